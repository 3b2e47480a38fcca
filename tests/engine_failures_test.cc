// docs/behaviour.md, "Failures of the spare and of the pool" and "Safety around
// the data".
#include <catch2/catch.hpp>
#include <cstring>

#include "test_util.h"

using namespace dmremap;

namespace {
constexpr uint32_t B = 4096;
}

TEST_CASE("spare 1: a slot that fails to write is marked bad and never used again",
          "[engine][spare]") {
  auto s = test::make_set();
  const Superblock sb = s.engine->superblock();
  s.spare->add_write_error(sb.slot_offset / 512);  // slot 0
  s.main->add_write_error(2);
  const auto d = test::pattern(B, 1);
  REQUIRE(s.engine->write(d.data(), B, 2 * B, false).is_ok());
  auto st = s.engine->stats();
  CHECK(st.slots_bad == 1);
  CHECK(st.slots_used == 1);
  CHECK(st.slot_write_errors == 1);
  uint64_t slot = 99;
  s.engine->for_each_entry(2, 3, [&](const RemapTable::Entry& e) { slot = RemapTable::slot_of(e.value); });
  CHECK(slot == 1);
  std::vector<char> buf(B);
  REQUIRE(s.engine->read(buf.data(), B, 2 * B).is_ok());
  CHECK(buf == d);
  test::reopen(s);
  st = s.engine->stats();
  CHECK(st.slots_bad == 1);
  s.main->add_write_error(5);
  REQUIRE(s.engine->write(d.data(), B, 5 * B, false).is_ok());
  s.engine->for_each_entry(5, 6, [&](const RemapTable::Entry& e) { slot = RemapTable::slot_of(e.value); });
  CHECK(slot == 2);
}

TEST_CASE("spare 1: a remapped block whose slot fails moves to a new slot",
          "[engine][spare]") {
  auto s = test::make_set();
  const Superblock sb = s.engine->superblock();
  s.main->add_write_error(2);
  const auto d1 = test::pattern(B, 1), d2 = test::pattern(B, 2);
  REQUIRE(s.engine->write(d1.data(), B, 2 * B, false).is_ok());
  s.spare->add_write_error(sb.slot_offset / 512 + 3);  // inside slot 0
  REQUIRE(s.engine->write(d2.data(), B, 2 * B, false).is_ok());
  std::vector<char> buf(B);
  REQUIRE(s.engine->read(buf.data(), B, 2 * B).is_ok());
  CHECK(buf == d2);
  auto st = s.engine->stats();
  CHECK(st.slots_bad == 1);
  CHECK(st.remaps == 1);
}

TEST_CASE("spare 2: when the journal cannot be written, writes stop and reads go on",
          "[engine][spare]") {
  auto s = test::make_set();
  const Superblock sb = s.engine->superblock();
  const auto healthy = test::pattern(4 * B, 3);
  REQUIRE(s.engine->write(healthy.data(), healthy.size(), 0, false).is_ok());
  // Both copies of the next journal unit refuse writes.
  s.spare->add_write_error(sb.journal_offset[0] / 512);
  s.spare->add_write_error(sb.journal_offset[1] / 512);
  s.main->add_write_error(8);
  const auto d = test::pattern(B, 4);
  Status st = s.engine->write(d.data(), B, 8 * B, false);
  CHECK(st.code() == EIO);
  CHECK_THAT(st.message(), Catch::Contains("journal"));
  // Every later write is refused, even to healthy blocks.
  CHECK(s.engine->write(d.data(), B, 0, false).code() == EIO);
  CHECK(s.engine->write_zeroes(B, 0, false).code() == EIO);
  std::vector<char> buf(4 * B);
  REQUIRE(s.engine->read(buf.data(), buf.size(), 0).is_ok());
  CHECK(buf == healthy);
  auto stats = s.engine->stats();
  CHECK(stats.journal_broken);
  CHECK(stats.health == Health::kFailing);
  CHECK(stats.remaps == 0);
  // Nothing was acknowledged that was not recorded.
  s.spare->clear_faults();
  test::reopen(s);
  CHECK(s.engine->stats().remaps == 0);
}

TEST_CASE("spare 3: an exhausted pool gives ENOSPC; health warns first", "[engine][spare]") {
  test::SetParams p;
  p.spare_size = 256 * 1024;
  p.journal_bytes = 8 * 4096;
  auto s = test::make_set(p);
  const uint64_t slots = s.engine->stats().slots_total;
  REQUIRE(slots >= 5);
  REQUIRE(slots < 64);
  const auto d = test::pattern(B, 5);
  bool warned = false;
  for (uint64_t b = 0; b < slots; ++b) {
    s.main->add_write_error(b);
    REQUIRE(s.engine->write(d.data(), B, b * B, false).is_ok());
    const auto st = s.engine->stats();
    if ((b + 1) * 100 >= 80 * slots && b + 1 < slots) {
      CHECK(st.health == Health::kWarning);
      warned = true;
    }
  }
  CHECK(warned);
  s.main->add_write_error(slots);
  Status st = s.engine->write(d.data(), B, slots * B, false);
  CHECK(st.code() == ENOSPC);
  const auto stats = s.engine->stats();
  CHECK(stats.slots_free == 0);
  CHECK(stats.health == Health::kFailing);
  CHECK_THAT(stats.health_reason, Catch::Contains("exhausted"));
  // Writes that need no slot still work.
  REQUIRE(s.engine->write(d.data(), B, (slots + 1) * B, false).is_ok());
}

