// The spare's metadata store, in the manner of LevelDB's log_test: what
// survives a truncated, torn, corrupt, stale or foreign journal, a destroyed
// or torn superblock, bad sectors inside the journal, a full journal, and
// power cuts in the middle of appends and checkpoints (design.md, "Opening";
// metadata-format.md, "Reading" and "Writing").
//
// Every case builds a real spare image with MetadataStore itself, then
// damages bytes of the MemoryDevice underneath (so that the damage is not
// seen by the FaultyDevice's bookkeeping), and opens the spare again as a
// restarted process would.
#include <algorithm>
#include <catch2/catch.hpp>

#include <atomic>
#include <thread>
#include <cstring>
#include <optional>
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

// A comparable picture of a table: every entry (block, slot | cause or
// pending), the bad slots and the allocation cursor.
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
std::ostream& operator<<(std::ostream& os, const Snapshot& s) {
  os << "{entries:";
  for (const auto& [b, v] : s.entries) {
    os << ' ' << b << "->";
    if (RemapTable::is_pending(v)) {
      os << "pending";
    } else {
      os << RemapTable::slot_of(v);
    }
  }
  os << "; bad:";
  for (uint64_t b : s.bad_slots) os << ' ' << b;
  return os << "; next_slot " << s.next_slot << '}';
}
bool has_block(const RemapTable& t, uint64_t block) { return t.find(block).has_value(); }
bool is_pending(const RemapTable& t, uint64_t block) {
  auto v = t.find(block);
  return v && RemapTable::is_pending(*v);
}
// The slot `block` is remapped to, or nullopt (unmapped or pending).
std::optional<uint64_t> slot_of(const RemapTable& t, uint64_t block) {
  auto v = t.find(block);
  if (!v || RemapTable::is_pending(*v)) return std::nullopt;
  return RemapTable::slot_of(*v);
}
bool contains(const std::vector<std::string>& lines, const std::string& what) {
  return std::any_of(lines.begin(), lines.end(),
                     [&](const std::string& l) { return l.find(what) != std::string::npos; });
}

// A formatted spare in memory behind a FaultyDevice, and a store open on it.
struct Spare {
  std::shared_ptr<MemoryDevice> mem = std::make_shared<MemoryDevice>(kSpareSize, "spare");
  std::shared_ptr<FaultyDevice> dev = std::make_shared<FaultyDevice>(mem, 512, "spare");
  std::unique_ptr<MetadataStore> store;
  RemapTable table;  // what the writer believes is durable
  Superblock layout;  // as formatted; the geometry never changes

  explicit Spare(uint64_t journal_bytes = 16 * kMetaUnit) {
    LayoutParams lp;
    lp.main_size = kMainSize;
    lp.block_size = 4096;
    lp.journal_bytes = journal_bytes;
    auto f = MetadataStore::format(*dev, lp, "");
    INFO(f.status().to_string());
    REQUIRE(f.is_ok());
    layout = f.value();
    auto s = MetadataStore::open(dev, table, true);
    INFO(s.status().to_string());
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
    return layout.journal_offset[copy] + unit * kMetaUnit;
  }
  std::vector<char> bytes(uint64_t offset, size_t len) const {
    std::vector<char> b(len);
    REQUIRE(mem->read(b.data(), len, offset).is_ok());
    return b;
  }
  void put(uint64_t offset, const std::vector<char>& b) {
    REQUIRE(mem->write(b.data(), b.size(), offset).is_ok());
  }
  std::vector<char> unit_bytes(int copy, uint64_t unit) const {
    return bytes(unit_offset(copy, unit), kMetaUnit);
  }
  // The same 4096 bytes into both journal copies at `unit`.
  void put_unit(uint64_t unit, const std::vector<char>& b) {
    put(unit_offset(0, unit), b);
    put(unit_offset(1, unit), b);
  }
  void corrupt(uint64_t offset, size_t len, char value = 0x5a) {
    put(offset, std::vector<char>(len, value));
  }
  void zero(uint64_t offset, size_t len) { corrupt(offset, len, 0); }
  // A reader's view, as after a crash: nothing written, nothing repaired.
  Result<std::unique_ptr<MetadataStore>> reopen(RemapTable& out, OpenReport* rep = nullptr,
                                                bool writable = false) {
    return MetadataStore::open(dev, out, writable, rep);
  }
};

// A valid-CRC journal unit.
std::vector<char> encode_unit(uint64_t epoch, uint64_t sequence, const Uuid& uuid,
                              const std::vector<Record>& records) {
  JournalUnit u;
  u.epoch = epoch;
  u.sequence = sequence;
  u.uuid = uuid;
  u.records = records;
  std::vector<char> buf(kMetaUnit);
  u.encode(buf.data());
  return buf;
}

// A valid-CRC journal unit written into both copies at `unit`.
void plant_unit(Spare& s, uint64_t unit, uint64_t epoch, const Uuid& uuid,
                const std::vector<Record>& records) {
  s.put_unit(unit, encode_unit(epoch, unit, uuid, records));
}

// Both superblock copies as they are on the spare.
std::optional<Superblock> superblock_at(const Spare& s, int copy) {
  const auto b = s.bytes(kSuperblockOffset[copy], kMetaUnit);
  return Superblock::decode(b.data());
}

}  // namespace

TEST_CASE("journal: records across several units come back exactly", "[journal]") {
  Spare s;
  REQUIRE(s.sb().journal_units() == 16);
  REQUIRE(s.sb().slot_count > 200);
  REQUIRE(s.append({remap(3, 0)}).is_ok());
  REQUIRE(s.append({pending(7)}).is_ok());
  REQUIRE(s.append({bad_slot(1), remap(9, 2)}).is_ok());
  // One append bigger than a unit spans two.
  std::vector<Record> many;
  for (uint64_t i = 0; i < kRecordsPerUnit + 20; ++i) many.push_back(remap(20 + i, 3 + i));
  REQUIRE(s.append(many).is_ok());
  const uint64_t last_slot = 3 + many.size();
  REQUIRE(s.append({remap(7, last_slot)}).is_ok());  // the pending block is remapped
  REQUIRE(s.append({pending(250)}).is_ok());         // and this one stays pending
  CHECK(s.store->journal_next() == 7);

  RemapTable t;
  OpenReport rep;
  auto r = s.reopen(t, &rep);
  REQUIRE(r.is_ok());
  CHECK(snap(t) == snap(s.table));
  CHECK(rep.journal_units == 7);
  CHECK(rep.journal_records == 7 + many.size() - 1);
  CHECK(rep.journal_copy_repairs == 0);
  CHECK(rep.checkpoint_entries == 0);
  CHECK(rep.warnings.empty());
  CHECK(r.value()->journal_next() == 7);
  // The table itself, spelled out.
  CHECK(t.remaps() == 3 + many.size());
  CHECK(t.pending() == 1);
  CHECK(is_pending(t, 250));
  CHECK(slot_of(t, 7) == last_slot);
  CHECK(slot_of(t, 9) == 2u);
  CHECK(slot_of(t, 20) == 3u);
  CHECK(slot_of(t, 20 + kRecordsPerUnit + 19) == 3 + kRecordsPerUnit + 19);
  CHECK(t.bad_slots() == std::vector<uint64_t>{1});
  CHECK(t.next_slot() == last_slot + 1);
  CHECK(t.remaps_by(Cause::kWriteError) == t.remaps());

  SECTION("a recovery folds the journal into a checkpoint that holds the same table") {
    r.value().reset();
    RemapTable t1;
    auto w = s.reopen(t1, nullptr, /*writable=*/true);
    REQUIRE(w.is_ok());
    CHECK(w.value()->superblock().epoch == s.sb().epoch + 1);
    CHECK(w.value()->journal_next() == 0);
    w.value().reset();
    RemapTable t2;
    OpenReport rep2;
    REQUIRE(s.reopen(t2, &rep2).is_ok());
    CHECK(snap(t2) == snap(s.table));
    CHECK(rep2.journal_units == 0);
    CHECK(rep2.checkpoint_entries == t.entries() + 1);  // + the bad slot
  }
}

