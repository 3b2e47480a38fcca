// Latency under failure (docs/behaviour.md): a bad block holds up only the
// requests that touch it, retries have a budget in count and in time,
// remaps that are ready together share their flushes, and shutdown never
// writes after the clean checkpoint. Plus a sector-level oracle for many
// threads on the same and neighbouring blocks while they are recovered.
//
// No assertion here is about time: where one request must not wait for
// another, the test counts what the other finished while the first was
// stuck on a block that takes a second per read.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "dmremap/fault_spec.h"
#include "test_util.h"

using namespace dmremap;
using namespace std::chrono_literals;

namespace {

constexpr uint32_t B = 4096;
constexpr uint32_t kSector = 512;
constexpr uint32_t kSectorsPerBlock = B / kSector;

// The 512 bytes of sector value `v` at sector `sector`.
void fill(char* out, uint64_t sector, uint64_t v) {
  for (uint32_t i = 0; i < kSector; i += 8) {
    const uint64_t word = v * 0x9E3779B97F4A7C15ull ^ (sector << 20) ^ i;
    std::memcpy(out + i, &word, 8);
  }
}

// Many threads, each owning some sectors; every sector of the first half
// of the region is owned by a different thread from its neighbours (so
// every write there is a read-modify-write of a block others write too),
// every block of the second half by one thread (whole-block writes,
// write-zeroes and trims next to other threads' blocks). A fault thread
// keeps making blocks weak, unwritable and slow, and the spare's slots
// unwritable, while they run. Each thread checks every read of its own
// sectors against what it last wrote.
struct Oracle {
  static constexpr unsigned kThreads = 4;
  static constexpr uint64_t kBlocks = 40;
  static constexpr uint64_t kSharedBlocks = 8;  // sector-interleaved
  // Per sector: the value written last (0: zeros), or kUnknown after a
  // trim (the old value or zeros).
  static constexpr uint64_t kUnknown = ~uint64_t{0};
  std::vector<uint64_t> value = std::vector<uint64_t>(kBlocks * kSectorsPerBlock, 0);
  std::vector<uint64_t> before_trim = std::vector<uint64_t>(kBlocks * kSectorsPerBlock, 0);

  static unsigned owner(uint64_t sector) {
    const uint64_t block = sector / kSectorsPerBlock;
    if (block < kSharedBlocks) return static_cast<unsigned>(sector % kThreads);
    return static_cast<unsigned>(block % kThreads);
  }
  bool matches(uint64_t sector, const char* got) const {
    char want[kSector];
    const uint64_t v = value[sector];
    if (v == kUnknown) {
      static const char zeros[kSector] = {};
      fill(want, sector, before_trim[sector]);
      if (before_trim[sector] == 0) std::memset(want, 0, kSector);
      return std::memcmp(got, want, kSector) == 0 || std::memcmp(got, zeros, kSector) == 0;
    }
    if (v == 0) {
      std::memset(want, 0, kSector);
    } else {
      fill(want, sector, v);
    }
    return std::memcmp(got, want, kSector) == 0;
  }
};

}  // namespace

