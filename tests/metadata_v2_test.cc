// Format version 2 (docs/metadata-format.md): mirrored checkpoints, slot
// headers, the rebuild from them, and the upgrade from version 1.
#include <catch2/catch.hpp>

#include <chrono>
#include <map>
#include <thread>

#include "dmremap/crc32c.h"
#include "dmremap/metadata_store.h"
#include "test_util.h"

using namespace dmremap;

namespace {
constexpr uint32_t B = 4096;

std::vector<char> read_ok(Engine& e, uint64_t offset, uint64_t len) {
  std::vector<char> buf(len);
  const Status s = e.read(buf.data(), len, offset);
  INFO(s.to_string());
  REQUIRE(s.is_ok());
  return buf;
}

// block -> (slot, cause) of every remap; pending blocks as slot ~0.
std::map<uint64_t, std::pair<uint64_t, Cause>> table_of(Engine& e) {
  std::map<uint64_t, std::pair<uint64_t, Cause>> m;
  e.for_each_entry(0, ~uint64_t{0} / 2, [&](const RemapTable::Entry& en) {
    m[en.block] = RemapTable::is_pending(en.value)
                      ? std::make_pair(~uint64_t{0}, Cause::kManual)
                      : std::make_pair(RemapTable::slot_of(en.value), RemapTable::cause_of(en.value));
  });
  return m;
}

// A set with remaps of every cause, one block moved off a slot that
// failed, one pending block, and records both in the checkpoint and in the
// journal. Returns the data each remapped block must read back.
std::map<uint64_t, std::vector<char>> populate(test::Set& s) {
  std::map<uint64_t, std::vector<char>> data;
  auto write = [&](uint64_t block, uint64_t seed) {
    data[block] = test::pattern(B, seed);
    REQUIRE(s.engine->write(data[block].data(), B, block * B, false).is_ok());
  };
  for (uint64_t b : {3u, 4u, 40u}) s.main->add_write_error(b);
  write(3, 1);
  write(4, 2);
  write(40, 3);
  // A weak block: rescued with main's data.
  data[9] = test::pattern(B, 4);
  REQUIRE(s.main_mem->write(data[9].data(), B, 9 * B).is_ok());
  s.main->add_weak_block(9, 1);
  REQUIRE(read_ok(*s.engine, 9 * B, B) == data[9]);
  // Manual.
  data[12] = test::pattern(B, 5);
  REQUIRE(s.main_mem->write(data[12].data(), B, 12 * B).is_ok());
  REQUIRE(s.engine->remap_block(12).is_ok());
  REQUIRE(s.engine->flush().is_ok());
  // Everything so far into a checkpoint (a clean close and reopen) ...
  REQUIRE(s.engine->close().is_ok());
  test::reopen(s);
  // ... and more in the journal: a pending block, a pending write, and a
  // block whose slot fails, so that it moves to a new one.
  s.main->add_read_error(20);
  std::vector<char> buf(B);
  REQUIRE(s.engine->read(buf.data(), B, 20 * B).code() == EIO);
  s.main->add_read_error(21);
  REQUIRE(s.engine->read(buf.data(), B, 21 * B).code() == EIO);
  write(21, 6);  // pending-write
  const auto slot4 = table_of(*s.engine).at(4).first;
  const uint64_t sector = (s.engine->superblock().slot_offset + slot4 * B) / 512;
  s.spare->add_write_error(sector);
  write(4, 7);  // its slot refuses: moves
  s.spare->clear_faults();
  REQUIRE(table_of(*s.engine).at(4).first != slot4);
  return data;
}
}  // namespace

namespace {
// populate(), then a clean close; `sb` gets the superblock it left.
test::Set populated_and_closed(Superblock& sb) {
  auto s = test::make_set();
  populate(s);
  REQUIRE(s.engine->close().is_ok());
  sb = s.engine->superblock();
  s.engine.reset();
  return s;
}
}  // namespace