TEST_CASE("journal: a truncated journal keeps every unit before the end", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  REQUIRE(s.append({remap(2, 1)}).is_ok());
  SECTION("the last unit never reached either copy") {
    REQUIRE(s.append({remap(3, 2), pending(4)}).is_ok());
    s.zero(s.unit_offset(0, 2), kMetaUnit);
    s.zero(s.unit_offset(1, 2), kMetaUnit);
    RemapTable t;
    OpenReport rep;
    auto r = s.reopen(t, &rep);
    REQUIRE(r.is_ok());
    CHECK(slot_of(t, 1) == 0u);
    CHECK(slot_of(t, 2) == 1u);
    CHECK_FALSE(has_block(t, 3));
    CHECK_FALSE(has_block(t, 4));
    CHECK(t.entries() == 2);
    CHECK(t.next_slot() == 2);
    CHECK(rep.journal_units == 2);
    CHECK(rep.journal_records == 2);
    CHECK(rep.journal_copy_repairs == 0);
    // The next append goes where the journal ended.
    CHECK(r.value()->journal_next() == 2);
  }
  SECTION("the second unit of a two-unit append never reached either copy") {
    std::vector<Record> big;
    for (uint64_t i = 0; i < kRecordsPerUnit + 5; ++i) big.push_back(remap(10 + i, 2 + i));
    REQUIRE(s.append(big).is_ok());
    REQUIRE(s.store->journal_next() == 4);
    s.zero(s.unit_offset(0, 3), kMetaUnit);
    s.zero(s.unit_offset(1, 3), kMetaUnit);
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    CHECK(rep.journal_units == 3);
    CHECK(rep.journal_records == 2 + kRecordsPerUnit);
    // The first unit's records are there, the lost unit's are not.
    CHECK(slot_of(t, 10) == 2u);
    CHECK(slot_of(t, 10 + kRecordsPerUnit - 1) == 2 + kRecordsPerUnit - 1);
    for (uint64_t i = kRecordsPerUnit; i < big.size(); ++i) CHECK_FALSE(has_block(t, 10 + i));
    CHECK(t.next_slot() == 2 + kRecordsPerUnit);
  }
}

TEST_CASE("journal: a torn last unit is not trusted", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  REQUIRE(s.append({remap(2, 1), remap(5, 2)}).is_ok());
  SECTION("second half of the sectors still hold older bytes in both copies") {
    s.corrupt(s.unit_offset(0, 1) + 2048, 2048);
    s.corrupt(s.unit_offset(1, 1) + 2048, 2048);
  }
  SECTION("a different sector of each copy kept older bytes") {
    s.corrupt(s.unit_offset(0, 1) + 512, 512, 0x11);
    s.corrupt(s.unit_offset(1, 1) + 7 * 512, 512, 0x22);
  }
  SECTION("the first sector is new, the last kept older non-zero bytes in both copies") {
    s.corrupt(s.unit_offset(0, 1) + 4000, 8);
    s.corrupt(s.unit_offset(1, 1) + 4000, 8);
  }
  SECTION("one record's bytes changed in both copies") {
    s.corrupt(s.unit_offset(0, 1) + kJournalHeaderBytes + 3, 1, 0x7f);
    s.corrupt(s.unit_offset(1, 1) + kJournalHeaderBytes + 3, 1, 0x7f);
  }
  RemapTable t;
  OpenReport rep;
  REQUIRE(s.reopen(t, &rep).is_ok());
  CHECK(slot_of(t, 1) == 0u);
  CHECK_FALSE(has_block(t, 2));
  CHECK_FALSE(has_block(t, 5));
  CHECK(t.next_slot() == 1);
  CHECK(rep.journal_units == 1);
  CHECK(rep.journal_records == 1);
}

TEST_CASE("journal: a bad checksum in one copy is repaired from the other", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  REQUIRE(s.append({remap(2, 1)}).is_ok());
  REQUIRE(s.append({remap(3, 2)}).is_ok());
  SECTION("copy 0 of the middle unit") {
    s.corrupt(s.unit_offset(0, 1) + 100, 8);
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    CHECK(snap(t) == snap(s.table));
    CHECK(rep.journal_units == 3);
    CHECK(rep.journal_copy_repairs == 1);
    CHECK(contains(rep.warnings, "1 journal unit(s) were read from the second copy"));
    // check_metadata names the disagreement.
    const CheckReport c = check_metadata(s.dev);
    CHECK(contains(c.problems, "journal unit 1 differs"));
    CHECK_FALSE(contains(c.problems, "journal unit 0 differs"));
  }
  SECTION("copy 0 of the last unit") {
    s.corrupt(s.unit_offset(0, 2) + kJournalHeaderBytes, 24);
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    CHECK(snap(t) == snap(s.table));
    CHECK(slot_of(t, 3) == 2u);
    CHECK(rep.journal_copy_repairs == 1);
  }
  SECTION("copy 1 only: copy 0 is read first, nothing to repair, check still tells") {
    s.corrupt(s.unit_offset(1, 1) + 100, 8);
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    CHECK(snap(t) == snap(s.table));
    CHECK(rep.journal_units == 3);
    CHECK(rep.journal_copy_repairs == 0);
    CHECK(contains(check_metadata(s.dev).problems, "journal unit 1 differs"));
  }
  SECTION("a different unit in each copy") {
    s.corrupt(s.unit_offset(0, 0) + 200, 1, 0x01);
    s.corrupt(s.unit_offset(1, 1) + 200, 1, 0x01);
    s.corrupt(s.unit_offset(0, 2) + 4, 4);  // the stored CRC itself
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    CHECK(snap(t) == snap(s.table));
    CHECK(rep.journal_units == 3);
    CHECK(rep.journal_copy_repairs == 2);  // units 0 and 2
  }
}

TEST_CASE("journal: a unit lost in the middle, with later units intact, is refused",
          "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  REQUIRE(s.append({remap(2, 1)}).is_ok());
  REQUIRE(s.append({remap(3, 2)}).is_ok());
  const auto sb_before = s.bytes(0, 2 * kMetaUnit);
  std::string kind;
  SECTION("bad checksum in both copies") {
    s.corrupt(s.unit_offset(0, 1) + 100, 8);
    s.corrupt(s.unit_offset(1, 1) + 100, 8);
    kind = "damaged";
  }
  SECTION("zeroed in both copies") {
    s.zero(s.unit_offset(0, 1), kMetaUnit);
    s.zero(s.unit_offset(1, 1), kMetaUnit);
    kind = "damaged";
  }
  SECTION("unreadable in both copies") {
    s.dev->add_read_error(s.unit_offset(0, 1) / 512);
    s.dev->add_read_error(s.unit_offset(1, 1) / 512 + 7);
    CHECK(s.bytes(s.unit_offset(0, 1), kMetaUnit) == s.bytes(s.unit_offset(1, 1), kMetaUnit));
    kind = "unreadable";
  }
  for (bool writable : {false, true}) {
    RemapTable t;
    auto r = s.reopen(t, nullptr, writable);
    INFO((writable ? "writable" : "read-only") << ": " << r.status().to_string());
    REQUIRE_FALSE(r.is_ok());
    CHECK(r.status().code() == EUCLEAN);
    CHECK_THAT(r.status().message(), Catch::Contains("journal unit 1 is " + kind +
                                                     " in both copies, but later units exist"));
    CHECK_THAT(r.status().message(), Catch::Contains("dmremap check"));
  }
  // A refused writable open wrote nothing.
  CHECK(s.bytes(0, 2 * kMetaUnit) == sb_before);
  // check reports the refusal as its problem.
  const CheckReport c = check_metadata(s.dev);
  REQUIRE(c.problems.size() == 1);
  CHECK_THAT(c.problems[0], Catch::Contains("later units exist"));
}