TEST_CASE("concurrency: a sector-level oracle while the blocks are being recovered",
          "[concurrency]") {
  const int rounds = 4;
  for (int round = 0; round < rounds; ++round) {
    test::SetParams p;
    p.options.read_retries = 3;
    auto s = test::make_set(p);
    const Superblock sb = s.engine->superblock();
    Oracle oracle;
    std::atomic<bool> stop{false};
    std::atomic<int> bad_reads{0}, failed_ops{0}, done_ops{0};
    std::mutex first_mu;
    std::string first_problem;
    auto problem = [&](const std::string& what) {
      std::lock_guard l(first_mu);
      if (first_problem.empty()) first_problem = what;
    };

    // Every operation on main takes a little while, as on a disk, which
    // widens the windows between a block's lookup and its I/O.
    s.main->set_delay(20us);
    // Some faults from the start, more while the threads run.
    for (uint64_t b : {2u, 9u, 13u}) s.main->add_write_error(b);
    for (uint64_t b : {3u, 10u, 11u, 14u}) s.main->add_weak_block(b, 1);
    std::thread faults([&] {
      std::mt19937_64 rng(1000 + round);
      int writes_broken = 3;
      std::vector<std::chrono::steady_clock::time_point> armed(Oracle::kBlocks);
      while (!stop.load()) {
        const uint64_t b = rng() % Oracle::kBlocks;
        switch (rng() % 4) {
          case 0:
            // One failure at a time, and not again soon: a block that failed
            // on every read within its budget would be pending, and rightly.
            if (std::chrono::steady_clock::now() - armed[b] > 25ms) {
              s.main->add_weak_block(b, 1);
              armed[b] = std::chrono::steady_clock::now();
            }
            break;
          case 1:
            if (writes_broken < 6) {
              s.main->add_write_error(b);
              ++writes_broken;
            }
            break;
          case 2: s.main->add_slow_block(b, 1ms); break;
          case 3: {
            // A slot that refuses writes: a block remapped there moves.
            const uint64_t slot = rng() % 24;
            if (rng() % 8 == 0) s.spare->add_write_error((sb.slot_offset + slot * B) / 512);
            break;
          }
        }
        std::this_thread::sleep_for(100us);
      }
    });

    std::vector<std::thread> workers;
    for (unsigned t = 0; t < Oracle::kThreads; ++t) {
      workers.emplace_back([&, t] {
        std::mt19937_64 rng(round * 100 + t);
        uint64_t next_value = (uint64_t{t} + 1) << 40;
        std::vector<uint64_t> own;
        for (uint64_t sec = 0; sec < Oracle::kBlocks * kSectorsPerBlock; ++sec) {
          if (Oracle::owner(sec) == t) own.push_back(sec);
        }
        std::vector<char> buf(16 * B);
        for (int op = 0; op < 300; ++op) {
          const uint64_t sec = own[rng() % own.size()];
          const uint64_t block = sec / kSectorsPerBlock;
          const unsigned kind = rng() % 12;
          Status st;
          if (kind < 3) {
            // One of its sectors: a partial-block write (read-modify-write).
            const uint64_t v = ++next_value;
            fill(buf.data(), sec, v);
            st = s.engine->write(buf.data(), kSector, sec * kSector, rng() % 8 == 0);
            if (st.is_ok()) oracle.value[sec] = v;
          } else if (kind < 6 && block >= Oracle::kSharedBlocks) {
            // A whole block of its own.
            const uint64_t first = block * kSectorsPerBlock;
            std::vector<uint64_t> vs(kSectorsPerBlock);
            for (uint32_t i = 0; i < kSectorsPerBlock; ++i) {
              vs[i] = ++next_value;
              fill(buf.data() + i * kSector, first + i, vs[i]);
            }
            st = s.engine->write(buf.data(), B, block * B, false);
            if (st.is_ok()) {
              for (uint32_t i = 0; i < kSectorsPerBlock; ++i) oracle.value[first + i] = vs[i];
            }
          } else if (kind == 6 && rng() % 2 == 0 && block >= Oracle::kSharedBlocks) {
            st = s.engine->write_zeroes(B, block * B, false);
            if (st.is_ok()) {
              for (uint32_t i = 0; i < kSectorsPerBlock; ++i) {
                oracle.value[block * kSectorsPerBlock + i] = 0;
              }
            }
          } else if (kind == 6 && block >= Oracle::kSharedBlocks) {
            st = s.engine->trim(B, block * B, false);
            if (st.is_ok()) {
              for (uint32_t i = 0; i < kSectorsPerBlock; ++i) {
                const uint64_t x = block * kSectorsPerBlock + i;
                if (oracle.value[x] != Oracle::kUnknown) oracle.before_trim[x] = oracle.value[x];
                oracle.value[x] = Oracle::kUnknown;
              }
            }
          } else if (kind == 7) {
            st = s.engine->flush();
          } else {
            // A read across neighbours' sectors and blocks, unaligned at
            // times; only its own sectors are checked.
            const uint64_t first_sec = rng() % (Oracle::kBlocks * kSectorsPerBlock - 1);
            const uint64_t max = std::min<uint64_t>(
                buf.size() / kSector, Oracle::kBlocks * kSectorsPerBlock - first_sec);
            const uint64_t n = 1 + rng() % max;
            st = s.engine->read(buf.data(), n * kSector, first_sec * kSector);
            if (st.is_ok()) {
              for (uint64_t i = 0; i < n; ++i) {
                const uint64_t x = first_sec + i;
                if (Oracle::owner(x) != t) continue;
                if (!oracle.matches(x, buf.data() + i * kSector)) {
                  ++bad_reads;
                  problem("thread " + std::to_string(t) + " read sector " + std::to_string(x) +
                          " (block " + std::to_string(x / kSectorsPerBlock) +
                          ") with data other than it last wrote");
                }
              }
            }
          }
          if (!st.is_ok()) {
            ++failed_ops;
            problem("thread " + std::to_string(t) + ": " + st.to_string());
          }
          ++done_ops;
        }
      });
    }
    for (auto& w : workers) w.join();
    stop = true;
    faults.join();
    INFO(first_problem);
    REQUIRE(bad_reads == 0);
    REQUIRE(failed_ops == 0);
    CHECK(done_ops == 300 * static_cast<int>(Oracle::kThreads));
    const auto st = s.engine->stats();
    CHECK(st.remaps >= 3);

    // After a crash (no close), everything reads as the oracle says.
    test::reopen(s, p.options);
    std::vector<char> all(Oracle::kBlocks * B);
    REQUIRE(s.engine->read(all.data(), all.size(), 0).is_ok());
    for (uint64_t x = 0; x < Oracle::kBlocks * kSectorsPerBlock; ++x) {
      INFO("sector " << x << " after reopen, round " << round);
      REQUIRE(oracle.matches(x, all.data() + x * kSector));
    }
  }
}

