// docs/behaviour.md, "Reads": one test per rule.
#include <catch2/catch.hpp>
#include <cstring>

#include "recording_device.h"
#include "test_util.h"

using namespace dmremap;

namespace {

constexpr uint32_t B = 4096;

std::vector<char> read_all(Engine& e, uint64_t off, uint64_t len, Status* st = nullptr) {
  std::vector<char> buf(len, '?');
  Status s = e.read(buf.data(), len, off);
  if (st) {
    *st = s;
  } else {
    INFO(s.to_string());
    REQUIRE(s.is_ok());
  }
  return buf;
}

void write_main_directly(test::Set& s, uint64_t block, const std::vector<char>& data) {
  REQUIRE(s.main_mem->write(data.data(), data.size(), block * B).is_ok());
}

bool is_remapped(Engine& e, uint64_t block, Cause* cause = nullptr) {
  bool found = false;
  e.for_each_entry(block, block + 1, [&](const RemapTable::Entry& en) {
    found = !RemapTable::is_pending(en.value);
    if (cause) *cause = RemapTable::cause_of(en.value);
  });
  return found;
}

}  // namespace

TEST_CASE("reads 1: the table is consulted before main (no stale data after a write error)",
          "[engine][reads]") {
  auto s = test::make_set();
  const auto old_data = test::pattern(B, 1);
  write_main_directly(s, 3, old_data);
  s.main->add_write_error(3);  // main keeps reading the old copy
  const auto new_data = test::pattern(B, 2);
  REQUIRE(s.engine->write(new_data.data(), B, 3 * B, false).is_ok());
  CHECK(read_all(*s.engine, 3 * B, B) == new_data);
  // The old copy on main still reads: a lazy design would return it.
  std::vector<char> on_main(B);
  REQUIRE(s.main->read(on_main.data(), B, 3 * B).is_ok());
  CHECK(on_main == old_data);
  test::reopen(s);
  CHECK(read_all(*s.engine, 3 * B, B) == new_data);
}

TEST_CASE("reads 2: unmapped ranges go to main in as few calls as possible", "[engine][reads]") {
  auto mem_main = std::make_shared<MemoryDevice>(1 << 20, "main");
  auto faulty = std::make_shared<FaultyDevice>(mem_main, B, "main");
  auto rec = std::make_shared<test::RecordingDevice>(faulty);
  auto spare = std::make_shared<MemoryDevice>(1 << 20, "spare");
  LayoutParams lp;
  lp.main_size = 1 << 20;
  REQUIRE(MetadataStore::format(*spare, lp, "").is_ok());
  auto e = Engine::open(rec, spare, EngineOptions{});
  REQUIRE(e.is_ok());
  Engine& engine = *e.value();
  std::vector<char> buf(64 * 1024);

  rec->clear();
  REQUIRE(engine.read(buf.data(), buf.size(), 0).is_ok());
  CHECK(rec->count('R') == 1);

  // Remap block 5 (write error), then a 16-block read is two main calls.
  faulty->add_write_error(5);
  const auto d = test::pattern(B, 9);
  REQUIRE(engine.write(d.data(), B, 5 * B, false).is_ok());
  rec->clear();
  REQUIRE(engine.read(buf.data(), buf.size(), 0).is_ok());
  CHECK(rec->count('R') == 2);
  CHECK(std::memcmp(buf.data() + 5 * B, d.data(), B) == 0);
}

