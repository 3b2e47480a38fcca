// RemapTable: the same answers with and without the group filter, for any
// density and any disk size (the filter turns coarse on big disks).
#include <catch2/catch.hpp>
#include <random>
#include <vector>

#include "dmremap/remap_table.h"

using namespace dmremap;

namespace {
std::vector<uint64_t> blocks_in(const RemapTable& t, uint64_t first, uint64_t last) {
  std::vector<uint64_t> out;
  t.for_range(first, last, [&](const RemapTable::Entry& e) { out.push_back(e.block); });
  return out;
}
}  // namespace

TEST_CASE("remap table: the filter never hides an entry", "[table]") {
  for (uint64_t blocks : {uint64_t{1000}, uint64_t{1} << 26, uint64_t{1} << 32}) {
    for (uint64_t n : {0, 1, 50, 5000}) {
      std::mt19937_64 rng(blocks + n);
      RemapTable plain, filtered;
      filtered.enable_filter(blocks);
      for (uint64_t i = 0; i < n; ++i) {
        const uint64_t b = rng() % blocks;
        const Record r = i % 3 ? Record{Record::kRemap, Cause::kWriteError, b, i}
                               : Record{Record::kPending, Cause::kManual, b, 0};
        plain.apply(r);
        filtered.apply(r);
        if (i == n / 2) filtered.enable_filter(blocks);  // built from entries already there
      }
      for (int q = 0; q < 2000; ++q) {
        const uint64_t first = rng() % blocks;
        const uint64_t last = std::min(blocks, first + 1 + rng() % 9000);
        INFO("blocks " << blocks << ", entries " << n << ", range " << first << ".." << last);
        REQUIRE(blocks_in(filtered, first, last) == blocks_in(plain, first, last));
        REQUIRE(filtered.none_in(first, last) == plain.none_in(first, last));
        REQUIRE(filtered.find(first) == plain.find(first));
      }
      CHECK(filtered.entries() == plain.entries());
    }
  }
}

TEST_CASE("remap table: a pending entry keeps the second it was marked", "[table]") {
  RemapTable t;
  t.apply(Record{Record::kPending, Cause::kManual, 7, 1764576000});
  t.apply(Record{Record::kPending, Cause::kManual, 8, 0});  // time not known
  const uint64_t v7 = *t.find(7);
  const uint64_t v8 = *t.find(8);
  CHECK(RemapTable::is_pending(v7));
  CHECK(RemapTable::pending_time(v7) == 1764576000);
  CHECK(RemapTable::is_pending(v8));
  CHECK(v8 == RemapTable::kPendingValue);  // as written before times were kept
  CHECK(RemapTable::pending_time(v8) == 0);
  CHECK(t.pending() == 2);
  // A remap is never taken for pending, whatever its slot and cause.
  t.apply(Record{Record::kRemap, Cause::kManual, 7, RemapTable::kSlotMask});
  CHECK_FALSE(RemapTable::is_pending(*t.find(7)));
  CHECK(t.pending() == 1);
  CHECK(t.erase_pending(8));
  CHECK(t.pending() == 0);
}

TEST_CASE("remap table: no pending time makes the engine's own marker value", "[table]") {
  // ~0 - 1 is the engine's "read from main" marker (a plan's piece).
  CHECK(RemapTable::pending_value(RemapTable::kSlotMask - 1) == RemapTable::kPendingValue);
  CHECK(RemapTable::pending_value(RemapTable::kSlotMask - 2) != ~uint64_t{0} - 1);
  RemapTable t;
  t.apply(Record{Record::kPending, Cause::kManual, 3, RemapTable::kSlotMask - 1});
  CHECK(*t.find(3) == RemapTable::kPendingValue);
}