// Every unit after the first lost one is checked, not just the next: two
// lost units in a row must not hide the acknowledged ones after them.
TEST_CASE("journal: two consecutive lost units, with a later unit intact, are refused",
          "[journal]") {
  Spare s;
  for (uint64_t i = 0; i < 4; ++i) REQUIRE(s.append({remap(1 + i, i)}).is_ok());
  for (uint64_t unit : {uint64_t{1}, uint64_t{2}}) {
    s.corrupt(s.unit_offset(0, unit) + 100, 8);
    s.corrupt(s.unit_offset(1, unit) + 100, 8);
  }
  RemapTable t;
  OpenReport rep;
  auto r = s.reopen(t, &rep);
  INFO("open: " << r.status().to_string() << ", replayed units " << rep.journal_units
                << ", block 4 present " << has_block(t, 4));
  CHECK(r.status().code() == EUCLEAN);
}

TEST_CASE("journal: a unit from an older epoch is never replayed", "[journal]") {
  SECTION("the real bytes of a unit written before a checkpoint, put back after it") {
    Spare s(8 * kMetaUnit);
    REQUIRE(s.append({remap(9, 0)}).is_ok());
    REQUIRE(s.append({remap(10, 1)}).is_ok());
    REQUIRE(s.append({pending(7)}).is_ok());  // unit 2 of epoch 1
    const uint64_t old_epoch = s.sb().epoch;
    const auto old_unit = s.unit_bytes(0, 2);
    {
      auto u = JournalUnit::decode(old_unit.data());
      REQUIRE(u.has_value());
      CHECK(u->epoch == old_epoch);
      CHECK(u->sequence == 2);
      CHECK(u->uuid == s.sb().uuid);
    }
    REQUIRE(s.store->checkpoint(s.table).is_ok());
    REQUIRE(s.sb().epoch == old_epoch + 1);
    REQUIRE(s.store->journal_next() == 0);
    // The new epoch remaps the block the old unit marks pending, so a replay
    // of the old unit would show.
    REQUIRE(s.append({remap(7, 2)}).is_ok());
    REQUIRE(s.append({remap(11, 3)}).is_ok());
    s.put_unit(2, old_unit);  // right after the valid units, in both copies

    RemapTable t;
    OpenReport rep;
    auto r = s.reopen(t, &rep);
    REQUIRE(r.is_ok());
    CHECK(snap(t) == snap(s.table));
    CHECK(slot_of(t, 7) == 2u);
    CHECK(t.pending() == 0);
    CHECK(rep.checkpoint_entries == 3);
    CHECK(rep.journal_units == 2);
    CHECK(rep.journal_records == 2);
    CHECK(r.value()->journal_next() == 2);

    SECTION("control: the same unit with the current epoch would be replayed") {
      auto u = JournalUnit::decode(old_unit.data());
      REQUIRE(u.has_value());
      s.put_unit(2, encode_unit(old_epoch + 1, 2, u->uuid, u->records));
      RemapTable t2;
      OpenReport rep2;
      REQUIRE(s.reopen(t2, &rep2).is_ok());
      CHECK(is_pending(t2, 7));
      CHECK(rep2.journal_units == 3);
    }
  }
  SECTION("planted units") {
    Spare s;
    REQUIRE(s.append({remap(1, 0)}).is_ok());
    const uint64_t epoch = s.sb().epoch;
    const Uuid uuid = s.sb().uuid;
    SECTION("control: the same unit with this epoch and set is replayed") {
      plant_unit(s, 1, epoch, uuid, {remap(9, 7)});
      RemapTable t;
      REQUIRE(s.reopen(t).is_ok());
      CHECK(slot_of(t, 9) == 7u);
    }
    SECTION("the epoch before") {
      plant_unit(s, 1, epoch - 1, uuid, {remap(9, 7)});
      RemapTable t;
      OpenReport rep;
      REQUIRE(s.reopen(t, &rep).is_ok());
      CHECK_FALSE(has_block(t, 9));
      CHECK(t.next_slot() == 1);
      CHECK(rep.journal_units == 1);
    }
    SECTION("an epoch from the future") {
      plant_unit(s, 1, epoch + 1, uuid, {remap(9, 7)});
      RemapTable t;
      REQUIRE(s.reopen(t).is_ok());
      CHECK_FALSE(has_block(t, 9));
    }
    SECTION("a unit of this epoch at the wrong position") {
      REQUIRE(s.append({pending(7)}).is_ok());   // unit 1
      REQUIRE(s.append({remap(7, 1)}).is_ok());  // unit 2
      s.put_unit(3, s.unit_bytes(0, 1));         // unit 1's bytes (sequence 1) at 3
      RemapTable t;
      OpenReport rep;
      REQUIRE(s.reopen(t, &rep).is_ok());
      CHECK(slot_of(t, 7) == 1u);
      CHECK(rep.journal_units == 3);
    }
  }
  SECTION("records from before a recovery never come back") {
    Spare s;
    REQUIRE(s.append({pending(1)}).is_ok());
    const uint64_t epoch = s.sb().epoch;
    const Uuid uuid = s.sb().uuid;
    // A recovery (writable open with a non-empty journal) checkpoints and
    // bumps the epoch; the old unit 0 stays on disk but is dead.
    s.store.reset();
    RemapTable t1;
    auto recovered = s.reopen(t1, nullptr, /*writable=*/true);
    REQUIRE(recovered.is_ok());
    CHECK(recovered.value()->superblock().epoch == epoch + 1);
    REQUIRE(recovered.value()->append({remap(1, 0)}, t1).is_ok());  // new unit 0
    t1.apply(remap(1, 0));
    recovered.value().reset();
    // The old epoch's unit 1 would mark block 1 pending again.
    plant_unit(s, 1, epoch, uuid, {pending(1)});
    RemapTable t2;
    OpenReport rep;
    REQUIRE(s.reopen(t2, &rep).is_ok());
    CHECK(slot_of(t2, 1) == 0u);
    CHECK(t2.pending() == 0);
    CHECK(rep.journal_units == 1);
    CHECK(snap(t2) == snap(t1));
  }
}