TEST_CASE("format 2: the two copies of each structure lie apart, nothing overlaps",
          "[journal][format2]") {
  LayoutParams p;
  p.main_size = 64 << 20;
  p.spare_size = 16 << 20;
  auto sb = plan_layout(p);
  REQUIRE(sb.is_ok());
  const Superblock& s = sb.value();
  CHECK(s.version == 2);
  CHECK(s.geometry_problem().empty());
  CHECK(s.checkpoint_copies() == 2);
  // The slot header area separates the copies of every structure.
  CHECK(s.checkpoint_offset[1] < s.slot_header_offset);
  CHECK(s.journal_offset[0] < s.slot_header_offset);
  CHECK(s.slot_header_offset < s.checkpoint_copy_offset[0]);
  CHECK(s.slot_header_offset + s.slot_header_bytes <= s.checkpoint_copy_offset[0]);
  CHECK(s.slot_header_offset < s.journal_offset[1]);
  CHECK(s.slot_header_bytes >= slot_header_area_bytes(s.slot_count));
  // An encoded superblock comes back whole.
  std::vector<char> img(kMetaUnit);
  s.encode(img.data());
  auto back = Superblock::decode(img.data());
  REQUIRE(back.has_value());
  CHECK(back->checkpoint_copy_offset[1] == s.checkpoint_copy_offset[1]);
  CHECK(back->slot_header_offset == s.slot_header_offset);
  // A newer format, with a good CRC, is refused with words, not "not
  // formatted"; the same bytes with a bad CRC are noise.
  std::vector<char> newer = img;
  newer[8] = 3;
  std::string why;
  CHECK_FALSE(Superblock::decode(newer.data(), &why).has_value());
  CHECK(why.empty());
  const uint32_t crc = crc32c(newer.data(), kSuperblockCrcBytes);
  for (int i = 0; i < 4; ++i) newer[kSuperblockCrcBytes + i] = static_cast<char>(crc >> (8 * i));
  CHECK_FALSE(Superblock::decode(newer.data(), &why).has_value());
  CHECK_THAT(why, Catch::Contains("format version 3 is not one this dmremap reads"));
}

TEST_CASE("format 2: every slot handed out gets its header, with its block",
          "[engine][format2]") {
  auto s = test::make_set();
  const auto data = populate(s);
  const Superblock& sb = s.engine->superblock();
  for (const auto& [block, where] : table_of(*s.engine)) {
    if (where.first == ~uint64_t{0}) continue;
    std::vector<char> unit(kMetaUnit);
    REQUIRE(s.spare_mem->read(unit.data(), kMetaUnit, slot_header_unit(sb, where.first)).is_ok());
    auto desc = SlotHeaderUnit::decode(unit.data());
    REQUIRE(desc.has_value());
    CHECK(desc->uuid == sb.uuid);
    auto h = SlotHeader::decode(unit.data() + slot_header_pos(where.first));
    REQUIRE(h.has_value());
    CHECK(h->block == block);
    CHECK(h->slot == where.first);
    CHECK(h->cause == where.second);
    CHECK(h->uuid == sb.uuid);
  }
  CHECK(data.size() == 6);
}

