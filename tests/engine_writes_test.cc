// docs/behaviour.md, "Writes" and "Durability": one test per rule.
#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <thread>

#include "recording_device.h"
#include "test_util.h"

using namespace dmremap;

namespace {

constexpr uint32_t B = 4096;

std::vector<char> read_ok(Engine& e, uint64_t off, uint64_t len) {
  std::vector<char> buf(len);
  Status s = e.read(buf.data(), len, off);
  INFO(s.to_string());
  REQUIRE(s.is_ok());
  return buf;
}

std::vector<char> main_bytes(test::Set& s, uint64_t off, uint64_t len) {
  return std::vector<char>(s.main_mem->contents().begin() + static_cast<long>(off),
                           s.main_mem->contents().begin() + static_cast<long>(off + len));
}

std::optional<RemapTable::Entry> entry(Engine& e, uint64_t block) {
  std::optional<RemapTable::Entry> out;
  e.for_each_entry(block, block + 1, [&](const RemapTable::Entry& en) { out = en; });
  return out;
}

void make_pending(test::Set& s, uint64_t block) {
  s.main->add_read_error(block);
  std::vector<char> buf(B);
  REQUIRE(s.engine->read(buf.data(), B, block * B).code() == EIO);
  REQUIRE(s.engine->stats().pending == 1);
}

}  // namespace

TEST_CASE("writes 1: remapped blocks are written to their slot, never to main",
          "[engine][writes]") {
  auto s = test::make_set();
  s.main->add_write_error(4);
  const auto first = test::pattern(B, 1);
  REQUIRE(s.engine->write(first.data(), B, 4 * B, false).is_ok());
  const auto on_main = main_bytes(s, 4 * B, B);
  const auto second = test::pattern(B, 2);
  REQUIRE(s.engine->write(second.data(), B, 4 * B, false).is_ok());
  CHECK(read_ok(*s.engine, 4 * B, B) == second);
  CHECK(main_bytes(s, 4 * B, B) == on_main);
  CHECK(s.engine->stats().remaps == 1);
}

TEST_CASE("writes 1: a write to a pending block remaps it and never touches main",
          "[engine][writes]") {
  auto s = test::make_set();
  make_pending(s, 6);
  const auto before = main_bytes(s, 6 * B, B);
  const auto data = test::pattern(B, 3);
  REQUIRE(s.engine->write(data.data(), B, 6 * B, false).is_ok());
  CHECK(main_bytes(s, 6 * B, B) == before);
  CHECK(read_ok(*s.engine, 6 * B, B) == data);
  auto e = entry(*s.engine, 6);
  REQUIRE(e);
  CHECK(RemapTable::cause_of(e->value) == Cause::kPendingWrite);
  const auto st = s.engine->stats();
  CHECK(st.pending == 0);
  CHECK(st.remaps_by_cause[static_cast<int>(Cause::kPendingWrite)] == 1);
  test::reopen(s);
  CHECK(read_ok(*s.engine, 6 * B, B) == data);
}

TEST_CASE("writes 2: a main write error is remapped and the client sees success",
          "[engine][writes]") {
  auto s = test::make_set();
  s.main->add_write_error(10);
  const auto data = test::pattern(8 * B, 4);
  REQUIRE(s.engine->write(data.data(), data.size(), 6 * B, false).is_ok());
  CHECK(read_ok(*s.engine, 6 * B, 8 * B) == data);
  // Only the failing block moved; its neighbours are on main.
  auto st = s.engine->stats();
  CHECK(st.remaps == 1);
  CHECK(st.remaps_by_cause[static_cast<int>(Cause::kWriteError)] == 1);
  CHECK(st.main_write_errors >= 1);
  CHECK(entry(*s.engine, 10));
  CHECK(main_bytes(s, 6 * B, 4 * B) == std::vector<char>(data.begin(), data.begin() + 4 * B));
  CHECK(main_bytes(s, 11 * B, 3 * B) == std::vector<char>(data.begin() + 5 * B, data.end()));
  test::reopen(s);
  CHECK(read_ok(*s.engine, 6 * B, 8 * B) == data);
}

TEST_CASE("writes 3: a write smaller than a block is read-modify-write", "[engine][writes]") {
  auto s = test::make_set();
  const auto base = test::pattern(2 * B, 5);
  REQUIRE(s.engine->write(base.data(), base.size(), 0, false).is_ok());
  const auto patch = test::pattern(300, 6);
  REQUIRE(s.engine->write(patch.data(), patch.size(), B - 100, false).is_ok());
  auto expect = base;
  std::copy(patch.begin(), patch.end(), expect.begin() + B - 100);
  CHECK(read_ok(*s.engine, 0, 2 * B) == expect);

  SECTION("on a remapped block") {
    s.main->add_write_error(0);
    REQUIRE(s.engine->write(base.data(), B, 0, false).is_ok());
    REQUIRE(s.engine->write(patch.data(), 10, 20, false).is_ok());
    auto e2 = std::vector<char>(base.begin(), base.begin() + B);
    std::copy(patch.begin(), patch.begin() + 10, e2.begin() + 20);
    CHECK(read_ok(*s.engine, 0, B) == e2);
  }
  SECTION("when the rest of the block cannot be read: EIO, nothing invented") {
    s.main->add_read_error(1);
    Status st = s.engine->write(patch.data(), 10, B + 20, false);
    CHECK(st.code() == EIO);
    CHECK_THAT(st.message(), Catch::Contains("the rest of the block cannot be read"));
    std::vector<char> buf(B);
    CHECK(s.engine->read(buf.data(), B, B).code() == EIO);
    // A whole-block write still repairs it.
    const auto whole = test::pattern(B, 7);
    REQUIRE(s.engine->write(whole.data(), B, B, false).is_ok());
    CHECK(read_ok(*s.engine, B, B) == whole);
  }
}

