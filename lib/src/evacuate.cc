#include "dmremap/evacuate.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <ctime>
#include <set>

#include "dmremap/log.h"

namespace dmremap {

namespace {
// The copy's piece: large enough for a disk's full speed, small enough that
// a client write to it waits little when the piece must be kept still.
constexpr uint64_t kPieceBytes = 1024 * 1024;
constexpr int64_t kSaveEveryMs = 30000;
// As the scan: a client request this recent makes the copy wait, 10 ms at
// a time, for up to a second; then one piece goes anyway.
constexpr int64_t kClientQuietMs = 50;
constexpr int kMaxYieldSteps = 100;
// A piece that clients wrote to while it was read is read again; after
// this many tries, it is read with clients' writes to it held back.
constexpr int kOptimisticTries = 3;
constexpr uint64_t kMinRate = 4096;
// The smallest write-intent region: 1 MiB of blocks.
constexpr uint64_t kMinRegionBytes = 1024 * 1024;
// How many blocks a verification lists as differing.
constexpr size_t kMaxListed = 1000;

int64_t unix_now() { return static_cast<int64_t>(std::time(nullptr)); }

Status check_rate(uint64_t rate) {
  if (rate != 0 && rate < kMinRate) {
    return Status::error(EINVAL, "a rate of " + std::to_string(rate) +
                                     " bytes/s is too slow to mean anything: 4096 at least, or 0 "
                                     "for no limit");
  }
  return Status::ok();
}

// Blocks per write-intent bit for a disk of `blocks` blocks: a power of two,
// at least 1 MiB, so that the bitmap covers the disk.
uint64_t region_blocks_for(uint64_t blocks, uint32_t bs) {
  uint64_t r = std::max<uint64_t>(1, kMinRegionBytes / bs);
  const uint64_t bits = kEvacIntentBytes * 8;
  while ((blocks + r - 1) / r > bits) r *= 2;
  return r;
}

// What names a local file or device: (device, inode), or for a block device
// its device number. Empty for NBD URIs and paths that do not stat.
std::string local_identity(const std::string& spec) {
  if (spec.empty() || is_nbd_uri(spec)) return {};
  struct stat st {};
  if (::stat(spec.c_str(), &st) != 0) return {};
  if (S_ISBLK(st.st_mode)) return "blk:" + std::to_string(st.st_rdev);
  return "file:" + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
}

// The first offset where `dev` holds a non-zero byte among its first and
// last MiB and 62 places between, or nullopt. Holes (a sparse file) are
// skipped without reading.
Result<std::optional<uint64_t>> find_data(BlockDevice& dev) {
  const uint64_t size = dev.size();
  const uint64_t probe = std::min<uint64_t>(size, 1024 * 1024);
  std::vector<std::pair<uint64_t, uint64_t>> spots = {{0, probe}, {size - probe, probe}};
  for (int i = 1; i <= 62; ++i) {
    const uint64_t at = size / 63 * static_cast<uint64_t>(i) / 4096 * 4096;
    spots.emplace_back(at, std::min<uint64_t>(65536, size - at));
  }
  std::vector<char> buf(probe);
  for (auto [at, len] : spots) {
    if (len == 0) continue;
    const uint64_t data = dev.next_data(at);
    if (data >= at + len) continue;  // a hole
    if (Status s = dev.read(buf.data(), len, at); !s.is_ok()) return s;
    for (uint64_t i = 0; i < len; ++i) {
      if (buf[i] != 0) return std::optional<uint64_t>(at + i);
    }
  }
  return std::optional<uint64_t>();
}

std::string size_text(uint64_t bytes) {
  const double gib = static_cast<double>(bytes) / (1024.0 * 1024 * 1024);
  char buf[64];
  if (gib >= 1) {
    std::snprintf(buf, sizeof buf, "%.2f GiB", gib);
  } else {
    std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(bytes) / (1024.0 * 1024));
  }
  return std::to_string(bytes) + " bytes (" + buf + ")";
}
}  // namespace

const char* evac_state_name(EvacState s) {
  switch (s) {
    case EvacState::kNone: return "none";
    case EvacState::kRunning: return "running";
    case EvacState::kPaused: return "paused";
    case EvacState::kSynced: return "in-sync";
    case EvacState::kFailed: return "failed";
    case EvacState::kAborted: return "aborted";
    case EvacState::kFinished: return "finished";
  }
  return "unknown";
}

namespace {
bool under_way(EvacState s) {
  return s == EvacState::kRunning || s == EvacState::kPaused || s == EvacState::kSynced;
}
}  // namespace

