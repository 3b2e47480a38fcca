// Engine::extents: holes of a sparse main are reported, remapped and pending
// blocks are always data.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "dmremap/file_device.h"
#include "test_util.h"

using namespace dmremap;

namespace {
constexpr uint32_t B = 4096;

struct Run {
  uint64_t offset, length;
  bool hole;
  bool operator==(const Run& o) const {
    return std::tie(offset, length, hole) == std::tie(o.offset, o.length, o.hole);
  }
};

std::vector<Run> runs_of(Engine& e, uint64_t len, uint64_t offset) {
  std::vector<Run> out;
  REQUIRE(e.extents(len, offset, [&](uint64_t o, uint64_t l, bool h) {
              if (!out.empty() && out.back().hole == h && out.back().offset + out.back().length == o) {
                out.back().length += l;  // merge: the engine may split runs at table entries
              } else {
                out.push_back({o, l, h});
              }
            }).is_ok());
  return out;
}
}  // namespace

TEST_CASE("extents: a sparse main's holes are holes, remapped blocks are data", "[engine][extents]") {
  char tmpl[] = "/tmp/dmremap-extents-XXXXXX";
  const int fd = ::mkstemp(tmpl);
  REQUIRE(fd >= 0);
  ::close(fd);
  const std::string path = tmpl;
  {
    // 64 blocks, data only in block 2.
    std::FILE* f = std::fopen(path.c_str(), "r+");
    REQUIRE(f);
    REQUIRE(::ftruncate(::fileno(f), 64 * B) == 0);
    const auto d = test::pattern(B, 3);
    REQUIRE(std::fseek(f, 2 * B, SEEK_SET) == 0);
    REQUIRE(std::fwrite(d.data(), 1, B, f) == B);
    std::fclose(f);
  }
  auto main = open_device(path, "main", OpenOptions{});
  REQUIRE(main.is_ok());
  auto faulty = std::make_shared<FaultyDevice>(main.value(), B, "main");
  auto spare = std::make_shared<MemoryDevice>(1 << 20, "spare");
  LayoutParams lp;
  lp.main_size = 64 * B;
  REQUIRE(MetadataStore::format(*spare, lp, "").is_ok());
  auto opened = Engine::open(faulty, spare, EngineOptions{});
  REQUIRE(opened.is_ok());
  Engine& e = *opened.value();

  SECTION("holes and data as main has them") {
    CHECK(runs_of(e, 64 * B, 0) ==
          std::vector<Run>{{0, 2 * B, true}, {2 * B, B, false}, {3 * B, 61 * B, true}});
  }
  SECTION("a remapped block inside a hole is data, and reads as what was written") {
    faulty->add_write_error(5);
    const auto d = test::pattern(B, 9);
    REQUIRE(e.write(d.data(), B, 5 * B, false).is_ok());
    CHECK(e.stats().remaps == 1);
    CHECK(runs_of(e, 64 * B, 0) == std::vector<Run>{{0, 2 * B, true},
                                                    {2 * B, B, false},
                                                    {3 * B, 2 * B, true},
                                                    {5 * B, B, false},
                                                    {6 * B, 58 * B, true}});
  }
  SECTION("a pending block is data (reading it fails; it is not zeros)") {
    faulty->add_read_error(7);
    std::vector<char> buf(B);
    CHECK(e.read(buf.data(), B, 7 * B).code() == EIO);
    CHECK(runs_of(e, 2 * B, 6 * B) == std::vector<Run>{{6 * B, B, true}, {7 * B, B, false}});
  }
  SECTION("a range inside the device, unaligned, starts at its block") {
    const auto r = runs_of(e, 100, 2 * B + 10);
    REQUIRE(r.size() == 1);
    CHECK(r[0].offset == 2 * B);
    CHECK_FALSE(r[0].hole);
  }
  SECTION("past the end is EINVAL") {
    CHECK(e.extents(B, 64 * B, [](uint64_t, uint64_t, bool) {}).code() == EINVAL);
  }
  opened.value().reset();
  std::remove(path.c_str());
}
