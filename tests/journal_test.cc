// The spare's metadata store, in the manner of LevelDB's log_test: what
// survives a truncated, torn, corrupt, stale or foreign journal, a destroyed
// or torn superblock, bad sectors inside the journal, and power cuts in the
// middle of appends and checkpoints (semantics.md, "Durability" 3 and 4).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>
#include <string>
#include <vector>

#include "dmremap/crc32c.h"
#include "test_util.h"

using namespace dmremap;

namespace {

constexpr uint64_t kMainSize = 1 << 20;  // 256 blocks of 4 KiB
constexpr uint64_t kSpareSize = 1 << 20;

Record remap(uint64_t block, uint64_t slot) {
  return Record{Record::kRemap, Cause::kWriteError, block, slot};
}
Record pending(uint64_t block) { return Record{Record::kPending, Cause::kManual, block, 0}; }
Record bad_slot(uint64_t slot) { return Record{Record::kBadSlot, Cause::kManual, 0, slot}; }

// A comparable picture of a table.
struct Snapshot {
  std::vector<std::pair<uint64_t, uint64_t>> entries;
  std::vector<uint64_t> bad_slots;
  uint64_t next_slot = 0;
  bool operator==(const Snapshot& o) const {
    return entries == o.entries && bad_slots == o.bad_slots && next_slot == o.next_slot;
  }
};
Snapshot snap(const RemapTable& t) {
  Snapshot s;
  t.for_each([&](const RemapTable::Entry& e) { s.entries.emplace_back(e.block, e.value); });
  s.bad_slots = t.bad_slots();
  std::sort(s.bad_slots.begin(), s.bad_slots.end());
  s.next_slot = t.next_slot();
  return s;
}
bool has_block(const RemapTable& t, uint64_t block) { return t.find(block).has_value(); }

// A formatted spare in memory behind a FaultyDevice, and a store open on it.
struct Spare {
  std::shared_ptr<MemoryDevice> mem = std::make_shared<MemoryDevice>(kSpareSize, "spare");
  std::shared_ptr<FaultyDevice> dev = std::make_shared<FaultyDevice>(mem, 512, "spare");
  std::unique_ptr<MetadataStore> store;
  RemapTable table;  // what the writer believes is durable

  explicit Spare(uint64_t journal_bytes = 16 * kMetaUnit) {
    LayoutParams lp;
    lp.main_size = kMainSize;
    lp.block_size = 4096;
    lp.journal_bytes = journal_bytes;
    REQUIRE(MetadataStore::format(*dev, lp, "").is_ok());
    auto s = MetadataStore::open(dev, table, true);
    REQUIRE(s.is_ok());
    store = std::move(s.value());
  }
  const Superblock& sb() const { return store->superblock(); }
  // Appends as the engine does: durable first, then applied.
  Status append(const std::vector<Record>& records) {
    Status s = store->append(records, table);
    if (s.is_ok()) {
      for (const Record& r : records) table.apply(r);
    }
    return s;
  }
  uint64_t unit_offset(int copy, uint64_t unit) const {
    return sb().journal_offset[copy] + unit * kMetaUnit;
  }
  void corrupt(uint64_t offset, size_t len, char value = 0x5a) {
    std::vector<char> junk(len, value);
    REQUIRE(mem->write(junk.data(), len, offset).is_ok());
  }
  void zero(uint64_t offset, size_t len) { corrupt(offset, len, 0); }
  // A reader's view, as after a crash: nothing written, nothing repaired.
  Result<std::unique_ptr<MetadataStore>> reopen(RemapTable& out, OpenReport* rep = nullptr,
                                                bool writable = false) {
    return MetadataStore::open(dev, out, writable, rep);
  }
};

// A valid-CRC journal unit written into both copies at `unit`.
void plant_unit(Spare& s, uint64_t unit, uint64_t epoch, const Uuid& uuid,
                const std::vector<Record>& records) {
  JournalUnit u;
  u.epoch = epoch;
  u.sequence = unit;
  u.uuid = uuid;
  u.records = records;
  std::vector<char> buf(kMetaUnit);
  u.encode(buf.data());
  for (int copy = 0; copy < 2; ++copy) {
    REQUIRE(s.mem->write(buf.data(), kMetaUnit, s.unit_offset(copy, unit)).is_ok());
  }
}

}  // namespace