TEST_CASE("format 2: rebuild from the slots alone gives back every remap and its data",
          "[engine][format2]") {
  auto s = test::make_set();
  const auto data = populate(s);
  auto before = table_of(*s.engine);
  REQUIRE(s.engine->flush().is_ok());
  s.engine.reset();  // a crash, as good as any: the metadata goes next
  const Superblock sb = [&] {
    auto f = read_superblock(*s.spare_mem);
    REQUIRE(f.is_ok());
    return f->sb;
  }();
  const bool keep_superblocks = GENERATE(false, true);
  INFO("superblocks kept: " << keep_superblocks);
  // Every copy of the table gone: checkpoints and journals (and the
  // superblocks too, unless kept).
  const std::vector<char> zeros(sb.checkpoint_bytes);
  for (int area = 0; area < 2; ++area) {
    for (int copy = 0; copy < 2; ++copy) {
      REQUIRE(s.spare_mem->write(zeros.data(), sb.checkpoint_bytes, sb.checkpoint_at(area, copy)).is_ok());
    }
  }
  const std::vector<char> jz(sb.journal_bytes);
  for (int copy = 0; copy < 2; ++copy) {
    REQUIRE(s.spare_mem->write(jz.data(), sb.journal_bytes, sb.journal_offset[copy]).is_ok());
  }
  if (!keep_superblocks) {
    const std::vector<char> z(2 * kMetaUnit);
    REQUIRE(s.spare_mem->write(z.data(), z.size(), 0).is_ok());
  }
  {
    RemapTable t;
    REQUIRE_FALSE(MetadataStore::open(s.spare, t, false).is_ok());
  }
  auto r = rebuild_metadata(s.spare);
  INFO(r.status().to_string());
  REQUIRE(r.is_ok());
  CHECK(r->geometry_from_backup == !keep_superblocks);
  test::reopen(s);
  auto after = table_of(*s.engine);
  // The pending block (20) is not in any slot; every remap is back, in its
  // slot, with its cause.
  before.erase(20);
  CHECK(after == before);
  CHECK(r->remaps == before.size());
  // The slot block 4 left is bad, never handed out again.
  CHECK(r->bad_slots == 1);
  for (const auto& [block, bytes] : data) CHECK(read_ok(*s.engine, block * B, B) == bytes);
  // Block 20 is still unreadable on main: it fails, and is pending again.
  std::vector<char> buf(B);
  CHECK(s.engine->read(buf.data(), B, 20 * B).code() == EIO);
  CHECK(s.engine->stats().pending == 1);
  // The set goes on: a new remap takes a slot nobody holds.
  s.main->add_write_error(50);
  const auto more = test::pattern(B, 99);
  REQUIRE(s.engine->write(more.data(), B, 50 * B, false).is_ok());
  test::reopen(s);
  CHECK(read_ok(*s.engine, 50 * B, B) == more);
  for (const auto& [block, bytes] : data) CHECK(read_ok(*s.engine, block * B, B) == bytes);
  CHECK(check_metadata(s.spare).problems.empty());
}

TEST_CASE("format 2: a rebuild trusts no header of another set, of another slot, or damaged",
          "[engine][format2]") {
  auto s = test::make_set();
  const auto data = populate(s);
  REQUIRE(s.engine->close().is_ok());
  const Superblock sb = s.engine->superblock();
  s.engine.reset();
  const uint64_t slot = table_of(*([&] {
                                   test::reopen(s);
                                   return s.engine.get();
                                 }()))
                            .at(3)
                            .first;
  s.engine.reset();
  std::vector<char> unit(kMetaUnit);
  const uint64_t at = slot_header_unit(sb, slot);
  REQUIRE(s.spare_mem->read(unit.data(), kMetaUnit, at).is_ok());
  SECTION("a header of another set") {
    SlotHeader h{random_uuid(), slot, 3, 1, Cause::kWriteError};
    h.encode(unit.data() + slot_header_pos(slot));
  }
  SECTION("a header that names another slot") {
    SlotHeader h{sb.uuid, slot + 1, 3, 1, Cause::kWriteError};
    h.encode(unit.data() + slot_header_pos(slot));
  }
  SECTION("a header with a flipped bit") { unit[slot_header_pos(slot) + 33] ^= 1; }
  REQUIRE(s.spare_mem->write(unit.data(), kMetaUnit, at).is_ok());
  auto r = rebuild_metadata(s.spare);
  REQUIRE(r.is_ok());
  test::reopen(s);
  const auto after = table_of(*s.engine);
  CHECK(after.count(3) == 0);  // not taken as block 3's data
  // Its slot is below the highest header: unknown, so bad, never reused.
  CHECK(r->bad_slots == 2);
}