// The mirror (every client change made on NEW too), the copy's pieces, and
// the record on the spare. Shared by the engine (as its mirror) and the
// Evacuator (its thread), so that writes in flight when the Evacuator goes
// still reach NEW.
class Evacuator::Core : public WriteMirror {
 public:
  Core(Engine& engine, std::shared_ptr<BlockDevice> target, EvacRecord rec)
      : engine_(engine),
        target_(std::move(target)),
        bs_(engine.block_size()),
        blocks_(engine.size() / engine.block_size()),
        rb_(std::max<uint64_t>(1, rec.region_blocks)),
        rec_(std::move(rec)) {
    rec_.region_blocks = rb_;
    state_ = static_cast<EvacState>(rec_.state);
    cursor_ = std::min(rec_.cursor, blocks_);
    lost_ = rec_.lost;
    rate_limit_ = rec_.rate;
    const uint64_t regions = (blocks_ + rb_ - 1) / rb_;
    touched_.assign(regions, 0);
    // A crash left these regions with writes NEW may not hold.
    for (uint64_t r = 0; r < regions; ++r) {
      if (rec_.intent_bit(r)) resync_.push_back(r);
    }
  }

  // --- WriteMirror -------------------------------------------------------

  Status change(Op op, const void* buf, uint64_t len, uint64_t offset, bool fua,
                const std::function<Status()>& apply) override {
    if (!live_.load()) return apply();
    const uint64_t first = offset / bs_;
    const uint64_t last = (offset + len + bs_ - 1) / bs_;
    {
      std::unique_lock l(mu_);
      cv_.wait(l, [&] { return !(win_locked_ && overlaps_window(first, last)) && !held_overlaps(first, last); });
      if (win_active_ && overlaps_window(first, last)) win_dirty_ = true;
      held_.emplace_back(first, last);
      touch(first, last);
    }
    Status intent = note_intent(first, last);
    Status s = apply();
    if (live_.load()) {
      Status mirrored;
      if (!intent.is_ok()) {
        mirrored = intent;
      } else if (s.is_ok()) {
        mirrored = apply_on_target(op, buf, len, offset, fua, first, last);
      } else {
        // The set may hold part of it: NEW gets what the set holds now.
        mirrored = copy_range(first, last, /*held=*/true);
      }
      if (mirrored.is_ok()) {
        mirrored_.fetch_add(1, std::memory_order_relaxed);
      } else {
        fail("NEW did not take a client's change at offset " + std::to_string(offset) + ": " +
             mirrored.to_string());
      }
    }
    {
      std::lock_guard l(mu_);
      held_.erase(std::find(held_.begin(), held_.end(), std::make_pair(first, last)));
      touch(first, last);
      if (s.is_ok() && !lost_extra_.empty()) {
        lost_extra_.erase(lost_extra_.lower_bound(first), lost_extra_.lower_bound(last));
      }
    }
    cv_.notify_all();
    return s;
  }

  void flushed() override {
    if (!live_.load()) return;
    if (Status s = target_->flush(); !s.is_ok()) fail("NEW's flush failed: " + s.to_string());
  }

  void refresh(uint64_t first, uint64_t last) override {
    if (!live_.load()) return;
    {
      std::unique_lock l(mu_);
      cv_.wait(l, [&] { return !(win_locked_ && overlaps_window(first, last)) && !held_overlaps(first, last); });
      if (win_active_ && overlaps_window(first, last)) win_dirty_ = true;
      held_.emplace_back(first, last);
      touch(first, last);
    }
    Status s = note_intent(first, last);
    if (s.is_ok()) s = copy_range(first, last, /*held=*/true);
    if (!s.is_ok()) fail("NEW did not take blocks that read again: " + s.to_string());
    {
      std::lock_guard l(mu_);
      held_.erase(std::find(held_.begin(), held_.end(), std::make_pair(first, last)));
      touch(first, last);
    }
    cv_.notify_all();
  }

  std::optional<EvacRecord> closing() override {
    if (!live_.load()) return std::nullopt;
    halt_.store(true);
    std::lock_guard g(save_mu_);
    EvacRecord next = rec_;
    if (Status s = target_->flush(); !s.is_ok()) {
      log(LogLevel::kError, "evacuation: NEW's flush failed at close: " + s.to_string() +
                                "; the bitmap keeps its regions to copy again");
      return std::nullopt;
    }
    // The set was flushed before this: every region is in step on both.
    next.intent.clear();
    std::lock_guard l(mu_);
    next.cursor = cursor_;
    next.lost = lost_;
    next.saved = static_cast<uint64_t>(unix_now());
    if (state_ == EvacState::kSynced && resync_.empty()) {
      state_ = EvacState::kFinished;
      log(LogLevel::kInfo, "evacuation finished: the set closed cleanly with " +
                               target_->name() + " holding the whole disk; it is no longer "
                               "written");
    }
    next.state = static_cast<uint32_t>(state_);
    rec_ = next;
    live_.store(false);
    return next;
  }

  // --- used by the Evacuator --------------------------------------------

  EvacProgress progress() {
    EvacProgress p;
    {
      std::lock_guard g(save_mu_);
      p.target = rec_.target;
      p.target_size = rec_.target_size;
      p.started = static_cast<int64_t>(rec_.started);
      p.synced = static_cast<int64_t>(rec_.synced);
      p.region_blocks = rec_.region_blocks;
    }
    std::lock_guard l(mu_);
    p.state = state_;
    p.next_block = cursor_;
    p.blocks = blocks_;
    p.block_size = bs_;
    p.rate_limit = rate_limit_;
    p.rate = rate_;
    p.eta_seconds = eta_;
    p.lost = lost_;
    p.resync_regions = resync_.size();
    p.mirrored = mirrored_.load();
    p.waiting_for_main = waiting_main_;
    p.error = error_;
    return p;
  }