TEST_CASE("journal: records across several units come back exactly", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(3, 0)}).is_ok());
  REQUIRE(s.append({pending(7)}).is_ok());
  REQUIRE(s.append({bad_slot(1), remap(9, 2)}).is_ok());
  // One append bigger than a unit spans two.
  std::vector<Record> many;
  for (uint64_t i = 0; i < kRecordsPerUnit + 20; ++i) many.push_back(remap(20 + i, 3 + i));
  REQUIRE(s.append(many).is_ok());
  REQUIRE(s.append({remap(7, 3 + many.size())}).is_ok());  // a pending block remapped

  RemapTable t;
  OpenReport rep;
  REQUIRE(s.reopen(t, &rep).is_ok());
  CHECK(snap(t) == snap(s.table));
  CHECK(rep.journal_units == 6);
  CHECK(rep.journal_records == 5 + many.size());
  CHECK(rep.journal_copy_repairs == 0);
  CHECK(t.pending() == 0);
  CHECK(t.remaps() == 3 + many.size());
  CHECK(t.bad_slots() == std::vector<uint64_t>{1});
}

TEST_CASE("journal: a truncated journal keeps every unit before the end", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  REQUIRE(s.append({remap(2, 1)}).is_ok());
  REQUIRE(s.append({remap(3, 2)}).is_ok());
  // The third unit never reached either copy.
  s.zero(s.unit_offset(0, 2), kMetaUnit);
  s.zero(s.unit_offset(1, 2), kMetaUnit);
  RemapTable t;
  OpenReport rep;
  REQUIRE(s.reopen(t, &rep).is_ok());
  CHECK(has_block(t, 1));
  CHECK(has_block(t, 2));
  CHECK_FALSE(has_block(t, 3));
  CHECK(rep.journal_units == 2);
}

TEST_CASE("journal: a torn last unit is not trusted", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  REQUIRE(s.append({remap(2, 1), remap(5, 2)}).is_ok());
  SECTION("second half of the sectors still hold older bytes in both copies") {
    s.corrupt(s.unit_offset(0, 1) + 2048, 2048);
    s.corrupt(s.unit_offset(1, 1) + 2048, 2048);
  }
  SECTION("a later sector of each copy kept older bytes") {
    s.corrupt(s.unit_offset(0, 1) + 512, 512, 0x11);
    s.corrupt(s.unit_offset(1, 1) + 7 * 512, 512, 0x22);
  }
  SECTION("one record's bytes changed in both copies") {
    s.corrupt(s.unit_offset(0, 1) + kJournalHeaderBytes + 3, 1, 0x7f);
    s.corrupt(s.unit_offset(1, 1) + kJournalHeaderBytes + 3, 1, 0x7f);
  }
  RemapTable t;
  REQUIRE(s.reopen(t).is_ok());
  CHECK(has_block(t, 1));
  CHECK_FALSE(has_block(t, 2));
  CHECK_FALSE(has_block(t, 5));
  CHECK(t.next_slot() == 1);
}

TEST_CASE("journal: a bad checksum in one copy is repaired from the other", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  REQUIRE(s.append({remap(2, 1)}).is_ok());
  REQUIRE(s.append({remap(3, 2)}).is_ok());
  s.corrupt(s.unit_offset(0, 1) + 100, 8);
  RemapTable t;
  OpenReport rep;
  REQUIRE(s.reopen(t, &rep).is_ok());
  CHECK(snap(t) == snap(s.table));
  CHECK(rep.journal_copy_repairs == 1);
  REQUIRE_FALSE(rep.warnings.empty());
  // check_metadata names the disagreement.
  const CheckReport c = check_metadata(s.dev);
  CHECK(std::any_of(c.problems.begin(), c.problems.end(), [](const std::string& p) {
    return p.find("journal unit 1 differs") != std::string::npos;
  }));
}

TEST_CASE("journal: a unit lost in the middle, with later units intact, is refused",
          "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  REQUIRE(s.append({remap(2, 1)}).is_ok());
  REQUIRE(s.append({remap(3, 2)}).is_ok());
  s.corrupt(s.unit_offset(0, 1) + 100, 8);
  s.corrupt(s.unit_offset(1, 1) + 100, 8);
  RemapTable t;
  auto r = s.reopen(t);
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().code() == EUCLEAN);
  CHECK(r.status().message().find("later units exist") != std::string::npos);
}