TEST_CASE("reads 3: a failing range is narrowed to the bad block, which is retried",
          "[engine][reads]") {
  const unsigned retries = GENERATE(3u, 1u, 5u);
  auto mem_main = std::make_shared<MemoryDevice>(1 << 20, "main");
  auto faulty = std::make_shared<FaultyDevice>(mem_main, B, "main");
  auto rec = std::make_shared<test::RecordingDevice>(faulty);
  auto spare = std::make_shared<MemoryDevice>(1 << 20, "spare");
  LayoutParams lp;
  lp.main_size = 1 << 20;
  REQUIRE(MetadataStore::format(*spare, lp, "").is_ok());
  EngineOptions o;
  o.read_retries = retries;
  auto e = Engine::open(rec, spare, o);
  REQUIRE(e.is_ok());
  const auto content = test::pattern(64 * 1024, 4);
  REQUIRE(mem_main->write(content.data(), content.size(), 0).is_ok());
  faulty->add_read_error(11);

  std::vector<char> buf(64 * 1024);
  rec->clear();
  Status st = e.value()->read(buf.data(), buf.size(), 0);
  CHECK(st.code() == EIO);
  // Reads that include block 11: 1 + retries in all. The range's read and
  // the narrowing's are the first two, then the rest of the retries.
  size_t exact = 0;
  for (auto& op : rec->ops()) exact += op.kind == 'R' && op.offset == 11 * B && op.len == B;
  CHECK(exact == retries);
  // The whole range once, each of its 16 blocks once, then the retries,
  // plus one or two probe reads of other blocks, never block 11: before
  // the block is declared lost, does main still read elsewhere (reads 7)?
  const size_t probes = rec->count('R') - (1 + 16 + retries - 1);
  CHECK(probes >= 1);
  CHECK(probes <= 2);
  CHECK(std::memcmp(buf.data(), content.data(), 11 * B) == 0);
  CHECK(std::memcmp(buf.data() + 12 * B, content.data() + 12 * B, 4 * B) == 0);
}

TEST_CASE("reads 4: a weak block is rescued with its data", "[engine][reads]") {
  auto s = test::make_set();
  const auto content = test::pattern(4 * B, 11);
  write_main_directly(s, 8, content);
  s.main->add_weak_block(9, 2);  // fails twice, then reads
  CHECK(read_all(*s.engine, 8 * B, 4 * B) == content);
  Cause cause{};
  CHECK(is_remapped(*s.engine, 9, &cause));
  CHECK(cause == Cause::kRescue);
  const auto st = s.engine->stats();
  CHECK(st.retry_successes == 1);
  CHECK(st.remaps_by_cause[static_cast<int>(Cause::kRescue)] == 1);
  // The rescued copy is what is served from now on, even if main dies.
  s.main->add_read_error(9);
  CHECK(read_all(*s.engine, 9 * B, B) ==
        std::vector<char>(content.begin() + B, content.begin() + 2 * B));
  test::reopen(s);
  CHECK(read_all(*s.engine, 8 * B, 4 * B) == content);
}

TEST_CASE("reads 5: an unreadable block fails with EIO at its offset; the rest reads",
          "[engine][reads]") {
  auto s = test::make_set();
  const auto content = test::pattern(8 * B, 12);
  write_main_directly(s, 0, content);
  s.main->add_read_error(5);
  Status st;
  auto buf = read_all(*s.engine, 1000, 8 * B - 2000, &st);
  CHECK(st.code() == EIO);
  REQUIRE(st.error_offset().has_value());
  CHECK(*st.error_offset() == 5 * B);
  // Every other byte of the request holds the right data.
  CHECK(std::memcmp(buf.data(), content.data() + 1000, 5 * B - 1000) == 0);
  CHECK(std::memcmp(buf.data() + 6 * B - 1000, content.data() + 6 * B, 2 * B - 2000) == 0);
  auto stats = s.engine->stats();
  CHECK(stats.pending == 1);
  CHECK(stats.health == Health::kWarning);
  // Pending is journaled: it survives a crash, and still fails (main is not
  // touched again for it).
  test::reopen(s);
  CHECK(s.engine->stats().pending == 1);
  read_all(*s.engine, 5 * B, B, &st);
  CHECK(st.code() == EIO);
  CHECK(*st.error_offset() == 5 * B);
  // A request starting inside the bad block reports its own first byte.
  read_all(*s.engine, 5 * B + 100, 10, &st);
  CHECK(*st.error_offset() == 5 * B + 100);
  CHECK(read_all(*s.engine, 6 * B, B) ==
        std::vector<char>(content.begin() + 6 * B, content.begin() + 7 * B));
}

