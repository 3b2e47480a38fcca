// dmremap import's inputs (lib/include/dmremap/bad_list.h) and what the
// engine does with them (Engine::mark_known_bad): docs/behaviour.md,
// "Import".
#include <catch2/catch.hpp>

#include <ctime>

#include "dmremap/bad_list.h"
#include "dmremap/set_actions.h"
#include "test_util.h"

using namespace dmremap;

namespace {

constexpr uint64_t kMain = 64 << 20;
constexpr uint32_t B = 4096;

BadList parse(const std::string& text, BadListOptions o, uint64_t main_size = kMain) {
  auto r = parse_bad_list(text, o, main_size, B);
  INFO(r.status().to_string());
  REQUIRE(r.is_ok());
  return r.value();
}

Status parse_error(const std::string& text, BadListOptions o, uint64_t main_size = kMain) {
  auto r = parse_bad_list(text, o, main_size, B);
  REQUIRE_FALSE(r.is_ok());
  return r.status();
}

BadListOptions ddrescue(std::string statuses = "-") {
  BadListOptions o;
  o.format = BadListFormat::kDdrescue;
  o.statuses = std::move(statuses);
  return o;
}

BadListOptions numbers(BadListFormat f, uint64_t unit) {
  BadListOptions o;
  o.format = f;
  o.unit = unit;
  return o;
}

// A mapfile as GNU ddrescue writes one: comments, the status line, then
// pos size status in hex.
const char* const kMap =
    "# Mapfile. Created by GNU ddrescue version 1.27\n"
    "# current_pos  current_status  current_pass\n"
    "0x00102000     ?               1\n"
    "#      pos        size  status\n"
    "0x00000000  0x00100000  +\n"
    "0x00100000  0x00000200  -\n"      // one sector: block 256
    "0x00100200  0x00001E00  +\n"
    "0x00102000  0x00002000  *\n"      // blocks 258-259, non-trimmed
    "0x00104000  0x00001000  /\n"      // block 260, non-scraped
    "0x00105000  0x00000001  -\n"      // one byte: block 261
    "0x00105001  0x03EFAFFF  ?\n";

}  // namespace

TEST_CASE("import: a ddrescue mapfile's bad-sector areas, as main's blocks", "[import]") {
  const BadList only_bad = parse(kMap, ddrescue());
  CHECK(only_bad.blocks == std::vector<uint64_t>{256, 261});
  CHECK(only_bad.entries == 2);
  CHECK(only_bad.bad_bytes == 0x200 + 1);
  // Non-tried, non-trimmed and non-scraped bytes are said, not imported.
  CHECK(only_bad.unfinished_bytes == 0x2000 + 0x1000 + 0x03EFAFFF);
  const BadList all_failed = parse(kMap, ddrescue("-*/"));
  CHECK(all_failed.blocks == std::vector<uint64_t>{256, 258, 259, 260, 261});
  CHECK(all_failed.unfinished_bytes == 0x03EFAFFF);
  // Decimal works too, and an area across a block boundary names both.
  CHECK(parse("0 +\n8190 2 -\n", ddrescue()).blocks == std::vector<uint64_t>{1});
  CHECK(parse("0 +\n4095 2 -\n", ddrescue()).blocks == std::vector<uint64_t>{0, 1});
}

TEST_CASE("import: a ddrescue mapfile that is wrong says where", "[import]") {
  CHECK(parse_error("", ddrescue()).message().find("empty") != std::string::npos);
  CHECK(parse_error("0 +\n0x0 0x10 x\n", ddrescue()).message().find("line 2") !=
        std::string::npos);
  CHECK(parse_error("0 +\n0x0 0x10\n", ddrescue()).message().find("line 2") != std::string::npos);
  CHECK(parse_error("0 +\n0x0 -0x10 -\n", ddrescue()).code() == EINVAL);
  CHECK(parse_error("0 +\n0x0 0x1FFFFFFFFFFFFFFFF -\n", ddrescue()).code() == EINVAL);
  // A bad area past main's end: a map of another disk.
  const Status past = parse_error("0 +\n0x4000000 0x200 -\n", ddrescue());
  CHECK(past.message().find("past main's end") != std::string::npos);
  // Finished areas past the end do not matter.
  CHECK(parse("0 +\n0 0x8000000 +\n", ddrescue()).blocks.empty());
  // More blocks than the set can hold pending: E2BIG, not expanded.
  BadListOptions o = ddrescue();
  o.max_blocks = 10;
  CHECK(parse_error("0 +\n0 0x4000000 -\n", o).code() == E2BIG);
  CHECK(parse("0 +\n0 0xA000 -\n", o).blocks.size() == 10);
}

