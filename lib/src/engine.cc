#include "dmremap/engine.h"

#include "dmremap/open_set.h"

#include <algorithm>
#include <cstring>
#include <ctime>
#include <random>
#include <mutex>
#include <shared_mutex>

#include <boost/container/small_vector.hpp>

#include "dmremap/log.h"

namespace dmremap {

struct Engine::Counters {
  std::atomic<uint64_t> reads{0}, writes{0}, flushes{0}, trims{0}, zeroes{0};
  std::atomic<uint64_t> bytes_read{0}, bytes_written{0};
  std::atomic<uint64_t> main_read_errors{0}, main_write_errors{0};
  std::atomic<uint64_t> retry_successes{0}, unreadable_reads{0}, slot_write_errors{0};
  std::atomic<uint64_t> commit_groups{0}, commit_records{0};
  std::atomic<uint64_t> slow_reads{0};
  LatencyHistogram latency[kLatencyOps];  // indexed by LatencyOp
};

// Set while this thread reads for the surface scan: not client activity.
thread_local bool t_scanning = false;
// The scan's stop flag, while it reads (scan_read).
thread_local const std::atomic<bool>* t_scan_stop = nullptr;

Engine::Background::Background() : was_(t_scanning) { t_scanning = true; }
Engine::Background::~Background() { t_scanning = was_; }

// One request's admission (see close()).
class Engine::Admit {
 public:
  explicit Admit(Engine& e) : e_(e) {
    e_.active_.fetch_add(1, std::memory_order_seq_cst);
    ok_ = !e_.closing_.load(std::memory_order_seq_cst);
    // Every request writing one shared atomic would bounce its cache line
    // between cores: written only when the millisecond has changed.
    if (!t_scanning) {
      const int64_t now = now_ms();
      if (e_.last_client_ms_.load(std::memory_order_relaxed) != now) {
        e_.last_client_ms_.store(now, std::memory_order_relaxed);
      }
    }
  }
  ~Admit() {
    if (e_.active_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
        e_.closing_.load(std::memory_order_seq_cst)) {
      std::lock_guard l(e_.active_mu_);
      e_.active_cv_.notify_all();
    }
  }
  Admit(const Admit&) = delete;
  Admit& operator=(const Admit&) = delete;
  explicit operator bool() const { return ok_; }

 private:
  Engine& e_;
  bool ok_ = false;
};

// A claim on one block: taken once no one else holds it, then waits until
// the writes already on their way to the block have finished. Writes that
// look the block up afterwards see the claim and wait for it.
class Engine::Claim {
 public:
  Claim(Engine& e, uint64_t block) : e_(e), block_(block) {
    {
      std::unique_lock l(e_.claim_mu_);
      e_.claim_cv_.wait(l, [&] {
        return std::find(e_.claimed_.begin(), e_.claimed_.end(), block_) == e_.claimed_.end();
      });
      e_.claimed_.push_back(block_);
      // Paired with count_writes(): a write either sees this claim, or is
      // counted before the wait below reads its counter.
      e_.claims_.fetch_add(1, std::memory_order_seq_cst);
    }
    auto& counter = e_.inflight_[block_ % kInflight];
    for (unsigned spin = 0; counter.load(std::memory_order_seq_cst) != 0; ++spin) {
      if (spin < 64) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(spin < 1000 ? 50 : 1000));
      }
    }
  }
  ~Claim() {
    {
      std::lock_guard l(e_.claim_mu_);
      e_.claimed_.erase(std::find(e_.claimed_.begin(), e_.claimed_.end(), block_));
      e_.claims_.fetch_sub(1, std::memory_order_seq_cst);
    }
    e_.claim_cv_.notify_all();
  }
  Claim(const Claim&) = delete;
  Claim& operator=(const Claim&) = delete;

 private:
  Engine& e_;
  uint64_t block_;
};

// A chunk of a write or trim on its way to its blocks: counted (see Claim)
// from before its lookup until it is destroyed, after its I/O. Blocks claimed
// already (and those sharing a claimed block's counter) are not counted:
// they are left to the slow path.
class Engine::CountedChunk {
 public:
  CountedChunk(Engine& e, uint64_t first, uint64_t last) : e_(e), first_(first), last_(last) {
    e_.count_writes(first_, last_, +1);
    claimed_ = e_.claimed_in(first_, last_);
    for (uint64_t b : claimed_) e_.count_writes(b, b + 1, -1);
  }
  ~CountedChunk() {
    if (claimed_.empty()) {
      e_.count_writes(first_, last_, -1);
      return;
    }
    for (uint64_t b = first_; b < last_; ++b) {
      if (!claimed(b)) e_.count_writes(b, b + 1, -1);
    }
  }
  CountedChunk(const CountedChunk&) = delete;
  CountedChunk& operator=(const CountedChunk&) = delete;
  bool claimed(uint64_t b) const { return std::binary_search(claimed_.begin(), claimed_.end(), b); }
  const std::vector<uint64_t>& claimed_blocks() const { return claimed_; }

 private:
  Engine& e_;
  const uint64_t first_, last_;
  std::vector<uint64_t> claimed_;  // sorted
};

// What a group commit writes for one request.
struct Engine::Commit {
  std::vector<Record> records;
  // The remap's new slot, whose data was written and whose header goes out
  // with the group (none for a pending mark or bad slots alone).
  std::optional<MetadataStore::SlotHeaderWrite> header;
  Status result;
  // Set by the round's leader when the result is final early (a failure);
  // `done` (under commit_mu_) is what the waiter reads.
  bool settled = false;
  bool done = false;
};

namespace {

using SharedGuard = std::shared_lock<GateLock>;
using ExclusiveGuard = std::unique_lock<GateLock>;

std::string block_name(uint64_t block, uint32_t bs) {
  return "block " + std::to_string(block) + " (offset " + std::to_string(block * bs) + ")";
}

}  // namespace

