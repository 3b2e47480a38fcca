// The surface scan (lib/scan.h): it finds weak and dead blocks, keeps its
// place on the spare, pauses, goes on, is cancelled, keeps to its rate and
// yields to clients.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#include "dmremap/scan.h"
#include "test_util.h"

using namespace dmremap;
using namespace std::chrono_literals;

namespace {
constexpr uint32_t B = 4096;

// Waits up to 30 s for the scan to leave `state`.
ScanProgress wait_while(Scanner& s, ScanState state) {
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (s.progress().state == state) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(2ms);
  }
  return s.progress();
}
}  // namespace

TEST_CASE("scan: every block is read; a weak one is rescued, a dead one marked pending",
          "[scan]") {
  auto s = test::make_set();
  s.main->add_weak_block(100, 2);  // fails in its piece and once alone, then reads
  s.main->add_read_error(200);      // never reads
  Scanner scanner(*s.engine);
  CHECK(scanner.progress().state == ScanState::kNone);
  REQUIRE(scanner.start(std::nullopt, 0).is_ok());
  const ScanProgress p = wait_while(scanner, ScanState::kRunning);
  CHECK(p.state == ScanState::kDone);
  CHECK(p.next_block == p.blocks);
  CHECK(p.unreadable == 1);
  CHECK(p.rescued == 1);
  CHECK(p.last_good_read != 0);
  const EngineStats st = s.engine->stats();
  CHECK(st.pending == 1);
  CHECK(st.remaps_by_cause[static_cast<int>(Cause::kRescue)] == 1);
  // Recorded on the spare: done, at the end.
  const Engine::ScanMark m = s.engine->saved_scan();
  CHECK(m.state == static_cast<uint32_t>(ScanState::kDone));
  CHECK(m.next == p.blocks);
  CHECK(m.started != 0);
}

TEST_CASE("scan: its place is on the spare; a new Scanner goes on from it", "[scan]") {
  test::SetParams params;
  params.main_size = 8 << 20;  // 2048 blocks
  auto s = test::make_set(params);
  {
    Scanner scanner(*s.engine);
    REQUIRE(scanner.start(uint64_t{64}, 1 << 20).is_ok());  // 1 MiB/s: 8 s in all
    // Saved before it reads anything: a kill -9 now finds it running at 64.
    const Engine::ScanMark first = s.engine->saved_scan();
    CHECK(first.state == static_cast<uint32_t>(ScanState::kRunning));
    CHECK(first.next == 64);
    CHECK(first.rate == 1 << 20);
    while (scanner.progress().next_block < 200) std::this_thread::sleep_for(5ms);
  }  // the frontend stops: the place is saved, still running
  const Engine::ScanMark stopped = s.engine->saved_scan();
  CHECK(stopped.state == static_cast<uint32_t>(ScanState::kRunning));
  CHECK(stopped.next >= 200);
  // After a crash and a restart too.
  test::reopen(s);
  CHECK(s.engine->saved_scan().next == stopped.next);
  Scanner again(*s.engine);  // goes on at once
  CHECK(again.progress().state == ScanState::kRunning);
  CHECK(again.progress().next_block >= stopped.next);
  REQUIRE(again.set_rate(0).is_ok());
  CHECK(wait_while(again, ScanState::kRunning).state == ScanState::kDone);
}

TEST_CASE("scan: pause keeps the place, resume goes on, cancel ends it", "[scan]") {
  test::SetParams params;
  params.main_size = 8 << 20;
  auto s = test::make_set(params);
  Scanner scanner(*s.engine);
  CHECK(scanner.pause().code() == EINVAL);  // nothing runs
  REQUIRE(scanner.start(std::nullopt, 2 << 20).is_ok());
  CHECK(scanner.start(std::nullopt, 0).code() == EBUSY);
  while (scanner.progress().next_block == 0) std::this_thread::sleep_for(2ms);
  REQUIRE(scanner.pause().is_ok());
  CHECK(scanner.progress().state == ScanState::kPaused);
  std::this_thread::sleep_for(300ms);  // the piece under way ends; nothing after
  const uint64_t at = scanner.progress().next_block;
  std::this_thread::sleep_for(300ms);
  CHECK(scanner.progress().next_block == at);
  CHECK(s.engine->saved_scan().state == static_cast<uint32_t>(ScanState::kPaused));
  CHECK(s.engine->saved_scan().next == at);
  REQUIRE(scanner.resume().is_ok());
  while (scanner.progress().next_block == at) std::this_thread::sleep_for(2ms);
  CHECK(scanner.progress().next_block > at);  // from where it was, not from 0
  REQUIRE(scanner.cancel().is_ok());
  CHECK(scanner.progress().state == ScanState::kCancelled);
  std::this_thread::sleep_for(300ms);
  CHECK(s.engine->saved_scan().state == static_cast<uint32_t>(ScanState::kCancelled));
  CHECK(scanner.resume().code() == EINVAL);
  CHECK(scanner.start(uint64_t{1} << 40, 0).code() == EINVAL);  // past the end
}

