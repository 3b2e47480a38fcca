// Power cuts at every point of random workloads over a failing main, checked
// against an oracle (docs/behaviour.md, "Durability").
//
// A workload is a seeded list of writes (some FUA, some unaligned, some
// write-zeroes), flushes and reads, with bad blocks appearing on main between
// requests: write errors, unreadable blocks and weak blocks. Main and spare
// share one PowerSwitch, which counts every write, trim, zero and flush on
// either device. For each crash point n the workload runs from scratch and
// the power goes out during the n-th of those operations; every write not yet
// flushed is then dropped or torn sector by sector, and the set is reopened.
// Every point from the first to the last operation of each workload is tried,
// so every flush boundary is hit and every point between them. The spare is
// format version 2, so the cuts fall among its writes too: slot headers
// (read-modify-write with each remap's data), both copies of every
// checkpoint, and the superblocks; `dmremap check` after each recovery also
// reads every remapped slot's header and both checkpoint copies.
//
// After the cut, every 512-byte sector must hold one of the values it may
// hold: the value it had at its last flush (or FUA write), or a value written
// to it since. Nothing else: not zeros, not a neighbour's data, not a
// never-written slot. A sector of a block that became unreadable may read as
// EIO. Every remap that was visible before the cut must still be there.
//
// Environment: DMREMAP_CRASH_POINTS (default 10000) is the budget of crash
// points; DMREMAP_CRASH_SEED (default 1) the first workload seed;
// DMREMAP_CRASH_ONLY=n runs only point n of that seed (to reproduce a
// failure, whose message gives all three).
#include <catch2/catch.hpp>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "test_util.h"

using namespace dmremap;

namespace {

constexpr uint32_t kBlock = 4096;
constexpr uint32_t kSector = 512;
constexpr uint32_t kSectorsPerBlock = kBlock / kSector;
constexpr uint64_t kMainBlocks = 96;
constexpr uint64_t kSpareBytes = 1 << 20;
constexpr uint64_t kJournalBytes = 8 * kMetaUnit;  // a checkpoint every few remaps
constexpr uint64_t kUnreadable = ~uint64_t{0};     // a sector value: reads fail
constexpr uint64_t kZero = 0;                      // a sector value: all zeros

uint64_t env_u64(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : fallback;
}

// The bytes of sector value `id` (kZero: zeros). Values are unique per write
// and per sector, so a sector shows exactly which write it came from.
void fill_sector(char* out, uint64_t id) {
  if (id == kZero) {
    std::memset(out, 0, kSector);
    return;
  }
  uint64_t x = id * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  for (uint32_t i = 0; i < kSector; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(out + i, &x, 8);
  }
}

struct Op {
  enum Kind { kWrite, kZeroes, kFlush, kRead, kAddWriteError, kAddReadError, kAddWeak } kind;
  uint64_t offset = 0;  // bytes; a block number for the fault kinds
  uint64_t len = 0;
  bool fua = false;
  uint64_t first_id = 0;  // the value of the first sector written; +1 per sector
};

std::vector<Op> make_workload(uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto pick = [&](uint64_t n) { return rng() % n; };
  std::vector<Op> ops;
  // A few blocks are already failing when the workload starts.
  for (int i = 0; i < 3; ++i) ops.push_back(Op{Op::kAddWriteError, pick(kMainBlocks)});
  ops.push_back(Op{Op::kAddReadError, pick(kMainBlocks)});
  uint64_t next_id = 1'000'000 * (seed + 1);
  const int count = 24 + static_cast<int>(pick(16));
  for (int i = 0; i < count; ++i) {
    Op op{};
    const uint64_t r = pick(100);
    if (r < 45) {
      op.kind = pick(8) == 0 ? Op::kZeroes : Op::kWrite;
      const uint64_t block = pick(kMainBlocks);
      if (pick(6) == 0) {
        // Unaligned: the engine reads, modifies and writes whole blocks.
        op.offset = block * kBlock + pick(kSectorsPerBlock) * kSector;
        op.len = (1 + pick(kSectorsPerBlock * 2)) * kSector;
      } else {
        op.offset = block * kBlock;
        op.len = (1 + pick(4)) * kBlock;
      }
      op.len = std::min(op.len, kMainBlocks * kBlock - op.offset);
      op.fua = pick(5) == 0;
      op.first_id = next_id;
      next_id += op.len / kSector;
    } else if (r < 60) {
      op.kind = Op::kFlush;
    } else if (r < 75) {
      op.kind = Op::kRead;
      op.offset = pick(kMainBlocks) * kBlock;
      op.len = std::min<uint64_t>((1 + pick(4)) * kBlock, kMainBlocks * kBlock - op.offset);
    } else if (r < 87) {
      op.kind = Op::kAddWriteError;
      op.offset = pick(kMainBlocks);
    } else if (r < 94) {
      op.kind = Op::kAddReadError;
      op.offset = pick(kMainBlocks);
    } else {
      op.kind = Op::kAddWeak;
      op.offset = pick(kMainBlocks);
    }
    ops.push_back(op);
  }
  ops.push_back(Op{Op::kFlush});
  return ops;
}

// What each sector may hold now and after a power cut.
class Oracle {
 public:
  Oracle() : now_(kMainBlocks * kSectorsPerBlock), durable_(now_.size()) {
    for (uint64_t s = 0; s < now_.size(); ++s) {
      now_[s] = {initial(s)};
      durable_[s] = {initial(s)};
    }
  }
  static uint64_t initial(uint64_t sector) { return 10 + sector; }