namespace {
// A version 1 spare, written byte by byte as docs/metadata-format.md
// described version 1: one checkpoint copy per area, no slot headers, the
// superblock CRC at byte 252. `remaps` go into the checkpoint, `journaled`
// into one journal unit; the slots get `data`.
struct V1Spare {
  std::shared_ptr<MemoryDevice> mem;
  Superblock sb;
};
V1Spare make_v1(uint64_t main_size, uint64_t spare_size,
                const std::vector<std::pair<uint64_t, uint64_t>>& remaps,
                const std::vector<std::pair<uint64_t, uint64_t>>& journaled,
                const std::vector<uint64_t>& pending) {
  V1Spare v;
  v.mem = std::make_shared<MemoryDevice>(spare_size, "spare");
  Superblock& sb = v.sb;
  sb.version = 1;
  sb.uuid = random_uuid();
  sb.main_size = main_size;
  sb.block_size = B;
  sb.spare_size = spare_size;
  sb.journal_bytes = 4 * kMetaUnit;
  const uint64_t slots_guess = spare_size / B;
  sb.pending_capacity = 64;
  sb.checkpoint_bytes = (kMetaUnit + (slots_guess + 64) * 16 + kMetaUnit - 1) / kMetaUnit * kMetaUnit;
  sb.checkpoint_offset[0] = 2 * kMetaUnit;
  sb.checkpoint_offset[1] = sb.checkpoint_offset[0] + sb.checkpoint_bytes;
  sb.journal_offset[0] = sb.checkpoint_offset[1] + sb.checkpoint_bytes;
  sb.journal_offset[1] = sb.journal_offset[0] + sb.journal_bytes;
  sb.slot_offset = sb.journal_offset[1] + sb.journal_bytes;
  sb.slot_count = (spare_size - sb.slot_offset) / B;
  sb.epoch = 5;
  sb.active_checkpoint = 1;
  sb.generation = 9;
  sb.flags = 0;  // not closed cleanly: the journal counts
  // Superblock: the version 2 image, turned into version 1.
  std::vector<char> img(kMetaUnit);
  sb.encode(img.data());
  img[8] = 1;
  img[12] = 0;
  img[13] = 1;  // header_bytes 256
  std::fill(img.begin() + 223, img.begin() + 256, 0);
  const uint32_t crc = crc32c(img.data(), 252);
  for (int i = 0; i < 4; ++i) img[252 + i] = static_cast<char>(crc >> (8 * i));
  REQUIRE(Superblock::decode(img.data()).has_value());
  REQUIRE(Superblock::decode(img.data())->version == 1);
  for (int copy = 0; copy < 2; ++copy) {
    img[16] = static_cast<char>(sb.generation - 1 + copy);
    const uint32_t c2 = crc32c(img.data(), 252);
    for (int i = 0; i < 4; ++i) img[252 + i] = static_cast<char>(c2 >> (8 * i));
    REQUIRE(v.mem->write(img.data(), kMetaUnit, kSuperblockOffset[copy]).is_ok());
  }
  // The checkpoint: entries in block order, then its header.
  std::vector<std::pair<uint64_t, uint64_t>> entries;
  for (auto [block, slot] : remaps) entries.push_back({block, slot | (uint64_t{4} << 56)});
  for (uint64_t b : pending) entries.push_back({b, ~uint64_t{0}});
  std::sort(entries.begin(), entries.end());
  std::vector<char> ents(std::max<size_t>(entries.size() * 16, 1));
  for (size_t i = 0; i < entries.size(); ++i) {
    for (int k = 0; k < 8; ++k) {
      ents[i * 16 + k] = static_cast<char>(entries[i].first >> (8 * k));
      ents[i * 16 + 8 + k] = static_cast<char>(entries[i].second >> (8 * k));
    }
  }
  uint64_t next_slot = 0;
  for (auto [block, slot] : remaps) next_slot = std::max(next_slot, slot + 1);
  CheckpointHeader h;
  h.version = 1;
  h.epoch = sb.epoch;
  h.entries = entries.size();
  h.next_slot = next_slot;
  h.entries_crc = crc32c(ents.data(), entries.size() * 16);
  h.uuid = sb.uuid;
  std::vector<char> head(kMetaUnit);
  h.encode(head.data());
  const uint64_t area = sb.checkpoint_offset[sb.active_checkpoint];
  REQUIRE(v.mem->write(head.data(), kMetaUnit, area).is_ok());
  std::vector<char> padded((ents.size() + kMetaUnit - 1) / kMetaUnit * kMetaUnit);
  std::copy(ents.begin(), ents.end(), padded.begin());
  REQUIRE(v.mem->write(padded.data(), padded.size(), area + kMetaUnit).is_ok());
  // One journal unit, in both copies.
  if (!journaled.empty()) {
    JournalUnit u;
    u.epoch = sb.epoch;
    u.sequence = 0;
    u.uuid = sb.uuid;
    for (auto [block, slot] : journaled) u.records.push_back(Record{Record::kRemap, Cause::kWriteError, block, slot});
    std::vector<char> ub(kMetaUnit);
    u.encode(ub.data());
    for (int copy = 0; copy < 2; ++copy) {
      REQUIRE(v.mem->write(ub.data(), kMetaUnit, sb.journal_offset[copy]).is_ok());
    }
  }
  // Slot data.
  for (auto list : {remaps, journaled}) {
    for (auto [block, slot] : list) {
      const auto d = test::pattern(B, block);
      REQUIRE(v.mem->write(d.data(), B, sb.slot_offset + slot * B).is_ok());
    }
  }
  return v;
}
}  // namespace