TEST_CASE("latency 1: a slow bad block holds up only the requests that touch it",
          "[concurrency]") {
  test::SetParams p;
  p.options.read_retries = 3;
  auto s = test::make_set(p);
  const auto healthy = test::pattern(B, 1);
  REQUIRE(s.engine->write(healthy.data(), B, 20 * B, false).is_ok());
  s.main->add_write_error(30);
  REQUIRE(s.engine->write(healthy.data(), B, 30 * B, false).is_ok());  // on the spare
  // Block 10 takes 250 ms per read and never reads: 4 reads, then pending.
  s.main->add_read_error(10);
  s.main->add_slow_block(10, 250ms);

  std::atomic<bool> bad_done{false};
  Status bad_status;
  std::thread bad([&] {
    std::vector<char> buf(4 * B);
    bad_status = s.engine->read(buf.data(), buf.size(), 8 * B);  // blocks 8-11
    bad_done = true;
  });
  // While it is stuck: reads of main's healthy blocks and of a remapped
  // block, writes elsewhere, and a write that needs a new remap, all on
  // other "connections", must finish.
  std::this_thread::sleep_for(20ms);
  int finished_while_stuck = 0;
  std::vector<char> buf(B);
  s.main->add_write_error(40);
  for (int i = 0; i < 60; ++i) {
    REQUIRE(s.engine->read(buf.data(), B, 20 * B).is_ok());
    REQUIRE(buf == healthy);
    REQUIRE(s.engine->read(buf.data(), B, 30 * B).is_ok());
    REQUIRE(s.engine->write(healthy.data(), B, (50 + i % 8) * B, false).is_ok());
    if (i == 30) REQUIRE(s.engine->write(healthy.data(), B, 40 * B, false).is_ok());
    if (!bad_done) ++finished_while_stuck;
  }
  bad.join();
  CHECK(finished_while_stuck == 60);
  CHECK(bad_status.code() == EIO);
  const auto st = s.engine->stats();
  CHECK(st.pending == 1);
  CHECK(st.remaps == 2);
}