TEST_CASE("journal: a unit of another set is never replayed", "[journal]") {
  Spare s;
  Spare other;
  REQUIRE(s.sb().uuid != other.sb().uuid);
  REQUIRE(s.sb().epoch == other.sb().epoch);
  REQUIRE(s.sb().journal_offset[0] == other.sb().journal_offset[0]);
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  REQUIRE(other.append({remap(50, 5)}).is_ok());
  REQUIRE(other.append({pending(60), remap(61, 6)}).is_ok());
  const auto foreign = other.unit_bytes(0, 1);
  {
    auto u = JournalUnit::decode(foreign.data());
    REQUIRE(u.has_value());  // a valid unit: right CRC, epoch and position
    CHECK(u->epoch == s.sb().epoch);
    CHECK(u->sequence == 1);
    CHECK(u->records.size() == 2);
  }
  s.put_unit(1, foreign);

  RemapTable t;
  OpenReport rep;
  REQUIRE(s.reopen(t, &rep).is_ok());
  CHECK(snap(t) == snap(s.table));
  CHECK_FALSE(has_block(t, 60));
  CHECK_FALSE(has_block(t, 61));
  CHECK(t.next_slot() == 1);
  CHECK(rep.journal_units == 1);
  CHECK(rep.journal_records == 1);

  SECTION("the next append takes the foreign unit's place") {
    REQUIRE(s.append({remap(2, 1)}).is_ok());
    RemapTable t2;
    REQUIRE(s.reopen(t2).is_ok());
    CHECK(snap(t2) == snap(s.table));
    CHECK(slot_of(t2, 2) == 1u);
    CHECK_FALSE(has_block(t2, 60));
  }
  SECTION("control: with this set's UUID the same unit would be replayed") {
    auto u = JournalUnit::decode(foreign.data());
    REQUIRE(u.has_value());
    s.put_unit(1, encode_unit(u->epoch, u->sequence, s.sb().uuid, u->records));
    RemapTable t2;
    REQUIRE(s.reopen(t2).is_ok());
    CHECK(is_pending(t2, 60));
    CHECK(slot_of(t2, 61) == 6u);
  }
}

TEST_CASE("superblocks: one destroyed copy is survivable, both are not", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(4, 0)}).is_ok());
  SECTION("with a checkpoint since the format") {
    REQUIRE(s.store->checkpoint(s.table).is_ok());
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
        CHECK(slot_of(t, 4) == 0u);
        CHECK(slot_of(t, 5) == 1u);
        CHECK_FALSE(rep.other_superblock_valid);
        CHECK(rep.superblock_copy == 1 - copy);
        CHECK(contains(rep.warnings, "superblock copy " + std::to_string(copy) + " is damaged"));
        CHECK(r.value()->superblock().epoch == s.sb().epoch);
      }
    }
  }
  SECTION("journal only (no checkpoint since the format)") {
    REQUIRE(s.append({pending(5)}).is_ok());
    for (int copy = 0; copy < 2; ++copy) {
      DYNAMIC_SECTION("copy " << copy << " destroyed") {
        s.corrupt(kSuperblockOffset[copy], kMetaUnit, 0x33);
        RemapTable t;
        OpenReport rep;
        auto r = s.reopen(t, &rep);
        INFO(r.status().to_string());
        REQUIRE(r.is_ok());
        CHECK(snap(t) == snap(s.table));
        CHECK(rep.superblock_copy == 1 - copy);
        CHECK(rep.journal_units == 2);
        // A writable open repairs the destroyed copy.
        r.value().reset();
        RemapTable tw;
        REQUIRE(s.reopen(tw, nullptr, /*writable=*/true).is_ok());
        CHECK(superblock_at(s, copy).has_value());
        RemapTable t2;
        OpenReport rep2;
        REQUIRE(s.reopen(t2, &rep2).is_ok());
        CHECK(rep2.other_superblock_valid);
        CHECK(snap(t2) == snap(s.table));
      }
    }
  }
  SECTION("both destroyed") {
    s.zero(0, 2 * kMetaUnit);
    for (bool writable : {false, true}) {
      RemapTable t;
      auto r = s.reopen(t, nullptr, writable);
      REQUIRE_FALSE(r.is_ok());
      CHECK(r.status().code() == ENOENT);
      CHECK_THAT(r.status().message(), Catch::Contains("no valid dmremap superblock"));
      CHECK_THAT(r.status().message(), Catch::Contains("dmremap format"));
      CHECK(t.entries() == 0);
    }
    CHECK(s.bytes(0, 2 * kMetaUnit) == std::vector<char>(2 * kMetaUnit, 0));
  }
}

TEST_CASE("superblocks: a torn new superblock leaves the previous state intact", "[journal]") {
  SECTION("a newer generation with a bad CRC loses to the older valid copy") {
    Spare s;
    REQUIRE(s.append({remap(1, 0)}).is_ok());
    REQUIRE(s.append({remap(2, 1)}).is_ok());
    auto found = read_superblock(*s.mem);
    REQUIRE(found.is_ok());
    REQUIRE(found->other_valid);
    const int cur = found->copy;
    const Superblock current = found->sb;
    Superblock newer = current;
    newer.generation = current.generation + 1;
    newer.main_identity = "from the newer copy";
    std::vector<char> img(kMetaUnit);
    newer.encode(img.data());
    SECTION("control: intact, the newer generation wins") {
      s.put(kSuperblockOffset[1 - cur], img);
      RemapTable t;
      OpenReport rep;
      auto r = s.reopen(t, &rep);
      REQUIRE(r.is_ok());
      CHECK(rep.superblock_copy == 1 - cur);
      CHECK(r.value()->superblock().generation == current.generation + 1);
      CHECK(r.value()->superblock().main_identity == "from the newer copy");
    }
    SECTION("a checksummed newer copy whose journal overlaps the slots is refused") {
      Superblock hostile = newer;
      hostile.journal_offset[0] = hostile.journal_offset[1] = current.slot_offset;
      std::string why;
      hostile.encode(img.data());
      REQUIRE_FALSE(Superblock::decode(img.data(), &why).has_value());
      CHECK_THAT(why, Catch::Contains("overlaps"));
      s.put(kSuperblockOffset[1 - cur], img);
      RemapTable t;
      OpenReport rep;
      auto r = s.reopen(t, &rep);
      REQUIRE(r.is_ok());
      CHECK(rep.superblock_copy == cur);
      CHECK(rep.journal_units == 2);
      CHECK(snap(t) == snap(s.table));
    }
    SECTION("torn: the first bytes are new, the CRC is the old image's") {
      auto torn = s.bytes(kSuperblockOffset[1 - cur], kMetaUnit);
      std::copy(img.begin(), img.begin() + 128, torn.begin());
      s.put(kSuperblockOffset[1 - cur], torn);
      REQUIRE_FALSE(Superblock::decode(torn.data()).has_value());
      RemapTable t;
      OpenReport rep;
      auto r = s.reopen(t, &rep);
      REQUIRE(r.is_ok());
      CHECK(rep.superblock_copy == cur);
      CHECK_FALSE(rep.other_superblock_valid);
      CHECK(r.value()->superblock().generation == current.generation);
      CHECK(rep.journal_units == 2);
      CHECK(snap(t) == snap(s.table));
    }
    SECTION("one flipped bit in the CRC-covered bytes") {
      img[100] ^= 0x01;
      s.put(kSuperblockOffset[1 - cur], img);
      RemapTable t;
      OpenReport rep;
      auto r = s.reopen(t, &rep);
      REQUIRE(r.is_ok());
      CHECK(rep.superblock_copy == cur);
      CHECK(r.value()->superblock().generation == current.generation);
      CHECK(snap(t) == snap(s.table));
    }
  }
  SECTION("a checkpoint's superblock torn after the checkpoint was flushed") {
    Spare s;
    REQUIRE(s.append({remap(1, 0)}).is_ok());
    REQUIRE(s.append({remap(2, 1)}).is_ok());
    const Snapshot before = snap(s.table);
    const uint64_t old_epoch = s.sb().epoch;
    const uint64_t old_generation = s.sb().generation;
    REQUIRE(s.store->checkpoint(s.table).is_ok());
    // The checkpoint's superblock went to the older copy; tear it.
    auto found = read_superblock(*s.mem);
    REQUIRE(found.is_ok());
    const int newest = found->copy;
    CHECK(found->sb.generation == old_generation + 1);
    s.corrupt(kSuperblockOffset[newest] + 120, 64);
    RemapTable t;
    OpenReport rep;
    auto r = s.reopen(t, &rep);
    REQUIRE(r.is_ok());
    // The older copy is chosen, and the checkpoint the torn one pointed to
    // (complete and flushed before it) is rolled forward to.
    CHECK(rep.superblock_copy == 1 - newest);
    CHECK(r.value()->superblock().generation == old_generation);
    CHECK(r.value()->superblock().epoch == old_epoch + 1);
    CHECK(contains(rep.warnings, "rolled forward"));
    CHECK(snap(t) == before);
    SECTION("and without the newer checkpoint, the older state is whole") {
      for (int copy = 0; copy < 2; ++copy) {
        s.zero(s.sb().checkpoint_at(static_cast<int>(s.sb().active_checkpoint), copy), kMetaUnit);
      }
      RemapTable t2;
      OpenReport rep2;
      auto r2 = s.reopen(t2, &rep2);
      REQUIRE(r2.is_ok());
      CHECK(r2.value()->superblock().epoch == old_epoch);
      CHECK(rep2.journal_units == 2);  // the old epoch's journal is live again
      CHECK(snap(t2) == before);
    }
  }
}