TEST_CASE("format 1: read as it is; a writable open is refused and names the upgrade",
          "[journal][format2]") {
  auto v = make_v1(1 << 20, 1 << 20, {{3, 0}, {7, 1}}, {{9, 2}}, {11});
  RemapTable t;
  OpenReport rep;
  auto r = MetadataStore::open(v.mem, t, /*writable=*/false, &rep);
  INFO(r.status().to_string());
  REQUIRE(r.is_ok());
  CHECK(r.value()->superblock().version == 1);
  CHECK(t.remaps() == 3);
  CHECK(t.pending() == 1);
  RemapTable tw;
  auto w = MetadataStore::open(v.mem, tw, /*writable=*/true);
  REQUIRE_FALSE(w.is_ok());
  CHECK(w.status().code() == ENOTSUP);
  CHECK_THAT(w.status().message(), Catch::Contains("dmremap upgrade --spare"));
}

TEST_CASE("format 1 to 2: the upgrade keeps every remap, pending block and byte",
          "[engine][format2]") {
  auto v = make_v1(1 << 20, 1 << 20, {{3, 0}, {7, 1}}, {{9, 2}}, {11});
  auto spare = std::make_shared<FaultyDevice>(v.mem, 512, "spare");
  auto r = upgrade_metadata(spare);
  INFO(r.status().to_string());
  REQUIRE(r.is_ok());
  CHECK(r->headers == 3);
  CHECK(r->slots_after < r->slots_before);
  CHECK(upgrade_metadata(spare).status().code() == EALREADY);
  auto main_mem = std::make_shared<MemoryDevice>(1 << 20, "main");
  auto main = std::make_shared<FaultyDevice>(main_mem, B, "main");
  auto e = Engine::open(main, spare, EngineOptions{});
  INFO(e.status().to_string());
  REQUIRE(e.is_ok());
  CHECK(e.value()->superblock().version == 2);
  for (uint64_t b : {3u, 7u, 9u}) CHECK(read_ok(*e.value(), b * B, B) == test::pattern(B, b));
  CHECK(e.value()->stats().pending == 1);
  // It serves as version 2: a new remap gets its header, and a rebuild
  // finds the old remaps too.
  main->add_write_error(30);
  const auto d = test::pattern(B, 30);
  REQUIRE(e.value()->write(d.data(), B, 30 * B, false).is_ok());
  REQUIRE(e.value()->close().is_ok());
  CHECK(check_metadata(spare).problems.empty());
  auto rb = rebuild_metadata(spare);
  REQUIRE(rb.is_ok());
  CHECK(rb->remaps == 4);
}