TEST_CASE("latency 2: retries have a budget in count and in time", "[concurrency]") {
  SECTION("count: retries=3 means four reads, whatever found the block") {
    for (unsigned retries : {0u, 1u, 3u}) {
      test::SetParams p;
      p.options.read_retries = retries;
      auto s = test::make_set(p);
      s.main->add_read_error(5);
      std::vector<char> buf(B);
      const uint64_t before = s.main->failed_reads();
      CHECK(s.engine->read(buf.data(), B, 5 * B).code() == EIO);
      CHECK(s.main->failed_reads() - before == 1 + retries);
    }
  }
  SECTION("time: no new attempt after retry_time") {
    test::SetParams p;
    p.options.read_retries = 50;
    p.options.retry_time = 300ms;
    auto s = test::make_set(p);
    s.main->add_read_error(5);
    s.main->add_slow_block(5, 200ms);
    std::vector<char> buf(B);
    const uint64_t before = s.main->failed_reads();
    CHECK(s.engine->read(buf.data(), B, 5 * B).code() == EIO);
    // 200 ms each: the first at 0, the second at 200 ms, then 400 ms have
    // passed. Never 51.
    const uint64_t reads = s.main->failed_reads() - before;
    CHECK(reads >= 2);
    CHECK(reads <= 3);
    CHECK(s.engine->stats().pending == 1);
  }
}

TEST_CASE("group commit: remaps that are ready together share their flushes",
          "[concurrency][durability]") {
  test::SetParams p;
  p.spare_size = 4 << 20;
  auto s = test::make_set(p);
  // Main refuses every write of blocks 0-127; the spare's flush takes 5 ms,
  // as a disk's cache flush.
  for (uint64_t b = 0; b < 128; ++b) s.main->add_write_error(b);
  s.spare->set_flush_delay(5ms);
  const uint64_t flushes_before = s.spare->flush_calls();
  std::vector<std::thread> threads;
  std::atomic<int> failed{0};
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 8; ++i) {
        const uint64_t b = static_cast<uint64_t>(t * 8 + i);
        const auto d = test::pattern(B, 500 + b);
        if (!s.engine->write(d.data(), B, b * B, false).is_ok()) ++failed;
      }
    });
  }
  for (auto& t : threads) t.join();
  REQUIRE(failed == 0);
  const auto st = s.engine->stats();
  REQUIRE(st.remaps == 128);
  const uint64_t flushes = s.spare->flush_calls() - flushes_before;
  INFO(st.commit_groups << " groups, " << flushes << " spare flushes for 128 remaps");
  // Serial commits would take two flushes per remap (256).
  CHECK(st.commit_groups < 64);
  CHECK(flushes < 128);
  // Every remap is durable and reads back after a crash.
  test::reopen(s);
  for (uint64_t b = 0; b < 128; ++b) {
    std::vector<char> buf(B);
    REQUIRE(s.engine->read(buf.data(), B, b * B).is_ok());
    REQUIRE(buf == test::pattern(B, 500 + b));
  }
}