TEST_CASE("superblocks: a copy that refuses writes is taken over by the other, degraded",
          "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  const int older = 1 - read_superblock(*s.mem)->copy;
  s.dev->add_write_error(kSuperblockOffset[older] / 512);
  SECTION("checkpoints and appends go on; a reopen finds everything") {
    for (uint64_t i = 2; i < 12; ++i) {
      REQUIRE(s.append({remap(i, i - 1)}).is_ok());
      if (i % 3 == 0) REQUIRE(s.store->checkpoint(s.table).is_ok());
    }
    CHECK(s.dev->failed_writes() == 1);  // tried once, then left alone
    REQUIRE(s.store->degraded().size() == 1);
    CHECK_THAT(s.store->degraded()[0],
               Catch::Contains("superblock copy " + std::to_string(older) + " refuses writes"));
    RemapTable t;
    REQUIRE(s.reopen(t).is_ok());
    CHECK(snap(t) == snap(s.table));
  }
  SECTION("a writable open is not blocked by it") {
    s.store.reset();
    RemapTable t;
    auto r = s.reopen(t, nullptr, /*writable=*/true);
    REQUIRE(r.is_ok());
    CHECK(r.value()->degraded().size() == 1);
    CHECK(snap(t) == snap(s.table));
  }
  SECTION("the stale copy alone, several checkpoints behind, rolls forward to the newest") {
    // The refused copy still reads its old contents; then the kept copy is
    // lost too. The newest complete checkpoint and its journal hold it all.
    for (uint64_t i = 2; i < 9; ++i) {
      REQUIRE(s.append({remap(i, i - 1)}).is_ok());
      if (i % 2 == 0) REQUIRE(s.store->checkpoint(s.table).is_ok());
    }
    REQUIRE(s.append({pending(40)}).is_ok());
    s.store.reset();
    s.dev->clear_faults();
    s.corrupt(kSuperblockOffset[1 - older], kMetaUnit);
    const auto stale = superblock_at(s, older);
    REQUIRE(stale.has_value());
    RemapTable t;
    OpenReport rep;
    auto r = s.reopen(t, &rep);
    REQUIRE(r.is_ok());
    CHECK(r.value()->superblock().epoch >= stale->epoch + 3);
    CHECK(contains(rep.warnings, "rolled forward"));
    CHECK(snap(t) == snap(s.table));
  }
}

TEST_CASE("superblocks: a hostile or damaged geometry is refused with a clear message",
          "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  const Superblock good = s.sb();
  struct Case {
    const char* name;
    void (*mutate)(Superblock&);
    const char* says;
  };
  const Case cases[] = {
      {"slot pool at 0", [](Superblock& b) { b.slot_offset = 0; }, "overlaps"},
      {"journal over the checkpoint",
       [](Superblock& b) { b.journal_offset[1] = b.checkpoint_offset[1]; }, "overlaps"},
      {"checkpoint areas overlap",
       [](Superblock& b) { b.checkpoint_offset[1] = b.checkpoint_offset[0] + kMetaUnit; },
       "overlaps"},
      {"journal past the end", [](Superblock& b) { b.journal_offset[1] = b.spare_size; },
       "ends past"},
      {"offset near 2^64", [](Superblock& b) { b.checkpoint_offset[0] = ~uint64_t{0} - 4095; },
       "ends past"},
      {"huge journal", [](Superblock& b) { b.journal_bytes = uint64_t{1} << 51; }, "journal size"},
      {"journal not in units", [](Superblock& b) { b.journal_bytes += 1; }, "journal size"},
      {"main not a multiple of the block", [](Superblock& b) { b.main_size += 512; },
       "multiple of the block size"},
      {"main of 0 bytes", [](Superblock& b) { b.main_size = 0; }, "multiple of the block size"},
      {"too many slots", [](Superblock& b) { b.slot_count = ~uint64_t{0}; }, "slot count"},
      {"no slots", [](Superblock& b) { b.slot_count = 0; }, "slot count"},
      {"pending beyond the checkpoint",
       [](Superblock& b) { b.pending_capacity = b.checkpoint_bytes; }, "checkpoint size"},
      {"huge pending capacity", [](Superblock& b) { b.pending_capacity = ~uint64_t{0}; },
       "pending capacity"},
      {"misaligned slot pool", [](Superblock& b) { b.slot_offset += 512; }, "not aligned"},
      {"active checkpoint 2", [](Superblock& b) { b.active_checkpoint = 2; }, "active checkpoint"},
      {"block size 3000", [](Superblock& b) { b.block_size = 3000; }, "block size"},
  };
  for (const Case& c : cases) {
    DYNAMIC_SECTION(c.name) {
      Superblock bad = good;
      c.mutate(bad);
      std::string why;
      std::vector<char> img(kMetaUnit);
      bad.encode(img.data());
      REQUIRE_FALSE(Superblock::decode(img.data(), &why).has_value());
      CHECK_THAT(why, Catch::Contains(c.says));
      // In one copy: the other copy is used.
      s.put(kSuperblockOffset[0], img);
      {
        RemapTable t;
        auto r = s.reopen(t);
        REQUIRE(r.is_ok());
        CHECK(snap(t) == snap(s.table));
      }
      // In both: refused, saying why, not "not formatted".
      s.put(kSuperblockOffset[1], img);
      RemapTable t;
      auto r = s.reopen(t);
      REQUIRE_FALSE(r.is_ok());
      CHECK(r.status().code() == EUCLEAN);
      CHECK_THAT(r.status().message(), Catch::Contains(c.says));
      CHECK_THAT(r.status().message(), Catch::Contains("refused"));
    }
  }
}

TEST_CASE("journal: a slot claimed by two blocks is refused at open, not served", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0), remap(2, 1)}).is_ok());
  SECTION("two remaps onto one slot") {
    plant_unit(s, 1, s.sb().epoch, s.sb().uuid, {remap(3, 0)});
    RemapTable t;
    auto r = s.reopen(t);
    REQUIRE_FALSE(r.is_ok());
    CHECK(r.status().code() == EUCLEAN);
    CHECK_THAT(r.status().message(), Catch::Contains("slot 0 is claimed by block 1 and by block 3"));
  }
  SECTION("a remap onto a bad slot") {
    plant_unit(s, 1, s.sb().epoch, s.sb().uuid, {Record{Record::kBadSlot, Cause::kManual, 0, 1}});
    RemapTable t;
    auto r = s.reopen(t);
    REQUIRE_FALSE(r.is_ok());
    CHECK_THAT(r.status().message(), Catch::Contains("slot 1 is claimed by block 2 and by the bad-slot list"));
  }
  SECTION("control: a block moved to a new slot frees nothing twice") {
    plant_unit(s, 1, s.sb().epoch, s.sb().uuid,
               {Record{Record::kBadSlot, Cause::kManual, 0, 0}, remap(1, 2)});
    RemapTable t;
    REQUIRE(s.reopen(t).is_ok());
    CHECK(t.bad_slots() == std::vector<uint64_t>{0});
  }
}