  // Saves the record with `state` and the copy's place `cursor` (which
  // the caller has flushed to NEW). With `clear`, the bits of regions that
  // no write touched since `touched` was reset are cleared too.
  Status save(EvacState state, uint64_t cursor, bool clear) {
    std::lock_guard g(save_mu_);
    EvacRecord next = rec_;
    {
      std::lock_guard l(mu_);
      next.state = static_cast<uint32_t>(state);
      next.rate = rate_limit_;
      next.lost = lost_;
      if (clear) {
        for (uint64_t r = 0; r < touched_.size(); ++r) {
          const uint64_t a = r * rb_;
          const uint64_t b = std::min(blocks_, a + rb_);
          if (next.intent_bit(r) && !touched_[r] && !held_overlaps(a, b) &&
              !std::binary_search(resync_.begin(), resync_.end(), r)) {
            next.clear_intent_bit(r);
          }
        }
        if (next.intent_empty()) next.intent.clear();
      }
    }
    next.cursor = cursor;
    next.saved = static_cast<uint64_t>(unix_now());
    if (state == EvacState::kSynced && next.synced == 0) next.synced = next.saved;
    Status s = engine_.save_evacuation(next);
    if (s.is_ok()) {
      rec_ = std::move(next);
    } else {
      log(LogLevel::kWarning, "evacuation: its place could not be saved: " + s.to_string());
    }
    last_save_ms_ = now_ms();
    return s;
  }

  // A save point: flushes NEW and the set, then saves `state` with the
  // place the copy had reached before the flushes, clearing the bits of
  // regions untouched meanwhile.
  Status checkpoint(EvacState state) {
    uint64_t cursor;
    {
      std::lock_guard l(mu_);
      std::fill(touched_.begin(), touched_.end(), 0);
      cursor = cursor_;
    }
    if (Status s = target_->flush(); !s.is_ok()) {
      fail("NEW's flush failed: " + s.to_string());
      return s;
    }
    const Status set_flush = engine_.flush_background();
    // Without the set's flush the bits stay: a crash could still leave the
    // set ahead of NEW there.
    return save(state, cursor, /*clear=*/set_flush.is_ok());
  }

  // Copies blocks [first, last) from the set to NEW. `held`: the caller
  // has registered the range (a client's change), so no window is used.
  // Otherwise a piece at a time, in a window that client writes mark
  // dirty: a dirty piece is read again, so that the copy never writes
  // older data over a client's newer write. ECANCELED when told to stop;
  // a device error of main (offline) as it is.
  Status copy_range(uint64_t first, uint64_t last, bool held) {
    const uint64_t piece = std::max<uint64_t>(1, kPieceBytes / bs_);
    std::vector<char> buf(std::min(last - first, piece) * bs_);
    for (uint64_t at = first; at < last; at += piece) {
      const uint64_t end = std::min(last, at + piece);
      Status s = held ? copy_held(at, end, buf.data()) : copy_piece(at, end, buf.data());
      if (!s.is_ok()) return s;
    }
    return Status::ok();
  }

  // The copy of [first, last): read the set (holes as zeros, unreadable
  // blocks as zeros and counted lost), then write NEW.
  Status read_set(uint64_t first, uint64_t last, char* buf,
                  std::vector<std::pair<uint64_t, uint64_t>>& holes) {
    holes.clear();
    const uint64_t off = first * bs_;
    const uint64_t len = (last - first) * bs_;
    std::vector<std::pair<uint64_t, uint64_t>> data;
    const Engine::Background background;
    Status ext = engine_.extents(len, off, [&](uint64_t o, uint64_t l, bool hole) {
      const uint64_t a = std::max(o, off);
      const uint64_t b = std::min(o + l, off + len);
      if (a < b) (hole ? holes : data).emplace_back(a, b);
    });
    if (!ext.is_ok()) {
      holes.clear();
      data = {{off, off + len}};
    }
    for (auto [a, b] : holes) std::memset(buf + (a - off), 0, b - a);
    for (auto [a, b] : data) {
      std::vector<uint64_t> bad;
      Status s = engine_.scan_read(buf + (a - off), b - a, a, &bad, &interrupt_);
      if (s.is_ok()) continue;
      if (bad.empty()) return s;  // main offline, closed, told to stop
      std::lock_guard l(mu_);
      for (uint64_t blk : bad) {
        std::memset(buf + (blk * bs_ - off), 0, bs_);
        if (lost_seen_.insert(blk).second) ++lost_;
        bool pending = false;
        engine_.for_each_entry(blk, blk + 1, [&](const RemapTable::Entry& e) {
          pending = RemapTable::is_pending(e.value);
        });
        if (!pending) lost_extra_.insert(blk);
      }
      log(LogLevel::kWarning, "evacuation: " + std::to_string(bad.size()) +
                                  " unreadable block(s) from block " + std::to_string(bad.front()) +
                                  ": NEW gets zeros there (listed as lost)");
    }
    return Status::ok();
  }

