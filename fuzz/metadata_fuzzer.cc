// libFuzzer target: open a set whose spare metadata has been damaged.
//
// The base is a real spare, made once per process through the engine: three
// remaps, a clean close (checkpoint), three more remaps, a pending block and
// a slot that failed, then a crash (no close), so that opening it replays
// journal units on top of a checkpoint. After every step the table is kept:
// that list is the set's history.
//
// Each input is a list of patches to the metadata area of a copy of that
// spare: bytes written at an offset, or a whole 4096-byte unit copied over
// another (a valid unit in the wrong place, with the wrong sequence). Then
// the engine opens it. The properties:
// - it never crashes, hangs or allocates without bound (libFuzzer and the
//   sanitizers watch those);
// - when it opens, the table is one of the history's states: a record whose
//   checksum, sequence, epoch or set is wrong is never applied, so damage
//   can only lose a suffix of the history or make the open fail;
// - the opened engine reads every block without crashing;
// - when the open is refused, `rebuild_metadata` does not crash and its set
//   opens: from the checkpoint and journal (only the superblocks were
//   lost), with a table the set had; from the slot headers, with no
//   pending block and only remaps the set had.
//
// Input: repeated [kind:1][offset:3][len:1][len bytes] (kind even: write
// bytes; odd: copy the unit at offset to the unit at the next 3 bytes).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "dmremap/engine.h"
#include "dmremap/faulty_device.h"
#include "dmremap/log.h"
#include "dmremap/memory_device.h"
#include "dmremap/metadata.h"
#include "dmremap/metadata_store.h"

using namespace dmremap;

namespace {

// Small devices keep each run cheap: the metadata is what is fuzzed.
constexpr uint64_t kMainSize = 256 << 10;
constexpr uint64_t kSpareSize = 256 << 10;
constexpr uint32_t kBlock = 4096;
constexpr uint64_t kBlocks = kMainSize / kBlock;

using Table = std::vector<std::pair<uint64_t, uint64_t>>;  // block -> entry value

Table table_of(Engine& e) {
  Table t;
  e.for_each_entry(0, kBlocks, [&](const RemapTable::Entry& x) { t.emplace_back(x.block, x.value); });
  return t;
}

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "metadata_fuzzer: %s\n", what);
  std::abort();
}

struct Base {
  std::vector<char> spare;     // the crashed spare's bytes
  uint64_t metadata_end = 0;   // slot 0's offset: patches stay before it
  std::vector<Table> history;  // every state the set went through
};

Base make_base() {
  set_log_sink([](LogLevel, const std::string&) {});
  auto main_mem = std::make_shared<MemoryDevice>(kMainSize, "main");
  auto spare_mem = std::make_shared<MemoryDevice>(kSpareSize, "spare");
  auto main = std::make_shared<FaultyDevice>(main_mem, kBlock, "main");
  auto spare = std::make_shared<FaultyDevice>(spare_mem, 512, "spare");
  LayoutParams lp;
  lp.main_size = kMainSize;
  lp.block_size = kBlock;
  lp.journal_bytes = 4 * kMetaUnit;  // small, so patches often land in it
  auto sb = MetadataStore::format(*spare, lp, "");
  if (!sb.is_ok()) die("format failed");
  Base b;
  b.metadata_end = sb.value().slot_offset;
  std::vector<char> data(kBlock, 'x');
  auto open = [&] {
    auto e = Engine::open(main, spare, {});
    if (!e.is_ok()) die("open of the base failed");
    return std::move(e.value());
  };
  auto e = open();
  b.history.push_back(table_of(*e));
  auto remap = [&](uint64_t block) {
    main->add_write_error(block);
    if (!e->write(data.data(), kBlock, block * kBlock, false).is_ok()) die("remap failed");
    b.history.push_back(table_of(*e));
  };
  for (uint64_t block : {3, 17, 40}) remap(block);
  if (!e->close().is_ok()) die("close failed");
  e = open();
  for (uint64_t block : {5, 50}) remap(block);
  // The next free slot refuses the write: it is recorded bad with the remap.
  spare->add_write_error((sb.value().slot_offset + 5 * kBlock) / 512);
  remap(60);
  main->add_read_error(33);
  std::vector<char> buf(kBlock);
  (void)e->read(buf.data(), kBlock, 33 * kBlock);  // pending
  b.history.push_back(table_of(*e));
  e.reset();  // a crash: the journal stays to be replayed
  b.spare = spare_mem->contents();
  return b;
}