TEST_CASE("journal: bad sectors inside the journal", "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  REQUIRE(s.append({remap(2, 1)}).is_ok());
  REQUIRE(s.append({pending(3)}).is_ok());
  SECTION("an unreadable sector in copy 0 is read from copy 1") {
    s.dev->add_read_error(s.unit_offset(0, 1) / 512 + 3);
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    CHECK(snap(t) == snap(s.table));
    CHECK(rep.journal_units == 3);
    CHECK(rep.journal_copy_repairs == 1);
    CHECK(s.dev->failed_reads() >= 1);
  }
  SECTION("an unreadable sector in every unit of copy 0") {
    for (uint64_t u = 0; u < 3; ++u) s.dev->add_read_error(s.unit_offset(0, u) / 512 + u);
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    CHECK(snap(t) == snap(s.table));
    CHECK(rep.journal_copy_repairs == 3);
    CHECK(contains(check_metadata(s.dev).problems, "cannot be read in one of them"));
  }
  SECTION("unreadable in copy 0 and corrupt in copy 1, in different units") {
    s.dev->add_read_error(s.unit_offset(0, 0) / 512);
    s.corrupt(s.unit_offset(1, 2) + 60, 4);
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    CHECK(snap(t) == snap(s.table));
    CHECK(rep.journal_copy_repairs == 1);
  }
  for (int bad : {0, 1}) {
    DYNAMIC_SECTION("a sector of copy " << bad << " refuses writes: the append goes on in the "
                    "other copy, degraded, and nothing is lost") {
      s.dev->add_write_error(s.unit_offset(bad, 3) / 512);
      const Status st = s.append({remap(3, 2)});
      REQUIRE(st.is_ok());
      CHECK(s.store->journal_next() == 4);
      CHECK(s.dev->failed_writes() == 1);
      REQUIRE(s.store->degraded().size() == 1);
      CHECK_THAT(s.store->degraded()[0],
                 Catch::Contains("journal copy " + std::to_string(bad) + " refuses writes"));
      CHECK(s.unit_bytes(bad, 3) == std::vector<char>(kMetaUnit, 0));
      // Later appends go on, and the store is not refused.
      REQUIRE(s.append({remap(4, 3)}).is_ok());
      RemapTable t;
      OpenReport rep;
      REQUIRE(s.reopen(t, &rep).is_ok());
      CHECK(snap(t) == snap(s.table));
      CHECK(slot_of(t, 3) == 2u);
      CHECK(rep.journal_units == 5);
      CHECK(rep.journal_copy_repairs == (bad == 0 ? 1u : 0u));
      CHECK(contains(check_metadata(s.dev).problems, "journal unit 3 differs"));
    }
  }
  SECTION("both copies refuse writes: the append fails and claims nothing") {
    s.dev->add_write_error(s.unit_offset(0, 3) / 512);
    s.dev->add_write_error(s.unit_offset(1, 3) / 512);
    const Snapshot before = snap(s.table);
    const Status st = s.append({remap(3, 2)});
    CHECK(st.code() == EIO);
    CHECK_THAT(st.message(), Catch::Contains("injected write error"));
    CHECK(snap(s.table) == before);
    CHECK(s.store->journal_next() == 3);
    RemapTable t;
    REQUIRE(s.reopen(t).is_ok());
    CHECK(snap(t) == before);
    CHECK(is_pending(t, 3));
  }
}

TEST_CASE("journal: a full journal is checkpointed and nothing is lost", "[journal]") {
  // No floor on an explicit journal size: it is rounded up to whole units
  // (the 256 KiB minimum applies only to the size chosen by default).
  {
    LayoutParams lp;
    lp.main_size = kMainSize;
    lp.spare_size = kSpareSize;
    lp.journal_bytes = 4 * kMetaUnit - 100;
    auto planned = plan_layout(lp);
    REQUIRE(planned.is_ok());
    CHECK(planned->journal_units() == 4);
    lp.journal_bytes = 0;
    CHECK(plan_layout(lp)->journal_bytes == 256 * 1024);
  }
  Spare s(4 * kMetaUnit);
  REQUIRE(s.sb().journal_units() == 4);
  const uint64_t epoch = s.sb().epoch;

  SECTION("the append that finds no room checkpoints the state before it first") {
    // Units 2 and 3 of the first epoch mark blocks pending that the second
    // epoch remaps: a replay of them would show.
    REQUIRE(s.append({remap(9, 0)}).is_ok());
    REQUIRE(s.append({bad_slot(1), remap(10, 2)}).is_ok());
    REQUIRE(s.append({pending(7)}).is_ok());
    REQUIRE(s.append({pending(8)}).is_ok());
    CHECK(s.store->journal_next() == 4);
    CHECK(s.sb().epoch == epoch);
    REQUIRE(s.append({remap(7, 3)}).is_ok());  // no room: checkpoint, then unit 0
    CHECK(s.sb().epoch == epoch + 1);
    CHECK(s.store->journal_next() == 1);
    REQUIRE(s.append({remap(8, 4)}).is_ok());
    CHECK(s.store->journal_next() == 2);

    RemapTable t;
    OpenReport rep;
    auto r = s.reopen(t, &rep);
    REQUIRE(r.is_ok());
    CHECK(snap(t) == snap(s.table));
    CHECK(rep.checkpoint_entries == 5);  // 9, 10, 7, 8 and bad slot 1
    CHECK(rep.journal_units == 2);
    CHECK(rep.journal_records == 2);
    CHECK(slot_of(t, 7) == 3u);
    CHECK(slot_of(t, 8) == 4u);
    CHECK(t.pending() == 0);
    CHECK(t.bad_slots() == std::vector<uint64_t>{1});
    CHECK(t.next_slot() == 5);
    // The first epoch's units 2 and 3 are still on disk, intact, but dead.
    auto u2 = JournalUnit::decode(s.unit_bytes(0, 2).data());
    REQUIRE(u2.has_value());
    CHECK(u2->epoch == epoch);
    CHECK(u2->records.size() == 1);
    CHECK(u2->records[0].type == Record::kPending);
  }
  SECTION("many checkpoints in a row") {
    for (uint64_t i = 0; i < 23; ++i) {
      REQUIRE(s.append({i % 3 == 2 ? pending(10 + i) : remap(10 + i, i)}).is_ok());
    }
    // 23 single-record appends in 4-unit epochs: checkpoints before appends
    // 4, 8, 12, 16 and 20 (counting from 0).
    CHECK(s.sb().epoch == epoch + 5);
    CHECK(s.store->journal_next() == 3);
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    CHECK(snap(t) == snap(s.table));
    CHECK(t.entries() == 23);
    CHECK(t.pending() == 7);
    CHECK(rep.checkpoint_entries == 20);
    CHECK(rep.journal_units == 3);
    CHECK(rep.journal_records == 3);
  }
  SECTION("an append that fills the journal exactly, then one more") {
    std::vector<Record> fill;
    for (uint64_t i = 0; i < 4 * kRecordsPerUnit; ++i) fill.push_back(pending(i % 200));
    REQUIRE(s.append(fill).is_ok());
    CHECK(s.store->journal_next() == 4);
    CHECK(s.sb().epoch == epoch);
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    CHECK(rep.journal_units == 4);
    CHECK(rep.journal_records == 4 * kRecordsPerUnit);
    CHECK(t.pending() == 200);
    REQUIRE(s.append({remap(0, 0)}).is_ok());
    CHECK(s.sb().epoch == epoch + 1);
    RemapTable t2;
    OpenReport rep2;
    REQUIRE(s.reopen(t2, &rep2).is_ok());
    CHECK(snap(t2) == snap(s.table));
    CHECK(rep2.checkpoint_entries == 200);
    CHECK(rep2.journal_records == 1);
    CHECK(slot_of(t2, 0) == 0u);
  }
  SECTION("an append larger than the whole journal is refused and changes nothing") {
    REQUIRE(s.append({remap(1, 0)}).is_ok());
    std::vector<Record> huge(4 * kRecordsPerUnit + 1, pending(5));
    const Status st = s.append(huge);
    CHECK(st.code() == E2BIG);
    CHECK(s.store->journal_next() == 1);
    CHECK(s.sb().epoch == epoch);
    RemapTable t;
    REQUIRE(s.reopen(t).is_ok());
    CHECK_FALSE(has_block(t, 5));
    CHECK(slot_of(t, 1) == 0u);
  }
  SECTION("a clean checkpoint: an empty journal and the clean flag") {
    REQUIRE(s.append({remap(1, 0)}).is_ok());
    REQUIRE(s.append({pending(2)}).is_ok());
    REQUIRE(s.store->checkpoint(s.table, /*clean=*/true).is_ok());
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    CHECK(rep.was_clean);
    CHECK(rep.journal_units == 0);
    CHECK(rep.checkpoint_entries == 2);
    CHECK(snap(t) == snap(s.table));
    // Opening for writing clears the flag before anything else happens.
    RemapTable tw;
    REQUIRE(s.reopen(tw, nullptr, /*writable=*/true).is_ok());
    RemapTable t2;
    OpenReport rep2;
    REQUIRE(s.reopen(t2, &rep2).is_ok());
    CHECK_FALSE(rep2.was_clean);
  }
}