  Status write_target(uint64_t first, uint64_t last, const char* buf,
                      const std::vector<std::pair<uint64_t, uint64_t>>& holes) {
    const uint64_t off = first * bs_;
    const uint64_t end = last * bs_;
    uint64_t at = off;
    for (auto [a, b] : holes) {
      if (a > at) {
        if (Status s = target_->write(buf + (at - off), a - at, at); !s.is_ok()) return s;
      }
      if (Status s = target_->write_zeroes(b - a, a); !s.is_ok()) return s;
      at = b;
    }
    if (at < end) return target_->write(buf + (at - off), end - at, at);
    return Status::ok();
  }

  Status copy_held(uint64_t first, uint64_t last, char* buf) {
    std::vector<std::pair<uint64_t, uint64_t>> holes;
    if (Status s = read_set(first, last, buf, holes); !s.is_ok()) return s;
    return write_target(first, last, buf, holes);
  }

  Status copy_piece(uint64_t first, uint64_t last, char* buf) {
    std::vector<std::pair<uint64_t, uint64_t>> holes;
    for (int attempt = 0;; ++attempt) {
      const bool keep_still = attempt >= kOptimisticTries;
      {
        std::unique_lock l(mu_);
        win_first_ = first;
        win_last_ = last;
        win_active_ = true;
        win_dirty_ = held_overlaps(first, last);
        if (keep_still) {
          win_locked_ = true;
          cv_.wait(l, [&] { return !held_overlaps(first, last); });
        }
      }
      Status s = read_set(first, last, buf, holes);
      bool again = false;
      {
        std::unique_lock l(mu_);
        win_locked_ = true;
        cv_.wait(l, [&] { return !held_overlaps(first, last); });
        if (!s.is_ok() || (win_dirty_ && !keep_still)) {
          win_locked_ = win_active_ = false;
          again = s.is_ok();
        }
      }
      if (!s.is_ok() || again) {
        cv_.notify_all();
        if (!s.is_ok()) return s;
        continue;
      }
      // No client write reached the piece since it was read, and none can
      // until NEW has it.
      s = write_target(first, last, buf, holes);
      {
        std::lock_guard l(mu_);
        win_locked_ = win_active_ = false;
      }
      cv_.notify_all();
      return s;
    }
  }

  // Sets the write-intent bits of the regions [first, last) touches that a
  // crash would not copy again anyway (those below the saved place, or all
  // once in sync), durably, before the write goes on.
  Status note_intent(uint64_t first, uint64_t last) {
    std::lock_guard g(save_mu_);
    const uint64_t rb = rb_;
    const bool all = rec_.state == static_cast<uint32_t>(EvacState::kSynced);
    EvacRecord next = rec_;
    bool changed = false;
    for (uint64_t r = first / rb; r * rb < last; ++r) {
      if ((all || r * rb < rec_.cursor) && !next.intent_bit(r)) {
        next.set_intent_bit(r);
        changed = true;
      }
    }
    if (!changed) return Status::ok();
    next.saved = static_cast<uint64_t>(unix_now());
    Status s = engine_.save_evacuation(next);
    if (s.is_ok()) rec_ = std::move(next);
    return s;
  }

  Status apply_on_target(Op op, const void* buf, uint64_t len, uint64_t offset, bool fua,
                         uint64_t first, uint64_t last) {
    Status s;
    switch (op) {
      case Op::kWrite: s = target_->write(buf, len, offset); break;
      case Op::kZeroes: s = target_->write_zeroes(len, offset); break;
      case Op::kTrim: {
        // The set trims whole blocks only, and keeps remapped ones: so
        // does NEW, which gets the remapped blocks' data instead.
        const uint64_t a = (offset + bs_ - 1) / bs_;
        const uint64_t b = (offset + len) / bs_;
        if (a < b) s = target_->trim((b - a) * bs_, a * bs_);
        std::vector<uint64_t> kept;
        engine_.for_each_entry(first, last, [&](const RemapTable::Entry& e) {
          if (!RemapTable::is_pending(e.value)) kept.push_back(e.block);
        });
        for (uint64_t blk : kept) {
          if (s.is_ok()) s = copy_range(blk, blk + 1, /*held=*/true);
        }
        break;
      }
    }
    if (s.is_ok() && fua) s = target_->flush();
    return s;
  }

  // NEW is given up: no more writes reach it, and the record says why.
  void fail(const std::string& why) {
    if (!live_.exchange(false)) return;
    halt_.store(true);
    interrupt_.store(true);
    engine_.attach_mirror(nullptr);
    {
      std::lock_guard l(mu_);
      state_ = EvacState::kFailed;
      error_ = why;
    }
    cv_.notify_all();
    log(LogLevel::kError, "evacuation failed: " + why +
                              ". Writes now reach only the set; start it again when NEW is fixed "
                              "or replaced (dmremap evacuate --to NEW)");
    (void)save(EvacState::kFailed, rec_cursor(), /*clear=*/false);
  }