TEST_CASE("writes 4: trim of remapped or pending blocks does nothing harmful",
          "[engine][writes]") {
  auto s = test::make_set();
  const auto old_main = test::pattern(B, 8);
  REQUIRE(s.main_mem->write(old_main.data(), B, 2 * B).is_ok());
  s.main->add_write_error(2);
  const auto data = test::pattern(B, 9);
  REQUIRE(s.engine->write(data.data(), B, 2 * B, false).is_ok());
  make_pending(s, 3);
  REQUIRE(s.engine->trim(4 * B, 0, false).is_ok());
  // The remapped block never exposes main's stale copy; pending stays pending.
  CHECK(read_ok(*s.engine, 2 * B, B) == data);
  std::vector<char> buf(B);
  CHECK(s.engine->read(buf.data(), B, 3 * B).code() == EIO);
  CHECK(s.engine->stats().pending == 1);
}

TEST_CASE("writes 4: write-zeroes is a write of zeros everywhere", "[engine][writes]") {
  auto s = test::make_set();
  const auto data = test::pattern(6 * B, 10);
  REQUIRE(s.engine->write(data.data(), data.size(), 0, false).is_ok());
  s.main->add_write_error(1);
  REQUIRE(s.engine->write(data.data() + B, B, B, false).is_ok());  // remapped
  make_pending(s, 2);
  s.main->add_write_error(4);  // zeroing this one fails on main
  REQUIRE(s.engine->write_zeroes(5 * B - 10, 5, false).is_ok());
  auto back = read_ok(*s.engine, 0, 6 * B);
  CHECK(std::equal(back.begin(), back.begin() + 5, data.begin()));
  CHECK(std::all_of(back.begin() + 5, back.begin() + 5 * B - 5, [](char c) { return c == 0; }));
  CHECK(std::equal(back.begin() + 5 * B - 5, back.end(), data.begin() + 5 * B - 5));
  const auto st = s.engine->stats();
  CHECK(st.pending == 0);
  CHECK(st.remaps == 3);  // 1 (earlier), 2 (pending write), 4 (write error)
}

TEST_CASE("writes: bad input gets the NBD errors", "[engine][writes][badinput]") {
  auto s = test::make_set();
  std::vector<char> buf(B);
  CHECK(s.engine->write(buf.data(), B, (1 << 20) - 100, false).code() == ENOSPC);
  CHECK(s.engine->write_zeroes(B, 1 << 20, false).code() == ENOSPC);
  CHECK(s.engine->trim(2 * B, (1 << 20) - B, false).code() == EINVAL);
  CHECK(s.engine->write(buf.data(), 0, 1 << 20, false).is_ok());
}

TEST_CASE("durability 1: a remap commits slot and header, flush, journal, flush, in that order",
          "[engine][durability]") {
  auto main_mem = std::make_shared<MemoryDevice>(1 << 20, "main");
  auto main = std::make_shared<FaultyDevice>(main_mem, B, "main");
  auto spare = std::make_shared<test::RecordingDevice>(std::make_shared<MemoryDevice>(1 << 20));
  LayoutParams lp;
  lp.main_size = 1 << 20;
  auto sb = MetadataStore::format(*spare, lp, "");
  REQUIRE(sb.is_ok());
  auto e = Engine::open(main, spare, EngineOptions{});
  REQUIRE(e.is_ok());
  main->add_write_error(7);
  spare->clear();
  const auto data = test::pattern(B, 11);
  REQUIRE(e.value()->write(data.data(), B, 7 * B, false).is_ok());
  const auto ops = spare->ops();
  REQUIRE(ops.size() == 7);
  const Superblock& s = sb.value();
  CHECK((ops[0].kind == 'W' && ops[0].offset == s.slot_offset && ops[0].len == B));
  // The slot's header: its unit is read, updated and written back.
  CHECK((ops[1].kind == 'R' && ops[1].offset == slot_header_unit(s, 0)));
  CHECK((ops[2].kind == 'W' && ops[2].offset == slot_header_unit(s, 0) && ops[2].len == 4096));
  CHECK(ops[3].kind == 'F');
  CHECK((ops[4].kind == 'W' && ops[4].offset == s.journal_offset[0]));
  CHECK((ops[5].kind == 'W' && ops[5].offset == s.journal_offset[1]));
  CHECK(ops[6].kind == 'F');
}