TEST_CASE("group commit: a power cut keeps whole remaps and never loses an acknowledged one",
          "[concurrency][durability]") {
  // Threads remap at once while the spare's flush is slow, so groups form;
  // the power goes out at a point of the run. Acknowledged remaps must all
  // be there after the reopen; a remap not acknowledged may be there or
  // not, but whole (its slot holds the data it was written with).
  for (uint64_t cut = 1; cut <= 40; cut += 3) {
    test::SetParams p;
    p.spare_size = 4 << 20;
    p.journal_bytes = 4 * kMetaUnit;  // checkpoints fall among the groups too
    auto s = test::make_set(p);
    auto power = std::make_shared<PowerSwitch>();
    s.main->attach(power);
    s.spare->attach(power);
    for (uint64_t b = 0; b < 64; ++b) s.main->add_write_error(b);
    s.spare->set_flush_delay(1ms);
    power->cut_after(cut);
    std::vector<std::atomic<int>> acked(64);
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < 8; ++i) {
          const uint64_t b = static_cast<uint64_t>(t * 8 + i);
          const auto d = test::pattern(B, 900 + b);
          if (s.engine->write(d.data(), B, b * B, false).is_ok()) acked[b] = 1;
        }
      });
    }
    for (auto& t : threads) t.join();
    s.main->power_cut(FaultyDevice::CutMode::kTear, cut);
    s.spare->power_cut(FaultyDevice::CutMode::kTear, cut + 1);
    power->reset();
    test::reopen(s);
    const CheckReport check = check_metadata(s.spare);
    INFO("cut " << cut << (check.problems.empty() ? "" : ": " + check.problems.front()));
    CHECK(check.problems.empty());
    for (uint64_t b = 0; b < 64; ++b) {
      std::vector<char> buf(B);
      const Status r = s.engine->read(buf.data(), B, b * B);
      const bool remapped = [&] {
        bool found = false;
        s.engine->for_each_entry(b, b + 1, [&](const RemapTable::Entry& e) {
          found = !RemapTable::is_pending(e.value);
        });
        return found;
      }();
      INFO("block " << b << " cut " << cut);
      if (acked[b]) {
        REQUIRE(remapped);
        REQUIRE(r.is_ok());
        REQUIRE(buf == test::pattern(B, 900 + b));
      } else if (remapped) {
        REQUIRE(r.is_ok());
        REQUIRE(buf == test::pattern(B, 900 + b));
      }
    }
  }
}

TEST_CASE("shutdown: close waits for requests, and gives up without writing after its deadline",
          "[concurrency][durability]") {
  SECTION("requests racing close: none is journaled after the clean checkpoint") {
    for (int round = 0; round < 10; ++round) {
      auto s = test::make_set();
      // Counts every write, trim and flush of the spare (no cut is armed).
      auto meter = std::make_shared<PowerSwitch>();
      s.spare->attach(meter);
      for (uint64_t b = 0; b < 200; ++b) s.main->add_write_error(b);
      std::atomic<bool> go{true};
      std::vector<std::thread> threads;
      std::vector<std::vector<uint64_t>> acked(4);
      for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
          for (uint64_t b = static_cast<uint64_t>(t); b < 200 && go; b += 4) {
            const auto d = test::pattern(B, 700 + b);
            if (s.engine->write(d.data(), B, b * B, false).is_ok()) acked[t].push_back(b);
          }
        });
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200 * round));
      REQUIRE(s.engine->close().is_ok());
      const uint64_t spare_ops_at_close = meter->ticks();
      go = false;
      for (auto& t : threads) t.join();
      CHECK(meter->ticks() == spare_ops_at_close);
      OpenReport rep;
      s.engine.reset();
      auto e = Engine::open(s.main, s.spare, EngineOptions{}, &rep);
      REQUIRE(e.is_ok());
      CHECK(rep.was_clean);
      CHECK(rep.journal_units == 0);
      for (const auto& list : acked) {
        for (uint64_t b : list) {
          std::vector<char> buf(B);
          REQUIRE(e.value()->read(buf.data(), B, b * B).is_ok());
          REQUIRE(buf == test::pattern(B, 700 + b));
        }
      }
    }
  }
  SECTION("a request stuck in main past the deadline: EBUSY, no clean mark, nothing after") {
    auto s = test::make_set();
    s.main->add_read_error(7);
    s.main->add_slow_block(7, 400ms);
    Status stuck;
    std::thread reader([&] {
      std::vector<char> buf(B);
      stuck = s.engine->read(buf.data(), B, 7 * B);
    });
    std::this_thread::sleep_for(50ms);
    CHECK(s.engine->in_flight() == 1);
    const Status c = s.engine->close(100ms);
    CHECK(c.code() == EBUSY);
    std::vector<char> buf(B);
    CHECK(s.engine->read(buf.data(), B, 0).code() == EIO);  // refused after close
    reader.join();  // the engine outlived it, as a frontend must ensure
    CHECK(stuck.code() == EIO);
    // Its pending mark came after the deadline: not journaled.
    CHECK(s.engine->stats().pending == 0);
    CHECK_FALSE(s.engine->superblock().clean());
    OpenReport rep;
    s.engine.reset();
    auto e = Engine::open(s.main, s.spare, EngineOptions{}, &rep);
    REQUIRE(e.is_ok());
    CHECK_FALSE(rep.was_clean);
    CHECK(e.value()->stats().pending == 0);
  }
}