TEST_CASE("reads 6: no invented data; unreadable=zero only when asked", "[engine][reads]") {
  auto s = test::make_set();
  const auto content = test::pattern(2 * B, 13);
  write_main_directly(s, 2, content);
  s.main->add_read_error(3);
  Status st;
  auto buf = read_all(*s.engine, 2 * B, 2 * B, &st);
  CHECK(st.code() == EIO);
  // Not zeros, not anything: the failed block's bytes are left as they were.
  CHECK(std::all_of(buf.begin() + B, buf.end(), [](char c) { return c == '?'; }));

  EngineOptions salvage;
  salvage.unreadable_zero = true;
  test::reopen(s, salvage);
  buf = read_all(*s.engine, 2 * B, 2 * B);
  CHECK(std::equal(buf.begin(), buf.begin() + B, content.begin()));
  CHECK(std::all_of(buf.begin() + B, buf.end(), [](char c) { return c == 0; }));
}

TEST_CASE("reads: out of range is EINVAL", "[engine][reads][badinput]") {
  auto s = test::make_set();
  std::vector<char> buf(B);
  CHECK(s.engine->read(buf.data(), B, (1 << 20) - B + 1).code() == EINVAL);
  CHECK(s.engine->read(buf.data(), 1, ~uint64_t{0}).code() == EINVAL);
  CHECK(s.engine->read(buf.data(), 0, 1 << 20).is_ok());
}

TEST_CASE("reads: read-only mode serves reads and rescues nothing", "[engine][reads]") {
  auto s = test::make_set();
  EngineOptions ro;
  ro.read_only = true;
  test::reopen(s, ro);
  s.main->add_weak_block(4, 1);
  std::vector<char> buf(B);
  CHECK(s.engine->read(buf.data(), B, 4 * B).is_ok());
  CHECK_FALSE(is_remapped(*s.engine, 4));
  CHECK(s.engine->write(buf.data(), B, 0, false).code() == EPERM);
  CHECK(s.engine->write_zeroes(B, 0, false).code() == EPERM);
  CHECK(s.engine->trim(B, 0, false).code() == EPERM);
}

// docs/behaviour.md, "Slow reads" (slow=).
namespace {

test::Set slow_set(std::chrono::milliseconds slow) {
  test::SetParams p;
  p.options.slow_read = slow;
  return test::make_set(p);
}

// Reads that teach the engine main's usual read time.
void warm_up(Engine& e) {
  for (uint64_t i = 0; i < kSlowWarmup; ++i) read_all(e, 200 * B, B);
}

}  // namespace

TEST_CASE("slow reads: a block that reads correctly but slowly is rescued, cause slow",
          "[reads][slow]") {
  auto s = slow_set(std::chrono::milliseconds(40));
  for (uint64_t b = 0; b < 32; ++b) write_main_directly(s, b, test::pattern(B, b));
  warm_up(*s.engine);
  s.main->add_slow_block(5, std::chrono::milliseconds(120));
  s.main->add_slow_block(20, std::chrono::milliseconds(120));
  SECTION("a read of the block alone") {
    CHECK(read_all(*s.engine, 5 * B, B) == test::pattern(B, 5));
    Cause cause{};
    CHECK(is_remapped(*s.engine, 5, &cause));
    CHECK(cause == Cause::kSlow);
    CHECK_FALSE(is_remapped(*s.engine, 20));
  }
  SECTION("a read of many blocks names only the slow ones") {
    const std::vector<char> got = read_all(*s.engine, 0, 32 * B);
    for (uint64_t b = 0; b < 32; ++b) {
      INFO("block " << b);
      CHECK(std::memcmp(got.data() + b * B, test::pattern(B, b).data(), B) == 0);
      CHECK(is_remapped(*s.engine, b) == (b == 5 || b == 20));
    }
  }
  const EngineStats st = s.engine->stats();
  CHECK(st.slow_reads >= 1);
  // The copy is the block's data, and the next read takes it from the
  // spare without waiting for main.
  s.main->clear_faults();
  REQUIRE(s.main_mem->write(test::pattern(B, 99).data(), B, 5 * B).is_ok());
  CHECK(read_all(*s.engine, 5 * B, B) == test::pattern(B, 5));
  // It is recorded: after a crash it is still there, with its cause.
  test::reopen(s);
  Cause cause{};
  CHECK(is_remapped(*s.engine, 5, &cause));
  CHECK(cause == Cause::kSlow);
}