TEST_CASE("import: badblocks lists in any block size, 64-bit", "[import]") {
  // badblocks -b 1024 (its default): four of its blocks to one of ours.
  CHECK(parse("8\n9\n10\n11\n12\n", numbers(BadListFormat::kBadblocks, 1024)).blocks ==
        std::vector<uint64_t>{2, 3});
  // -b 8192: each spans two of ours. -b 512.
  CHECK(parse("3\n", numbers(BadListFormat::kBadblocks, 8192)).blocks ==
        std::vector<uint64_t>{6, 7});
  CHECK(parse("7\n8\n", numbers(BadListFormat::kBadblocks, 512)).blocks ==
        std::vector<uint64_t>{0, 1});
  // Past 2^32 on a large main (the size alone is given: nothing is read).
  const uint64_t big = uint64_t{1} << 50;
  CHECK(parse("5000000000\n", numbers(BadListFormat::kBadblocks, 4096), big).blocks ==
        std::vector<uint64_t>{5000000000});
  CHECK(parse_error("5000000000\n", numbers(BadListFormat::kBadblocks, 4096))
            .message()
            .find("line 1") != std::string::npos);
  CHECK(parse_error("1\nx\n", numbers(BadListFormat::kBadblocks, 1024)).message().find(
            "line 2") != std::string::npos);
  CHECK(parse_error("18446744073709551616\n", numbers(BadListFormat::kBadblocks, 1024)).code() ==
        EINVAL);
  // The unit is never guessed.
  CHECK(parse_error("1\n", numbers(BadListFormat::kBadblocks, 0)).code() == EINVAL);
}

TEST_CASE("import: LBA lists with an explicit sector size", "[import]") {
  // A 4Kn disk's SMART log: LBA 16 is byte 65536, block 16; on a 512e
  // disk the same number is block 2.
  CHECK(parse("16\n", numbers(BadListFormat::kLba, 4096)).blocks == std::vector<uint64_t>{16});
  CHECK(parse("16\n", numbers(BadListFormat::kLba, 512)).blocks == std::vector<uint64_t>{2});
  CHECK(parse("0x10  # from smartctl -l selftest\n\n17\n", numbers(BadListFormat::kLba, 512))
            .blocks == std::vector<uint64_t>{2});
  CHECK(parse_error("16\n", numbers(BadListFormat::kLba, 0)).code() == EINVAL);
}

TEST_CASE("import: blocks become pending without a read, and stay so", "[import]") {
  test::SetParams p;
  p.pending_capacity = 64;
  auto s = test::make_set(p);
  // A remapped block is left as it is.
  s.main->add_write_error(7);
  std::vector<char> buf(B, 'x');
  REQUIRE(s.engine->write(buf.data(), B, 7 * B, true).is_ok());
  // Main would fail these; import must not ask it.
  for (uint64_t b : {3, 4, 5}) s.main->add_read_error(b);
  const auto before = static_cast<uint64_t>(std::time(nullptr));
  Engine::KnownBadResult r;
  REQUIRE(s.engine->mark_known_bad({5, 3, 4, 7, 3, 9}, r).is_ok());
  CHECK(r.marked == 4);  // 3, 4, 5, 9
  CHECK(r.already == 1);  // 7
  CHECK(s.engine->stats().main_read_errors == 0);
  CHECK(s.engine->stats().pending == 4);
  // A read fails at once, without main; a write gives the block a slot.
  CHECK(s.engine->read(buf.data(), B, 9 * B).code() == EIO);
  CHECK(s.engine->stats().main_read_errors == 0);
  REQUIRE(s.engine->write(buf.data(), B, 9 * B, false).is_ok());
  CHECK(s.engine->stats().pending == 3);
  // Again: nothing new. After a crash: the marks and their times.
  Engine::KnownBadResult again;
  REQUIRE(s.engine->mark_known_bad({3, 4, 5}, again).is_ok());
  CHECK((again.marked == 0 && again.already == 3));
  test::reopen(s);
  const Json listed = list_json(*s.engine, ListQuery{});
  REQUIRE(listed["pending"].size() == 3);
  CHECK(listed["pending"][0]["time"].get<uint64_t>() >= before);
  SECTION("no room for them all: none is marked") {
    std::vector<uint64_t> many;
    for (uint64_t b = 100; b < 200; ++b) many.push_back(b);
    Engine::KnownBadResult full;
    const Status st = s.engine->mark_known_bad(many, full);
    CHECK(st.code() == ENOSPC);
    CHECK(full.marked == 0);
    CHECK(s.engine->stats().pending == 3);
  }
  SECTION("past the end: none is marked") {
    Engine::KnownBadResult past;
    CHECK(s.engine->mark_known_bad({10, 1u << 20}, past).code() == EINVAL);
    CHECK(s.engine->stats().pending == 3);
  }
  SECTION("more than a journal unit at once") {
    test::SetParams big;
    big.pending_capacity = 1000;
    big.main_size = 8 << 20;
    auto t = test::make_set(big);
    std::vector<uint64_t> lots;
    for (uint64_t b = 0; b < 500; ++b) lots.push_back(b * 2);
    Engine::KnownBadResult lr;
    const Status st = t.engine->mark_known_bad(lots, lr);
    INFO(st.to_string());
    REQUIRE(st.is_ok());
    CHECK(lr.marked == 500);
    test::reopen(t);
    CHECK(t.engine->stats().pending == 500);
  }
}