TEST_CASE("fault spec: slow blocks", "[concurrency]") {
  auto mem = std::make_shared<MemoryDevice>(1 << 20, "main");
  FaultyDevice dev(mem, B, "main");
  REQUIRE(apply_fault_spec(dev, "slow:3x40,read:3").is_ok());
  std::vector<char> buf(B);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(dev.read(buf.data(), B, 3 * B).code() == EIO);
  CHECK(std::chrono::steady_clock::now() - t0 >= 40ms);
  CHECK(dev.read(buf.data(), B, 4 * B).is_ok());
  CHECK_FALSE(apply_fault_spec(dev, "slow:3").is_ok());
  CHECK_FALSE(apply_fault_spec(dev, "slow:3x0").is_ok());
}

TEST_CASE("latency 2: each failing block has its own time budget", "[concurrency]") {
  // Blocks 5 and 6 both fail, 150 ms per read; retry-time 400 ms. Each gets
  // its own reads: the range read and its naming read, then one more (450
  // ms of its own reads). The second block's budget is not spent by the
  // first one's retries.
  test::SetParams p;
  p.options.read_retries = 10;
  p.options.retry_time = 400ms;
  auto s = test::make_set(p);
  for (uint64_t b : {5u, 6u}) {
    s.main->add_read_error(b);
    s.main->add_slow_block(b, 150ms);
  }
  std::vector<char> buf(2 * B);
  const uint64_t before = s.main->failed_reads();
  CHECK(s.engine->read(buf.data(), buf.size(), 5 * B).code() == EIO);
  // 1 range read + 2 naming reads + one retry each.
  CHECK(s.main->failed_reads() - before == 5);
  CHECK(s.engine->stats().pending == 2);
}

TEST_CASE("shutdown: a FUA write in flight when close begins finishes whole",
          "[concurrency][durability]") {
  auto s = test::make_set();
  s.main->set_delay(200ms);  // every operation on main takes 200 ms
  const auto d = test::pattern(B, 77);
  Status written;
  std::thread writer([&] { written = s.engine->write(d.data(), B, 3 * B, /*fua=*/true); });
  std::this_thread::sleep_for(50ms);
  const Status closed = s.engine->close();
  writer.join();
  CHECK(closed.is_ok());
  CHECK(written.is_ok());  // admitted before close began: its flush is part of it
  s.main->set_delay(0us);
  OpenReport rep;
  s.engine.reset();
  auto e = Engine::open(s.main, s.spare, EngineOptions{}, &rep);
  REQUIRE(e.is_ok());
  CHECK(rep.was_clean);
  std::vector<char> buf(B);
  REQUIRE(e.value()->read(buf.data(), B, 3 * B).is_ok());
  CHECK(buf == d);
}