TEST_CASE("safety 2: a spare opened with another main is refused, saying what differs",
          "[engine][safety]") {
  auto s = test::make_set();
  s.engine.reset();
  auto other_main = std::make_shared<MemoryDevice>(2 << 20, "main");
  auto e = Engine::open(other_main, s.spare, EngineOptions{});
  CHECK(e.status().code() == EINVAL);
  CHECK_THAT(e.status().message(), Catch::Contains("2097152 bytes") &&
                                       Catch::Contains("1048576 bytes"));
}

TEST_CASE("safety 2: bad configuration stops start-up with one clear line", "[engine][safety]") {
  auto main = std::make_shared<MemoryDevice>(1 << 20, "main");
  auto blank = std::make_shared<MemoryDevice>(1 << 20, "spare");
  auto e = Engine::open(main, blank, EngineOptions{});
  CHECK(e.status().code() == ENOENT);
  CHECK_THAT(e.status().message(), Catch::Contains("dmremap format"));
  LayoutParams lp;
  lp.main_size = 1 << 20;
  lp.block_size = 3000;
  CHECK(MetadataStore::format(*blank, lp, "").status().code() == EINVAL);
  lp.block_size = 4096;
  lp.main_size = (1 << 20) + 512;
  CHECK_THAT(MetadataStore::format(*blank, lp, "").status().message(),
             Catch::Contains("multiple of the block size"));
  auto tiny = std::make_shared<MemoryDevice>(64 * 1024, "spare");
  lp.main_size = 1 << 20;
  CHECK(MetadataStore::format(*tiny, lp, "").status().code() == ENOSPC);
}

TEST_CASE("manual remap copies readable data, and marks unreadable blocks pending",
          "[engine][admin]") {
  auto s = test::make_set();
  const auto d = test::pattern(B, 6);
  REQUIRE(s.main_mem->write(d.data(), B, 12 * B).is_ok());
  REQUIRE(s.engine->remap_block(12).is_ok());
  CHECK(s.engine->remap_block(12).code() == EEXIST);
  s.main->add_read_error(12);  // main may die now: the copy is safe
  std::vector<char> buf(B);
  REQUIRE(s.engine->read(buf.data(), B, 12 * B).is_ok());
  CHECK(buf == d);
  CHECK(s.engine->stats().remaps_by_cause[static_cast<int>(Cause::kManual)] == 1);
  s.main->add_read_error(13);
  CHECK(s.engine->remap_block(13).code() == EIO);
  CHECK(s.engine->stats().pending == 1);
  CHECK(s.engine->remap_block(256).code() == EINVAL);
}

TEST_CASE("spare 1: a run of bad slots longer than one check is skipped and recorded",
          "[engine][spare]") {
  auto s = test::make_set();
  const Superblock sb = s.engine->superblock();
  const uint64_t run = 2 * Engine::kSlotFailuresPerCheck + 3;
  for (uint64_t i = 0; i < run; ++i) s.spare->add_write_error((sb.slot_offset + i * B) / 512);
  s.main->add_write_error(2);
  const auto d = test::pattern(B, 5);
  REQUIRE(s.engine->write(d.data(), B, 2 * B, false).is_ok());
  uint64_t slot = 0;
  s.engine->for_each_entry(2, 3, [&](const RemapTable::Entry& e) { slot = RemapTable::slot_of(e.value); });
  CHECK(slot == run);
  CHECK(s.engine->stats().slots_bad == run);
  test::reopen(s);
  CHECK(s.engine->stats().slots_bad == run);
  std::vector<char> buf(B);
  REQUIRE(s.engine->read(buf.data(), B, 2 * B).is_ok());
  CHECK(buf == d);
}

TEST_CASE("spare 4: a spare that refuses every write gives EIO after a few slots, not ENOSPC",
          "[engine][spare]") {
  auto s = test::make_set();
  const auto healthy = test::pattern(B, 6);
  REQUIRE(s.engine->write(healthy.data(), B, 0, false).is_ok());
  REQUIRE(s.engine->flush().is_ok());
  const uint64_t sectors = s.spare->size() / 512;
  for (uint64_t i = 0; i < sectors; ++i) s.spare->add_write_error(i);
  s.main->add_write_error(2);
  const auto d = test::pattern(B, 7);
  const Status st = s.engine->write(d.data(), B, 2 * B, false);
  CHECK(st.code() == EIO);
  // It gave up after one check's worth of slots, not the whole pool.
  const auto stats = s.engine->stats();
  CHECK(stats.slot_write_errors == Engine::kSlotFailuresPerCheck);
  CHECK(stats.slots_free > Engine::kSlotFailuresPerCheck);
  CHECK(s.engine->write(d.data(), B, 4 * B, false).code() == EIO);
  std::vector<char> buf(B);
  REQUIRE(s.engine->read(buf.data(), B, 0).is_ok());
  CHECK(buf == healthy);
}