TEST_CASE("journal: a unit from an older epoch or another set is never replayed", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  const uint64_t epoch = s.sb().epoch;
  const Uuid uuid = s.sb().uuid;
  Uuid other = uuid;
  other[0] ^= 0xff;
  SECTION("control: the same unit with this epoch and set is replayed") {
    plant_unit(s, 1, epoch, uuid, {remap(9, 7)});
    RemapTable t;
    REQUIRE(s.reopen(t).is_ok());
    CHECK(has_block(t, 9));
  }
  SECTION("stale epoch") {
    plant_unit(s, 1, epoch - 1, uuid, {remap(9, 7)});
    RemapTable t;
    REQUIRE(s.reopen(t).is_ok());
    CHECK_FALSE(has_block(t, 9));
    CHECK(t.next_slot() == 1);
  }
  SECTION("another set's unit") {
    plant_unit(s, 1, epoch, other, {remap(9, 7)});
    RemapTable t;
    REQUIRE(s.reopen(t).is_ok());
    CHECK_FALSE(has_block(t, 9));
  }
  SECTION("a unit at the wrong position") {
    plant_unit(s, 2, epoch, uuid, {remap(9, 7)});
    s.zero(s.unit_offset(0, 1), kMetaUnit);
    s.zero(s.unit_offset(1, 1), kMetaUnit);
    // Unit 1 is empty, unit 2 valid: treated as loss in the middle.
    RemapTable t;
    CHECK(s.reopen(t).status().code() == EUCLEAN);
  }
  SECTION("records from before a recovery never come back") {
    // A recovery (writable open with a non-empty journal) checkpoints and
    // bumps the epoch; the old units stay on disk but are dead.
    RemapTable t1;
    auto recovered = s.reopen(t1, nullptr, /*writable=*/true);
    REQUIRE(recovered.is_ok());
    CHECK(recovered.value()->superblock().epoch == epoch + 1);
    recovered.value().reset();
    // The old epoch's unit 0 (remap 1 -> 0) is still in place; a record
    // planted with the old epoch at unit 1 must stay dead.
    plant_unit(s, 1, epoch, uuid, {remap(9, 7)});
    RemapTable t2;
    REQUIRE(s.reopen(t2).is_ok());
    CHECK(has_block(t2, 1));  // from the checkpoint
    CHECK_FALSE(has_block(t2, 9));
  }
}

TEST_CASE("superblocks: one destroyed copy is survivable, both are not", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(4, 0)}).is_ok());
  REQUIRE(s.store->checkpoint(s.table).is_ok());  // both copies now written
  REQUIRE(s.append({remap(5, 1)}).is_ok());
  for (int copy = 0; copy < 2; ++copy) {
    DYNAMIC_SECTION("copy " << copy << " destroyed") {
      // Whichever copy goes, nothing is lost: the older superblock is one
      // checkpoint behind, and the newer checkpoint is found and rolled
      // forward to rather than serving the older, stale state.
      s.zero(kSuperblockOffset[copy], kMetaUnit);
      RemapTable t;
      OpenReport rep;
      auto r = s.reopen(t, &rep);
      INFO(r.status().to_string());
      REQUIRE(r.is_ok());
      CHECK(snap(t) == snap(s.table));
      CHECK(has_block(t, 4));
      CHECK(has_block(t, 5));
      CHECK_FALSE(rep.other_superblock_valid);
      CHECK(rep.superblock_copy == 1 - copy);
      CHECK(r.value()->superblock().epoch == s.sb().epoch);
    }
  }
  SECTION("both destroyed") {
    s.zero(0, 2 * kMetaUnit);
    RemapTable t;
    auto r = s.reopen(t);
    REQUIRE_FALSE(r.is_ok());
    CHECK(r.status().code() == ENOENT);
    CHECK(r.status().message().find("dmremap format") != std::string::npos);
  }
}

TEST_CASE("superblocks: a torn new superblock leaves the previous state intact", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  REQUIRE(s.append({remap(2, 1)}).is_ok());
  const Snapshot before = snap(s.table);
  const uint64_t old_epoch = s.sb().epoch;
  REQUIRE(s.store->checkpoint(s.table).is_ok());
  // The checkpoint's superblock went to the older copy; tear it.
  const int newest = [&] {
    std::vector<char> b(kMetaUnit);
    uint64_t best = 0;
    int which = 0;
    for (int c = 0; c < 2; ++c) {
      REQUIRE(s.mem->read(b.data(), kMetaUnit, kSuperblockOffset[c]).is_ok());
      auto sb = Superblock::decode(b.data());
      if (sb && sb->generation >= best) {
        best = sb->generation;
        which = c;
      }
    }
    return which;
  }();
  s.corrupt(kSuperblockOffset[newest] + 120, 64);
  RemapTable t;
  OpenReport rep;
  auto r = s.reopen(t, &rep);
  REQUIRE(r.is_ok());
  // The older copy is chosen, and the checkpoint the torn one pointed to
  // (complete and flushed before it) is rolled forward to.
  CHECK(rep.superblock_copy == 1 - newest);
  CHECK(r.value()->superblock().epoch == old_epoch + 1);
  CHECK(std::any_of(rep.warnings.begin(), rep.warnings.end(), [](const std::string& w) {
    return w.find("rolled forward") != std::string::npos;
  }));
  CHECK(snap(t) == before);
  SECTION("and without the newer checkpoint, the older state is whole") {
    s.zero(s.sb().checkpoint_offset[s.sb().active_checkpoint], kMetaUnit);
    RemapTable t2;
    auto r2 = s.reopen(t2);
    REQUIRE(r2.is_ok());
    CHECK(r2.value()->superblock().epoch == old_epoch);
    CHECK(snap(t2) == before);
  }
}