  uint64_t rec_cursor() {
    std::lock_guard g(save_mu_);
    return rec_.cursor;
  }

  bool overlaps_window(uint64_t a, uint64_t b) const {
    return win_active_ && a < win_last_ && win_first_ < b;
  }
  bool held_overlaps(uint64_t a, uint64_t b) const {
    for (auto [x, y] : held_) {
      if (a < y && x < b) return true;
    }
    return false;
  }
  void touch(uint64_t first, uint64_t last) {
    const uint64_t rb = rb_;
    for (uint64_t r = first / rb; r * rb < last && r < touched_.size(); ++r) touched_[r] = 1;
  }

  Engine& engine_;
  std::shared_ptr<BlockDevice> target_;
  const uint32_t bs_;
  const uint64_t blocks_;
  const uint64_t rb_;  // blocks per write-intent region, fixed at start
  // Whether client changes are made on NEW: false once failed, aborted or
  // closed.
  std::atomic<bool> live_{true};
  // The copy thread is to stop (pause, abort, failure, destruction).
  std::atomic<bool> halt_{false};
  std::atomic<bool> interrupt_{false};  // and its engine read stops at the block it is on
  std::atomic<uint64_t> mirrored_{0};

  std::mutex save_mu_;  // taken before mu_, never after
  EvacRecord rec_;      // as saved, under save_mu_
  int64_t last_save_ms_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;
  EvacState state_ = EvacState::kNone;  // under mu_, and the rest
  uint64_t cursor_ = 0;
  uint64_t lost_ = 0;
  std::set<uint64_t> lost_extra_;  // unreadable, not pending (a slot the spare fails)
  std::set<uint64_t> lost_seen_;   // counted in lost_ since open
  std::vector<uint64_t> resync_;   // regions to copy again, sorted
  uint64_t rate_limit_ = 0;
  double rate_ = 0, eta_ = -1;
  bool waiting_main_ = false;
  std::string error_;
  std::vector<std::pair<uint64_t, uint64_t>> held_;  // client changes in flight
  uint64_t win_first_ = 0, win_last_ = 0;            // the copy's piece
  bool win_active_ = false, win_locked_ = false, win_dirty_ = false;
  std::vector<uint8_t> touched_;  // regions written since the last save point
};

Evacuator::Evacuator(Engine& engine, OpenOptions target_open, std::vector<std::string> set_specs)
    : engine_(engine), target_open_(std::move(target_open)), set_specs_(std::move(set_specs)) {
  if (engine_.read_only()) return;
  EvacRecord rec = engine_.saved_evacuation();
  const EvacState state = static_cast<EvacState>(rec.state);
  if (!under_way(state)) {
    if (state != EvacState::kNone) {
      auto core = std::make_shared<Core>(engine_, nullptr, rec);
      core->live_.store(false);
      core_ = core;
    }
    return;
  }
  // The same disk as before: its size, and its serial where it has one.
  OpenOptions o = target_open_;
  o.read_only = false;
  auto opened = open_device(rec.target, "NEW", o);
  std::string why;
  if (!opened.is_ok()) {
    why = opened.status().to_string();
  } else if (opened.value()->size() != rec.target_size) {
    why = rec.target + " is " + std::to_string(opened.value()->size()) + " bytes, not the " +
          std::to_string(rec.target_size) + " it was when the evacuation started: another disk";
  } else if (!rec.target_identity.empty() &&
             opened.value()->identity().substr(0, kEvacIdentityBytes - 1) != rec.target_identity) {
    why = rec.target + " is now the disk " + opened.value()->identity() + ", not " +
          rec.target_identity;
  }
  if (!why.empty()) {
    // Writes from now on reach only the set: NEW is behind for good.
    core_ = std::make_shared<Core>(engine_, nullptr, rec);
    core_->fail("NEW cannot be opened again: " + why);
    return;
  }
  core_ = std::make_shared<Core>(engine_, opened.value(), rec);
  engine_.attach_mirror(core_);
  log(LogLevel::kInfo, std::string("evacuation to ") + rec.target + " picked up (" +
                           evac_state_name(state) + ", block " + std::to_string(rec.cursor) +
                           ", saved " + utc_time(static_cast<int64_t>(rec.saved)) + ")" +
                           (core_->resync_.empty()
                                ? std::string()
                                : "; " + std::to_string(core_->resync_.size()) +
                                      " region(s) written before a crash are copied again"));
  // Copying, or copying again what a crash left; also keeping the bitmap
  // tidy while paused or in sync.
  std::lock_guard l(mu_);
  thread_ = std::thread([this] { run(); });
}

Evacuator::~Evacuator() { stop_thread(); }

void Evacuator::stop_thread() {
  std::thread t;
  {
    std::lock_guard l(mu_);
    if (!core_) return;
    core_->halt_.store(true);
    core_->interrupt_.store(true);
    core_->cv_.notify_all();
    t = std::move(thread_);
  }
  if (t.joinable()) t.join();
}