  // A write was acknowledged (`ok`), or failed or was cut off: then either
  // value may be there.
  void wrote(uint64_t first_sector, uint64_t count, uint64_t first_id, bool zero, bool ok,
             bool fua) {
    for (uint64_t i = 0; i < count; ++i) {
      const uint64_t s = first_sector + i;
      const uint64_t id = zero ? kZero : first_id + i;
      if (ok) {
        now_[s] = {id};
        if (fua) durable_[s] = {id};
      } else {
        now_[s].push_back(id);
      }
      if (!(ok && fua)) durable_[s].push_back(id);
    }
  }
  void flushed() { durable_ = now_; }
  void unreadable(uint64_t block) {
    for (uint64_t i = 0; i < kSectorsPerBlock; ++i) {
      now_[block * kSectorsPerBlock + i].push_back(kUnreadable);
      durable_[block * kSectorsPerBlock + i].push_back(kUnreadable);
    }
  }
  // Checks one block's read result against `allowed` (now_ or durable_).
  // Returns "" or what is wrong.
  static std::string check(const std::vector<std::vector<uint64_t>>& allowed, uint64_t block,
                           bool read_ok, const char* data) {
    char expect[kSector];
    for (uint64_t i = 0; i < kSectorsPerBlock; ++i) {
      const auto& ids = allowed[block * kSectorsPerBlock + i];
      bool match = false;
      for (uint64_t id : ids) {
        if (id == kUnreadable) {
          match = match || !read_ok;
          continue;
        }
        if (!read_ok) continue;
        fill_sector(expect, id);
        if (std::memcmp(expect, data + i * kSector, kSector) == 0) match = true;
      }
      if (!match) {
        std::string list;
        for (uint64_t id : ids) list += (id == kUnreadable ? "EIO" : std::to_string(id)) + " ";
        return "block " + std::to_string(block) + " sector " + std::to_string(i) +
               (read_ok ? " holds bytes" : " fails to read") + " none of: " + list;
      }
    }
    return {};
  }
  const std::vector<std::vector<uint64_t>>& now() const { return now_; }
  const std::vector<std::vector<uint64_t>>& durable() const { return durable_; }