uint32_t get24(const uint8_t* p) { return (uint32_t{p[0]} << 16) | (uint32_t{p[1]} << 8) | p[2]; }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Base base = make_base();
  // The devices live for the whole run and the spare is rewritten each time:
  // allocating them afresh made page faults most of the cost of a run.
  static const auto main = std::make_shared<MemoryDevice>(kMainSize, "main");
  static const auto spare = std::make_shared<MemoryDevice>(kSpareSize, "spare");
  auto put = [](const void* p, size_t n, uint64_t offset) {
    if (!spare->write(p, n, offset).is_ok()) die("write to the memory spare failed");
  };
  put(base.spare.data(), base.spare.size(), 0);
  const uint64_t units = base.metadata_end / kMetaUnit;
  std::vector<char> unit(kMetaUnit);
  size_t i = 0;
  while (i + 5 <= size) {
    const uint8_t kind = data[i];
    const uint64_t offset = get24(data + i + 1) % base.metadata_end;
    const size_t len = data[i + 4];
    i += 5;
    if (kind % 2 == 0) {
      const size_t n = std::min({len, size - i, static_cast<size_t>(base.metadata_end - offset)});
      if (n > 0) put(data + i, n, offset);
      i += n;
    } else if (i + 3 <= size) {
      const uint64_t from = (offset / kMetaUnit) % units, to = get24(data + i) % units;
      i += 3;
      if (!spare->read(unit.data(), kMetaUnit, from * kMetaUnit).is_ok()) die("read failed");
      put(unit.data(), kMetaUnit, to * kMetaUnit);
    }
  }

  auto e = Engine::open(main, spare, {});
  if (!e.is_ok()) {
    // Refused: allowed. Then the rebuild from the slot headers, which the
    // patches may have damaged too, must not crash either, and whatever it
    // finds is a remap the set had: a block in a slot that held it.
    auto report = rebuild_metadata(spare);
    if (!report.is_ok()) return 0;
    auto rebuilt = Engine::open(main, spare, {});
    if (!rebuilt.is_ok()) die("a rebuilt set does not open");
    if (report->from_checkpoint) {
      // Only the superblocks were lost: the checkpoint and journal give a
      // state the set had, as an open does.
      const Table t = table_of(*rebuilt.value());
      if (std::find(base.history.begin(), base.history.end(), t) == base.history.end()) {
        die("a rebuild from the checkpoint gave a table the set never had");
      }
      return 0;
    }
    for (const auto& found : table_of(*rebuilt.value())) {
      const uint64_t block = found.first;
      const uint64_t value = found.second;
      if (RemapTable::is_pending(value)) die("a rebuild invented a pending block");
      const bool known = std::any_of(base.history.begin(), base.history.end(), [&](const Table& h) {
        return std::any_of(h.begin(), h.end(), [&](const auto& entry) {
          return entry.first == block && !RemapTable::is_pending(entry.second) &&
                 RemapTable::slot_of(entry.second) == RemapTable::slot_of(value);
        });
      });
      if (!known) die("a rebuild put a block in a slot that never held it");
    }
    return 0;
  }
  const Table t = table_of(*e.value());
  if (std::find(base.history.begin(), base.history.end(), t) == base.history.end()) {
    std::fprintf(stderr, "opened a table the set never had (%zu entries)\n", t.size());
    std::abort();
  }
  std::vector<char>& buf = unit;
  for (uint64_t b = 0; b < kBlocks; ++b) (void)e.value()->read(buf.data(), kBlock, b * kBlock);
  return 0;
}