Status Evacuator::start(const EvacStart& how) {
  if (Status s = check_rate(how.rate); !s.is_ok()) return s;
  if (engine_.read_only()) return Status::error(EPERM, "the set is served read-only");
  if (core_) {
    const EvacProgress p = core_->progress();
    if (under_way(p.state)) {
      return Status::error(EBUSY, std::string("an evacuation to ") + p.target + " is " +
                                      evac_state_name(p.state) +
                                      ": abort it first (dmremap evacuate --abort)");
    }
  }
  if (how.target.empty()) return Status::error(EINVAL, "no NEW disk given (--to)");
  // Not main, not the spare: by name, and by what the path is.
  const std::string id = local_identity(how.target);
  for (const std::string& spec : set_specs_) {
    if (spec.empty()) continue;
    if (spec == how.target || (!id.empty() && id == local_identity(spec))) {
      return Status::error(EINVAL, how.target + " is " + spec +
                                       ", a disk of this set: NEW must be another disk");
    }
  }
  OpenOptions o = target_open_;
  o.read_only = false;
  o.exclusive = true;
  auto opened = open_device(how.target, "NEW", o);
  if (!opened.is_ok()) return opened.take_status();
  std::shared_ptr<BlockDevice> target = opened.value();
  if (target->size() < engine_.size()) {
    return Status::error(EINVAL, how.target + " is " + size_text(target->size()) +
                                     ": smaller than the set's " + size_text(engine_.size()));
  }
  if (!how.force) {
    auto data = find_data(*target);
    if (!data.is_ok()) {
      return Status::error(data.status().code(),
                           "NEW could not be read to see whether it holds data: " +
                               data.status().to_string());
    }
    if (const std::optional<uint64_t> at = data.value()) {
      return Status::error(EEXIST, how.target + " holds data (a non-zero byte at offset " +
                                       std::to_string(*at) +
                                       "): give --force to overwrite it");
    }
  }
  stop_thread();
  EvacRecord rec;
  rec.state = static_cast<uint32_t>(EvacState::kRunning);
  rec.started = static_cast<uint64_t>(unix_now());
  rec.rate = how.rate;
  rec.target = how.target;
  rec.target_size = target->size();
  rec.target_identity = target->identity().substr(0, kEvacIdentityBytes - 1);
  rec.region_blocks = region_blocks_for(engine_.size() / engine_.block_size(),
                                        engine_.block_size());
  rec.saved = rec.started;
  // Recorded before any write goes to NEW: a crash from here on finds it.
  if (Status s = engine_.save_evacuation(rec); !s.is_ok()) return s;
  auto core = std::make_shared<Core>(engine_, target, rec);
  {
    std::lock_guard l(mu_);
    core_ = core;
  }
  engine_.attach_mirror(core_);
  log(LogLevel::kInfo, "evacuation to " + how.target + " started: " +
                           std::to_string(engine_.size() / engine_.block_size()) + " blocks" +
                           (how.rate ? ", at most " + std::to_string(how.rate) + " bytes/s" : ""));
  std::lock_guard l(mu_);
  thread_ = std::thread([this] { run(); });
  return Status::ok();
}

Status Evacuator::pause() {
  if (!core_ || core_->progress().state != EvacState::kRunning) {
    return Status::error(EINVAL, "no evacuation is copying");
  }
  stop_thread();
  {
    std::lock_guard l(core_->mu_);
    core_->state_ = EvacState::kPaused;
  }
  Status s = core_->checkpoint(EvacState::kPaused);
  // Writes still go to both disks; the thread keeps the bitmap tidy.
  core_->halt_.store(false);
  core_->interrupt_.store(false);
  std::lock_guard l(mu_);
  thread_ = std::thread([this] { run(); });
  return s;
}

Status Evacuator::resume() {
  if (!core_ || core_->progress().state != EvacState::kPaused) {
    return Status::error(EINVAL, "no evacuation is paused");
  }
  stop_thread();
  {
    std::lock_guard l(core_->mu_);
    core_->state_ = EvacState::kRunning;
    core_->error_.clear();
  }
  Status s = core_->save(EvacState::kRunning, core_->rec_cursor(), false);
  core_->halt_.store(false);
  core_->interrupt_.store(false);
  std::lock_guard l(mu_);
  thread_ = std::thread([this] { run(); });
  return s;
}

Status Evacuator::abort() {
  if (!core_ || !under_way(core_->progress().state)) {
    return Status::error(EINVAL, "no evacuation is under way");
  }
  stop_thread();
  core_->live_.store(false);
  engine_.attach_mirror(nullptr);
  {
    std::lock_guard l(core_->mu_);
    core_->state_ = EvacState::kAborted;
  }
  if (core_->target_) (void)core_->target_->flush();
  log(LogLevel::kWarning, "evacuation to " + core_->target_->name() +
                              " aborted: NEW is no longer written");
  return core_->save(EvacState::kAborted, core_->rec_cursor(), false);
}