TEST_CASE("scan: keeps to its rate, and yields to a busy client", "[scan]") {
  test::SetParams params;
  params.main_size = 4 << 20;  // 1024 blocks
  auto s = test::make_set(params);
  SECTION("4 MiB at 8 MiB/s takes half a second at least") {
    Scanner scanner(*s.engine);
    const auto t0 = std::chrono::steady_clock::now();
    REQUIRE(scanner.start(std::nullopt, 8 << 20).is_ok());
    CHECK(wait_while(scanner, ScanState::kRunning).state == ScanState::kDone);
    CHECK(std::chrono::steady_clock::now() - t0 >= 450ms);
    CHECK(scanner.progress().yields <= 1);  // nobody used the set after it was opened
  }
  SECTION("a client that keeps reading makes it wait, and it still ends") {
    std::atomic<bool> done{false};
    std::atomic<int> failed_reads{0};  // Catch's macros are for this thread only
    std::thread client([&] {
      std::vector<char> buf(B);
      while (!done) {
        if (!s.engine->read(buf.data(), B, 0).is_ok()) ++failed_reads;
        std::this_thread::sleep_for(5ms);
      }
    });
    Scanner scanner(*s.engine);
    REQUIRE(scanner.start(std::nullopt, 0).is_ok());
    const ScanProgress p = wait_while(scanner, ScanState::kRunning);
    done = true;
    client.join();
    CHECK(p.state == ScanState::kDone);
    CHECK(p.yields > 0);
    CHECK(failed_reads == 0);
  }
}

TEST_CASE("scan: stops at the block it is on, and marks none it did not finish", "[scan]") {
  auto s = test::make_set();
  // 64 dead blocks in the first piece, each read of one taking 10 ms: the
  // piece's read takes 0.64 s, then four tries of each block 2.6 s more,
  // if nothing stopped it.
  for (uint64_t b = 0; b < 64; ++b) {
    s.main->add_read_error(b);
    s.main->add_slow_block(b, 10ms);
  }
  auto scanner = std::make_unique<Scanner>(*s.engine);
  REQUIRE(scanner->start(std::nullopt, 0).is_ok());
  std::this_thread::sleep_for(800ms);  // into the retries
  const auto t0 = std::chrono::steady_clock::now();
  scanner.reset();  // as the frontend stops
  CHECK(std::chrono::steady_clock::now() - t0 < 1s);  // 1.9 s were left
  const uint64_t pending = s.engine->stats().pending;
  CHECK(pending < 64);  // the rest were neither retried nor marked
  // The piece is read again by the next run, from its start.
  CHECK(s.engine->saved_scan().next == 0);
  CHECK(s.engine->saved_scan().state == static_cast<uint32_t>(ScanState::kRunning));
}

TEST_CASE("scan: a new start waits for the old run's thread; counts and rates", "[scan]") {
  test::SetParams params;
  params.main_size = 8 << 20;
  auto s = test::make_set(params);
  s.main->add_read_error(5);
  Scanner scanner(*s.engine);
  CHECK(scanner.start(std::nullopt, 100).code() == EINVAL);  // too slow to mean anything
  REQUIRE(scanner.start(std::nullopt, 2 << 20).is_ok());
  while (scanner.progress().next_block < 256) std::this_thread::sleep_for(2ms);
  REQUIRE(scanner.pause().is_ok());
  // Again from 0 at once: the old thread must not write its place over it.
  REQUIRE(scanner.start(uint64_t{0}, 2 << 20).is_ok());
  CHECK(scanner.progress().next_block < 128);
  std::this_thread::sleep_for(100ms);
  CHECK(scanner.progress().next_block < 256 + 64);
  // What it found is kept with its place, across a restart.
  while (scanner.progress().unreadable == 0) std::this_thread::sleep_for(2ms);
  REQUIRE(scanner.pause().is_ok());
  {
    Scanner after(*s.engine);
    CHECK(after.progress().state == ScanState::kPaused);
    CHECK(after.progress().unreadable == 1);
    // A slow rate is left at once when it changes.
    REQUIRE(after.resume().is_ok());
    REQUIRE(after.set_rate(4096).is_ok());  // 64 s a piece
    std::this_thread::sleep_for(100ms);
    const auto t0 = std::chrono::steady_clock::now();
    REQUIRE(after.set_rate(0).is_ok());
    CHECK(wait_while(after, ScanState::kRunning).state == ScanState::kDone);
    CHECK(std::chrono::steady_clock::now() - t0 < 10s);
    CHECK(after.progress().unreadable == 1);
  }
}