int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string utc_time(int64_t seconds) {
  const time_t t = static_cast<time_t>(seconds);
  struct tm tm {};
  gmtime_r(&t, &tm);
  char out[32];
  std::strftime(out, sizeof out, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return out;
}

const char* health_name(Health h) {
  switch (h) {
    case Health::kOk: return "ok";
    case Health::kWarning: return "warning";
    case Health::kFailing: return "failing";
  }
  return "unknown";
}

void assess_health(EngineStats& s, unsigned warn_percent) {
  // Every problem that applies, worst first; the first one is the reason.
  s.health = Health::kOk;
  s.health_reason.clear();
  s.health_problems.clear();
  auto problem = [&](Health level, const char* key, const std::string& reason) {
    if (s.health_problems.empty()) {
      s.health = level;
      s.health_reason = reason;
    }
    s.health_problems.emplace_back(key);
  };
  if (s.main_offline_since != 0) {
    problem(Health::kFailing, "main_offline",
            "main offline since " + utc_time(s.main_offline_since) + " (" + s.main_offline_reason +
                "): requests that need main fail with EIO; remapped blocks are served");
  }
  if (s.lease_lapsed_seconds != 0) {
    problem(Health::kFailing, "lease_lapsed",
            "the lease on the spare has not been renewed for " +
                std::to_string(s.lease_lapsed_seconds) +
                " s: every request fails with EIO, so that no other server writes the set");
  }
  if (!s.flush_failure.empty()) {
    problem(Health::kFailing, "flush_failed",
            "a flush failed (" + s.flush_failure +
                "): writes acknowledged before it may be lost; FLUSH and FUA fail until restart");
  }
  if (s.journal_broken) {
    problem(Health::kFailing, "journal_broken",
            "the journal on the spare cannot be written: writes are refused");
  }
  if (s.slots_free == 0) {
    problem(Health::kFailing, "pool_exhausted",
            "the spare pool is exhausted: writes that need a slot fail with ENOSPC");
  }
  if (!s.metadata_degraded.empty()) {
    problem(Health::kWarning, "metadata_degraded",
            "the spare's metadata is degraded: " + s.metadata_degraded.front());
  }
  if (s.slots_free != 0 &&
      (s.slots_used + s.slots_bad) * 100 >= uint64_t{warn_percent} * s.slots_total) {
    problem(Health::kWarning, "pool_nearly_full",
            std::to_string((s.slots_used + s.slots_bad) * 100 / s.slots_total) +
                "% of the spare pool is used");
  }
  if (s.pending > 0) {
    problem(Health::kWarning, "pending",
            std::to_string(s.pending) + " block(s) are unreadable (pending)");
  }
}

void fill_table_stats(EngineStats& s, const RemapTable& table, const Superblock& sb,
                      unsigned warn_percent) {
  s.remaps = table.remaps();
  s.pending = table.pending();
  for (int cause = 1; cause <= static_cast<int>(kLastCause); ++cause) {
    s.remaps_by_cause[cause] = table.remaps_by(static_cast<Cause>(cause));
  }
  s.slots_bad = table.bad_slots().size();
  s.slots_used = table.next_slot() - s.slots_bad;
  s.slots_total = sb.slot_count;
  s.slots_free = s.slots_total - table.next_slot();
  s.pending_capacity = sb.pending_capacity;
  assess_health(s, warn_percent);
}

GateLock::GateLock() {
  pthread_rwlockattr_t attr;
  pthread_rwlockattr_init(&attr);
  pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init(&rw_, &attr);
  pthread_rwlockattr_destroy(&attr);
}

GateLock::~GateLock() { pthread_rwlock_destroy(&rw_); }

Result<std::unique_ptr<Engine>> Engine::open(std::shared_ptr<BlockDevice> main,
                                             std::shared_ptr<BlockDevice> spare,
                                             const EngineOptions& options, OpenReport* report) {
  auto found = read_superblock(*spare);
  if (!found.is_ok()) return found.take_status();
  const Superblock& sb = found->sb;
  if (const std::string why = main_mismatch(*main, sb.main_size, sb.main_identity); !why.empty()) {
    return Status::error(EINVAL, why + " (" + spare->name() + " holds set " + uuid_string(sb.uuid) +
                                     "). Is this the right main? Use the main it was formatted "
                                     "for, or format a new spare for this one");
  }
  for (const BlockDevice* dev : {main.get(), spare.get()}) {
    if (dev->alignment() > sb.block_size) {
      return Status::error(EINVAL,
                           dev->name() + " needs writes of " + std::to_string(dev->alignment()) +
                               " bytes under direct I/O, more than the set's block size of " +
                               std::to_string(sb.block_size) +
                               ": one block's write would rewrite its neighbours. Use buffered "
                               "I/O, or format a spare with --block-size " +
                               std::to_string(dev->alignment()));
    }
  }
  if (!options.read_only && (spare->read_only() || main->read_only())) {
    return Status::error(EPERM, "main or spare was opened read-only: use read-only mode");
  }
  if (!options.read_only && !spare->locked()) {
    if (auto s = wait_out_lease(*spare, options.lease_interval); !s.is_ok()) return s;
  }
  RemapTable table;
  auto store = MetadataStore::open(spare, table, !options.read_only, report);
  if (!store.is_ok()) return store.take_status();
  std::unique_ptr<Engine> e(new Engine(std::move(main), std::move(spare),
                                       std::move(store.value()), std::move(table), options));
  const auto st = e->stats();
  log(LogLevel::kInfo, "set " + uuid_string(sb.uuid) + ": " + std::to_string(st.remaps) +
                           " remapped, " + std::to_string(st.pending) + " pending, " +
                           std::to_string(st.slots_free) + " of " +
                           std::to_string(st.slots_total) + " slots free" +
                           (options.read_only ? " (read-only)" : ""));
  if (st.health != Health::kOk) log(LogLevel::kWarning, "health: " + st.health_reason);
  if (!options.read_only && !e->spare_->locked()) e->start_lease();
  return e;
}

Engine::Engine(std::shared_ptr<BlockDevice> main, std::shared_ptr<BlockDevice> spare,
               std::unique_ptr<MetadataStore> store, RemapTable table,
               const EngineOptions& options)
    : main_(std::move(main)),
      spare_(std::move(spare)),
      store_(std::move(store)),
      table_(std::move(table)),
      options_(options),
      size_(store_->superblock().main_size),
      block_(store_->superblock().block_size),
      slot_base_(store_->superblock().slot_offset),
      slot_count_(store_->superblock().slot_count),
      pending_capacity_(store_->superblock().pending_capacity),
      fixed_(store_->superblock()),
      rng_(static_cast<std::minstd_rand::result_type>(
          options.probe_seed != 0 ? options.probe_seed : std::random_device{}())),
      counters_(std::make_unique<Counters>()) {
  table_.enable_filter(size_ / block_);
  next_alloc_ = table_.next_slot();
  committed_next_slot_ = next_alloc_;
  inflight_ = std::make_unique<std::atomic<uint32_t>[]>(kInflight);
  for (size_t i = 0; i < kInflight; ++i) inflight_[i].store(0, std::memory_order_relaxed);
}

Engine::~Engine() {
  stop_lease();
  stop_watch();
}

void Engine::start_lease() {
  lease_renewed_ms_.store(now_ms());
  lease_active_.store(true);
  lease_thread_ = std::thread([this] { lease_loop(); });
}

void Engine::stop_lease() {
  {
    std::lock_guard l(store_mu_);
    lease_stop_ = true;
  }
  lease_cv_.notify_all();
  if (lease_thread_.joinable()) lease_thread_.join();
}

void Engine::lease_loop() {
  std::unique_lock l(store_mu_);
  while (!lease_cv_.wait_for(l, options_.lease_interval, [&] { return lease_stop_; })) {
    // Renewed whatever else failed: an owner that stops renewing stops
    // serving (refuse_if_unusable) before a second one may take over.
    const Status s = store_->heartbeat();
    if (s.is_ok()) {
      lease_renewed_ms_.store(now_ms());
      spare_away_since_.store(0);
    } else if (s.code() == EBUSY) {
      journal_broken_.store(true);
      log(LogLevel::kError, s.to_string() + ". Writes are refused from now on; stop the other "
                                           "server, then restart this one");
    } else if (!s.is_ok()) {
      log(LogLevel::kWarning, "lease on " + spare_->name() + " not renewed: " + s.to_string());
      if (classify_failure(s.code()) == FailureKind::kDevice) {
        int64_t online = 0;
        spare_away_since_.compare_exchange_strong(online,
                                                  static_cast<int64_t>(std::time(nullptr)));
      }
    }
  }
}

uint64_t Engine::slot_offset(uint64_t slot) const {
  return slot_base_ + slot * block_;
}

Status Engine::refuse_if_unusable() const {
  if (closed_.load() || closing_.load()) return Status::error(EIO, "the device is closed");
  if (lease_active_.load(std::memory_order_relaxed)) {
    const int64_t age = now_ms() - lease_renewed_ms_.load(std::memory_order_relaxed);
    // Past this another dmremap may take the set over: stop first.
    if (age > 5 * options_.lease_interval.count() / 2) {
      return Status::error(EIO, "the lease on " + spare_->name() + " has not been renewed for " +
                                    std::to_string(age / 1000) +
                                    " s (see the log): nothing is served, so that no other "
                                    "server can write the set at the same time. Restart");
    }
  }
  return Status::ok();
}

Status Engine::refuse_writes_if_broken() const {
  if (journal_broken_.load()) {
    return Status::error(EIO, "writes are refused: the journal on " + spare_->name() +
                                  " could not be written (see the log); reads still work");
  }
  return Status::ok();
}

void Engine::count_writes(uint64_t first, uint64_t last, int delta) {
  for (uint64_t b = first; b < last; ++b) {
    if (delta > 0) {
      inflight_[b % kInflight].fetch_add(1, std::memory_order_seq_cst);
    } else {
      inflight_[b % kInflight].fetch_sub(1, std::memory_order_seq_cst);
    }
  }
}

std::vector<uint64_t> Engine::claimed_in(uint64_t first, uint64_t last) {
  std::vector<uint64_t> out;
  if (claims_.load(std::memory_order_seq_cst) == 0) return out;
  std::lock_guard l(claim_mu_);
  for (uint64_t c : claimed_) {
    // The claimed block itself, and any block of the range that shares its
    // in-flight counter: those take the slow path too, so that a claim
    // never waits on a stream of writes to another block (ranges are
    // shorter than the counter table, see kFastChunk).
    const uint64_t index = c % kInflight;
    uint64_t b = first + (index + kInflight - first % kInflight) % kInflight;
    for (; b < last; b += kInflight) out.push_back(b);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

// ---------------------------------------------------------------- reads

Status Engine::read(void* out, uint64_t len, uint64_t offset, std::vector<uint64_t>* unreadable_out) {
  Admit admit(*this);
  if (!admit) return Status::error(EIO, "the device is closed");
  if (auto s = refuse_if_unusable(); !s.is_ok()) return s;
  if (offset > size_ || len > size_ - offset) {
    return Status::error(EINVAL, "read at offset " + std::to_string(offset) + ", length " +
                                     std::to_string(len) + ": beyond the end of the device");
  }
  if (len == 0) return Status::ok();
  LatencyTimer timed(counters_->latency[kLatencyRead]);
  counters_->reads.fetch_add(1, std::memory_order_relaxed);
  counters_->bytes_read.fetch_add(len, std::memory_order_relaxed);
  char* buf = static_cast<char*>(out);
  ReadFindings f;
  read_fast(buf, len, offset, f);
  if (!f.failed.empty()) recover_reads(buf, len, offset, f);
  if (!f.slow.empty()) rescue_slow(f);
  return finish_read(buf, len, offset, f, unreadable_out);
}

Status Engine::finish_read(char* buf, uint64_t len, uint64_t offset, ReadFindings& f,
                           std::vector<uint64_t>* unreadable_out) {
  if (f.scan_stopped) return Status::error(ECANCELED, "the scan was told to stop");
  auto& bad = f.unreadable;
  // Past the point main went offline nothing was read, good or bad.
  std::erase_if(bad, [&](uint64_t b) { return std::max(offset, b * block_) >= f.offline_from; });
  if (bad.empty() && f.offline_from == UINT64_MAX) return Status::ok();
  std::sort(bad.begin(), bad.end());
  if (options_.unreadable_zero && !t_scanning) {  // a scan must see them
    for (uint64_t b : bad) {
      const uint64_t lo = std::max(offset, b * block_);
      const uint64_t hi = std::min(offset + len, (b + 1) * block_);
      std::memset(buf + (lo - offset), 0, hi - lo);
      log(LogLevel::kWarning, "unreadable=zero: returned zeros for unreadable " +
                                  block_name(b, block_) + " (salvage mode)");
    }
    bad.clear();
    if (f.offline_from == UINT64_MAX) return Status::ok();
  }
  if (!bad.empty()) counters_->unreadable_reads.fetch_add(1, std::memory_order_relaxed);
  const uint64_t first_bad = bad.empty() ? UINT64_MAX : std::max(offset, bad.front() * block_);
  if (f.offline_from < first_bad) {
    // Only the bytes before it are good: no list, so a frontend sends those
    // and one error.
    return offline_error().with_offset(f.offline_from);
  }
  if (unreadable_out != nullptr && f.offline_from == UINT64_MAX) *unreadable_out = bad;
  const uint64_t b = bad.front();
  const bool slot = std::find(f.bad_slot_reads.begin(), f.bad_slot_reads.end(), b) !=
                    f.bad_slot_reads.end();
  return Status::error(EIO, block_name(b, block_) +
                                (slot ? ": its copy on the spare cannot be read"
                                      : " cannot be read from main and has no copy (pending)"))
      .with_offset(first_bad);
}

namespace {

// Where a request's blocks are, looked up with the gate shared and used
// after it is released: runs of main's blocks, and single table entries.
struct Piece {
  uint64_t first, last;  // blocks
  uint64_t value;        // kMain, or the table entry's value
  static constexpr uint64_t kMain = ~uint64_t{0} - 1;
};

// Most requests are one piece (no remap in their range): kept inline, so
// the fast path does not allocate.
using Pieces = boost::container::small_vector<Piece, 8>;

template <class Table>
void plan_pieces(const Table& table, uint64_t first, uint64_t last, Pieces& out) {
  uint64_t cursor = first;
  table.for_range(first, last, [&](const RemapTable::Entry& e) {
    if (cursor < e.block) out.push_back(Piece{cursor, e.block, Piece::kMain});
    out.push_back(Piece{e.block, e.block + 1, e.value});
    cursor = e.block + 1;
  });
  if (cursor < last) out.push_back(Piece{cursor, last, Piece::kMain});
}

}  // namespace

void Engine::read_fast(char* buf, uint64_t len, uint64_t offset, ReadFindings& f) {
  const uint64_t first = offset / block_;
  const uint64_t end = (offset + len - 1) / block_ + 1;
  auto clip = [&](uint64_t a, uint64_t b) {
    return std::pair{std::max(offset, a * block_), std::min(offset + len, b * block_)};
  };
  Pieces pieces;
  {
    SharedGuard g(gate_);
    plan_pieces(table_, first, end, pieces);
  }
  for (const Piece& p : pieces) {
    const auto [lo, hi] = clip(p.first, p.last);
    if (lo >= f.offline_from) return;
    if (p.value == Piece::kMain) {
      if (!main_online()) {
        f.offline_from = lo;
        return;
      }
      const bool timed = options_.slow_read.count() > 0;
      // When main last answered, as this read starts (note_main_read).
      const int64_t answered = timed ? main_answered_ms_.load(std::memory_order_relaxed) : 0;
      const int64_t started = now_us();
      const Status s = main_->read(buf + (lo - offset), hi - lo, lo);
      if (s.is_ok()) {
        if (timed) note_main_read(started, answered, p.first, p.last, f);
        continue;
      }
      const int64_t spent = (now_us() - started) / 1000;
      counters_->main_read_errors.fetch_add(1, std::memory_order_relaxed);
      if (!failure_is_media(s, p.first, p.last)) {
        f.offline_from = lo;
      } else if (p.last - p.first == 1) {
        f.failed.push_back({p.first, 1, spent});  // that read was the block's first attempt
      } else {
        read_main_narrowing(buf, offset, len, p.first, p.last, spent, f);
      }
      continue;
    }
    if (RemapTable::is_pending(p.value)) {
      f.unreadable.push_back(p.first);
      continue;
    }
    const uint64_t slot = RemapTable::slot_of(p.value);
    const Status s =
        spare_->read(buf + (lo - offset), hi - lo, slot_offset(slot) + (lo - p.first * block_));
    if (s.is_ok()) continue;
    // The block may have moved to another slot meanwhile (its old one
    // failed a write): a claim settles it.
    {
      Claim claim(*this, p.first);
      SharedGuard g(gate_);
      const auto now = table_.find(p.first);
      if (now && !RemapTable::is_pending(*now) && RemapTable::slot_of(*now) != slot) {
        g.unlock();
        const uint64_t moved = RemapTable::slot_of(*now);
        if (spare_->read(buf + (lo - offset), hi - lo,
                         slot_offset(moved) + (lo - p.first * block_))
                .is_ok()) {
          continue;
        }
      }
    }
    // Nothing else holds this block's data: it is unreadable, and the rest
    // of the request is still served.
    log(LogLevel::kError, "slot " + std::to_string(slot) + " of " + block_name(p.first, block_) +
                              " cannot be read: " + s.to_string());
    revive_spare();
    f.unreadable.push_back(p.first);
    f.bad_slot_reads.push_back(p.first);
  }
}

void Engine::read_main_narrowing(char* buf, uint64_t req_off, uint64_t req_len, uint64_t first,
                                 uint64_t last, int64_t range_ms, ReadFindings& f) {
  // One read per block, not bisection: each read that includes a bad sector
  // may cost a failing disk seconds of internal retries, and a weak block
  // must not use up its failures on intermediate ranges before it is named.
  // The failed range read and this one are the block's first two attempts.
  const size_t before = f.failed.size();
  for (uint64_t b = first; b < last; ++b) {
    if (t_scan_stop != nullptr && t_scan_stop->load()) {
      f.scan_stopped = true;  // a background read told to stop: read again later
      return;
    }
    const uint64_t lo = std::max(req_off, b * block_);
    const uint64_t hi = std::min(req_off + req_len, (b + 1) * block_);
    const int64_t started = now_ms();
    const Status s = main_->read(buf + (lo - req_off), hi - lo, lo);
    if (s.is_ok()) continue;
    counters_->main_read_errors.fetch_add(1, std::memory_order_relaxed);
    if (main_gone(s)) {
      set_main_offline(s);
      f.offline_from = lo;
      return;
    }
    f.failed.push_back({b, 2, range_ms + now_ms() - started});
  }
  if (f.failed.size() == before) {
    log(LogLevel::kWarning, main_->name() + ": a read of blocks " + std::to_string(first) + "-" +
                                std::to_string(last - 1) +
                                " failed once, then every block read: a transient error");
  }
}

void Engine::note_main_read(int64_t started_us, int64_t answered_ms, uint64_t first,
                            uint64_t last, ReadFindings& f) {
  const int64_t end_us = now_us();
  if (main_answered_ms_.load(std::memory_order_relaxed) != end_us / 1000) {
    main_answered_ms_.store(end_us / 1000, std::memory_order_relaxed);
  }
  if (!read_was_slow(end_us - started_us, /*count=*/true)) return;
  // Every slow read arms the quiet window, whether its blocks are taken or
  // not: slow reads close together are the device (a spin-up, a stall of
  // the disk or of its link, a starved process), not a sector.
  const uint64_t seq = slow_seq_.fetch_add(1, std::memory_order_relaxed) + 1;
  const int64_t now = end_us / 1000;
  const int64_t before = last_slow_ms_.exchange(now, std::memory_order_relaxed);
  if (before != 0 && now - before < kSlowQuietMs) return;
  // A read that started long after main last answered may have waited for
  // the disk to spin up, which says nothing about its blocks.
  if (answered_ms != 0 && started_us / 1000 - answered_ms > kSlowIdleMs) return;
  f.slow.push_back(ReadFindings::Slow{first, last, seq});
}

bool Engine::read_was_slow(int64_t us, bool count) {
  const int64_t usual = main_read_avg_us_.load(std::memory_order_relaxed);
  // The first reads only teach what usual is (their mean): nothing is slow
  // before it is known.
  if (main_read_samples_.load(std::memory_order_relaxed) < kSlowWarmup) {
    const uint64_t seen = main_read_samples_.fetch_add(1, std::memory_order_relaxed);
    main_read_avg_us_.store(usual + (us - usual) / static_cast<int64_t>(seen + 1),
                            std::memory_order_relaxed);
    return false;
  }
  const int64_t limit =
      std::max<int64_t>(options_.slow_read.count() * 1000, kSlowFactor * usual);
  // A running average of about the last 32 reads, slow ones counted at the
  // limit: a main that gets slower everywhere raises it within a few reads
  // (each such read raises it by about 60 %, as the limit is 20 times it).
  // Racing updates lose a sample now and then, which an average can afford.
  main_read_avg_us_.store(usual + (std::min(us, limit) - usual) / 32, std::memory_order_relaxed);
  if (us <= limit) return false;
  if (count) counters_->slow_reads.fetch_add(1, std::memory_order_relaxed);
  return true;
}

bool Engine::slow_rescue_allowed(uint64_t seq) {
  // Another slow read since this one (a read that waited with it for the
  // same stall, and finished after it): the device's, not this block's.
  if (slow_seq_.load(std::memory_order_relaxed) != seq) return false;
  // Slots are for data main cannot store: none for slow blocks once the
  // pool is at the warning level.
  SharedGuard g(gate_);
  const uint64_t used = table_.next_slot();
  return used * 100 < slot_count_ * options_.warn_percent;
}

void Engine::rescue_slow(ReadFindings& f) {
  if (options_.read_only) {
    if (!slow_read_only_logged_.exchange(true)) {
      log(LogLevel::kWarning, "a read of " + block_name(f.slow.front().first, block_) +
                                  " was slow; read-only, so slow blocks are counted, not "
                                  "rescued (logged once)");
    }
    return;
  }
  std::vector<char> data(block_);
  const int64_t began = now_ms();
  for (const ReadFindings::Slow& slow : f.slow) {
    const uint64_t first = slow.first, last = slow.last;
    if (!slow_rescue_allowed(slow.seq)) {
      log(LogLevel::kWarning, main_->name() + ": a slow read of blocks " +
                                  std::to_string(first) + "-" + std::to_string(last - 1) +
                                  " is not taken for its blocks' (another slow read came "
                                  "shortly before, or the pool is at its warning level): none "
                                  "rescued");
      continue;
    }
    if (last - first > std::max<uint64_t>(1, kSlowPinpointBytes / block_)) {
      log(LogLevel::kWarning, main_->name() + ": a read of blocks " + std::to_string(first) +
                                  "-" + std::to_string(last - 1) +
                                  " was slow; too long a range to read again block by block: "
                                  "none rescued (a scan's pieces are short enough)");
      continue;
    }
    size_t rescued = 0;
    for (uint64_t b = first; b < last; ++b) {
      if (b * block_ >= f.offline_from) return;
      if (t_scan_stop != nullptr && t_scan_stop->load()) {
        f.scan_stopped = true;  // this piece is read again when the scan goes on
        return;
      }
      // Within the same budget in time as a failing block's retries.
      if (now_ms() - began > options_.retry_time.count()) return;
      // Read under the claim, so that the copy is the block's data and no
      // write to it comes between.
      Claim claim(*this, b);
      {
        SharedGuard g(gate_);
        if (table_.find(b)) continue;  // moved meanwhile
      }
      if (!main_online()) return;
      const int64_t started = now_us();
      const Status s = main_->read(data.data(), block_, b * block_);
      if (!s.is_ok()) {
        // The next read of it finds out what it is; main gone is said now.
        counters_->main_read_errors.fetch_add(1, std::memory_order_relaxed);
        if (main_gone(s)) set_main_offline(s);
        return;
      }
      // One block's read was slow: it is the one. Of a longer read, only
      // the blocks that are slow again alone (a disk may answer the second
      // read from its cache: then none is named).
      if (last - first > 1 && !read_was_slow(now_us() - started, /*count=*/false)) {
        continue;
      }
      if (!slow_rescue_allowed(slow.seq)) return;  // another slow read came meanwhile
      log(LogLevel::kWarning, block_name(b, block_) +
                                  " read correctly but slowly (past slow=): rescuing it to the "
                                  "spare before it fails");
      if (auto st = commit_remap(b, data.data(), Cause::kSlow); !st.is_ok()) {
        log(LogLevel::kError,
            block_name(b, block_) + " is slow but could not be rescued: " + st.to_string());
        continue;
      }
      ++rescued;
    }
    if (rescued == 0 && last - first > 1) {
      log(LogLevel::kWarning, main_->name() + ": a read of blocks " + std::to_string(first) +
                                  "-" + std::to_string(last - 1) +
                                  " was slow, but no block alone was: none rescued");
    }
  }
}

void Engine::recover_reads(char* buf, uint64_t len, uint64_t offset, ReadFindings& f) {
  std::vector<char> data(block_);
  for (const auto& failed : f.failed) {
    const uint64_t b = failed.block;
    const uint64_t lo = std::max(offset, b * block_);
    if (lo >= f.offline_from) break;
    if (t_scan_stop != nullptr && t_scan_stop->load()) {
      f.scan_stopped = true;  // the rest is neither read nor marked
      break;
    }
    Status s;
    {
      Claim claim(*this, b);
      s = read_block_claimed(b, data.data(), failed.attempts, failed.spent_ms);
    }
    if (!s.is_ok()) {
      if (!main_online()) {
        f.offline_from = lo;
        break;
      }
      f.unreadable.push_back(b);
      continue;
    }
    const uint64_t hi = std::min(offset + len, (b + 1) * block_);
    std::memcpy(buf + (lo - offset), data.data() + (lo - b * block_), hi - lo);
  }
}

Status Engine::read_block_claimed(uint64_t block, char* out, unsigned attempts,
                                  int64_t spent_ms) {
  std::optional<uint64_t> v;
  {
    SharedGuard g(gate_);
    v = table_.find(block);
  }
  if (v) {
    if (RemapTable::is_pending(*v)) {
      return Status::error(EIO, block_name(block, block_) + " is pending (unreadable)");
    }
    return spare_->read(out, block_, slot_offset(RemapTable::slot_of(*v)));
  }
  if (!main_online()) return offline_error();
  const unsigned allowed = options_.read_retries + 1;
  Status last = Status::error(EIO, main_->name() + ": " + block_name(block, block_) +
                                       " failed to read");
  bool read = false;
  bool over_time = false;
  unsigned done = attempts;
  for (; !read; ++done) {
    // The budget: in count (every read that included the block), and in
    // the time those reads took (not the time spent waiting for a claim or
    // on other blocks). A block not yet tried is always read once.
    if (done > 0 && done >= allowed) break;
    // At least one retry whatever the time: a first read that timed out
    // (io-timeout) may be one stall of a healthy block.
    if (done > 1 && spent_ms >= options_.retry_time.count()) {
      over_time = true;
      break;
    }
    const int64_t started = now_ms();
    last = main_->read(out, block_, block * block_);
    spent_ms += now_ms() - started;
    if (last.is_ok()) {
      read = true;
      attempts = done;
      break;
    }
    counters_->main_read_errors.fetch_add(1, std::memory_order_relaxed);
    if (main_gone(last)) {
      set_main_offline(last);
      return offline_error();
    }
  }
  if (read) {
    if (attempts == 0) return last;
    counters_->retry_successes.fetch_add(1, std::memory_order_relaxed);
    if (options_.read_only) {
      log(LogLevel::kWarning, block_name(block, block_) + " read on a retry (weak); read-only, "
                              "so it is not rescued");
      return last;
    }
    // A weak block: copy it now, while it still reads.
    log(LogLevel::kWarning, block_name(block, block_) + " failed, then read on a retry (weak): "
                            "rescuing it to the spare");
    if (auto s = commit_remap(block, out, Cause::kRescue); !s.is_ok()) {
      log(LogLevel::kError, block_name(block, block_) + " is weak but could not be rescued: " +
                                s.to_string());
    }
    return Status::ok();
  }
  // Before the block is declared lost: is it the block, or main as a whole?
  if (!failure_is_media(last, block, block + 1)) return offline_error();
  log(LogLevel::kError, block_name(block, block_) + " is unreadable after " +
                            std::to_string(done) + " reads in " +
                            std::to_string(spent_ms / 1000) + "." +
                            std::to_string(spent_ms % 1000 / 100) + " s" +
                            (over_time ? " (retry-time reached)" : "") + ": " + last.to_string());
  if (!options_.read_only) (void)mark_pending(block);
  return last;
}

// ------------------------------------------------------------ main offline

bool Engine::main_gone(const Status& failure) {
  // One request that timed out may be one sector a disk keeps retrying:
  // the probe decides, as for a plain EIO.
  return failure.code() != ETIMEDOUT && classify_failure(failure.code()) == FailureKind::kDevice;
}

bool Engine::failure_is_media(const Status& failure, uint64_t first, uint64_t last) {
  if (classify_failure(failure.code()) == FailureKind::kMedia) return true;
  if (main_gone(failure)) {
    set_main_offline(failure);
    return false;
  }
  const std::vector<uint64_t> candidates = probe_candidates(first, last);
  Status probe = probe_main(candidates);
  if (probe.is_ok()) return true;
  set_main_offline(Status::error(failure.code(), failure.message() + "; and other blocks of "
                                                     "main fail too: " + probe.message()));
  return false;
}

std::vector<uint64_t> Engine::probe_candidates(uint64_t first, uint64_t last) {
  // Blocks picked at random, so that a cache in front of a dead disk (an
  // NBD server's page cache) is unlikely to hold them, and none known bad.
  // Six, so that a disk with many bad sectors not found yet (15 % of them:
  // one chance in 100,000) is not taken for a dead one. None near the
  // failing range either: bad sectors come in clusters, so a neighbour says
  // little about the disk as a whole (and may be the next block this very
  // request is about to name).
  const uint64_t blocks = size_ / block_;
  const uint64_t margin = std::min<uint64_t>(64, blocks / 16);
  const uint64_t near_lo = first > margin ? first - margin : 0;
  const uint64_t near_hi = last + margin;
  std::vector<uint64_t> out;
  std::lock_guard l(rng_mu_);
  SharedGuard g(gate_);
  for (int draw = 0; draw < 32 && out.size() < kProbeBlocks; ++draw) {
    const uint64_t b = std::uniform_int_distribution<uint64_t>(0, blocks - 1)(rng_);
    if ((b >= near_lo && b < near_hi) || table_.find(b)) continue;
    if (std::find(out.begin(), out.end(), b) == out.end()) out.push_back(b);
  }
  return out;
}

Status Engine::probe_main(const std::vector<uint64_t>& candidates) {
  // Main is alive when any of them reads. A link that drops one request in
  // a while must not look dead, so each gets a second chance.
  std::vector<char> data(block_);
  Status last_failure;
  for (int round = 0; round < 2; ++round) {
    for (uint64_t b : candidates) {
      Status s = main_->read(data.data(), block_, b * block_);
      if (s.is_ok()) return s;
      // A healthy block that gets no answer either: main as a whole is
      // stuck. Eleven more reads would each wait out the timeout.
      if (s.code() == ETIMEDOUT) return s;
      last_failure = std::move(s);
    }
  }
  return last_failure;  // ok when there was nothing to compare with
}

void Engine::set_main_offline(const Status& why) {
  int64_t expected = 0;
  const int64_t now = std::time(nullptr);
  if (!offline_since_.compare_exchange_strong(expected, now)) return;
  {
    std::lock_guard l(reason_mu_);
    offline_reason_ = why.to_string();
  }
  log(LogLevel::kError, main_->name() + " offline since " + utc_time(now) + ": " +
                            why.to_string() +
                            ". This is not a bad block: nothing is marked or remapped. Requests "
                            "that need main fail with EIO until it is back; blocks on the spare "
                            "are still served; main is tried again with backoff");
  wake_watch();
}

void Engine::watch_main() {
  // Brings main back, and reconnects a failing spare, holding no lock that
  // requests need, so they keep failing at once (or being served from the
  // other device) while a reconnect takes its time.
  std::unique_lock l(watch_mu_);
  while (!watch_stop_) {
    if (spare_revive_wanted_.exchange(false)) {
      l.unlock();
      const Status s = spare_->reconnect();
      l.lock();
      if (!s.is_ok()) log(LogLevel::kDebug, "spare not back yet: " + s.to_string());
      // At most once a second.
      watch_cv_.wait_for(l, std::chrono::seconds(1),
                         [&] { return watch_stop_ || offline_since_.load() != 0; });
      continue;
    }
    if (offline_since_.load() == 0) {
      watch_cv_.wait(l, [&] {
        return watch_stop_ || offline_since_.load() != 0 || spare_revive_wanted_.load();
      });
      continue;
    }
    auto backoff = std::max(options_.reconnect_first, std::chrono::milliseconds(1));
    while (!watch_stop_ && offline_since_.load() != 0) {
      if (watch_cv_.wait_for(l, backoff, [&] { return watch_stop_; })) break;
      l.unlock();
      Status s = main_->reconnect();
      if (s.is_ok()) s = probe_main(probe_candidates(0, 0));
      l.lock();
      if (s.is_ok()) {
        const int64_t since = offline_since_.exchange(0);
        log(LogLevel::kWarning, main_->name() + " back online after " +
                                    std::to_string(std::time(nullptr) - since) +
                                    " s offline; serving from it again");
        if (main_->lost_writes()) {
          log(LogLevel::kError, main_->name() + " came back as a new connection or device "
                                                "while writes were not yet flushed: they may "
                                                "be lost, so every FLUSH and FUA fails until "
                                                "restart");
        }
        break;
      }
      log(LogLevel::kDebug, "main still offline: " + s.to_string());
      backoff = std::min(backoff * 2, std::max(options_.reconnect_max,
                                                std::chrono::milliseconds(1)));
    }
  }
}

void Engine::stop_watch() {
  {
    std::lock_guard l(watch_mu_);
    watch_stop_ = true;
  }
  watch_cv_.notify_all();
  if (watch_thread_.joinable()) watch_thread_.join();
}

Status Engine::offline_error() {
  const int64_t since = offline_since_.load();
  if (since == 0) return Status::error(EIO, "main was offline during the request");
  std::string reason;
  {
    std::lock_guard l(reason_mu_);
    reason = offline_reason_;
  }
  return Status::error(EIO, "main offline since " + utc_time(since) + " (" + reason + ")");
}

// ---------------------------------------------------------------- writes

std::shared_ptr<WriteMirror> Engine::mirror() {
  if (!has_mirror_.load(std::memory_order_acquire)) return nullptr;
  std::lock_guard l(mirror_mu_);
  return mirror_;
}

void Engine::attach_mirror(std::shared_ptr<WriteMirror> m) {
  {
    std::lock_guard l(mirror_mu_);
    mirror_ = std::move(m);
    has_mirror_.store(mirror_ != nullptr, std::memory_order_seq_cst);
  }
  // Changes that began before this (with the old mirror, or none) finish
  // first: whatever the new mirror is for may then assume it sees every
  // change made after this returns. Only those: the generation's parity
  // tells them from the ones that began after.
  const uint64_t old = mirror_gen_.fetch_add(1, std::memory_order_seq_cst);
  while (in_mirror_[old & 1].load(std::memory_order_seq_cst) != 0) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

Status Engine::flush_background() {
  const Background background;
  Admit admit(*this);
  if (!admit) return Status::error(EIO, "the device is closed");
  if (Status s = refuse_if_unusable(); !s.is_ok()) return s;
  return flush_both();
}

// A request the mirror cannot take (out of range, read-only...) is not
// given to it: the engine's own checks answer first.
namespace {
bool mirrored_range(uint64_t len, uint64_t offset, uint64_t size) {
  return len > 0 && offset <= size && len <= size - offset;
}
}  // namespace

Status Engine::mirrored(WriteMirror::Op op, const void* buf, uint64_t len, uint64_t offset,
                        bool fua, const std::function<Status()>& apply) {
  // Counted, under the generation it began in, until it is done: so that
  // attach_mirror() waits for it, or it sees the new mirror.
  const uint64_t gen = mirror_gen_.load(std::memory_order_seq_cst);
  std::atomic<int64_t>& counted = in_mirror_[gen & 1];
  counted.fetch_add(1, std::memory_order_seq_cst);
  std::shared_ptr<WriteMirror> m;
  if (has_mirror_.load(std::memory_order_seq_cst) && !options_.read_only &&
      mirrored_range(len, offset, size_)) {
    m = mirror();
  }
  Status s = m ? m->change(op, buf, len, offset, fua, apply) : apply();
  counted.fetch_sub(1, std::memory_order_seq_cst);
  return s;
}

Status Engine::write(const void* buf, uint64_t len, uint64_t offset, bool fua) {
  const char* src = static_cast<const char*>(buf);
  return mirrored(WriteMirror::Op::kWrite, buf, len, offset, fua,
                  [&] { return do_write(src, Data::kBuffer, len, offset, fua); });
}

Status Engine::write_zeroes(uint64_t len, uint64_t offset, bool fua, bool fast) {
  if (fast && offset <= size_ && len <= size_ - offset && len > 0) {
    if (!can_fast_zero()) {
      return Status::error(ENOTSUP, "zeroing is not fast here: it would write zeros");
    }
    bool slots = false;
    for_each_entry(offset / block_, (offset + len + block_ - 1) / block_,
                   [&](const RemapTable::Entry&) { slots = true; });
    if (slots) {
      return Status::error(ENOTSUP, "zeroing remapped or pending blocks writes zeros to the spare");
    }
  }
  counters_->zeroes.fetch_add(1, std::memory_order_relaxed);
  return mirrored(WriteMirror::Op::kZeroes, nullptr, len, offset, fua,
                  [&] { return do_write(nullptr, Data::kZeroes, len, offset, fua); });
}

Status Engine::do_write(const char* src, Data kind, uint64_t len, uint64_t offset, bool fua) {
  Admit admit(*this);
  if (!admit) return Status::error(EIO, "the device is closed");
  if (auto s = refuse_if_unusable(); !s.is_ok()) return s;
  if (options_.read_only) return Status::error(EPERM, "the device is read-only");
  if (offset > size_ || len > size_ - offset) {
    return Status::error(ENOSPC, "write at offset " + std::to_string(offset) + ", length " +
                                     std::to_string(len) + ": beyond the end of the device");
  }
  if (auto s = refuse_writes_if_broken(); !s.is_ok()) return s;
  if (len == 0) return fua ? flush_both() : Status::ok();
  const bool zero = kind == Data::kZeroes;
  // Write-zeroes has its own counter (write_zeroes): not a write here.
  std::optional<LatencyTimer> timed;
  if (!zero) {
    timed.emplace(counters_->latency[kLatencyWrite]);
    counters_->writes.fetch_add(1, std::memory_order_relaxed);
    counters_->bytes_written.fetch_add(len, std::memory_order_relaxed);
  }
  const uint64_t full_first = (offset + block_ - 1) / block_;
  const uint64_t full_end = std::max(full_first, (offset + len) / block_);
  // Blocks that the fast path could not finish, and partial blocks.
  std::vector<uint64_t> slow;
  if (offset % block_ != 0) slow.push_back(offset / block_);
  if ((offset + len) % block_ != 0 && (slow.empty() || (offset + len - 1) / block_ != slow[0])) {
    slow.push_back((offset + len - 1) / block_);
  }
  bool main_down = false;
  // Blocks a write to which timed out: it may still land, later than a
  // newer write, so they are never written again where they are (see
  // write_block_claimed).
  std::vector<uint64_t> suspect;
  auto is_timeout = [](const Status& st) { return st.code() == ETIMEDOUT; };
  // In chunks, each counted for no longer than its own I/O.
  for (uint64_t chunk = full_first; chunk < full_end && !main_down; chunk += kFastChunk) {
    const uint64_t chunk_end = std::min(full_end, chunk + kFastChunk);
    // Counted before the lookup, so that a claim taken after it waits for
    // this write; blocks claimed already are left to the slow path.
    const CountedChunk counted(*this, chunk, chunk_end);
    slow.insert(slow.end(), counted.claimed_blocks().begin(), counted.claimed_blocks().end());
    Pieces pieces;
    {
      SharedGuard g(gate_);
      plan_pieces(table_, chunk, chunk_end, pieces);
    }
    auto is_claimed = [&](uint64_t b) { return counted.claimed(b); };
    auto to_main = [&](uint64_t a, uint64_t b) {
      if (main_down) return;
      if (!main_online()) {
        main_down = true;
        return;
      }
      const uint64_t n = (b - a) * block_;
      const Status st = zero ? main_->write_zeroes(n, a * block_)
                             : main_->write(src + (a * block_ - offset), n, a * block_);
      if (st.is_ok()) return;
      counters_->main_write_errors.fetch_add(1, std::memory_order_relaxed);
      // Main as a whole failing is no reason to remap anything.
      if (!failure_is_media(st, a, b)) {
        main_down = true;
        return;
      }
      for (uint64_t b2 = a; b2 < b; ++b2) {
        slow.push_back(b2);
        if (is_timeout(st)) suspect.push_back(b2);
      }
    };
    for (const Piece& p : pieces) {
      if (p.value == Piece::kMain) {
        // Runs of unclaimed blocks.
        uint64_t a = p.first;
        for (uint64_t b = p.first; b <= p.last; ++b) {
          if (b == p.last || is_claimed(b)) {
            if (a < b) to_main(a, b);
            a = b + 1;
          }
        }
        continue;
      }
      if (is_claimed(p.first)) continue;
      if (RemapTable::is_pending(p.value)) {
        slow.push_back(p.first);
        continue;
      }
      const uint64_t at = slot_offset(RemapTable::slot_of(p.value));
      const Status st = zero ? spare_->write_zeroes(block_, at)
                             : spare_->write(src + (p.first * block_ - offset), block_, at);
      if (!st.is_ok()) {
        slow.push_back(p.first);
        if (is_timeout(st)) suspect.push_back(p.first);
      }
    }
  }
  if (main_down) return offline_error();
  Status result;
  if (!slow.empty()) {
    std::sort(slow.begin(), slow.end());
    slow.erase(std::unique(slow.begin(), slow.end()), slow.end());
    std::vector<char> data(block_);
    for (uint64_t b : slow) {
      const uint64_t lo = std::max(offset, b * block_);
      const uint64_t hi = std::min(offset + len, (b + 1) * block_);
      Claim claim(*this, b);
      Status s;
      if (hi - lo < block_) {
        // Read-modify-write: the rest of the block must be real data.
        s = read_block_claimed(b, data.data(), 0, 0);
        if (!s.is_ok() && !main_online()) {
          s = offline_error();
        } else if (!s.is_ok()) {
          s = Status::error(EIO, "write to part of " + block_name(b, block_) +
                                     ": the rest of the block cannot be read");
        }
      }
      if (s.is_ok()) {
        char* dst = data.data() + (lo - b * block_);
        if (zero) {
          std::memset(dst, 0, hi - lo);
        } else {
          std::memcpy(dst, src + (lo - offset), hi - lo);
        }
        s = write_block_claimed(b, data.data(),
                                std::find(suspect.begin(), suspect.end(), b) != suspect.end());
      }
      if (!s.is_ok() && result.is_ok()) result = std::move(s);
    }
  }
  if (!result.is_ok()) return result;
  // The request's own flush: admitted with it, so one that was running
  // when close() began finishes whole.
  return fua ? flush_both() : Status::ok();
}

Status Engine::write_block_claimed(uint64_t block, const char* data, bool suspect) {
  if (auto s = refuse_writes_if_broken(); !s.is_ok()) return s;
  std::optional<uint64_t> v;
  {
    SharedGuard g(gate_);
    v = table_.find(block);
  }
  if (v && RemapTable::is_pending(*v)) return commit_remap(block, data, Cause::kPendingWrite);
  if (v) {
    const uint64_t slot = RemapTable::slot_of(*v);
    if (suspect) {
      log(LogLevel::kWarning, "a write to slot " + std::to_string(slot) + " of " +
                                  block_name(block, block_) +
                                  " timed out and may still land: moving the block");
      return commit_remap(block, data, RemapTable::cause_of(*v), slot);
    }
    Status s = spare_->write(data, block_, slot_offset(slot));
    if (s.is_ok()) return s;
    counters_->slot_write_errors.fetch_add(1, std::memory_order_relaxed);
    if (!spare_failure_is_slot(s)) return spare_away(s);
    log(LogLevel::kWarning, "slot " + std::to_string(slot) + " of " + block_name(block, block_) +
                                " failed to write (" + s.to_string() + "); moving it");
    // The old slot is recorded bad in the same journal append as the move.
    return commit_remap(block, data, RemapTable::cause_of(*v), slot);
  }
  if (!main_online()) return offline_error();
  if (suspect) {
    // Writing main again could be overtaken by the write that timed out.
    log(LogLevel::kWarning, main_->name() + ": a write to " + block_name(block, block_) +
                                " timed out and may still land: remapping it");
    return commit_remap(block, data, Cause::kWriteError);
  }
  Status s = main_->write(data, block_, block * block_);
  if (s.is_ok()) return s;
  counters_->main_write_errors.fetch_add(1, std::memory_order_relaxed);
  if (!failure_is_media(s, block, block + 1)) return offline_error();
  log(LogLevel::kWarning, main_->name() + ": " + block_name(block, block_) +
                              " failed to write (" + s.to_string() + "); remapping it");
  return commit_remap(block, data, Cause::kWriteError);
}

// ------------------------------------------------------- remap machinery

std::optional<uint64_t> Engine::allocate_slot(std::optional<uint64_t> above) {
  std::unique_lock l(commit_mu_);
  // No more than kSlotsAhead slots in flight past the committed ones: a
  // writable open clears only that many slots' headers after a crash.
  commit_cv_.wait(l, [&] {
    const bool usable_free = std::any_of(free_slots_.begin(), free_slots_.end(),
                                         [&](uint64_t f) { return !above || f > *above; });
    return usable_free || next_alloc_ < committed_next_slot_ + kSlotsAhead;
  });
  // A slot given back is taken again only above the block's current slot:
  // each block's slots then only ever rise, which is what a rebuild from
  // the slot headers relies on (the highest slot naming a block is its
  // latest).
  for (auto it = free_slots_.begin(); it != free_slots_.end(); ++it) {
    if (!above || *it > *above) {
      const uint64_t slot = *it;
      free_slots_.erase(it);
      return slot;
    }
  }
  if (next_alloc_ >= slot_count_) return std::nullopt;
  return next_alloc_++;
}

void Engine::give_back_slots(const std::vector<uint64_t>& slots) {
  {
    std::lock_guard l(commit_mu_);
    free_slots_.insert(free_slots_.end(), slots.begin(), slots.end());
    std::sort(free_slots_.begin(), free_slots_.end());
  }
  commit_cv_.notify_all();  // allocate_slot may wait for one
}

Status Engine::commit_remap(uint64_t block, const char* data, Cause cause,
                            std::optional<uint64_t> abandoned_slot) {
  if (auto s = refuse_writes_if_broken(); !s.is_ok()) return s;
  // Slots found bad on the way; recorded with the remap, or before it when
  // there are many (see below).
  std::vector<Record> bad;
  const auto record_bad_slots = [&]() -> Status {
    if (bad.empty()) return Status::ok();
    Commit c;
    c.records = std::move(bad);
    bad.clear();
    return group_commit(c);
  };
  std::optional<uint64_t> current = abandoned_slot;
  {
    SharedGuard g(gate_);
    if (auto v = table_.find(block); v && !RemapTable::is_pending(*v)) {
      current = RemapTable::slot_of(*v);
    }
  }
  uint64_t slot = 0;
  while (true) {
    const auto got = allocate_slot(current);
    if (!got) {
      if (auto s = record_bad_slots(); !s.is_ok()) return s;
      log(LogLevel::kError, "spare pool exhausted: " + block_name(block, block_) +
                                " cannot be remapped");
      return Status::error(ENOSPC, "no free slot on " + spare_->name() + " for " +
                                       block_name(block, block_) + ": all " +
                                       std::to_string(slot_count_) +
                                       " slots are used");
    }
    slot = *got;
    Status s = spare_->write(data, block_, slot_offset(slot));
    if (s.is_ok()) break;
    counters_->slot_write_errors.fetch_add(1, std::memory_order_relaxed);
    // The spare (or the link to it, or the storage under it) as a whole:
    // its slots are not bad, and the journal is not to be tried now either.
    // This slot is given back; those found bad before stay unrecorded and
    // will be found again.
    if (!spare_failure_is_slot(s)) {
      // A write that timed out may still land: that slot is never handed
      // out again (recorded bad with the next commit).
      if (s.code() == ETIMEDOUT) {
        std::lock_guard l(commit_mu_);
        slots_to_retire_.push_back(slot);
      } else {
        give_back_slots({slot});
      }
      return spare_away(s);
    }
    log(LogLevel::kWarning, "slot " + std::to_string(slot) + " failed to write (" +
                                s.to_string() + "): marked bad");
    bad.push_back(Record{Record::kBadSlot, Cause::kManual, 0, slot});
    // Many slots in a row refusing writes may mean the spare itself is gone
    // or dying, not its slots: record the bad ones now. If even that fails,
    // the journal path refuses writes (EIO) instead of this loop walking the
    // whole pool, one failed write (perhaps one long timeout) per slot, to
    // end with a misleading ENOSPC.
    if (bad.size() == kSlotFailuresPerCheck) {
      if (auto st = record_bad_slots(); !st.is_ok()) return st;
    }
  }
  Commit c;
  if (abandoned_slot) c.records.push_back(Record{Record::kBadSlot, Cause::kManual, 0, *abandoned_slot});
  c.records.insert(c.records.end(), bad.begin(), bad.end());
  c.records.push_back(Record{Record::kRemap, cause, block, slot});
  c.header = MetadataStore::SlotHeaderWrite{slot, block, cause};
  if (auto s = group_commit(c); !s.is_ok()) return s;
  log(LogLevel::kInfo, block_name(block, block_) + " remapped to slot " + std::to_string(slot) +
                           " (" + cause_name(cause) + ")");
  return Status::ok();
}

Status Engine::group_commit(Commit& c) {
  commit_waiters_.fetch_add(1, std::memory_order_relaxed);
  std::unique_lock l(commit_mu_);
  commit_queue_.push_back(&c);
  while (!c.done) {
    if (committing_) {
      commit_cv_.wait(l);
      continue;
    }
    // Leads one round for everything queued now (the batch) and the group
    // left by the round before (carried); those that arrive meanwhile form
    // the next batch.
    committing_ = true;
    std::vector<Commit*> batch;
    std::vector<Commit*> carried;
    batch.swap(commit_queue_);
    carried.swap(carried_);
    l.unlock();
    commit_round(carried, batch);
    l.lock();
    for (Commit* d : carried) d->done = true;
    committed_next_slot_ = table_.next_slot();  // only leaders change it
    std::erase_if(batch, [](Commit* d) {
      // Settled by the round (failed): done now, not carried.
      d->done = d->settled;
      return d->done;
    });
    if (!batch.empty() && commit_queue_.empty()) {
      // No group follows whose flush could carry this one's records: they
      // go now, with a flush of their own.
      l.unlock();
      std::vector<Commit*> none;
      commit_round(batch, none);
      l.lock();
      for (Commit* d : batch) d->done = true;
      committed_next_slot_ = table_.next_slot();
    } else {
      carried_ = std::move(batch);
    }
    committing_ = false;
    commit_cv_.notify_all();
  }
  commit_waiters_.fetch_sub(1, std::memory_order_relaxed);
  return c.result;
}

void Engine::commit_round(std::vector<Commit*>& carried, std::vector<Commit*>& batch) {
  // Settles a commit of the batch now (it is not carried).
  auto settle = [](Commit* c, const Status& s) {
    c->result = s;
    c->settled = true;
  };
  auto fail_all = [&](const Status& s) {
    for (Commit* c : carried) c->result = s;
    for (Commit* c : batch) settle(c, s);
  };
  if (closed_.load()) {
    // Past close()'s deadline: nothing is journaled after it gave up.
    return fail_all(Status::error(EIO, "the device is closed"));
  }
  if (auto s = refuse_writes_if_broken(); !s.is_ok()) return fail_all(s);
  auto pending_marks = [](const Commit* c) {
    return static_cast<uint64_t>(
        std::count_if(c->records.begin(), c->records.end(),
                      [](const Record& r) { return r.type == Record::kPending; }));
  };
  // Pending marks beyond the list's room are refused one by one.
  uint64_t pending_room = pending_capacity_ - table_.pending();
  std::vector<std::vector<Record>> groups;
  size_t record_count = 0;
  {
    // Slots whose write timed out while the spare did not answer.
    std::lock_guard l(commit_mu_);
    if (!slots_to_retire_.empty()) {
      groups.emplace_back();
      for (uint64_t slot : slots_to_retire_) {
        groups.back().push_back(Record{Record::kBadSlot, Cause::kManual, 0, slot});
      }
      record_count += slots_to_retire_.size();
      slots_to_retire_.clear();
    }
  }
  for (Commit* c : carried) {
    pending_room -= std::min(pending_room, pending_marks(c));
    groups.push_back(c->records);
    record_count += c->records.size();
  }
  std::vector<MetadataStore::SlotHeaderWrite> headers;
  for (Commit* c : batch) {
    if (const uint64_t marks = pending_marks(c); marks > 0) {
      if (pending_room < marks) {
        log(LogLevel::kError, "the pending list is full: " +
                                  block_name(c->records.back().block, block_) +
                                  (marks > 1 ? " and others are" : " is") +
                                  " unreadable but cannot be recorded");
        settle(c, Status::error(ENOSPC, "pending list full"));
        continue;
      }
      pending_room -= marks;
    }
    if (c->header) headers.push_back(*c->header);
  }
  uint64_t handed_out;
  {
    std::lock_guard l(commit_mu_);
    handed_out = next_alloc_;
  }
  std::lock_guard store_lock(store_mu_);
  // The batch's slot headers go with their data, before the flush that
  // makes both durable.
  if (Status s = store_->write_slot_headers(headers, table_, handed_out); !s.is_ok()) {
    std::vector<uint64_t> back;
    for (const auto& h : headers) back.push_back(h.slot);
    give_back_slots(back);
    const Status away = spare_away(s);
    for (Commit* c : batch) {
      if (c->header && !c->settled) settle(c, away);
    }
    headers.clear();
  }
  // The carried group's records: written, and made durable by the same
  // flush as the batch's data. Order for each remap: its data durable (the
  // round before), then its record durable (this flush), then visible.
  if (record_count > 0) {
    if (Status s = store_->append_groups(groups, table_, /*flush_last=*/false); !s.is_ok()) {
      journal_broken_.store(true);
      log(LogLevel::kError, "journal write failed (" + s.to_string() +
                                "): writes are refused from now on, reads continue. Check the "
                                "spare, then restart");
      return fail_all(
          Status::error(EIO, "the remap could not be recorded in the journal: " + s.to_string()));
    }
  }
  if (!headers.empty() || record_count > 0) {
    if (Status s = spare_->flush(); !s.is_ok()) {
      journal_broken_.store(true);
      store_->refuse_from_now();
      log(LogLevel::kError, "spare flush failed (" + s.to_string() +
                                "): writes are refused from now on, reads continue");
      return fail_all(Status::error(EIO, "the remap could not be made durable: " + s.to_string()));
    }
  }
  if (record_count == 0) return;
  {
    ExclusiveGuard g(gate_);
    for (const auto& group : groups) {
      for (const Record& r : group) table_.apply(r);
    }
  }
  counters_->commit_groups.fetch_add(1, std::memory_order_relaxed);
  spare_away_since_.store(0);  // the spare took a journal write and its flush
  counters_->commit_records.fetch_add(record_count, std::memory_order_relaxed);
  for (Commit* c : carried) c->result = Status::ok();
}

Status Engine::with_commits_stopped(const std::function<Status()>& fn) {
  {
    std::unique_lock l(commit_mu_);
    commit_cv_.wait(l, [&] { return !committing_; });
    committing_ = true;
  }
  Status s = fn();
  {
    std::lock_guard l(commit_mu_);
    committing_ = false;
  }
  commit_cv_.notify_all();
  return s;
}

Status Engine::spare_away(const Status& why) {
  int64_t online = 0;
  spare_away_since_.compare_exchange_strong(online, static_cast<int64_t>(std::time(nullptr)));
  log(LogLevel::kError, spare_->name() + " does not answer (" + why.to_string() +
                            "): no slot is marked bad for it; writes that need the spare fail "
                            "until it is back");
  revive_spare();
  return Status::error(EIO, "spare offline: " + why.to_string());
}

bool Engine::spare_failure_is_slot(const Status& failure) {
  // Storage full under a sparse spare image: no slot is to blame.
  if (failure.code() == ENOSPC || failure.code() == EDQUOT) return false;
  const FailureKind kind = classify_failure(failure.code());
  if (kind == FailureKind::kMedia) return true;
  // A connection that broke says nothing of the slot, even if another one
  // reads; a timeout may be one sector of a local disk, so it is probed.
  if (kind == FailureKind::kDevice && failure.code() != ETIMEDOUT) return false;
  // A device errno or a plain EIO: the slot only if the spare still reads
  // (ETIMEDOUT can be one sector timing out on a local disk).
  std::vector<char> unit(kMetaUnit);
  for (uint64_t at : kSuperblockOffset) {
    if (spare_->read(unit.data(), unit.size(), at).is_ok()) return true;
  }
  return false;
}

void Engine::revive_spare() {
  // The engine's own thread does it: a reconnect can take seconds.
  spare_revive_wanted_.store(true);
  wake_watch();
}

void Engine::wake_watch() {
  {
    std::lock_guard l(watch_mu_);
    if (!watch_stop_ && !watch_thread_.joinable()) {
      watch_thread_ = std::thread([this] { watch_main(); });
    }
  }
  watch_cv_.notify_all();
}

namespace {

std::vector<uint64_t> sorted_unique(std::vector<uint64_t> blocks) {
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
  return blocks;
}

}  // namespace

Status Engine::refuse_table_change(const Admit& admit) {
  if (!admit) return Status::error(EIO, "the device is closed");
  if (auto s = refuse_if_unusable(); !s.is_ok()) return s;
  if (options_.read_only) return Status::error(EPERM, "the device is read-only");
  return refuse_writes_if_broken();
}

Engine::KnownBadRoom Engine::known_bad_room(const std::vector<uint64_t>& blocks) {
  SharedGuard g(gate_);
  KnownBadRoom r;
  const std::vector<uint64_t> sorted = sorted_unique(blocks);
  r.fresh = static_cast<uint64_t>(
      std::count_if(sorted.begin(), sorted.end(), [&](uint64_t b) { return !table_.find(b); }));
  r.room = pending_capacity_ - std::min(pending_capacity_, table_.pending());
  return r;
}

bool Engine::is_claimed(uint64_t block) {
  std::lock_guard l(claim_mu_);
  return std::find(claimed_.begin(), claimed_.end(), block) != claimed_.end();
}

Status Engine::mark_known_bad(const std::vector<uint64_t>& blocks, KnownBadResult& result,
                              const std::function<bool()>& stopping) {
  Admit admit(*this);
  if (auto s = refuse_table_change(admit); !s.is_ok()) return s;
  std::vector<uint64_t> sorted = sorted_unique(blocks);
  if (!sorted.empty() && sorted.back() >= size_ / block_) {
    return Status::error(EINVAL, "block " + std::to_string(sorted.back()) +
                                     " is past the end (main has " +
                                     std::to_string(size_ / block_) + " blocks)");
  }
  // Room for all of them, or none is marked.
  if (const KnownBadRoom r = known_bad_room(sorted); r.fresh > r.room) {
    return Status::error(ENOSPC, "the set records at most " + std::to_string(pending_capacity_) +
                                     " pending blocks and has room for " +
                                     std::to_string(r.room) + " more; this names " +
                                     std::to_string(r.fresh) + " new ones");
  }
  const auto now = static_cast<uint64_t>(std::time(nullptr));
  for (size_t i = 0; i < sorted.size();) {
    if (stopping && stopping()) {
      result.untried = sorted.size() - i;
      break;
    }
    // kImportBatch at a time, claimed in ascending order (as forget_pending
    // does), so that no write to them comes between the look-up and the
    // mark: a write would give the block a slot instead. A batch leaves
    // room in its journal unit for the other commits of its round.
    std::vector<std::unique_ptr<Claim>> claims;
    Commit c;
    const size_t batch_start = i;
    const uint64_t already_before = result.already;
    for (; i < sorted.size() && c.records.size() < kImportBatch; ++i) {
      // A block someone holds (its retries may take a while): the claims
      // taken so far are not held meanwhile; they commit first.
      if (!claims.empty() && is_claimed(sorted[i])) break;
      claims.push_back(std::make_unique<Claim>(*this, sorted[i]));
      bool known;
      {
        SharedGuard g(gate_);
        known = table_.find(sorted[i]).has_value();
      }
      if (known) {
        ++result.already;
        claims.pop_back();
        continue;
      }
      c.records.push_back(Record{Record::kPending, Cause::kManual, sorted[i], now});
    }
    if (c.records.empty()) continue;
    if (auto s = group_commit(c); !s.is_ok()) {
      // This batch's blocks on, but those found marked already.
      result.untried = sorted.size() - batch_start - (result.already - already_before);
      return s;
    }
    result.marked += c.records.size();
  }
  if (result.marked > 0) {
    log(LogLevel::kWarning, std::to_string(result.marked) +
                                " block(s) imported as known bad: marked pending without being "
                                "read; the next write to each gives it a slot");
  }
  return Status::ok();
}

Status Engine::mark_pending(uint64_t block) {
  if (auto s = refuse_writes_if_broken(); !s.is_ok()) return s;
  Commit c;
  c.records.push_back(
      Record{Record::kPending, Cause::kManual, block, static_cast<uint64_t>(std::time(nullptr))});
  if (auto s = group_commit(c); !s.is_ok()) return s;
  log(LogLevel::kError, block_name(block, block_) +
                            " marked pending: its data is lost; the next write to it remaps it");
  return Status::ok();
}

// ------------------------------------------------------ trim, flush, admin

Status Engine::trim(uint64_t len, uint64_t offset, bool fua) {
  return mirrored(WriteMirror::Op::kTrim, nullptr, len, offset, fua,
                  [&] { return do_trim(len, offset, fua); });
}

Status Engine::do_trim(uint64_t len, uint64_t offset, bool fua) {
  Admit admit(*this);
  if (!admit) return Status::error(EIO, "the device is closed");
  if (auto s = refuse_if_unusable(); !s.is_ok()) return s;
  if (options_.read_only) return Status::error(EPERM, "the device is read-only");
  if (offset > size_ || len > size_ - offset) {
    return Status::error(EINVAL, "trim at offset " + std::to_string(offset) +
                                     ": beyond the end of the device");
  }
  counters_->trims.fetch_add(1, std::memory_order_relaxed);
  const uint64_t first = (offset + block_ - 1) / block_;
  const uint64_t end = (offset + len) / block_;
  for (uint64_t chunk = first; chunk < end; chunk += kFastChunk) {
    const uint64_t chunk_end = std::min(end, chunk + kFastChunk);
    // Counted as a write: a claimed block (a rescue reading it) is left
    // alone. Only whole unmapped blocks reach main; remapped and pending
    // blocks keep their state, so a trim never exposes stale main data.
    const CountedChunk counted(*this, chunk, chunk_end);
    Pieces pieces;
    {
      SharedGuard g(gate_);
      plan_pieces(table_, chunk, chunk_end, pieces);
    }
    auto to_main = [&](uint64_t a, uint64_t b) {
      // A trim is advice: one that main cannot take now is simply dropped.
      if (a >= b || offline_since_.load() != 0) return;
      if (auto s = main_->trim((b - a) * block_, a * block_); !s.is_ok()) {
        log(LogLevel::kDebug, "trim ignored: " + s.to_string());
      }
    };
    for (const Piece& p : pieces) {
      if (p.value != Piece::kMain) continue;
      uint64_t a = p.first;
      for (uint64_t b : counted.claimed_blocks()) {
        if (b < p.first || b >= p.last) continue;
        to_main(a, b);
        a = b + 1;
      }
      to_main(a, p.last);
    }
  }
  return fua ? flush_both() : Status::ok();
}

Status Engine::flush() {
  Admit admit(*this);
  if (!admit) return Status::error(EIO, "the device is closed");
  if (auto s = refuse_if_unusable(); !s.is_ok()) return s;
  LatencyTimer timed(counters_->latency[kLatencyFlush]);
  counters_->flushes.fetch_add(1, std::memory_order_relaxed);  // FUA's flushes are not
  Status s = flush_both();
  if (s.is_ok()) {
    if (auto m = mirror()) m->flushed();
  }
  return s;
}

Status Engine::flush_both() {
  Status m = flush_device(*main_);
  Status s = flush_device(*spare_);
  if (!m.is_ok()) return m;
  return s;
}

Status Engine::flush_device(BlockDevice& dev) {
  // Nothing written since the last flush that worked: nothing can be lost,
  // and a device that is away meanwhile does not fail the flush.
  if (!dev.lost_writes() && !dev.has_unflushed_writes()) return Status::ok();
  // Main away: this flush fails, but says nothing of the writes yet; the
  // reconnect decides (the same device keeps them, a new one forfeits them).
  if (&dev == main_.get() && !main_online()) return offline_error();
  Status s = dev.flush();
  if (s.is_ok()) return s;
  if (dev.lost_writes()) {
    std::lock_guard l(reason_mu_);
    if (flush_failure_.empty()) {
      flush_failure_ = s.to_string();
      log(LogLevel::kError, dev.name() + ": flush failed (" + s.to_string() +
                                "): writes acknowledged before it may be lost. Every FLUSH and "
                                "FUA fails from now on; check the disk, then restart dmremap");
    }
  }
  return Status::error(EIO, dev.name() + ": flush failed: " + s.to_string());
}

Status Engine::extents(uint64_t len, uint64_t offset,
                       const std::function<void(uint64_t, uint64_t, bool)>& fn) {
  Admit admit(*this);
  if (!admit) return Status::error(EIO, "the device is closed");
  if (auto s = refuse_if_unusable(); !s.is_ok()) return s;
  if (offset > size_ || len > size_ - offset) {
    return Status::error(EINVAL, "extents past the end of the device");
  }
  if (len == 0) return Status::ok();
  const uint64_t first = offset / block_;
  const uint64_t last = (offset + len + block_ - 1) / block_;
  Pieces pieces;
  {
    SharedGuard g(gate_);
    plan_pieces(table_, first, last, pieces);
  }
  const uint64_t end = std::min(last * block_, size_);
  for (const Piece& p : pieces) {
    uint64_t pos = p.first * block_;
    const uint64_t stop = std::min(p.last * block_, end);
    if (p.value != Piece::kMain) {
      fn(pos, stop - pos, false);
      continue;
    }
    // Main's own map.
    while (pos < stop) {
      const uint64_t data = std::min(main_->next_data(pos), stop);
      if (data > pos) {
        fn(pos, data - pos, true);
        pos = data;
        continue;
      }
      const uint64_t hole = std::max(std::min(main_->next_hole(pos), stop), pos + 1);
      fn(pos, hole - pos, false);
      pos = hole;
    }
  }
  return Status::ok();
}

Status Engine::remap_block(uint64_t block) {
  Admit admit(*this);
  if (!admit) return Status::error(EIO, "the device is closed");
  if (auto s = refuse_if_unusable(); !s.is_ok()) return s;
  if (options_.read_only) return Status::error(EPERM, "the device is read-only");
  if (block >= size_ / block_) {
    return Status::error(EINVAL, "block " + std::to_string(block) + " is beyond the end (" +
                                     std::to_string(size_ / block_) + " blocks)");
  }
  Claim claim(*this, block);
  std::optional<uint64_t> v;
  {
    SharedGuard g(gate_);
    v = table_.find(block);
  }
  if (v && !RemapTable::is_pending(*v)) {
    return Status::error(EEXIST, block_name(block, block_) + " is already remapped to slot " +
                                     std::to_string(RemapTable::slot_of(*v)));
  }
  if (v) {
    return Status::error(EIO, block_name(block, block_) +
                                  " is pending: its data is lost; the next write to it remaps it");
  }
  std::vector<char> data(block_);
  Status s = read_block_claimed(block, data.data(), 0, 0);
  if (!s.is_ok() && !main_online()) return offline_error();
  if (!s.is_ok()) {
    return Status::error(EIO, block_name(block, block_) +
                                  " cannot be read: marked pending; the next write to it remaps it");
  }
  {
    // A weak block was rescued by the read itself.
    SharedGuard g(gate_);
    if (table_.find(block)) return Status::ok();
  }
  return commit_remap(block, data.data(), Cause::kManual);
}

Status Engine::forget_pending(const std::vector<uint64_t>& blocks, bool listed,
                              ForgetResult& result, const std::function<bool()>& stopping) {
  Admit admit(*this);
  if (auto s = refuse_table_change(admit); !s.is_ok()) return s;
  std::vector<uint64_t> sorted = sorted_unique(blocks);
  auto still_pending = [&](uint64_t b) {
    const auto v = table_.find(b);
    return v && RemapTable::is_pending(*v);
  };
  {
    SharedGuard g(gate_);
    std::vector<uint64_t> pending;
    for (uint64_t b : sorted) {
      if (b < size_ / block_ && still_pending(b)) {
        pending.push_back(b);
      } else if (listed) {
        return Status::error(EINVAL, "block " + std::to_string(b) + " is not pending");
      } else {
        result.moved.push_back(b);
      }
    }
    sorted = std::move(pending);
  }
  if (!main_online()) return offline_error();
  // No claim while reading: a pending block is never written on main (a
  // write gives it a slot), so what this read sees stays true unless the
  // block leaves the pending list, which is checked again below.
  std::vector<uint64_t> readable;
  std::vector<char> data(block_);
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (stopping && stopping()) {
      result.untried.assign(sorted.begin() + static_cast<std::ptrdiff_t>(i), sorted.end());
      break;
    }
    // One read, with no retries: a mark is cleared only on clear evidence.
    if (main_->read(data.data(), block_, sorted[i] * block_).is_ok()) {
      readable.push_back(sorted[i]);
    } else {
      result.kept.push_back(sorted[i]);
    }
  }
  if (readable.empty()) return Status::ok();
  // An evacuation is told first (its bitmap, durably): a crash after the
  // checkpoint below still copies these blocks to its new disk.
  if (auto m = mirror()) {
    for (uint64_t b : readable) {
      if (Status s = m->will_change(b, b + 1); !s.is_ok()) {
        return Status::error(EIO, "the evacuation could not record the blocks first: " +
                                      s.to_string() + "; every mark stays");
      }
    }
  }
  // Claimed in ascending order (the only place that holds several claims).
  std::vector<std::unique_ptr<Claim>> claims;
  for (uint64_t b : readable) claims.push_back(std::make_unique<Claim>(*this, b));
  std::vector<uint64_t> cleared;
  std::vector<uint64_t> marked_at;  // of each cleared block, to put it back as it was
  auto restore = [&] {
    ExclusiveGuard g(gate_);
    for (size_t k = 0; k < cleared.size(); ++k) {
      table_.apply(Record{Record::kPending, Cause::kManual, cleared[k], marked_at[k]});
    }
  };
  Status s = with_commits_stopped([&] {
    {
      ExclusiveGuard g(gate_);
      for (uint64_t b : readable) {
        if (!still_pending(b)) {
          result.moved.push_back(b);
          continue;
        }
        marked_at.push_back(RemapTable::pending_time(*table_.find(b)));
        table_.erase_pending(b);
        cleared.push_back(b);
      }
    }
    if (cleared.empty()) return Status::ok();
    // The reads took their time: a lease that lapsed meanwhile may have
    // let another server take the set; its metadata is not ours to write.
    Status written = refuse_if_unusable();
    if (!written.is_ok()) {
      restore();
      return written;
    }
    {
      std::lock_guard l(store_mu_);
      written = store_->checkpoint(table_);
    }
    if (!written.is_ok()) {
      restore();
      journal_broken_.store(true);
    }
    return written;
  });
  std::sort(result.moved.begin(), result.moved.end());
  if (!s.is_ok()) {
    // They read, but stay marked: the error says why.
    return Status::error(EIO, "the cleared marks could not be recorded: " + s.to_string());
  }
  for (uint64_t b : cleared) {
    log(LogLevel::kWarning, block_name(b, block_) +
                                ": pending mark cleared, main reads it now (dmremap forget-pending)");
  }
  // They read again: an evacuation's new disk gets what they hold (with
  // the claims let go: the mirror reads them through the engine; its
  // bitmap was told before the checkpoint, above).
  claims.clear();
  if (auto m = mirror()) {
    for (uint64_t b : cleared) m->refresh(b, b + 1);
  }
  result.cleared = std::move(cleared);
  return Status::ok();
}

void Engine::for_each_entry(uint64_t first, uint64_t last,
                            const std::function<void(const RemapTable::Entry&)>& fn) {
  SharedGuard g(gate_);
  table_.for_range(first, last, fn);
}

std::vector<uint64_t> Engine::slot_times(const std::vector<uint64_t>& slots) {
  // Not while the spare is away: a list must not wait on it.
  if (spare_away_since_.load() != 0) return std::vector<uint64_t>(slots.size(), 0);
  return read_slot_times(*spare_, fixed_, slots);
}

Superblock Engine::geometry() {
  std::lock_guard l(store_mu_);
  return store_->superblock();
}

Engine::ScanMark Engine::saved_scan() {
  std::lock_guard l(store_mu_);
  const Superblock& sb = store_->superblock();
  return ScanMark{sb.scan_next,  sb.scan_state,      sb.scan_started, sb.scan_saved,
                  sb.scan_rate,  sb.scan_unreadable, sb.scan_rescued};
}

Status Engine::save_scan(const ScanMark& m) {
  Admit admit(*this);
  if (!admit) return Status::error(EIO, "the device is closed");
  if (options_.read_only) return Status::error(EPERM, "the device is read-only");
  std::lock_guard l(store_mu_);
  // After a lapsed lease another server may own the set: write nothing.
  if (auto s = refuse_if_unusable(); !s.is_ok()) return s;
  return store_->save_scan(m.next, m.state, m.started, m.saved, m.rate, m.unreadable,
                           m.rescued);
}

EvacRecord Engine::saved_evacuation() {
  std::lock_guard l(store_mu_);
  return store_->superblock().evac;
}

Status Engine::save_evacuation(const EvacRecord& record) {
  Admit admit(*this);
  if (!admit) return Status::error(EIO, "the device is closed");
  if (options_.read_only) return Status::error(EPERM, "the device is read-only");
  std::lock_guard l(store_mu_);
  if (auto s = refuse_if_unusable(); !s.is_ok()) return s;
  return store_->save_evacuation(record);
}

Status Engine::advertise_control(const std::string& path) {
  Admit admit(*this);
  if (!admit) return Status::error(EIO, "the device is closed");
  if (options_.read_only) return Status::error(EPERM, "the device is read-only");
  std::lock_guard l(store_mu_);
  if (auto s = refuse_if_unusable(); !s.is_ok()) return s;
  return store_->advertise_control(path);
}

Status Engine::scan_read(void* buf, uint64_t len, uint64_t offset,
                         std::vector<uint64_t>* unreadable, const std::atomic<bool>* stop) {
  const Background background;
  t_scan_stop = stop;
  Status s = read(buf, len, offset, unreadable);
  t_scan_stop = nullptr;
  return s;
}

std::vector<RemapTable::Entry> Engine::entries(
    uint64_t from, size_t max, const std::function<bool(const RemapTable::Entry&)>& want) {
  std::vector<RemapTable::Entry> out;
  if (max == 0) return out;
  SharedGuard g(gate_);
  table_.for_range(from, ~uint64_t{0}, [&](const RemapTable::Entry& e) {
    if (want(e)) out.push_back(e);
    return out.size() < max;
  });
  return out;
}

uint64_t Engine::remaps_by(Cause cause) {
  SharedGuard g(gate_);
  return table_.remaps_by(cause);
}

std::vector<uint64_t> Engine::bad_slots() {
  SharedGuard g(gate_);
  return table_.bad_slots();
}

EngineStats Engine::stats() {
  EngineStats s;
  const Counters& c = *counters_;
  s.reads = c.reads;
  s.writes = c.writes;
  s.flushes = c.flushes;
  s.trims = c.trims;
  s.zeroes = c.zeroes;
  s.bytes_read = c.bytes_read;
  s.bytes_written = c.bytes_written;
  s.main_read_errors = c.main_read_errors;
  s.main_write_errors = c.main_write_errors;
  s.retry_successes = c.retry_successes;
  s.slow_reads = c.slow_reads;
  s.unreadable_reads = c.unreadable_reads;
  s.slot_write_errors = c.slot_write_errors;
  s.commit_groups = c.commit_groups;
  s.commit_records = c.commit_records;
  s.spare_flushes = spare_->flush_calls();
  s.journal_broken = journal_broken_.load();
  s.main_offline_since = offline_since_.load();
  s.spare_offline_since = spare_away_since_.load();
  if (lease_active_.load(std::memory_order_relaxed)) {
    const int64_t age = now_ms() - lease_renewed_ms_.load(std::memory_order_relaxed);
    if (age > 5 * options_.lease_interval.count() / 2) s.lease_lapsed_seconds = age / 1000;
  }
  for (int op = 0; op < kLatencyOps; ++op) s.latency[op] = c.latency[op].snapshot();
  {
    std::lock_guard l(reason_mu_);
    if (s.main_offline_since != 0) s.main_offline_reason = offline_reason_;
    if (main_->lost_writes() || spare_->lost_writes()) {
      s.flush_failure = flush_failure_.empty()
                            ? "a device went away with writes not yet flushed"
                            : flush_failure_;
    }
  }
  s.metadata_degraded = store_->degraded();
  SharedGuard g(gate_);
  // The geometry, which never changes: the superblock itself is rewritten
  // by checkpoints and the lease while this runs.
  Superblock geometry;
  geometry.slot_count = slot_count_;
  geometry.pending_capacity = pending_capacity_;
  fill_table_stats(s, table_, geometry, options_.warn_percent);
  return s;
}

Status Engine::close(std::optional<std::chrono::milliseconds> wait) {
  // New requests are refused from here; those in flight finish first.
  closing_.store(true, std::memory_order_seq_cst);
  {
    std::unique_lock l(active_mu_);
    const auto drained = [&] { return active_.load(std::memory_order_seq_cst) == 0; };
    if (wait) {
      if (!active_cv_.wait_for(l, *wait, drained)) {
        // They may be stuck in a device for minutes. Nothing more is
        // journaled (commit_round checks closed_), and no clean mark: the
        // set is as after a crash, which the journal is made for. What was
        // acknowledged is flushed if the devices answer within a few
        // seconds (in a thread of its own: a stuck device would hold it).
        closed_.store(true);
        l.unlock();
        // Each device in a thread of its own: one stuck does not keep the
        // other from being flushed. The engine must outlive them (as it
        // must outlive the stuck requests): a frontend exits without
        // destroying it.
        struct Flushed {
          std::mutex mu;
          std::condition_variable cv;
          int done = 0;
        };
        auto flushed = std::make_shared<Flushed>();
        for (BlockDevice* dev : {main_.get(), spare_.get()}) {
          std::thread([this, dev, flushed] {
            (void)flush_device(*dev);
            std::lock_guard g(flushed->mu);
            ++flushed->done;
            flushed->cv.notify_all();
          }).detach();
        }
        {
          std::unique_lock g(flushed->mu);
          flushed->cv.wait_for(g, std::chrono::seconds(5), [&] { return flushed->done == 2; });
        }
        return Status::error(EBUSY, std::to_string(active_.load()) +
                                        " request(s) still running: the spare is left as after "
                                        "a crash (consistent; the next open replays its "
                                        "journal), without a clean mark");
      }
    } else {
      active_cv_.wait(l, drained);
    }
  }
  // The watch thread holds no lock requests need; the lease is kept until
  // the last metadata write is done.
  stop_watch();
  if (close_done_.exchange(true)) return Status::ok();
  closed_.store(true);
  if (options_.read_only) return Status::ok();
  return with_commits_stopped([&] {
    Status m = flush_device(*main_);
    Status sp = flush_device(*spare_);
    if (!m.is_ok()) return m;
    if (!sp.is_ok()) return sp;
    // The set is flushed: an evacuation flushes its new disk and says what
    // the clean checkpoint's superblock records of it.
    if (auto mir = mirror()) {
      if (auto rec = mir->closing()) {
        std::lock_guard l(store_mu_);
        store_->set_evacuation(*rec);
      }
    }
    if (journal_broken_.load()) {
      return Status::error(EIO, "closed without a clean checkpoint: the journal is broken");
    }
    Status s;
    {
      std::lock_guard l(store_mu_);
      s = store_->checkpoint(table_, /*clean=*/true);
    }
    stop_lease();
    return s;
  });
}

}  // namespace dmremap