Status Evacuator::set_rate(uint64_t bytes_per_second) {
  if (Status s = check_rate(bytes_per_second); !s.is_ok()) return s;
  if (!core_ || !under_way(core_->progress().state)) {
    return Status::error(EINVAL, "no evacuation is under way");
  }
  {
    std::lock_guard l(core_->mu_);
    core_->rate_limit_ = bytes_per_second;
  }
  core_->cv_.notify_all();
  return Status::ok();
}

EvacProgress Evacuator::progress() {
  if (!core_) {
    EvacProgress p;
    p.blocks = engine_.size() / engine_.block_size();
    p.block_size = engine_.block_size();
    return p;
  }
  return core_->progress();
}

EvacProgress Evacuator::wait(std::chrono::milliseconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (true) {
    EvacProgress p = progress();
    if (p.state != EvacState::kRunning || std::chrono::steady_clock::now() >= until) return p;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

std::vector<uint64_t> Evacuator::lost_blocks(uint64_t first, uint64_t last) {
  std::vector<uint64_t> out;
  if (!core_) return out;
  uint64_t cursor;
  std::set<uint64_t> extra;
  {
    std::lock_guard l(core_->mu_);
    cursor = std::min(core_->cursor_, last);
    if (first < cursor) {
      extra.insert(core_->lost_extra_.lower_bound(first), core_->lost_extra_.lower_bound(cursor));
    }
  }
  if (first < cursor) {
    engine_.for_each_entry(first, cursor, [&](const RemapTable::Entry& e) {
      if (RemapTable::is_pending(e.value)) out.push_back(e.block);
    });
  }
  out.insert(out.end(), extra.begin(), extra.end());
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

void Evacuator::run() {
  Core& c = *core_;
  const uint64_t piece = std::max<uint64_t>(1, kPieceBytes / c.bs_);
  std::vector<char> buf(piece * c.bs_);
  c.last_save_ms_ = now_ms();
  double seconds_per_byte = 0;
  // Regions a crash left behind come first.
  while (!c.halt_.load()) {
    uint64_t region;
    {
      std::lock_guard l(c.mu_);
      if (c.resync_.empty()) break;
      region = c.resync_.front();
    }
    const uint64_t a = region * c.rb_;
    const uint64_t b = std::min(c.blocks_, a + c.rb_);
    Status s = c.copy_range(a, b, /*held=*/false);
    if (s.code() == ECANCELED || c.halt_.load()) break;
    if (!s.is_ok()) {
      // Main offline: wait for it, as below.
      {
        std::lock_guard l(c.mu_);
        c.waiting_main_ = true;
        c.error_ = "waiting: " + s.to_string();
      }
      std::unique_lock l(c.mu_);
      c.cv_.wait_for(l, std::chrono::seconds(1), [&] { return c.halt_.load(); });
      continue;
    }
    std::lock_guard l(c.mu_);
    c.waiting_main_ = false;
    c.error_.clear();
    c.resync_.erase(c.resync_.begin());
  }
  while (!c.halt_.load()) {
    EvacState state;
    uint64_t first;
    {
      std::lock_guard l(c.mu_);
      state = c.state_;
      first = c.cursor_;
    }
    if (state != EvacState::kRunning) {
      // Paused or in sync: writes still go to both; the bitmap is tidied
      // every 30 s.
      {
        std::unique_lock l(c.mu_);
        c.cv_.wait_for(l, std::chrono::milliseconds(500), [&] { return c.halt_.load(); });
      }
      if (!c.halt_.load() && now_ms() - c.last_save_ms_ >= kSaveEveryMs) (void)c.checkpoint(state);
      continue;
    }
    if (first >= c.blocks_) {
      if (c.checkpoint(EvacState::kSynced).is_ok()) {
        {
          std::lock_guard l(c.mu_);
          c.state_ = EvacState::kSynced;
          c.eta_ = 0;
        }
        log(LogLevel::kInfo, "evacuation: " + c.target_->name() +
                                 " holds the whole disk and stays in sync (" +
                                 std::to_string(c.lost_) + " block(s) lost); writes keep going "
                                 "to both disks until the set is closed");
      } else if (!c.live_.load()) {
        break;
      } else {
        std::unique_lock l(c.mu_);
        c.cv_.wait_for(l, std::chrono::seconds(1), [&] { return c.halt_.load(); });
      }
      continue;
    }
    const uint64_t last = std::min(c.blocks_, first + piece);
    // Clients first.
    const auto t0 = std::chrono::steady_clock::now();
    for (int waited = 0; waited < kMaxYieldSteps && !c.halt_.load() &&
                         now_ms() - engine_.last_client_request_ms() < kClientQuietMs;
         ++waited) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (c.halt_.load()) break;
    Status s = c.copy_piece(first, last, buf.data());
    if (s.code() == ECANCELED || c.halt_.load()) break;
    if (!s.is_ok()) {
      if (!c.live_.load()) break;
      // Main as a whole does not answer (or NEW failed, which fail()
      // settled): no block is called lost for it; wait and try again.
      {
        std::lock_guard l(c.mu_);
        if (!c.waiting_main_) {
          log(LogLevel::kWarning, "evacuation waits at block " + std::to_string(first) + ": " +
                                      s.to_string());
        }
        c.waiting_main_ = true;
        c.error_ = "waiting: " + s.to_string();
      }
      std::unique_lock l(c.mu_);
      c.cv_.wait_for(l, std::chrono::seconds(1), [&] { return c.halt_.load(); });
      continue;
    }
    if (!c.live_.load()) break;  // NEW failed: fail() has said so
    const double bytes = static_cast<double>(last - first) * c.bs_;
    {
      std::unique_lock l(c.mu_);
      c.waiting_main_ = false;
      c.error_.clear();
      c.cursor_ = last;
      const double took =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (const uint64_t limit = c.rate_limit_; limit > 0) {
        const double share = bytes / static_cast<double>(limit);
        if (took < share) {
          c.cv_.wait_for(l, std::chrono::duration<double>(share - took),
                         [&] { return c.halt_.load() || c.rate_limit_ != limit; });
        }
      }
      const double elapsed =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double spb = elapsed / bytes;
      seconds_per_byte = seconds_per_byte == 0 ? spb : 0.9 * seconds_per_byte + 0.1 * spb;
      c.rate_ = seconds_per_byte > 0 ? 1 / seconds_per_byte : 0;
      c.eta_ = c.rate_ > 0 ? static_cast<double>(c.blocks_ - c.cursor_) * c.bs_ / c.rate_ : -1;
    }
    if (now_ms() - c.last_save_ms_ >= kSaveEveryMs) (void)c.checkpoint(EvacState::kRunning);
  }
  // Stopped (pause, abort, the Evacuator going): the place so far, flushed.
  if (c.live_.load()) {
    EvacState state;
    {
      std::lock_guard l(c.mu_);
      state = c.state_;
    }
    (void)c.checkpoint(state);
  }
}

Result<EvacVerify> Evacuator::verify(const std::function<bool()>& stopping,
                                     const std::function<void(uint64_t, uint64_t)>& step) {
  if (!core_) return Status::error(EINVAL, "no evacuation to verify");
  const EvacProgress p = core_->progress();
  Core& c = *core_;
  std::shared_ptr<BlockDevice> target = c.target_;
  if (p.state == EvacState::kFinished) {
    OpenOptions o = target_open_;
    o.read_only = true;
    o.exclusive = false;
    auto opened = open_device(p.target, "NEW", o);
    if (!opened.is_ok()) return opened.take_status();
    target = opened.value();
  } else if (p.state != EvacState::kSynced || p.resync_regions > 0) {
    return Status::error(EINVAL, std::string("NEW is not in sync yet (the evacuation is ") +
                                     evac_state_name(p.state) +
                                     (p.resync_regions > 0 ? ", copying again what a crash left"
                                                           : "") +
                                     ")");
  }
  const std::vector<uint64_t> lost = lost_blocks();
  EvacVerify v;
  const uint64_t piece = std::max<uint64_t>(1, kPieceBytes / c.bs_);
  std::vector<char> set_buf(piece * c.bs_), new_buf(piece * c.bs_);
  for (uint64_t first = 0; first < c.blocks_; first += piece) {
    if (stopping && stopping()) {
      v.stopped = true;
      break;
    }
    const uint64_t last = std::min(c.blocks_, first + piece);
    const uint64_t len = (last - first) * c.bs_;
    std::vector<uint64_t> bad;
    Status rs, rn;
    {
      // Clients' writes to this piece wait until both sides are read.
      std::unique_lock l(c.mu_);
      c.cv_.wait(l, [&] { return !c.win_active_ && !c.held_overlaps(first, last); });
      c.win_first_ = first;
      c.win_last_ = last;
      c.win_active_ = c.win_locked_ = true;
    }
    rs = engine_.scan_read(set_buf.data(), len, first * c.bs_, &bad, nullptr);
    rn = target->read(new_buf.data(), len, first * c.bs_);
    {
      std::lock_guard l(c.mu_);
      c.win_active_ = c.win_locked_ = false;
    }
    c.cv_.notify_all();
    if (!rs.is_ok() && bad.empty()) return rs;
    if (!rn.is_ok()) return Status::error(rn.code(), "NEW: " + rn.to_string());
    for (uint64_t b = first; b < last; ++b) {
      if (std::binary_search(lost.begin(), lost.end(), b) ||
          std::binary_search(bad.begin(), bad.end(), b)) {
        ++v.lost;
        continue;
      }
      ++v.compared;
      const uint64_t o = (b - first) * c.bs_;
      if (std::memcmp(set_buf.data() + o, new_buf.data() + o, c.bs_) != 0) {
        ++v.differ_count;
        if (v.differ.size() < kMaxListed) v.differ.push_back(b);
      }
    }
    if (step) step(last, c.blocks_);
  }
  return v;
}

}  // namespace dmremap