TEST_CASE("slow reads: off by default, and a main slow everywhere is not remapped",
          "[reads][slow]") {
  SECTION("off") {
    auto s = test::make_set();
    warm_up(*s.engine);
    s.main->add_slow_block(5, std::chrono::milliseconds(60));
    read_all(*s.engine, 5 * B, B);
    CHECK_FALSE(is_remapped(*s.engine, 5));
    CHECK(s.engine->stats().slow_reads == 0);
  }
  SECTION("every read slow from the start: past slow=, but not 20 times the usual") {
    auto s = slow_set(std::chrono::milliseconds(5));
    s.main->set_delay(std::chrono::milliseconds(10));
    warm_up(*s.engine);
    for (uint64_t b = 0; b < 8; ++b) read_all(*s.engine, b * B, B);
    for (uint64_t b = 0; b < 8; ++b) CHECK_FALSE(is_remapped(*s.engine, b));
    CHECK(s.engine->stats().slow_reads == 0);
  }
  SECTION("main turns slow everywhere after it was learnt: at most one block moves") {
    // A disk that stalls, a link that degrades: slow reads close together
    // are the device's. The usual time catches up within a few reads.
    auto s = slow_set(std::chrono::milliseconds(20));
    warm_up(*s.engine);
    s.main->set_delay(std::chrono::milliseconds(40));
    for (uint64_t b = 0; b < 24; ++b) read_all(*s.engine, b * B, B);
    CHECK(s.engine->stats().remaps <= 1);
    CHECK(s.engine->stats().slow_reads >= 2);
    CHECK(s.engine->stats().slow_reads < 24);  // the limit rose to the new normal
  }
  SECTION("no slow rescue once the pool is at its warning level") {
    test::SetParams p;
    p.options.slow_read = std::chrono::milliseconds(40);
    p.options.warn_percent = 0;
    auto s = test::make_set(p);
    warm_up(*s.engine);
    s.main->add_slow_block(5, std::chrono::milliseconds(120));
    read_all(*s.engine, 5 * B, B);
    CHECK_FALSE(is_remapped(*s.engine, 5));
    CHECK(s.engine->stats().slow_reads == 1);
  }
  SECTION("a slow read too long to read again block by block: none moves") {
    auto s = slow_set(std::chrono::milliseconds(40));
    warm_up(*s.engine);
    s.main->add_slow_block(5, std::chrono::milliseconds(120));
    read_all(*s.engine, 0, kSlowPinpointBytes + B);
    CHECK(s.engine->stats().remaps == 0);
    CHECK(s.engine->stats().slow_reads == 1);
  }
  SECTION("read-only: counted, not rescued") {
    test::SetParams p;
    p.options.slow_read = std::chrono::milliseconds(40);
    p.options.read_only = true;
    auto s = test::make_set(p);
    warm_up(*s.engine);
    s.main->add_slow_block(5, std::chrono::milliseconds(120));
    read_all(*s.engine, 5 * B, B);
    read_all(*s.engine, 5 * B, B);
    CHECK_FALSE(is_remapped(*s.engine, 5));
    CHECK(s.engine->stats().slow_reads == 2);
  }
}

TEST_CASE("slow reads: a scan finds a slow block", "[reads][slow][scan]") {
  auto s = slow_set(std::chrono::milliseconds(40));
  warm_up(*s.engine);
  s.main->add_slow_block(100, std::chrono::milliseconds(120));
  std::vector<char> buf(64 * B);
  std::vector<uint64_t> bad;
  for (uint64_t b = 0; b < (1 << 20) / B; b += 64) {
    REQUIRE(s.engine->scan_read(buf.data(), buf.size(), b * B, &bad).is_ok());
  }
  CHECK(bad.empty());
  Cause cause{};
  CHECK(is_remapped(*s.engine, 100, &cause));
  CHECK(cause == Cause::kSlow);
  CHECK(s.engine->stats().remaps == 1);
}