 private:
  std::vector<std::vector<uint64_t>> now_;
  std::vector<std::vector<uint64_t>> durable_;
};

struct Rig {
  std::shared_ptr<MemoryDevice> main_mem, spare_mem;
  std::shared_ptr<FaultyDevice> main, spare;
  std::shared_ptr<PowerSwitch> power = std::make_shared<PowerSwitch>();
  std::unique_ptr<Engine> engine;
};

EngineOptions engine_options() {
  EngineOptions o;
  o.read_retries = 2;
  o.probe_seed = 1;  // runs repeat exactly
  return o;
}

Rig make_rig() {
  Rig r;
  r.main_mem = std::make_shared<MemoryDevice>(kMainBlocks * kBlock, "main");
  r.spare_mem = std::make_shared<MemoryDevice>(kSpareBytes, "spare");
  std::vector<char> image(kMainBlocks * kBlock);
  for (uint64_t s = 0; s < kMainBlocks * kSectorsPerBlock; ++s) {
    fill_sector(image.data() + s * kSector, Oracle::initial(s));
  }
  REQUIRE(r.main_mem->write(image.data(), image.size(), 0).is_ok());
  r.main = std::make_shared<FaultyDevice>(r.main_mem, kBlock, "main");
  r.spare = std::make_shared<FaultyDevice>(r.spare_mem, kSector, "spare");
  LayoutParams lp;
  lp.main_size = kMainBlocks * kBlock;
  lp.block_size = kBlock;
  lp.journal_bytes = kJournalBytes;
  REQUIRE(MetadataStore::format(*r.spare, lp, "").is_ok());
  r.main->attach(r.power);
  r.spare->attach(r.power);
  auto e = Engine::open(r.main, r.spare, engine_options());
  REQUIRE(e.is_ok());
  r.engine = std::move(e.value());
  return r;
}

std::vector<char> op_data(const Op& op) {
  std::vector<char> buf(op.len);
  for (uint64_t i = 0; i < op.len / kSector; ++i) fill_sector(buf.data() + i * kSector, op.first_id + i);
  return buf;
}

// Remapped and pending blocks, as the engine shows them.
std::map<uint64_t, bool> table_of(Engine& e) {
  std::map<uint64_t, bool> t;  // block -> remapped (true) or pending (false)
  e.for_each_entry(0, kMainBlocks, [&](const RemapTable::Entry& en) {
    t[en.block] = !RemapTable::is_pending(en.value);
  });
  return t;
}

struct Outcome {
  uint64_t ops_done = 0;
  bool cut = false;
  std::string failure;  // a live check that failed before any cut
};

// Runs `ops` until the power goes out. Updates the oracle and the table
// snapshot (the last state known committed).
Outcome run_workload(Rig& r, const std::vector<Op>& ops, Oracle& oracle,
                     std::map<uint64_t, bool>& committed) {
  Outcome out;
  std::vector<char> buf;
  for (const Op& op : ops) {
    if (r.power->is_off()) {
      out.cut = true;
      break;
    }
    committed = table_of(*r.engine);
    const uint64_t first_sector = op.offset / kSector;
    switch (op.kind) {
      case Op::kWrite:
      case Op::kZeroes: {
        const bool zero = op.kind == Op::kZeroes;
        Status s;
        if (zero) {
          s = r.engine->write_zeroes(op.len, op.offset, op.fua);
        } else {
          buf = op_data(op);
          s = r.engine->write(buf.data(), op.len, op.offset, op.fua);
        }
        oracle.wrote(first_sector, op.len / kSector, op.first_id, zero, s.is_ok(), op.fua);
        if (!s.is_ok() && !r.power->is_off() && s.code() != EIO) {
          out.failure = "write failed with " + s.to_string();
        }
        break;
      }
      case Op::kFlush:
        if (r.engine->flush().is_ok()) oracle.flushed();
        break;
      case Op::kRead: {
        buf.assign(op.len, 0);
        const Status s = r.engine->read(buf.data(), op.len, op.offset);
        if (r.power->is_off()) break;
        for (uint64_t b = op.offset / kBlock; b < (op.offset + op.len) / kBlock; ++b) {
          const char* d = buf.data() + (b * kBlock - op.offset);
          // A failed request may still carry good blocks; check those that
          // read, and that a failing one is allowed to fail.
          std::string why = Oracle::check(oracle.now(), b, true, d);
          if (!why.empty() && !s.is_ok()) why = Oracle::check(oracle.now(), b, false, d);
          if (!why.empty()) {
            out.failure = "live read: " + why;
            return out;
          }
        }
        break;
      }
      case Op::kAddWriteError:
        r.main->add_write_error(op.offset);
        break;
      case Op::kAddReadError:
        if (!committed.count(op.offset)) {
          r.main->add_read_error(op.offset);
          oracle.unreadable(op.offset);
        }
        break;
      case Op::kAddWeak:
        r.main->add_weak_block(op.offset, 1);
        break;
    }
    ++out.ops_done;
  }
  out.cut = out.cut || r.power->is_off();
  return out;
}

// Cuts the power as the switch left it, reopens, and checks everything.
// Returns "" or what is wrong.
std::string crash_and_verify(Rig& r, const Oracle& oracle,
                             const std::map<uint64_t, bool>& committed, FaultyDevice::CutMode mode,
                             uint64_t tear_seed) {
  r.engine.reset();  // no close: the process is gone
  r.main->power_cut(mode, tear_seed);
  r.spare->power_cut(mode, tear_seed + 1);
  r.power->reset();
  auto e = Engine::open(r.main, r.spare, engine_options());
  if (!e.is_ok()) return "reopen failed: " + e.status().to_string();
  r.engine = std::move(e.value());
  const auto after = table_of(*r.engine);
  for (const auto& [block, remapped] : committed) {
    auto it = after.find(block);
    if (it == after.end()) return "block " + std::to_string(block) + ": its remap was lost";
    if (remapped && !it->second) return "block " + std::to_string(block) + ": remap became pending";
  }
  std::vector<char> buf(kBlock);
  for (uint64_t b = 0; b < kMainBlocks; ++b) {
    const Status s = r.engine->read(buf.data(), kBlock, b * kBlock);
    if (!s.is_ok() && s.code() != EIO) return "block " + std::to_string(b) + ": " + s.to_string();
    std::string why = Oracle::check(oracle.durable(), b, s.is_ok(), buf.data());
    if (!why.empty()) return why;
  }
  // The recovered metadata is whole, and the set takes writes again.
  const CheckReport report = check_metadata(r.spare);
  if (!report.problems.empty()) return "check after recovery: " + report.problems.front();
  const auto d = test::pattern(kBlock, 1);
  if (!r.engine->write(d.data(), kBlock, 0, true).is_ok()) return "write after recovery failed";
  return {};
}

// Ticks that one full run of the workload makes (the crash points to try).
uint64_t count_ticks(const std::vector<Op>& ops) {
  Rig r = make_rig();
  Oracle oracle;
  std::map<uint64_t, bool> committed;
  const uint64_t before = r.power->ticks();
  const Outcome o = run_workload(r, ops, oracle, committed);
  INFO(o.failure);
  REQUIRE(o.failure.empty());
  return r.power->ticks() - before;
}

}  // namespace

