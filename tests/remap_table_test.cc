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