TEST_CASE("format 1 to 2: a power cut at any point of the upgrade leaves a set that opens",
          "[engine][format2][durability]") {
  uint64_t cuts = 0;
  bool done = false;
  const auto expected = [] {
    auto v = make_v1(1 << 20, 1 << 20, {{3, 0}, {7, 1}}, {{9, 2}}, {11});
    RemapTable t;
    REQUIRE(MetadataStore::open(v.mem, t, false).is_ok());
    std::vector<RemapTable::Entry> e;
    t.for_each([&](const RemapTable::Entry& x) { e.push_back(x); });
    return e;
  }();
  for (uint64_t n = 1; !done; ++n) {
   for (auto mode : {FaultyDevice::CutMode::kDrop, FaultyDevice::CutMode::kTear}) {
    auto v = make_v1(1 << 20, 1 << 20, {{3, 0}, {7, 1}}, {{9, 2}}, {11});
    auto spare = std::make_shared<FaultyDevice>(v.mem, 512, "spare");
    auto power = std::make_shared<PowerSwitch>();
    spare->attach(power);
    power->cut_after(n);
    auto r = upgrade_metadata(spare);
    if (r.is_ok()) {  // past its last write
      done = true;
      break;
    }
    spare->power_cut(mode, n);
    power->reset();
    ++cuts;
    INFO("cut at write " << n << (mode == FaultyDevice::CutMode::kDrop ? ", dropped" : ", torn"));
    RemapTable t;
    auto open = MetadataStore::open(spare, t, false);
    INFO(open.status().to_string());
    REQUIRE(open.is_ok());
    std::vector<RemapTable::Entry> got;
    t.for_each([&](const RemapTable::Entry& x) { got.push_back(x); });
    CHECK(got == expected);
    for (uint64_t b : {3u, 7u, 9u}) {
      const uint64_t slot = RemapTable::slot_of(
          std::find_if(got.begin(), got.end(), [&](const auto& x) { return x.block == b; })->value);
      std::vector<char> bytes(B);
      REQUIRE(v.mem->read(bytes.data(), B, open.value()->superblock().slot_offset + slot * B).is_ok());
      CHECK(bytes == test::pattern(B, b));
    }
    // The upgrade can be run again, and then the set serves.
    auto again = upgrade_metadata(spare);
    INFO(again.status().to_string());
    REQUIRE((again.is_ok() || again.status().code() == EALREADY));
    RemapTable t2;
    REQUIRE(MetadataStore::open(spare, t2, true).is_ok());
    CHECK(t2.remaps() == 3);
    CHECK(check_metadata(spare).problems.empty());
    REQUIRE(n < 100);
   }
  }
  CHECK(cuts >= 12);
}

TEST_CASE("format 1 to 2: refused when the last slots of the pool are in use", "[format2]") {
  auto probe = make_v1(1 << 20, 1 << 20, {}, {}, {});
  const uint64_t last = probe.sb.slot_count - 1;
  auto v = make_v1(1 << 20, 1 << 20, {{3, last}}, {}, {});
  auto r = upgrade_metadata(v.mem);
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().code() == ENOSPC);
  CHECK_THAT(r.status().message(), Catch::Contains("are in use"));
  RemapTable t;
  REQUIRE(MetadataStore::open(v.mem, t, false).is_ok());  // untouched
  CHECK(t.remaps() == 1);
}

TEST_CASE("format 2: check reads every checkpoint copy and every remapped slot's header",
          "[engine][format2]") {
  Superblock sb;
  auto s = populated_and_closed(sb);
  {
    const CheckReport c = check_metadata(s.spare);
    INFO((c.problems.empty() ? std::string() : c.problems.front()));
    CHECK(c.problems.empty());
    CHECK(std::any_of(c.notes.begin(), c.notes.end(), [](const std::string& n) {
      return n.find("slot headers: 6 of 6 remapped slots match") != std::string::npos;
    }));
  }
  SECTION("a damaged copy of the active checkpoint") {
    const std::vector<char> junk(kMetaUnit, 0x33);
    REQUIRE(s.spare_mem->write(junk.data(), kMetaUnit,
                               sb.checkpoint_at(static_cast<int>(sb.active_checkpoint), 1)).is_ok());
    const CheckReport c = check_metadata(s.spare);
    REQUIRE(c.problems.size() == 1);
    CHECK_THAT(c.problems[0], Catch::Contains("copy 1: header is damaged"));
  }
  SECTION("a slot header that names another block") {
    RemapTable t;
    auto st = MetadataStore::open(s.spare, t, false);
    REQUIRE(st.is_ok());
    uint64_t slot = 0;
    uint64_t block = 0;
    t.for_each([&](const RemapTable::Entry& e) {
      if (!RemapTable::is_pending(e.value)) {
        slot = RemapTable::slot_of(e.value);
        block = e.block;
      }
    });
    std::vector<char> unit(kMetaUnit);
    REQUIRE(s.spare_mem->read(unit.data(), kMetaUnit, slot_header_unit(sb, slot)).is_ok());
    SlotHeader{sb.uuid, slot, block + 1, 1, Cause::kWriteError}.encode(unit.data() + slot_header_pos(slot));
    REQUIRE(s.spare_mem->write(unit.data(), kMetaUnit, slot_header_unit(sb, slot)).is_ok());
    const CheckReport c = check_metadata(s.spare);
    REQUIRE(c.problems.size() == 1);
    CHECK_THAT(c.problems[0], Catch::Contains("names block " + std::to_string(block + 1)));
  }
}