// After a checkpoint fails once its new area is complete (here the superblock
// write fails), appending in the old epoch would be lost on reopen, which
// rolls forward to that area. The store refuses every later append instead.
TEST_CASE("journal: an append acknowledged after a failed checkpoint survives a reopen",
          "[journal]") {
  Spare s;
  REQUIRE(s.append({remap(1, 0)}).is_ok());
  // Both copies: one that refuses writes alone is taken over by the other.
  s.dev->add_write_error(kSuperblockOffset[0] / 512);
  s.dev->add_write_error(kSuperblockOffset[1] / 512);
  CHECK(s.store->checkpoint(s.table).code() == EIO);
  s.dev->clear_faults();  // the fault was transient
  const Status st = s.append({remap(2, 1)});
  RemapTable t;
  OpenReport rep;
  auto r = s.reopen(t, &rep);
  REQUIRE(r.is_ok());
  INFO("append after the failed checkpoint: " << st.to_string() << "; reopen warnings: "
                                              << rep.warnings.size());
  // Either the append was refused, or it is durable; the store refuses.
  CHECK((!st.is_ok() || slot_of(t, 2) == 1u));
  CHECK(st.code() == EIO);
  CHECK(slot_of(t, 1) == 0u);
}

namespace {

// One step of a power-cut scenario.
struct Op {
  bool checkpoint = false;
  std::vector<Record> records;  // an append when !checkpoint
};

std::vector<Op> crash_script() {
  std::vector<Op> ops;
  for (uint64_t i = 0; i < 14; ++i) {
    if (i == 6) ops.push_back(Op{true, {}});  // an explicit checkpoint
    Op op;
    switch (i % 5) {
      case 1: op.records = {pending(100 + i)}; break;
      case 3: op.records = {remap(100 + i - 2, 2 * i)}; break;  // i-2's pending block
      case 4: op.records = {bad_slot(2 * i), remap(200 + i, 2 * i + 1)}; break;
      default: op.records = {remap(30 + i, 2 * i)}; break;
    }
    ops.push_back(op);
  }
  return ops;
}

}  // namespace

TEST_CASE("journal: a power cut during appends and checkpoints leaves the state before or after",
          "[journal]") {
  // For every mutating operation on the spare, cut the power there (dropping
  // or tearing what was not flushed), then recover: the table must hold every
  // acknowledged append, plus at most the one in flight. The 4-unit journal
  // makes appends checkpoint on their own, and one checkpoint is explicit.
  const std::vector<Op> ops = crash_script();
  uint64_t total_ticks = 0;
  Snapshot final_state;
  {
    Spare s(4 * kMetaUnit);
    auto power = std::make_shared<PowerSwitch>();
    s.dev->attach(power);
    for (const Op& op : ops) {
      REQUIRE((op.checkpoint ? s.store->checkpoint(s.table) : s.append(op.records)).is_ok());
    }
    total_ticks = power->ticks();
    final_state = snap(s.table);
    CHECK(s.sb().epoch >= 4);  // several checkpoints happened
  }
  // Each append is a write per copy and a flush; each of the three
  // checkpoints (before appends 4 and 10, and the explicit one) writes the
  // entries and the header of both copies, flushes, writes the superblock
  // and flushes.
  REQUIRE(total_ticks == 3 * 14 + 3 * 7);
  uint64_t checked = 0, before_states = 0, after_states = 0;
  for (uint64_t n = 1; n <= total_ticks + 1; ++n) {
    for (auto mode : {FaultyDevice::CutMode::kDrop, FaultyDevice::CutMode::kTear}) {
      Spare s(4 * kMetaUnit);
      auto power = std::make_shared<PowerSwitch>();
      s.dev->attach(power);
      power->cut_after(n);
      size_t done = 0;
      for (; done < ops.size(); ++done) {
        const Op& op = ops[done];
        if (!(op.checkpoint ? s.store->checkpoint(s.table) : s.append(op.records)).is_ok()) break;
      }
      const Snapshot before = snap(s.table);  // every acknowledged append
      std::optional<Snapshot> after;          // with the one in flight
      if (done < ops.size() && !ops[done].checkpoint) {
        RemapTable t = s.table;
        for (const Record& r : ops[done].records) t.apply(r);
        after = snap(t);
      }
      s.store.reset();
      s.dev->power_cut(mode, n);
      power->reset();
      INFO("cut at operation " << n << (mode == FaultyDevice::CutMode::kTear ? " (tear)" : " (drop)")
                               << " during op " << done << " of " << ops.size());
      if (n > total_ticks) {
        REQUIRE(done == ops.size());  // the cut came after the last operation
        CHECK(before == final_state);
      }
      // Recover as a restarted engine would, then read the result back.
      RemapTable recovered;
      auto r = s.reopen(recovered, nullptr, /*writable=*/true);
      INFO(r.status().to_string());
      REQUIRE(r.is_ok());
      r.value().reset();
      RemapTable t;
      auto again = s.reopen(t);
      REQUIRE(again.is_ok());
      const Snapshot got = snap(t);
      CHECK(snap(recovered) == got);
      const bool is_before = got == before;
      const bool is_after = after && got == *after;
      INFO("got " << got << "\nbefore " << before);
      CHECK((is_before || is_after));
      before_states += is_before;
      after_states += is_after && !is_before;
      ++checked;
    }
  }
  CHECK(checked == 2 * (total_ticks + 1));
  // Both outcomes happen: cuts before the unit's flush lose it, cuts at the
  // flush (after both copies were written) with kTear may keep it.
  CHECK(before_states > 0);
  CHECK(after_states > 0);
}