TEST_CASE("durability: power cut at every point of random workloads loses nothing flushed",
          "[crash]") {
  const uint64_t budget = env_u64("DMREMAP_CRASH_POINTS", 10000);
  const uint64_t first_seed = env_u64("DMREMAP_CRASH_SEED", 1);
  const uint64_t only = env_u64("DMREMAP_CRASH_ONLY", 0);
  uint64_t points = 0;
  uint64_t seeds = 0;
  uint64_t points_with_remaps = 0;
  for (uint64_t seed = first_seed; points < budget; ++seed) {
    const auto ops = make_workload(seed);
    const uint64_t ticks = count_ticks(ops);
    ++seeds;
    for (uint64_t n = only ? only : 1; n <= (only ? only : ticks) && points < budget; ++n) {
      Rig r = make_rig();
      Oracle oracle;
      std::map<uint64_t, bool> committed;
      r.power->cut_after(n);
      const Outcome o = run_workload(r, ops, oracle, committed);
      const auto mode = (n + seed) % 2 ? FaultyDevice::CutMode::kTear : FaultyDevice::CutMode::kDrop;
      const std::string why =
          o.failure.empty() ? crash_and_verify(r, oracle, committed, mode, seed * 7919 + n)
                            : o.failure;
      ++points;
      if (!committed.empty()) ++points_with_remaps;
      if (!why.empty()) {
        FAIL("DMREMAP_CRASH_SEED=" << seed << " DMREMAP_CRASH_ONLY=" << n << " ("
                                   << (mode == FaultyDevice::CutMode::kTear ? "tear" : "drop")
                                   << ", after " << o.ops_done << " ops): " << why);
      }
    }
    if (only) break;
  }
  WARN("crash points: " << points << " over " << seeds << " workloads (from seed " << first_seed
                        << "), " << points_with_remaps << " with remaps committed before the cut");
  CHECK(points == (only ? 1 : budget));
  // The workloads do remap: most cuts find remaps already committed.
  if (!only) CHECK(points_with_remaps * 2 > points);
}
