// Micro-benchmark of the core: how long a spare holding many remaps takes to
// open, how much memory a remap costs, and what the table lookup adds to a
// 4 KiB read. Prints a table; targets are reported (PASS/MISS), not enforced.
//
//   dmremap_microbench [--quick] [--remaps N] [--main-blocks N] [--dir DIR]
//
// By default main has 4 blocks per remap: a quarter of the disk remapped,
// far denser than any real failing disk, so that most lookups hit. Give a
// larger --main-blocks for a realistic density.
//
// The main and spare are sparse files in DIR (default /var/tmp, a disk, so
// that "cold" opens read from it after the page cache is dropped for the
// files). Only the metadata and a few slots are ever written.
#include <fcntl.h>
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dmremap/engine.h"
#include "dmremap/log.h"
#include "dmremap/metadata_store.h"

using namespace dmremap;
using Clock = std::chrono::steady_clock;

namespace {

constexpr uint32_t kBlock = 4096;

[[noreturn]] void die(const std::string& what, const Status& s) {
  fmt::print(stderr, "microbench: {}: {}\n", what, s.to_string());
  std::exit(1);
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Drops the page cache of a file (as root or owner), so the next open
// reads the disk.
void drop_cache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

std::shared_ptr<BlockDevice> open_file(const std::string& path, const char* role) {
  auto d = open_device(path, role, OpenOptions{});
  if (!d.is_ok()) die(std::string("open ") + role, d.status());
  return d.value();
}

void make_sparse(const std::string& path, uint64_t size) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    die("create " + path, Status::from_errno(path));
  }
  ::close(fd);
}

struct Paths {
  std::string main, spare;
};

// A set whose spare holds `remaps` remaps of blocks spread over main, all in
// the checkpoint, plus `journal_records` more in the journal (as after a
// crash) when asked.
void build_set(const Paths& p, uint64_t main_blocks, uint64_t remaps, std::mt19937_64& rng) {
  make_sparse(p.main, main_blocks * kBlock);
  // Room for every remap's slot, plus the metadata.
  make_sparse(p.spare, (remaps + 1024) * kBlock + (remaps * 2 + 64) * 16 + (64 << 20));
  auto spare = open_file(p.spare, "spare");
  LayoutParams lp;
  lp.main_size = main_blocks * kBlock;
  lp.block_size = kBlock;
  if (auto sb = MetadataStore::format(*spare, lp, ""); !sb.is_ok()) die("format", sb.status());
  RemapTable table;
  auto store = MetadataStore::open(spare, table, true);
  if (!store.is_ok()) die("open store", store.status());
  // Distinct random blocks, remapped in random order, as they fail on a disk.
  std::vector<uint64_t> blocks(main_blocks);
  for (uint64_t i = 0; i < main_blocks; ++i) blocks[i] = i;
  std::shuffle(blocks.begin(), blocks.end(), rng);
  for (uint64_t i = 0; i < remaps; ++i) {
    table.apply(Record{Record::kRemap, Cause::kWriteError, blocks[i], i});
  }
  table.compact();
  if (auto s = store.value()->checkpoint(table, true); !s.is_ok()) die("checkpoint", s);
}

// Appends `n` single-remap journal records and leaves the set unclean.
void dirty_journal(const Paths& p, uint64_t n) {
  auto spare = open_file(p.spare, "spare");
  RemapTable table;
  auto store = MetadataStore::open(spare, table, true);
  if (!store.is_ok()) die("open store", store.status());
  const uint64_t main_blocks = store.value()->superblock().main_size / kBlock;
  uint64_t block = 0;
  for (uint64_t i = 0; i < n; ++i) {
    while (table.find(block)) ++block;
    const Record r{Record::kRemap, Cause::kWriteError, block % main_blocks, table.next_slot()};
    if (auto s = store.value()->append({r}, table); !s.is_ok()) die("append", s);
    table.apply(r);
  }
}

struct OpenTimes {
  double store_warm, store_cold, engine_clean, engine_recovery;
  uint64_t entries;
  size_t table_bytes;
};