TEST_CASE("journal: a power cut during the recovery of a crashed set is recovered from",
          "[journal]") {
  // The recovery itself (a checkpoint and a superblock) can be cut at every
  // point: the next open finds the same table.
  uint64_t ticks = 0;
  for (uint64_t n = 1;; ++n) {
    Spare s(4 * kMetaUnit);
    REQUIRE(s.append({remap(1, 0)}).is_ok());
    REQUIRE(s.append({pending(2), bad_slot(1)}).is_ok());
    REQUIRE(s.append({remap(3, 2)}).is_ok());
    const Snapshot expected = snap(s.table);
    s.store.reset();  // a crash: everything acknowledged was flushed
    auto power = std::make_shared<PowerSwitch>();
    s.dev->attach(power);
    power->cut_after(n);
    RemapTable t1;
    auto first = s.reopen(t1, nullptr, /*writable=*/true);
    if (first.is_ok()) {
      // The cut is past the recovery's last operation: all were counted.
      ticks = n - 1;
      CHECK(snap(t1) == expected);
      break;
    }
    s.dev->power_cut(n % 2 ? FaultyDevice::CutMode::kDrop : FaultyDevice::CutMode::kTear, n);
    power->reset();
    INFO("cut at operation " << n << " of the recovery");
    RemapTable t2;
    auto second = s.reopen(t2, nullptr, /*writable=*/true);
    INFO(second.status().to_string());
    REQUIRE(second.is_ok());
    CHECK(snap(t2) == expected);
    REQUIRE(n < 50);
  }
  // The entries and the header of both checkpoint copies, a flush, the
  // superblock, a flush.
  CHECK(ticks == 7);
}

TEST_CASE("journal: a power cut inside a multi-unit append keeps a prefix of its units",
          "[journal]") {
  // Units are flushed one by one, so an append of two units that was never
  // acknowledged may leave its first unit durable: records are independent
  // (metadata_store.cc, append) and the engine appends one unit at a time.
  std::vector<Record> big;
  for (uint64_t i = 0; i < kRecordsPerUnit + 10; ++i) big.push_back(remap(20 + i, 1 + i));
  int first_unit_only = 0;
  for (uint64_t n = 1; n <= 6; ++n) {
    Spare s;
    REQUIRE(s.append({remap(1, 0)}).is_ok());
    const Snapshot before = snap(s.table);
    auto power = std::make_shared<PowerSwitch>();
    s.dev->attach(power);
    power->cut_after(n);
    const bool acked = s.append(big).is_ok();
    RemapTable all = s.table;
    RemapTable prefix = s.table;
    if (!acked) {
      for (const Record& r : big) all.apply(r);
      for (size_t i = 0; i < kRecordsPerUnit; ++i) prefix.apply(big[i]);
    }
    s.store.reset();
    s.dev->power_cut(FaultyDevice::CutMode::kDrop, n);
    power->reset();
    RemapTable t;
    OpenReport rep;
    REQUIRE(s.reopen(t, &rep).is_ok());
    INFO("cut at operation " << n << (acked ? ", acknowledged" : ", not acknowledged"));
    const Snapshot got = snap(t);
    // Two writes and a flush per unit: cuts 1-3 lose the append, 4-6 keep
    // unit 1 only, a cut past 6 finds it acknowledged.
    if (n <= 3) {
      CHECK(got == before);
    } else {
      CHECK_FALSE(acked);
      CHECK(got == snap(prefix));
      CHECK(rep.journal_units == 2);
      ++first_unit_only;
    }
    CHECK((got == before || got == snap(prefix) || got == snap(all)));
  }
  CHECK(first_unit_only == 3);
}

TEST_CASE("crc32c: the Castagnoli check value, in one piece and in parts", "[journal]") {
  // docs/metadata-format.md promises this CRC to other tools.
  CHECK(crc32c("123456789", 9) == 0xE3069283u);
  CHECK(crc32c("56789", 5, crc32c("1234", 4)) == 0xE3069283u);
  std::vector<char> big(100000);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7);
  CHECK(crc32c(big.data(), big.size()) == crc32c(big.data() + 3, big.size() - 3, crc32c(big.data(), 3)));
}

TEST_CASE("journal: status and check read a consistent snapshot while a writer works",
          "[journal][concurrency]") {
  // A small journal, so that checkpoints (which rewrite whole areas) come
  // often, and the superblock stays "in use" as under a server.
  Spare s(4 * kMetaUnit);
  std::atomic<bool> done{false};
  std::atomic<bool> writes_ok{true};
  const uint64_t n = std::min<uint64_t>(s.sb().slot_count, kMainSize / 4096);
  std::thread writer([&] {
    for (uint64_t i = 0; i < n && writes_ok; ++i) {
      // As the engine does: the slot's header, then the record.
      writes_ok = s.store->write_slot_header(i, i, Cause::kWriteError, s.table).is_ok() &&
                  s.append({remap(i, i)}).is_ok() &&
                  (i % 7 != 0 || s.store->checkpoint(s.table).is_ok());
    }
    done = true;
  });
  int loads = 0;
  int checks = 0;
  uint64_t last_remaps = 0;
  while (!done) {
    RemapTable t;
    auto r = MetadataStore::open_snapshot(s.mem, t);
    INFO(r.status().to_string());
    REQUIRE(r.is_ok());
    // A snapshot is a state the writer had: remaps 0..n-1, each in its slot.
    CHECK(t.remaps() >= last_remaps);
    last_remaps = t.remaps();
    bool in_place = true;
    t.for_each([&](const RemapTable::Entry& e) {
      in_place = in_place && e.block < t.remaps() && RemapTable::slot_of(e.value) == e.block;
    });
    CHECK(in_place);
    ++loads;
    if (loads % 4 == 0) {
      const CheckReport c = check_metadata(s.mem);
      INFO((c.problems.empty() ? std::string() : c.problems.front()));
      CHECK(c.problems.empty());
      ++checks;
    }
  }
  writer.join();
  CHECK(writes_ok);
  WARN("snapshots while writing: " << loads << " loads, " << checks << " checks");
}

TEST_CASE("journal: a group commit keeps each change's records in one unit", "[journal]") {
  // Two changes of 100 records each (a slot's move and its old slot marked
  // bad is such a change, at a smaller scale): they fill two units of 100,
  // not 168 and 32, so a crash that keeps only the first unit never keeps
  // half of a change. A crash after the first unit's flush is replayed.
  Spare s;
  std::vector<std::vector<Record>> groups(2);
  for (uint64_t i = 0; i < 100; ++i) groups[0].push_back(remap(i, i));
  for (uint64_t i = 0; i < 99; ++i) groups[1].push_back(bad_slot(100 + i));
  groups[1].push_back(remap(150, 199));
  REQUIRE(s.store->append_groups(groups, s.table).is_ok());
  for (int u = 0; u < 2; ++u) {
    std::vector<char> buf(kMetaUnit);
    REQUIRE(s.dev->read(buf.data(), kMetaUnit, s.unit_offset(0, static_cast<uint64_t>(u))).is_ok());
    const auto unit = JournalUnit::decode(buf.data());
    REQUIRE(unit);
    CHECK(unit->records == groups[static_cast<size_t>(u)]);
  }
  for (const auto& g : groups) {
    for (const Record& r : g) s.table.apply(r);
  }
  // Only the first unit made it: the second change is absent as a whole.
  std::vector<char> zeros(kMetaUnit, 0);
  for (int copy = 0; copy < 2; ++copy) {
    REQUIRE(s.dev->write(zeros.data(), kMetaUnit, s.unit_offset(copy, 1)).is_ok());
  }
  RemapTable t;
  auto r = s.reopen(t);
  REQUIRE(r.is_ok());
  CHECK(t.remaps() == 100);
  CHECK(t.bad_slots().empty());
  CHECK_FALSE(t.find(150));
}