TEST_CASE("journal: bad sectors inside the journal", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  REQUIRE(s.append({remap(2, 1)}).is_ok());
  SECTION("an unreadable sector in copy 0 is read from copy 1") {
    s.dev->add_read_error(s.unit_offset(0, 1) / 512 + 3);
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    CHECK(snap(t) == snap(s.table));
    CHECK(rep.journal_copy_repairs == 1);
  }
  SECTION("a sector that refuses writes fails the append, which claims nothing") {
    s.dev->add_write_error(s.unit_offset(1, 2) / 512);
    const Status st = s.append({remap(3, 2)});
    CHECK(st.code() == EIO);
    CHECK_FALSE(has_block(s.table, 3));
  }
}

TEST_CASE("journal: a full journal is checkpointed and nothing is lost", "[journal]") {
  Spare s(4 * kMetaUnit);  // four units
  for (uint64_t i = 0; i < 23; ++i) REQUIRE(s.append({remap(10 + i, i)}).is_ok());
  RemapTable t;
  OpenReport rep;
  REQUIRE(s.reopen(t, &rep).is_ok());
  CHECK(snap(t) == snap(s.table));
  CHECK(t.remaps() == 23);
  CHECK(rep.journal_units < 4);
  CHECK(rep.checkpoint_entries + rep.journal_records == 23);
  CHECK(s.sb().epoch > 1);
}

TEST_CASE("journal: a power cut during appends and checkpoints leaves the state before or after",
          "[journal]") {
  // For every operation on the spare, cut the power there (dropping or
  // tearing what was not flushed), then recover: the table must hold every
  // acknowledged append, plus or minus the one in flight.
  const int appends = 14;
  auto record_of = [](int i) {
    return i % 5 == 4 ? std::vector<Record>{bad_slot(static_cast<uint64_t>(i))}
                      : std::vector<Record>{remap(static_cast<uint64_t>(30 + i), static_cast<uint64_t>(i))};
  };
  uint64_t total_ticks = 0;
  {
    Spare s(4 * kMetaUnit);
    auto power = std::make_shared<PowerSwitch>();
    s.dev->attach(power);
    const uint64_t t0 = power->ticks();
    for (int i = 0; i < appends; ++i) REQUIRE(s.append(record_of(i)).is_ok());
    total_ticks = power->ticks() - t0;
  }
  REQUIRE(total_ticks > static_cast<uint64_t>(appends) * 2);
  uint64_t checked = 0;
  for (uint64_t n = 1; n <= total_ticks; ++n) {
    for (auto mode : {FaultyDevice::CutMode::kDrop, FaultyDevice::CutMode::kTear}) {
      Spare s(4 * kMetaUnit);
      auto power = std::make_shared<PowerSwitch>();
      s.dev->attach(power);
      power->cut_after(n);
      std::vector<Snapshot> states{snap(s.table)};
      int acked = 0;
      for (int i = 0; i < appends; ++i) {
        if (!s.append(record_of(i)).is_ok()) break;
        ++acked;
        states.push_back(snap(s.table));
      }
      // The state had the in-flight append succeeded.
      RemapTable with_next;
      for (int i = 0; i <= acked && i < appends; ++i) {
        for (const Record& r : record_of(i)) with_next.apply(r);
      }
      s.store.reset();
      s.dev->power_cut(mode, n);
      power->reset();
      RemapTable t;
      auto r = s.reopen(t, nullptr, /*writable=*/true);
      INFO("cut at operation " << n << (mode == FaultyDevice::CutMode::kTear ? " (tear)" : " (drop)")
                               << " after " << acked << " acknowledged appends");
      REQUIRE(r.is_ok());
      const Snapshot got = snap(t);
      const bool ok = got == states.back() || got == snap(with_next);
      CHECK(ok);
      ++checked;
    }
  }
  CHECK(checked == 2 * total_ticks);
}

TEST_CASE("crc32c: the Castagnoli check value, in one piece and in parts", "[journal]") {
  // docs/metadata-format.md promises this CRC to other tools.
  CHECK(crc32c("123456789", 9) == 0xE3069283u);
  CHECK(crc32c("56789", 5, crc32c("1234", 4)) == 0xE3069283u);
  std::vector<char> big(100000);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7);
  CHECK(crc32c(big.data(), big.size()) == crc32c(big.data() + 3, big.size() - 3, crc32c(big.data(), 3)));
}