OpenTimes time_opens(const Paths& p, int iterations) {
  OpenTimes t{};
  std::vector<double> warm, cold, clean, recovery;
  for (int i = 0; i < iterations; ++i) {
    for (bool is_cold : {true, false}) {
      if (is_cold) drop_cache(p.spare);
      auto spare = open_file(p.spare, "spare");
      RemapTable table;
      const auto start = Clock::now();
      auto store = MetadataStore::open(spare, table, false);
      const double s = seconds_since(start);
      if (!store.is_ok()) die("open", store.status());
      (is_cold ? cold : warm).push_back(s);
      if (i == 0 && is_cold) {
        t.entries = table.entries();
        t.table_bytes = table.memory_bytes();
      }
    }
    {
      // A clean open by a frontend: load, then mark the set in use.
      auto start = Clock::now();
      auto e = Engine::open(open_file(p.main, "main"), open_file(p.spare, "spare"), {});
      clean.push_back(seconds_since(start));
      if (!e.is_ok()) die("engine open", e.status());
      if (auto s = e.value()->close(); !s.is_ok()) die("close", s);
    }
  }
  for (int i = 0; i < iterations; ++i) {
    {
      // After a crash: the journal holds records, which open replays and
      // folds into a new checkpoint before serving.
      dirty_journal(p, 200);
      drop_cache(p.spare);
      auto start = Clock::now();
      auto e = Engine::open(open_file(p.main, "main"), open_file(p.spare, "spare"), {});
      recovery.push_back(seconds_since(start));
      if (!e.is_ok()) die("engine open", e.status());
      if (auto s = e.value()->close(); !s.is_ok()) die("close", s);
    }
  }
  t.store_warm = median(warm);
  t.store_cold = median(cold);
  t.engine_clean = median(clean);
  t.engine_recovery = median(recovery);
  return t;
}

// Nanoseconds per table lookup (find, then the range walk the read path
// does) over random blocks.
struct LookupTimes {
  double find_ns, range_ns;
};
LookupTimes time_lookups(const RemapTable& table, uint64_t main_blocks, uint64_t n) {
  std::mt19937_64 rng(7);
  std::vector<uint64_t> probes(n);
  for (auto& b : probes) b = rng() % main_blocks;
  uint64_t sink = 0;
  auto start = Clock::now();
  for (uint64_t b : probes) sink += table.find(b).value_or(1);
  const double find_ns = seconds_since(start) * 1e9 / static_cast<double>(n);
  start = Clock::now();
  for (uint64_t b : probes) {
    table.for_range(b, b + 1, [&](const RemapTable::Entry& e) { sink += e.value; });
  }
  const double range_ns = seconds_since(start) * 1e9 / static_cast<double>(n);
  if (sink == 42) std::puts("");  // keeps the loops from being optimised away
  return {find_ns, range_ns};
}

// Nanoseconds per 4 KiB Engine::read of random blocks (page cache warm).
double time_engine_reads(const Paths& p, uint64_t n) {
  auto e = Engine::open(open_file(p.main, "main"), open_file(p.spare, "spare"), {});
  if (!e.is_ok()) die("engine open", e.status());
  const uint64_t blocks = e.value()->size() / kBlock;
  std::mt19937_64 rng(11);
  std::vector<char> buf(kBlock);
  for (uint64_t i = 0; i < n / 4; ++i) {  // warm-up
    (void)e.value()->read(buf.data(), kBlock, (rng() % blocks) * kBlock);
  }
  const auto start = Clock::now();
  for (uint64_t i = 0; i < n; ++i) {
    const Status s = e.value()->read(buf.data(), kBlock, (rng() % blocks) * kBlock);
    if (!s.is_ok()) die("read", s);
  }
  const double ns = seconds_since(start) * 1e9 / static_cast<double>(n);
  if (auto s = e.value()->close(); !s.is_ok()) die("close", s);
  return ns;
}

// Nanoseconds per plain 4 KiB pread of the same file, for scale.
double time_preads(const std::string& path, uint64_t blocks, uint64_t n) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) die("open", Status::from_errno(path));
  std::mt19937_64 rng(11);
  std::vector<char> buf(kBlock);
  for (uint64_t i = 0; i < n / 4; ++i) {
    (void)!::pread(fd, buf.data(), kBlock, static_cast<off_t>((rng() % blocks) * kBlock));
  }
  const auto start = Clock::now();
  for (uint64_t i = 0; i < n; ++i) {
    if (::pread(fd, buf.data(), kBlock, static_cast<off_t>((rng() % blocks) * kBlock)) != kBlock) {
      die("pread", Status::from_errno(path));
    }
  }
  const double ns = seconds_since(start) * 1e9 / static_cast<double>(n);
  ::close(fd);
  return ns;
}