namespace {
void zero(MemoryDevice& m, uint64_t offset, uint64_t len) {
  const std::vector<char> z(len);
  REQUIRE(m.write(z.data(), len, offset).is_ok());
}
// Zeroes both superblocks; with `tables`, also every checkpoint and journal copy.
void wipe(MemoryDevice& m, const Superblock& sb, bool tables) {
  zero(m, 0, 2 * kMetaUnit);
  if (!tables) return;
  for (int area = 0; area < 2; ++area) {
    for (int copy = 0; copy < 2; ++copy) zero(m, sb.checkpoint_at(area, copy), sb.checkpoint_bytes);
  }
  for (int copy = 0; copy < 2; ++copy) zero(m, sb.journal_offset[copy], sb.journal_bytes);
}
Superblock current(MemoryDevice& m) {
  auto f = read_superblock(m);
  REQUIRE(f.is_ok());
  return f->sb;
}
}  // namespace

TEST_CASE("format 2: with only the superblocks lost, rebuild keeps everything, pending too",
          "[engine][format2]") {
  auto s = test::make_set();
  const auto data = populate(s);
  const auto before = table_of(*s.engine);
  s.engine.reset();
  wipe(*s.spare_mem, current(*s.spare_mem), /*tables=*/false);
  auto r = rebuild_metadata(s.spare);
  INFO(r.status().to_string());
  REQUIRE(r.is_ok());
  CHECK(r->geometry_from_backup);
  CHECK(r->from_checkpoint);
  CHECK(r->pending == 1);
  test::reopen(s);
  CHECK(table_of(*s.engine) == before);  // block 20 still pending
  for (const auto& [block, bytes] : data) CHECK(read_ok(*s.engine, block * B, B) == bytes);
}

TEST_CASE("format 2: a rebuild after format --force finds the newest set, not an older one",
          "[engine][format2]") {
  // The old set: a small journal, so that its geometry's copy lies earlier
  // on the spare than the new set's.
  test::SetParams p;
  p.journal_bytes = 64 * 1024;
  auto s = test::make_set(p);
  for (uint64_t b : {1u, 2u, 3u}) s.main->add_write_error(b);
  const auto junk = test::pattern(B, 5);
  for (uint64_t b : {1u, 2u, 3u}) REQUIRE(s.engine->write(junk.data(), B, b * B, false).is_ok());
  REQUIRE(s.engine->close().is_ok());
  s.engine.reset();
  s.main->clear_faults();
  const Superblock old = current(*s.spare_mem);
  // The new set, formatted over it a second later, with a bigger journal.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  LayoutParams lp;
  lp.main_size = 1 << 20;
  lp.journal_bytes = 192 * 1024;
  REQUIRE(MetadataStore::format(*s.spare, lp, "").is_ok());
  const Superblock now = current(*s.spare_mem);
  REQUIRE(now.slot_header_offset > old.slot_header_offset);
  test::reopen(s);
  std::map<uint64_t, std::vector<char>> data;
  for (uint64_t b : {10u, 11u}) {
    s.main->add_write_error(b);
    data[b] = test::pattern(B, b);
    REQUIRE(s.engine->write(data[b].data(), B, b * B, false).is_ok());
  }
  REQUIRE(s.engine->close().is_ok());
  s.engine.reset();
  wipe(*s.spare_mem, now, /*tables=*/true);
  auto r = rebuild_metadata(s.spare);
  INFO(r.status().to_string());
  REQUIRE(r.is_ok());
  CHECK(current(*s.spare_mem).uuid == now.uuid);
  test::reopen(s);
  const auto after = table_of(*s.engine);
  CHECK(after.size() == 2);
  CHECK(after.count(1) == 0);
  for (const auto& [block, bytes] : data) CHECK(read_ok(*s.engine, block * B, B) == bytes);
}