TEST_CASE("durability 2: FLUSH and FUA survive a power cut; unflushed writes may not",
          "[engine][durability]") {
  auto s = test::make_set();
  auto power = std::make_shared<PowerSwitch>();
  s.main->attach(power);
  s.spare->attach(power);
  const auto a = test::pattern(B, 12), b = test::pattern(B, 13), c = test::pattern(B, 14);
  REQUIRE(s.engine->write(a.data(), B, 0, false).is_ok());
  REQUIRE(s.engine->flush().is_ok());
  REQUIRE(s.engine->write(b.data(), B, B, /*fua=*/true).is_ok());
  REQUIRE(s.engine->write(c.data(), B, 2 * B, false).is_ok());  // never flushed
  power->cut_after(1);
  s.engine.reset();
  s.main->power_cut(FaultyDevice::CutMode::kDrop, 1);
  s.spare->power_cut(FaultyDevice::CutMode::kDrop, 1);
  power->reset();
  test::reopen(s);
  CHECK(read_ok(*s.engine, 0, B) == a);
  CHECK(read_ok(*s.engine, B, B) == b);
  CHECK(read_ok(*s.engine, 2 * B, B) == std::vector<char>(B, 0));
}

TEST_CASE("durability 2: a flush on one connection covers writes from all (multi-conn)",
          "[engine][durability]") {
  auto s = test::make_set();
  auto power = std::make_shared<PowerSwitch>();
  s.main->attach(power);
  s.spare->attach(power);
  s.main->add_write_error(9);  // one of the writes remaps
  std::vector<std::thread> conns;
  std::atomic<int> failed{0};  // Catch2's assertions are not thread-safe
  for (int t = 0; t < 4; ++t) {
    conns.emplace_back([&, t] {
      for (int i = 0; i < 8; ++i) {
        const uint64_t block = static_cast<uint64_t>(t) * 8 + i;
        const auto d = test::pattern(B, 100 + block);
        if (!s.engine->write(d.data(), B, block * B, false).is_ok()) ++failed;
      }
    });
  }
  for (auto& th : conns) th.join();
  REQUIRE(failed == 0);
  REQUIRE(s.engine->flush().is_ok());  // "another connection"
  s.engine.reset();
  s.main->power_cut(FaultyDevice::CutMode::kTear, 7);
  s.spare->power_cut(FaultyDevice::CutMode::kTear, 7);
  test::reopen(s);
  for (uint64_t block = 0; block < 32; ++block) {
    CHECK(read_ok(*s.engine, block * B, B) == test::pattern(B, 100 + block));
  }
}

TEST_CASE("durability 4: close leaves clean metadata; reopen finds the same state",
          "[engine][durability]") {
  auto s = test::make_set();
  s.main->add_write_error(3);
  const auto d = test::pattern(B, 15);
  REQUIRE(s.engine->write(d.data(), B, 3 * B, false).is_ok());
  CHECK_FALSE(s.engine->superblock().clean());
  REQUIRE(s.engine->close().is_ok());
  CHECK(s.engine->superblock().clean());
  CHECK(s.engine->read(const_cast<char*>(d.data()), 1, 0).code() == EIO);  // closed
  OpenReport rep;
  s.engine.reset();
  auto e = Engine::open(s.main, s.spare, EngineOptions{}, &rep);
  REQUIRE(e.is_ok());
  CHECK(rep.was_clean);
  CHECK(rep.journal_units == 0);
  CHECK(e.value()->stats().remaps == 1);
}

TEST_CASE("concurrency: rescues and writes to the same blocks never lose a write",
          "[engine][concurrency]") {
  // A reader that rescues a weak block must not copy data older than a write
  // that completed meanwhile.
  for (int round = 0; round < 20; ++round) {
    auto s = test::make_set();
    for (uint64_t b = 0; b < 16; ++b) s.main->add_weak_block(b, 1 + (b + round) % 3);
    std::vector<char> last(16);
    std::atomic<int> failed{0};  // Catch2's assertions are not thread-safe
    std::thread writer([&] {
      for (int i = 0; i < 64; ++i) {
        const uint64_t b = static_cast<uint64_t>(i * 7 + round) % 16;
        const auto d = test::pattern(B, 1000 + i);
        if (!s.engine->write(d.data(), B, b * B, false).is_ok()) ++failed;
        last[b] = static_cast<char>(i + 1);
      }
    });
    std::thread reader([&] {
      std::vector<char> buf(16 * B);
      for (int i = 0; i < 16; ++i) (void)s.engine->read(buf.data(), buf.size(), 0);
    });
    writer.join();
    reader.join();
    REQUIRE(failed == 0);
    for (uint64_t b = 0; b < 16; ++b) {
      if (!last[b]) continue;
      CHECK(read_ok(*s.engine, b * B, B) == test::pattern(B, 1000 + last[b] - 1));
    }
  }
}