const char* verdict(bool ok) { return ok ? "PASS" : "MISS"; }

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  uint64_t remaps = 1'000'000;
  std::string dir = "/var/tmp";
  uint64_t main_blocks_arg = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      quick = true;
      remaps = 100'000;
    } else if (a == "--remaps" && i + 1 < argc) {
      remaps = std::strtoull(argv[++i], nullptr, 10);
    } else if (a == "--main-blocks" && i + 1 < argc) {
      main_blocks_arg = std::strtoull(argv[++i], nullptr, 10);
    } else if (a == "--dir" && i + 1 < argc) {
      dir = argv[++i];
    } else {
      fmt::print(stderr,
                 "usage: dmremap_microbench [--quick] [--remaps N] [--main-blocks N] [--dir DIR]\n");
      return 2;
    }
  }
  set_log_sink([](LogLevel, const std::string&) {});
  const int iterations = quick ? 1 : 5;
  const uint64_t lookups = quick ? 200'000 : 2'000'000;
  const uint64_t reads = quick ? 50'000 : 500'000;
  const uint64_t main_blocks =
      main_blocks_arg ? std::max(main_blocks_arg, remaps) : std::max<uint64_t>(remaps * 4, 1 << 16);
  std::mt19937_64 rng(1);

  char tmpl[4096];
  std::snprintf(tmpl, sizeof tmpl, "%s/dmremap-microbench-XXXXXX", dir.c_str());
  if (!::mkdtemp(tmpl)) die("mkdtemp in " + dir, Status::from_errno(dir));
  const std::string work = tmpl;
  const Paths empty{work + "/main0.img", work + "/spare0.img"};
  const Paths full{work + "/main.img", work + "/spare.img"};

  fmt::print("dmremap micro-benchmark: {} remaps of 4 KiB blocks spread over a main of {} blocks "
             "({} GiB, sparse)\n",
             remaps, main_blocks, main_blocks * kBlock >> 30);
  build_set(empty, main_blocks, 0, rng);
  build_set(full, main_blocks, remaps, rng);

  const OpenTimes o = time_opens(full, iterations);
  const OpenTimes o0 = time_opens(empty, iterations);
  const double per_remap = static_cast<double>(o.table_bytes) / static_cast<double>(o.entries);
  // The engine's filter: one bit per group of blocks, at most 32 Mi bits.
  uint64_t groups = main_blocks;
  while (groups > (uint64_t{1} << 25)) groups = (groups + 1) / 2;
  const double filter_bytes = static_cast<double>((groups + 7) / 8);

  RemapTable empty_table;
  RemapTable loaded;
  {
    auto spare = open_file(full.spare, "spare");
    auto store = MetadataStore::open(spare, loaded, false);
    if (!store.is_ok()) die("open", store.status());
  }
  // As the engine holds them: with the filter of occupied block groups.
  empty_table.enable_filter(main_blocks);
  loaded.enable_filter(main_blocks);
  const LookupTimes l0 = time_lookups(empty_table, main_blocks, lookups);
  const LookupTimes l1 = time_lookups(loaded, main_blocks, lookups);
  const double read0 = time_engine_reads(empty, reads);
  const double read1 = time_engine_reads(full, reads);
  const double pread = time_preads(full.main, main_blocks, reads);

  fmt::print("\n{:<52} {:>14} {:>14}  {}\n", "measure", "0 remaps", fmt::format("{} remaps", o.entries),
             "target");
  fmt::print("{:<52} {:>12.1f}ms {:>12.1f}ms\n", "load metadata, page cache cold (what status does)",
             o0.store_cold * 1e3, o.store_cold * 1e3);
  fmt::print("{:<52} {:>12.1f}ms {:>12.1f}ms\n", "load metadata, page cache warm", o0.store_warm * 1e3,
             o.store_warm * 1e3);
  fmt::print("{:<52} {:>12.1f}ms {:>12.1f}ms  < 500 ms: {}\n", "Engine::open after a clean close",
             o0.engine_clean * 1e3, o.engine_clean * 1e3, verdict(o.engine_clean < 0.5));
  fmt::print("{:<52} {:>12.1f}ms {:>12.1f}ms  < 500 ms: {}\n",
             "Engine::open after a crash (200 journal records)", o0.engine_recovery * 1e3,
             o.engine_recovery * 1e3, verdict(o.engine_recovery < 0.5));
  fmt::print("{:<52} {:>14} {:>13.1f}B  <= 24 B: {}\n", "table memory per remap", "-", per_remap,
             verdict(per_remap <= 24));
  fmt::print("{:<52} {:>14} {:>13.1f}B\n", "  plus the engine's group filter, per remap", "-",
             filter_bytes / static_cast<double>(o.entries));
  fmt::print("{:<52} {:>12.1f}ns {:>12.1f}ns\n", "table find(), random block", l0.find_ns, l1.find_ns);
  fmt::print("{:<52} {:>12.1f}ns {:>12.1f}ns\n", "table range walk of one block (read path)",
             l0.range_ns, l1.range_ns);
  fmt::print("{:<52} {:>12.0f}ns {:>12.0f}ns\n", "Engine::read 4 KiB, random, page cache warm", read0,
             read1);
  fmt::print("{:<52} {:>12.0f}ns {:>14}\n", "plain pread 4 KiB of main, same pattern", pread, "");
  const double share = (l1.range_ns - l0.range_ns) / pread * 100;
  fmt::print("{:<52} {:>14} {:>13.2f}%  < 1 %: {}\n", "lookup cost added by the remaps, vs the pread",
             "", share, verdict(share < 1.0));

  for (const Paths* p : {&empty, &full}) {
    std::remove(p->main.c_str());
    std::remove(p->spare.c_str());
  }
  ::rmdir(work.c_str());
  return 0;
}