TEST_CASE("format 2: the header of a remap that never committed is not taken by a rebuild",
          "[engine][format2]") {
  auto s = test::make_set();
  const Superblock sb = s.engine->superblock();
  // The journal refuses: the remap of block 7 writes its slot and header,
  // then fails, and the set refuses writes until it is reopened.
  for (int copy = 0; copy < 2; ++copy) {
    for (uint64_t sec = 0; sec < sb.journal_bytes / 512; ++sec) {
      s.spare->add_write_error(sb.journal_offset[copy] / 512 + sec);
    }
  }
  s.main->add_write_error(7);
  const auto d = test::pattern(B, 7);
  REQUIRE_FALSE(s.engine->write(d.data(), B, 7 * B, false).is_ok());
  std::vector<char> unit(kMetaUnit);
  REQUIRE(s.spare_mem->read(unit.data(), kMetaUnit, slot_header_unit(sb, 0)).is_ok());
  REQUIRE(SlotHeader::decode(unit.data() + slot_header_pos(0)).has_value());  // it was written
  s.spare->clear_faults();
  test::reopen(s);  // the writable open clears it
  REQUIRE(s.spare_mem->read(unit.data(), kMetaUnit, slot_header_unit(sb, 0)).is_ok());
  CHECK_FALSE(SlotHeader::decode(unit.data() + slot_header_pos(0)).has_value());
  // Block 7 goes to main after all (the write fault is gone).
  s.main->clear_faults();
  REQUIRE(s.engine->write(d.data(), B, 7 * B, false).is_ok());
  REQUIRE(s.engine->close().is_ok());
  s.engine.reset();
  wipe(*s.spare_mem, sb, /*tables=*/true);
  auto r = rebuild_metadata(s.spare);
  REQUIRE(r.is_ok());
  CHECK(r->remaps == 0);
  test::reopen(s);
  CHECK(read_ok(*s.engine, 7 * B, B) == d);
}

TEST_CASE("format 2: a header unit that cannot be read costs its slots, said so, never reused",
          "[engine][format2]") {
  Superblock sb;
  auto s = populated_and_closed(sb);
  wipe(*s.spare_mem, sb, /*tables=*/true);
  s.spare->add_read_error(slot_header_unit(sb, 0) / 512 + 3);
  auto r = rebuild_metadata(s.spare);
  INFO(r.status().to_string());
  REQUIRE(r.is_ok());
  CHECK(r->remaps == 0);
  CHECK(r->unreadable_units == 1);
  CHECK(std::any_of(r->warnings.begin(), r->warnings.end(), [](const std::string& w) {
    return w.find("slots 0-62 cannot be read") != std::string::npos;
  }));
  CHECK(r->bad_slots == 63);
  // A new remap does not land on a slot that may hold an old block's data.
  s.spare->clear_faults();
  test::reopen(s);
  s.main->add_write_error(50);
  const auto d = test::pattern(B, 50);
  REQUIRE(s.engine->write(d.data(), B, 50 * B, false).is_ok());
  CHECK(table_of(*s.engine).at(50).first >= 63);
}

TEST_CASE("format 2: a damaged second checkpoint copy or geometry copy is found and repaired",
          "[engine][format2]") {
  auto s = test::make_set();
  populate(s);
  REQUIRE(s.engine->close().is_ok());
  s.engine.reset();
  const Superblock sb = current(*s.spare_mem);
  const std::vector<char> junk(kMetaUnit, 0x5a);
  SECTION("copy 1 of the active checkpoint") {
    REQUIRE(s.spare_mem->write(junk.data(), kMetaUnit,
                               sb.checkpoint_at(static_cast<int>(sb.active_checkpoint), 1)).is_ok());
  }
  SECTION("the geometry's copy") {
    REQUIRE(s.spare_mem->write(junk.data(), kMetaUnit, sb.slot_header_offset).is_ok());
  }
  CHECK(check_metadata(s.spare).problems.size() == 1);
  RemapTable t;
  OpenReport rep;
  REQUIRE(MetadataStore::open(s.spare, t, /*writable=*/true, &rep).is_ok());
  CHECK(rep.warnings.size() == 1);
  const CheckReport after = check_metadata(s.spare);
  INFO((after.problems.empty() ? std::string() : after.problems.front()));
  CHECK(after.problems.empty());
}
