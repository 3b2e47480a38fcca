#include "dmremap/evacuate.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <new>
#include <set>

#include "dmremap/log.h"
#include "dmremap/scan.h"

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
// The smallest write-intent region: 1 MiB of blocks.
constexpr uint64_t kMinRegionBytes = 1024 * 1024;
// How many blocks a verification lists as differing.
constexpr size_t kMaxListed = 1000;

int64_t unix_now() { return static_cast<int64_t>(std::time(nullptr)); }

// The copy's buffers, aligned for O_DIRECT: an unaligned one would go
// through a bounce buffer on every read of main and write to NEW.
constexpr size_t kBufferAlign = 4096;
struct IoBuffer {
  explicit IoBuffer(size_t n)
      : data(static_cast<char*>(
            std::aligned_alloc(kBufferAlign, (n + kBufferAlign - 1) / kBufferAlign * kBufferAlign))) {
    if (data == nullptr) throw std::bad_alloc();
  }
  ~IoBuffer() { std::free(data); }
  IoBuffer(const IoBuffer&) = delete;
  IoBuffer& operator=(const IoBuffer&) = delete;
  char* data;
};

// How far ahead the copy asks main where its holes are: one question per
// 64 MiB, not per piece (a file system may walk its whole file to answer).
constexpr uint64_t kExtentsAhead = 64 * 1024 * 1024;

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


namespace {
// What went wrong in a copy: the set could not be read (main offline, the
// engine closing: wait and copy again), or NEW refused (the evacuation
// fails).
enum class Side { kNone, kSet, kTarget };
}  // namespace

// The mirror (every client change made on NEW too), the copy's pieces, and
// the record on the spare. Shared by the engine (as its mirror, attached
// until the engine closes) and the Evacuator (its thread), so that writes in
// flight when the Evacuator goes still reach NEW.
//
// Locks: save_mu_ (the record, its writes to the spare) is taken before
// mu_ (everything else), never after. Neither is held by the engine when it
// calls in, and the engine's claims are never held either.
class Evacuator::Core : public WriteMirror {
 public:
  Core(Engine& engine, std::shared_ptr<BlockDevice> target, EvacRecord rec)
      : engine_(engine),
        bs_(engine.block_size()),
        blocks_(engine.size() / engine.block_size()),
        rb_(std::max<uint64_t>(1, rec.region_blocks)),
        regions_((blocks_ + rb_ - 1) / rb_),
        rec_(std::move(rec)),
        target_(std::move(target)) {
    rec_.region_blocks = rb_;
    state_ = static_cast<EvacState>(rec_.state);
    cursor_ = std::min(rec_.cursor, blocks_);
    rate_limit_ = rec_.rate;
    lost_count_ = rec_.lost;
    touched_.assign(regions_, 0);
    bits_.assign(regions_, 0);
    for (uint64_t r = 0; r < regions_; ++r) bits_[r] = rec_.intent_bit(r) ? 1 : 0;
    // A crash left these regions with writes NEW may not hold.
    if (target_) take_resync_from_bits();
  }

  // --- WriteMirror -------------------------------------------------------

  Status change(Op op, const void* buf, uint64_t len, uint64_t offset, bool fua,
                const std::function<Status()>& apply) override {
    if (!live_.load()) {
      // Ended. An end (failed, aborted) not recorded yet must be, before a
      // write that NEW will not get: the next start would trust NEW.
      if (end_unsaved_.load() && !retired_.load() && !save_end().is_ok()) {
        return Status::error(EIO, "the evacuation ended and that could not be recorded on the "
                                  "spare: writes are refused so that NEW is not trusted later");
      }
      return apply();
    }
    const uint64_t first = offset / bs_;
    const uint64_t last = (offset + len + bs_ - 1) / bs_;
    std::vector<uint64_t> need;
    const std::shared_ptr<BlockDevice> target = hold(first, last, need);
    // The bit before the write: after a crash, its region is copied again.
    if (!need.empty()) {
      if (Status in = set_bits(need); !in.is_ok()) {
        release(first, last, /*written=*/false);
        return Status::error(EIO, "the evacuation's write-intent bitmap could not be saved on the "
                                  "spare (" + in.to_string() + "): the write is refused, so that "
                                  "NEW cannot miss it unnoticed");
      }
    }
    Status s = apply();
    if (!target) came_back(first, last);
    if (live_.load()) {
      Side side = Side::kNone;
      Status mirrored;
      if (s.is_ok()) {
        if (target) {
          mirrored = apply_on_target(*target, op, buf, len, offset, fua, first, last, side);
        }
        // No NEW now (waiting for it): the bit covers the write.
      } else {
        // The set may hold part of it: NEW gets what the set holds now.
        mirrored = target ? copy_held(*target, first, last, side)
                          : Status::ok();
      }
      if (mirrored.is_ok()) {
        mirrored_.fetch_add(1, std::memory_order_relaxed);
      } else {
        settle(mirrored, side, first, last,
               "a client's change at offset " + std::to_string(offset));
      }
    }
    release(first, last, s.is_ok() && op != Op::kTrim);
    return s;
  }

  void flushed() override {
    if (!live_.load()) return;
    auto target = current_target();
    if (!target) return;
    if (Status s = target->flush(); !s.is_ok()) fail("NEW's flush failed: " + s.to_string());
  }

  Status will_change(uint64_t first, uint64_t last) override {
    if (!live_.load()) return Status::ok();
    std::vector<uint64_t> need;
    {
      std::lock_guard l(mu_);
      need = regions_needing_bits(first, last);
    }
    return need.empty() ? Status::ok() : set_bits(need);
  }

  void refresh(uint64_t first, uint64_t last) override {
    if (!live_.load()) return;
    std::vector<uint64_t> need;
    const std::shared_ptr<BlockDevice> target = hold(first, last, need);
    Status s = need.empty() ? Status::ok() : set_bits(need);
    Side side = Side::kNone;
    if (s.is_ok() && target) s = copy_held(*target, first, last, side);
    if (!target) came_back(first, last);
    if (!s.is_ok()) settle(s, side, first, last, "blocks that read again");
    release(first, last, false);
  }

  std::optional<EvacRecord> closing() override {
    halt_.store(true);
    closing_.store(true);
    {
      // The NEW half of writes the engine has answered: done first.
      std::unique_lock l(mu_);
      if (!cv_.wait_for(l, std::chrono::seconds(30), [&] { return held_.empty(); })) {
        log(LogLevel::kWarning, "evacuation: writes to NEW still running at close; their "
                                "regions are copied again at the next start");
      }
    }
    std::lock_guard g(save_mu_);
    EvacRecord next = rec_;
    std::lock_guard l(mu_);
    if (!live_.load()) {
      // Failed or aborted: said, if it was not yet.
      if (state_ != EvacState::kFailed && state_ != EvacState::kAborted) return std::nullopt;
      if (retired_.load()) return std::nullopt;
      if (rec_.state == static_cast<uint32_t>(state_) && !end_unsaved_.load()) return std::nullopt;
      next.state = static_cast<uint32_t>(state_);
      return next;
    }
    for (uint64_t r : dirty_at_close_) next.set_intent_bit(r);
    if (!target_) return next;  // waiting for NEW: the bits stay
    if (Status s = target_->flush(); !s.is_ok()) {
      log(LogLevel::kError, "evacuation: NEW's flush failed at close: " + s.to_string() +
                                "; the bitmap keeps its regions to copy again");
      return next;
    }
    // The set was flushed before this, and now NEW: every region is in
    // step on both, but those still to be copied again.
    for (uint64_t r = 0; r < regions_; ++r) {
      if (next.intent_bit(r) && !in_resync(r) && !dirty_at_close_.count(r) &&
          !held_overlaps(r * rb_, std::min(blocks_, (r + 1) * rb_))) {
        next.clear_intent_bit(r);
      }
    }
    if (next.intent_empty()) next.intent.clear();
    next.cursor = cursor_;
    next.lost = lost_count_;
    next.saved = static_cast<uint64_t>(unix_now());
    if (state_ == EvacState::kSynced && resync_.empty() && next.intent.empty()) {
      state_ = EvacState::kFinished;
      log(LogLevel::kInfo, "evacuation finished: the set closed cleanly with " + rec_.target +
                               " holding the whole disk; it is no longer written");
    }
    next.state = static_cast<uint32_t>(state_);
    rec_ = next;
    live_.store(false);
    return next;
  }

  // --- used by the Evacuator --------------------------------------------

  EvacProgress progress() {
    const uint64_t lost = count_lost();
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
    p.lost = lost;
    p.resync_regions = resync_.size();
    p.mirrored = mirrored_.load();
    p.waiting_for_main = waiting_main_;
    p.target_away = under_way(state_) && !target_;
    p.error = error_;
    return p;
  }

  // Blocks NEW does not hold in [first, last), below the copy's place.
  std::vector<uint64_t> lost_blocks(uint64_t first, uint64_t last) {
    std::vector<uint64_t> out;
    uint64_t cursor;
    {
      std::lock_guard l(mu_);
      cursor = std::min(cursor_, last);
      if (first < cursor) {
        out.insert(out.end(), lost_extra_.lower_bound(first), lost_extra_.lower_bound(cursor));
      }
    }
    if (first < cursor) {
      engine_.for_each_entry(first, cursor, [&](const RemapTable::Entry& e) {
        if (RemapTable::is_pending(e.value)) out.push_back(e.block);
      });
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
  }

  uint64_t count_lost() {
    const uint64_t n = lost_blocks(0, ~uint64_t{0}).size();
    std::lock_guard l(mu_);
    lost_count_ = n;
    return n;
  }

  // Saves the record with `state` (a failure or an abort stays what it
  // is) and the copy's place `cursor`, which the caller has flushed to NEW.
  // With `clear`, the bits of regions no write touched since the save
  // point began are cleared too.
  Status save(EvacState state, uint64_t cursor, bool clear) {
    const uint64_t lost = count_lost();
    std::lock_guard g(save_mu_);
    EvacRecord next = rec_;
    std::vector<uint64_t> cleared;
    {
      std::lock_guard l(mu_);
      if (state_ == EvacState::kFailed || state_ == EvacState::kAborted) state = state_;
      next.state = static_cast<uint32_t>(state);
      next.rate = rate_limit_;
      next.lost = lost;
      if (clear) {
        for (uint64_t r = 0; r < regions_; ++r) {
          const uint64_t a = r * rb_;
          const uint64_t b = std::min(blocks_, a + rb_);
          if (next.intent_bit(r) && !touched_[r] && !held_overlaps(a, b) && !in_resync(r)) {
            next.clear_intent_bit(r);
            // A write that comes from now on sets it again, after this
            // save (it waits for save_mu_).
            bits_[r] = 0;
            cleared.push_back(r);
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
    last_save_ms_.store(now_ms());
    return s;
  }

  // A save point: flushes NEW and the set, then saves `state` with the
  // place the copy had reached before the flushes, clearing the bits of
  // regions untouched meanwhile.
  Status checkpoint(EvacState state) {
    uint64_t cursor;
    std::shared_ptr<BlockDevice> target;
    {
      std::lock_guard l(mu_);
      std::fill(touched_.begin(), touched_.end(), 0);
      cursor = cursor_;
      target = target_;
    }
    if (!target) {
      // Waiting for NEW: nothing new is on it, and no bit may go; only a
      // change of state (a pause) is recorded.
      last_save_ms_.store(now_ms());
      if (rec_state() == state) return Status::ok();
      return save(state, rec_cursor(), /*clear=*/false);
    }
    if (Status s = target->flush(); !s.is_ok()) {
      fail("NEW's flush failed: " + s.to_string());
      return s;
    }
    const Status set_flush = engine_.flush_background();
    // Without the set's flush the bits stay: a crash could still leave the
    // set ahead of NEW there.
    return save(state, cursor, /*clear=*/set_flush.is_ok());
  }

  // The copy of [first, last): the set's data (holes as zeros, unreadable
  // blocks as zeros and listed lost) in `buf`, with the holes in `holes`.
  // `stop`: the copy thread's flag (a client's own copy is not stopped).
  // `data_until`: the copy thread's note of where main's data, found by an
  // earlier question, goes on to (no hole before it). Only data is taken
  // from it: a hole is always asked about afresh, after the piece's window
  // opened, since a client write may have filled it.
  Status read_set(uint64_t first, uint64_t last, char* buf,
                  std::vector<std::pair<uint64_t, uint64_t>>& holes,
                  const std::atomic<bool>* stop, uint64_t* data_until = nullptr) {
    holes.clear();
    const uint64_t off = first * bs_;
    const uint64_t len = (last - first) * bs_;
    std::vector<std::pair<uint64_t, uint64_t>> data;
    const Engine::Background background;
    if (data_until != nullptr && *data_until >= off + len) {
      data = {{off, off + len}};
    } else {
      const uint64_t ask = data_until != nullptr
                               ? std::min(blocks_ * bs_ - off, std::max(len, kExtentsAhead))
                               : len;
      bool first_run = true;
      Status ext = engine_.extents(ask, off, [&](uint64_t o, uint64_t l, bool hole) {
        if (data_until != nullptr && first_run && !hole && o <= off) *data_until = o + l;
        first_run = false;
        const uint64_t a = std::max(o, off);
        const uint64_t b = std::min(o + l, off + len);
        if (a < b) (hole ? holes : data).emplace_back(a, b);
      });
      if (!ext.is_ok()) {
        holes.clear();
        data = {{off, off + len}};
      }
    }
    for (auto [a, b] : holes) std::memset(buf + (a - off), 0, b - a);
    for (auto [a, b] : data) {
      std::vector<uint64_t> bad;
      Status s = engine_.scan_read(buf + (a - off), b - a, a, &bad, stop);
      if (s.is_ok()) continue;
      if (bad.empty()) return s;  // main offline, closed, told to stop
      std::vector<uint64_t> extra;
      for (uint64_t blk : bad) {
        std::memset(buf + (blk * bs_ - off), 0, bs_);
        bool pending = false;
        engine_.for_each_entry(blk, blk + 1, [&](const RemapTable::Entry& e) {
          pending = RemapTable::is_pending(e.value);
        });
        if (!pending) extra.push_back(blk);
      }
      {
        std::lock_guard l(mu_);
        lost_extra_.insert(extra.begin(), extra.end());
      }
      log(LogLevel::kWarning, "evacuation: " + std::to_string(bad.size()) +
                                  " unreadable block(s) from block " + std::to_string(bad.front()) +
                                  ": NEW gets zeros there (listed as lost)");
    }
    return Status::ok();
  }

  static Status write_target(BlockDevice& target, uint64_t off, uint64_t end, const char* buf,
                             const std::vector<std::pair<uint64_t, uint64_t>>& holes) {
    uint64_t at = off;
    for (auto [a, b] : holes) {
      if (a > at) {
        if (Status s = target.write(buf + (at - off), a - at, at); !s.is_ok()) return s;
      }
      if (Status s = target.write_zeroes(b - a, a); !s.is_ok()) return s;
      at = b;
    }
    if (at < end) return target.write(buf + (at - off), end - at, at);
    return Status::ok();
  }

  // [first, last) from the set to NEW, for a caller that holds the range
  // (a client's change): no window.
  Status copy_held(BlockDevice& target, uint64_t first, uint64_t last, Side& side) {
    const uint64_t piece = std::max<uint64_t>(1, kPieceBytes / bs_);
    IoBuffer buf(std::min(last - first, piece) * bs_);
    std::vector<std::pair<uint64_t, uint64_t>> holes;
    for (uint64_t at = first; at < last; at += piece) {
      const uint64_t end = std::min(last, at + piece);
      if (Status s = read_set(at, end, buf.data, holes, nullptr); !s.is_ok()) {
        side = Side::kSet;
        return s;
      }
      if (Status s = write_target(target, at * bs_, end * bs_, buf.data, holes); !s.is_ok()) {
        side = Side::kTarget;
        return s;
      }
    }
    return Status::ok();
  }

  // One piece of the copy, [first, last), in a window that client writes
  // mark dirty: a dirty piece is read again, so that the copy never puts
  // older data over a client's newer write. After kOptimisticTries, the
  // piece is read with client writes to it held back.
  // `done` runs under mu_ as the window closes after NEW took the piece:
  // the copy's place moves with it, so that a write to the piece from then
  // on sets its region's bit.
  Status copy_piece(BlockDevice& target, uint64_t first, uint64_t last, char* buf, Side& side,
                    const std::function<void()>& done, uint64_t* data_until) {
    std::vector<std::pair<uint64_t, uint64_t>> holes;
    for (int attempt = 0;; ++attempt) {
      const bool keep_still = attempt >= kOptimisticTries;
      {
        std::unique_lock l(mu_);
        cv_.wait(l, [&] { return !win_active_ || halt_.load(); });  // a verification's window
        if (halt_.load()) return Status::error(ECANCELED, "stopping");
        win_first_ = first;
        win_last_ = last;
        win_active_ = true;
        win_dirty_ = held_overlaps(first, last);
        if (keep_still) {
          win_locked_ = true;
          cv_.wait(l, [&] { return !held_overlaps(first, last) || halt_.load(); });
        }
      }
      Status s = read_set(first, last, buf, holes, &interrupt_, data_until);
      bool again = false;
      {
        std::unique_lock l(mu_);
        if (!keep_still) {
          // Writes under way to the piece finish first, without holding
          // back others (a slow one would hold up the whole piece); if they
          // keep coming, then with them held back.
          if (!cv_.wait_for(l, std::chrono::milliseconds(100),
                            [&] { return !held_overlaps(first, last); })) {
            win_locked_ = true;
            cv_.wait(l, [&] { return !held_overlaps(first, last) || halt_.load(); });
          }
        }
        win_locked_ = true;
        if (s.is_ok() && halt_.load() && held_overlaps(first, last)) {
          s = Status::error(ECANCELED, "stopping");
        }
        if (!s.is_ok() || (win_dirty_ && !keep_still)) {
          win_locked_ = win_active_ = false;
          again = s.is_ok();
        }
      }
      if (!s.is_ok() || again) {
        cv_.notify_all();
        if (!s.is_ok()) {
          side = Side::kSet;
          return s;
        }
        continue;
      }
      // No client write reached the piece since it was read, and none can
      // until NEW has it.
      s = write_target(target, first * bs_, last * bs_, buf, holes);
      {
        std::lock_guard l(mu_);
        win_locked_ = win_active_ = false;
        if (s.is_ok()) done();
      }
      cv_.notify_all();
      if (!s.is_ok()) side = Side::kTarget;
      return s;
    }
  }

  // With mu_ held: the regions of [first, last) whose bit a crash would
  // need and that are not set yet: those the copy has reached (a crash
  // would not copy them again), or all once NEW holds the whole disk.
  std::vector<uint64_t> regions_needing_bits(uint64_t first, uint64_t last) const {
    std::vector<uint64_t> need;
    const bool all = state_ == EvacState::kSynced || cursor_ >= blocks_;
    for (uint64_t r = first / rb_; r * rb_ < last && r < regions_; ++r) {
      if ((all || r * rb_ < cursor_) && !bits_[r]) need.push_back(r);
    }
    return need;
  }

  // Sets the bits of `regions` on the spare, durably.
  Status set_bits(const std::vector<uint64_t>& regions) {
    std::lock_guard g(save_mu_);
    EvacRecord next = rec_;
    bool changed = false;
    {
      // From bits_, not rec_: a save that clears a bit zeroes it in bits_
      // first, and may land on the spare even when its flush fails.
      std::lock_guard l(mu_);
      for (uint64_t r : regions) {
        next.set_intent_bit(r);
        if (!bits_[r]) changed = true;
      }
    }
    if (changed) {
      next.saved = static_cast<uint64_t>(unix_now());
      if (Status s = engine_.save_evacuation(next); !s.is_ok()) return s;
      rec_ = std::move(next);
    }
    std::lock_guard l(mu_);
    for (uint64_t r : regions) bits_[r] = 1;
    return Status::ok();
  }

  // [first, last) could not be brought to NEW now: its regions are copied
  // again, and their bits say so across a crash.
  void copy_again(uint64_t first, uint64_t last) {
    std::vector<uint64_t> regions;
    for (uint64_t r = first / rb_; r * rb_ < last && r < regions_; ++r) regions.push_back(r);
    {
      std::lock_guard l(mu_);
      for (uint64_t r : regions) {
        if (!in_resync(r)) resync_.insert(std::upper_bound(resync_.begin(), resync_.end(), r), r);
        if (closing_.load()) dirty_at_close_.insert(r);
      }
    }
    if (closing_.load()) return;  // closing() records them
    if (Status s = set_bits(regions); !s.is_ok()) {
      fail("a region NEW could not be given could not be recorded either: " + s.to_string());
    }
  }

  // NEW is given up: no more writes reach it, and the record says why.
  void fail(const std::string& why) {
    {
      // The end is to be recorded before mirroring stops: a write that
      // finds live_ false saves it first (change()).
      std::lock_guard l(mu_);
      if (!live_.load()) return;
      state_ = EvacState::kFailed;
      error_ = why;
      end_unsaved_.store(true);
      live_.store(false);
      if (held_.empty()) target_.reset();  // NEW is let go (its lock too)
    }
    halt_.store(true);
    interrupt_.store(true);
    cv_.notify_all();
    log(LogLevel::kError, "evacuation failed: " + why +
                              ". Writes now reach only the set; start it again when NEW is fixed "
                              "or replaced (dmremap evacuate --to NEW)");
    (void)save_end();
  }

  // Records the end (failed, aborted); ok once it is on the spare.
  Status save_end() {
    EvacState state;
    {
      std::lock_guard l(mu_);
      state = state_;
    }
    Status s = save(state, rec_cursor(), /*clear=*/false);
    if (s.is_ok()) end_unsaved_.store(false);
    return s;
  }

  uint64_t rec_cursor() {
    std::lock_guard g(save_mu_);
    return rec_.cursor;
  }
  EvacState rec_state() {
    std::lock_guard g(save_mu_);
    return static_cast<EvacState>(rec_.state);
  }

  std::shared_ptr<BlockDevice> current_target() {
    std::lock_guard l(mu_);
    return target_;
  }

  // Registers a change of [first, last) in held_, once no other change to
  // those blocks is in flight and the copy's window is not closed on them;
  // returns NEW as it is now (null while away), and in `need` the regions
  // whose bits the change must set first.
  std::shared_ptr<BlockDevice> hold(uint64_t first, uint64_t last, std::vector<uint64_t>& need) {
    std::unique_lock l(mu_);
    cv_.wait(l, [&] {
      return !(win_locked_ && overlaps_window(first, last)) && !held_overlaps(first, last);
    });
    if (win_active_ && overlaps_window(first, last)) win_dirty_ = true;
    held_.emplace_back(first, last);
    touch(first, last);
    need = regions_needing_bits(first, last);
    return target_;
  }

  // After a change hold() found NEW away for: if NEW came back meanwhile,
  // the regions it missed may not be on the list it took from the bitmap.
  void came_back(uint64_t first, uint64_t last) {
    std::lock_guard l(mu_);
    if (!target_) return;
    for (uint64_t r = first / rb_; r * rb_ < last && r < regions_; ++r) {
      if (bits_[r] && !in_resync(r)) {
        resync_.insert(std::upper_bound(resync_.begin(), resync_.end(), r), r);
      }
    }
  }

  // [first, last) could not be brought to NEW (`what` for the log): NEW's
  // refusal fails the evacuation; the set's (main offline, the engine
  // closing) has it copied again later, from the bitmap.
  void settle(const Status& s, Side side, uint64_t first, uint64_t last, const std::string& what) {
    if (side == Side::kTarget) {
      fail("NEW did not take " + what + ": " + s.to_string());
    } else {
      copy_again(first, last);
    }
  }

  // Ends a change registered in held_.
  void release(uint64_t first, uint64_t last, bool written) {
    {
      std::lock_guard l(mu_);
      held_.erase(std::find(held_.begin(), held_.end(), std::make_pair(first, last)));
      touch(first, last);
      if (written && !lost_extra_.empty()) {
        lost_extra_.erase(lost_extra_.lower_bound(first), lost_extra_.lower_bound(last));
      }
      // Ended and idle: NEW is let go (its lock too).
      if (!live_.load() && held_.empty()) target_.reset();
    }
    cv_.notify_all();
  }

  // With mu_ held: every region whose bit is set joins resync_.
  void take_resync_from_bits() {
    for (uint64_t r = 0; r < regions_; ++r) {
      if (bits_[r] && !in_resync(r)) {
        resync_.insert(std::upper_bound(resync_.begin(), resync_.end(), r), r);
      }
    }
  }

  bool in_resync(uint64_t r) const { return std::binary_search(resync_.begin(), resync_.end(), r); }
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
    for (uint64_t r = first / rb_; r * rb_ < last && r < regions_; ++r) touched_[r] = 1;
  }

  Engine& engine_;
  const uint32_t bs_;
  const uint64_t blocks_;
  const uint64_t rb_;       // blocks per write-intent region
  const uint64_t regions_;
  // Whether client changes are made on NEW: false once failed, aborted or
  // closed.
  std::atomic<bool> live_{true};
  std::atomic<bool> end_unsaved_{false};  // ended, and the record does not say so yet
  std::atomic<bool> retired_{false};      // a new evacuation replaced this one
  std::atomic<bool> closing_{false};       // Engine::close has begun
  // The copy thread is to stop (pause, abort, failure, destruction).
  std::atomic<bool> halt_{false};
  std::atomic<bool> interrupt_{false};  // and its engine read stops at the block it is on
  std::atomic<uint64_t> mirrored_{0};
  std::atomic<int64_t> last_save_ms_{0};

  std::mutex save_mu_;  // taken before mu_, never after
  EvacRecord rec_;      // as saved, under save_mu_

  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<BlockDevice> target_;  // under mu_; null while NEW is away
  EvacState state_ = EvacState::kNone;  // under mu_, and the rest
  uint64_t cursor_ = 0;
  uint64_t lost_count_ = 0;
  std::set<uint64_t> lost_extra_;  // unreadable, not pending (a slot the spare fails)
  std::vector<uint64_t> resync_;   // regions to copy again, sorted
  uint64_t resync_region_ = ~uint64_t{0};  // the region resync_pos_ belongs to
  uint64_t resync_pos_ = 0;        // the next block of it to copy
  std::set<uint64_t> dirty_at_close_;
  uint64_t rate_limit_ = 0;
  double rate_ = 0, eta_ = -1;
  bool waiting_main_ = false;
  std::string error_;
  std::vector<std::pair<uint64_t, uint64_t>> held_;  // client changes in flight
  uint64_t win_first_ = 0, win_last_ = 0;            // the copy's piece
  bool win_active_ = false, win_locked_ = false, win_dirty_ = false;
  std::vector<uint8_t> touched_;  // regions written since the last save point
  std::vector<uint8_t> bits_;     // the bitmap's bits as saved (0 also while being cleared)

  // Applies a client's change to NEW.
  Status apply_on_target(BlockDevice& target, Op op, const void* buf, uint64_t len,
                         uint64_t offset, bool fua, uint64_t first, uint64_t last, Side& side) {
    Status s;
    switch (op) {
      case Op::kWrite: s = target.write(buf, len, offset); break;
      case Op::kZeroes: s = target.write_zeroes(len, offset); break;
      case Op::kTrim: {
        // The set trims whole blocks only, and keeps remapped ones: so
        // does NEW, which gets the remapped blocks' data instead.
        const uint64_t a = (offset + bs_ - 1) / bs_;
        const uint64_t b = (offset + len) / bs_;
        if (a < b) s = target.trim((b - a) * bs_, a * bs_);
        std::vector<uint64_t> kept;
        engine_.for_each_entry(first, last, [&](const RemapTable::Entry& e) {
          if (!RemapTable::is_pending(e.value)) kept.push_back(e.block);
        });
        for (uint64_t blk : kept) {
          if (!s.is_ok()) break;
          s = copy_held(target, blk, blk + 1, side);
          if (!s.is_ok()) return s;
        }
        break;
      }
    }
    if (s.is_ok() && fua) s = target.flush();
    if (!s.is_ok()) side = Side::kTarget;
    return s;
  }
};

namespace {

// Why `target` cannot be NEW for a set of `size` bytes in `block`-byte
// blocks, or "".
std::string unfit_target(const BlockDevice& target, uint64_t size, uint32_t block) {
  if (target.size() < size) {
    return target.name() + " is " + size_text(target.size()) + ": smaller than the set's " +
           size_text(size);
  }
  // NEW would read and rewrite around a block: two clients' writes to
  // neighbouring blocks could then undo each other on NEW.
  if (target.alignment() > block) {
    return target.name() + " writes in units of " + std::to_string(target.alignment()) +
           " bytes, larger than the set's " + std::to_string(block) + "-byte blocks";
  }
  return {};
}

// NEW again, for an evacuation under way: the same size and disk. Why not,
// in `why`.
std::shared_ptr<BlockDevice> reopen_target(const EvacRecord& rec, const OpenOptions& options,
                                           uint64_t size, uint32_t block, std::string& why) {
  OpenOptions o = options;
  o.read_only = false;
  o.exclusive = true;
  auto opened = open_device(rec.target, "NEW", o);
  if (!opened.is_ok()) {
    why = opened.status().to_string();
    return nullptr;
  }
  std::shared_ptr<BlockDevice> dev = opened.value();
  if (dev->size() != rec.target_size) {
    why = rec.target + " is " + std::to_string(dev->size()) + " bytes, not the " +
          std::to_string(rec.target_size) + " it was when the evacuation started: another disk";
  } else if (!rec.target_identity.empty() &&
             dev->identity().substr(0, kEvacIdentityBytes - 1) != rec.target_identity) {
    why = rec.target + " is now the disk " + dev->identity() + ", not " + rec.target_identity;
  } else {
    why = unfit_target(*dev, size, block);
  }
  return why.empty() ? dev : nullptr;
}

}  // namespace

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
  std::string why;
  auto target = reopen_target(rec, target_open_, engine_.size(), engine_.block_size(), why);
  if (!target) {
    // Writes are still watched: those to regions already copied set their
    // bits, and are copied again once NEW is back.
    log(LogLevel::kWarning, "evacuation: NEW cannot be opened (" + why +
                                "); writes are recorded in the bitmap and copied when it is "
                                "back (tried every 5 s)");
  }
  core_ = std::make_shared<Core>(engine_, target, rec);
  if (!target) core_->error_ = "waiting for NEW: " + why;
  log(LogLevel::kInfo, std::string("evacuation to ") + rec.target + " picked up (" +
                           evac_state_name(state) + ", block " + std::to_string(rec.cursor) +
                           ", saved " + utc_time(static_cast<int64_t>(rec.saved)) + ")" +
                           (core_->resync_.empty()
                                ? std::string()
                                : "; " + std::to_string(core_->resync_.size()) +
                                      " region(s) written before a crash are copied again"));
  engine_.attach_mirror(core_);
  // Copying, or copying again what a crash left; also keeping the bitmap
  // tidy while paused or in sync, and waiting for NEW.
  std::lock_guard l(mu_);
  thread_ = std::thread([this] { run(); });
}

Evacuator::~Evacuator() { stop_thread(); }

std::shared_ptr<Evacuator::Core> Evacuator::core() {
  std::lock_guard l(mu_);
  return core_;
}

void Evacuator::stop_thread() {
  std::thread t;
  std::shared_ptr<Core> c;
  {
    std::lock_guard l(mu_);
    if (!core_) return;
    c = core_;
    c->halt_.store(true);
    c->interrupt_.store(true);
    t = std::move(thread_);
  }
  c->cv_.notify_all();
  if (t.joinable()) t.join();
  c->interrupt_.store(false);
}

void Evacuator::launch() {
  std::lock_guard l(mu_);
  if (!core_->live_.load()) return;  // ended meanwhile
  core_->halt_.store(false);
  core_->interrupt_.store(false);
  thread_ = std::thread([this] { run(); });
}

Status Evacuator::start(const EvacStart& how) {
  if (Status s = check_rate_limit(how.rate); !s.is_ok()) return s;
  if (engine_.read_only()) return Status::error(EPERM, "the set is served read-only");
  if (auto c = core()) {
    const EvacProgress p = c->progress();
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
  if (std::string why = unfit_target(*target, engine_.size(), engine_.block_size());
      !why.empty()) {
    return Status::error(EINVAL, why);
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
                                       std::to_string(*at) + "): give --force to overwrite it");
    }
  }
  stop_thread();
  // The evacuation that ended is not to write the record any more.
  if (auto old = core()) old->retired_.store(true);
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
  auto c = std::make_shared<Core>(engine_, target, rec);
  {
    std::lock_guard l(mu_);
    core_ = c;
  }
  engine_.attach_mirror(c);
  log(LogLevel::kInfo, "evacuation to " + how.target + " started: " +
                           std::to_string(engine_.size() / engine_.block_size()) + " blocks" +
                           (how.rate ? ", at most " + std::to_string(how.rate) + " bytes/s" : ""));
  launch();
  return Status::ok();
}

// Pause and resume: the copy thread stops, the state moves `from` -> `to`
// (refused if a failure came meanwhile), the record says so, and the thread
// starts again (paused, it keeps the bitmap tidy: writes still go to both).
Status Evacuator::switch_state(EvacState from, EvacState to, const char* refusal) {
  auto c = core();
  if (!c || c->progress().state != from) return Status::error(EINVAL, refusal);
  stop_thread();
  {
    std::lock_guard l(c->mu_);
    if (c->state_ != from) {
      return Status::error(EINVAL, std::string("the evacuation is ") +
                                       evac_state_name(c->state_) + ": " + c->error_);
    }
    c->state_ = to;
    if (to == EvacState::kRunning) c->error_.clear();
  }
  Status s = to == EvacState::kPaused ? c->checkpoint(to) : c->save(to, c->rec_cursor(), false);
  if (c->live_.load()) launch();
  return s;
}

Status Evacuator::pause() {
  return switch_state(EvacState::kRunning, EvacState::kPaused, "no evacuation is copying");
}

Status Evacuator::resume() {
  return switch_state(EvacState::kPaused, EvacState::kRunning, "no evacuation is paused");
}

Status Evacuator::abort() {
  auto c = core();
  if (!c || !under_way(c->progress().state)) {
    return Status::error(EINVAL, "no evacuation is under way");
  }
  stop_thread();
  std::shared_ptr<BlockDevice> target;
  {
    std::unique_lock l(c->mu_);
    if (!c->live_.load()) {
      return Status::error(EINVAL, std::string("the evacuation is ") +
                                       evac_state_name(c->state_) + ": " + c->error_);
    }
    // Recorded before a write reaches the set alone (see change()).
    c->state_ = EvacState::kAborted;
    c->end_unsaved_.store(true);
    c->live_.store(false);
    // Writes already on their way to NEW finish before abort returns.
    c->cv_.wait_for(l, std::chrono::seconds(30), [&] { return c->held_.empty(); });
    target = c->target_;
    if (c->held_.empty()) c->target_.reset();
  }
  if (target) (void)target->flush();
  log(LogLevel::kWarning, "evacuation to " + c->progress().target +
                              " aborted: it is no longer written");
  return c->save_end();
}

Status Evacuator::set_rate(uint64_t bytes_per_second) {
  if (Status s = check_rate_limit(bytes_per_second); !s.is_ok()) return s;
  auto c = core();
  if (!c || !under_way(c->progress().state)) {
    return Status::error(EINVAL, "no evacuation is under way");
  }
  {
    std::lock_guard l(c->mu_);
    c->rate_limit_ = bytes_per_second;
  }
  c->cv_.notify_all();
  return Status::ok();
}

EvacProgress Evacuator::progress() {
  if (auto c = core()) return c->progress();
  EvacProgress p;
  p.blocks = engine_.size() / engine_.block_size();
  p.block_size = engine_.block_size();
  return p;
}

EvacProgress Evacuator::wait(std::chrono::milliseconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (true) {
    EvacProgress p = progress();
    const bool busy = p.state == EvacState::kRunning ||
                      (p.state == EvacState::kSynced && p.resync_regions > 0);
    if (!busy || std::chrono::steady_clock::now() >= until) return p;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

std::vector<uint64_t> Evacuator::lost_blocks(uint64_t first, uint64_t last) {
  auto c = core();
  if (!c) return {};
  return c->lost_blocks(first, last);
}

void Evacuator::run() {
  std::shared_ptr<Core> keep = core();
  Core& c = *keep;
  const uint64_t piece = std::max<uint64_t>(1, kPieceBytes / c.bs_);
  IoBuffer buf(piece * c.bs_);
  uint64_t data_until = 0;  // see Core::read_set
  c.last_save_ms_.store(now_ms());
  double seconds_per_byte = 0;
  int64_t next_try_ms = 0;  // of opening NEW again
  auto idle = [&](std::chrono::milliseconds d) {
    std::unique_lock l(c.mu_);
    c.cv_.wait_for(l, d, [&] { return c.halt_.load(); });
  };
  while (!c.halt_.load() && c.live_.load()) {
    EvacState state;
    uint64_t first = 0, last = 0;
    bool resync = false;
    std::shared_ptr<BlockDevice> target;
    {
      std::lock_guard l(c.mu_);
      state = c.state_;
      target = c.target_;
      if (target && state != EvacState::kPaused && !c.resync_.empty()) {
        // What a crash (or an outage) left comes first.
        const uint64_t region = c.resync_.front();
        if (c.resync_region_ != region) {
          c.resync_region_ = region;
          c.resync_pos_ = region * c.rb_;
        }
        first = std::max(region * c.rb_, c.resync_pos_);
        last = std::min({c.blocks_, (region + 1) * c.rb_, first + piece});
        resync = true;
      } else if (target && state == EvacState::kRunning && c.cursor_ < c.blocks_) {
        first = c.cursor_;
        last = std::min(c.blocks_, first + piece);
      }
    }
    if (!target) {
      // NEW is away: open it again every 5 s.
      if (now_ms() >= next_try_ms) {
        next_try_ms = now_ms() + 5000;
        std::string why;
        EvacRecord rec;
        {
          std::lock_guard g(c.save_mu_);
          rec = c.rec_;
        }
        if (auto dev = reopen_target(rec, target_open_, engine_.size(), engine_.block_size(),
                                     why)) {
          std::lock_guard l(c.mu_);
          c.target_ = dev;
          c.error_.clear();
          c.take_resync_from_bits();
          log(LogLevel::kInfo, "evacuation: NEW " + rec.target + " is back; " +
                                   std::to_string(c.resync_.size()) +
                                   " region(s) written meanwhile are copied again");
          continue;
        }
        std::lock_guard l(c.mu_);
        c.error_ = "waiting for NEW: " + why;
      }
      idle(std::chrono::milliseconds(500));
      continue;
    }
    if (last == 0) {
      if (state == EvacState::kRunning && c.cursor_ >= c.blocks_) {
        // Copied to the end: in sync once NEW and the set are flushed.
        if (c.checkpoint(EvacState::kSynced).is_ok()) {
          {
            std::lock_guard l(c.mu_);
            if (c.state_ == EvacState::kRunning) c.state_ = EvacState::kSynced;
            c.eta_ = 0;
          }
          log(LogLevel::kInfo, "evacuation: " + c.progress().target +
                                   " holds the whole disk and stays in sync (" +
                                   std::to_string(c.count_lost()) + " block(s) lost); writes keep "
                                   "going to both disks until the set is closed");
        } else if (!c.live_.load()) {
          break;
        } else {
          idle(std::chrono::seconds(1));
        }
        continue;
      }
      // Paused or in sync: writes still go to both; the bitmap is tidied
      // every 30 s.
      idle(std::chrono::milliseconds(500));
      if (!c.halt_.load() && now_ms() - c.last_save_ms_.load() >= kSaveEveryMs) {
        (void)c.checkpoint(state);
      }
      continue;
    }
    // Clients first.
    const auto t0 = std::chrono::steady_clock::now();
    for (int waited = 0; waited < kMaxYieldSteps && !c.halt_.load() &&
                         now_ms() - engine_.last_client_request_ms() < kClientQuietMs;
         ++waited) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (c.halt_.load()) break;
    Side side = Side::kNone;
    // Under mu_, as the piece's window closes: the place moves on.
    auto done = [&] {
      if (!resync) {
        c.cursor_ = last;
        return;
      }
      c.resync_pos_ = last;
      if (!c.resync_.empty() && c.resync_.front() == c.resync_region_ &&
          last >= std::min(c.blocks_, (c.resync_region_ + 1) * c.rb_)) {
        c.resync_.erase(c.resync_.begin());
        c.resync_region_ = ~uint64_t{0};
      }
    };
    Status s = c.copy_piece(*target, first, last, buf.data, side, done, &data_until);
    if (s.code() == ECANCELED || c.halt_.load()) break;
    if (!s.is_ok()) {
      if (side == Side::kTarget) {
        c.fail("NEW refused the copy's write at block " + std::to_string(first) + ": " +
               s.to_string());
        break;
      }
      // Main as a whole does not answer: no block is called lost for it;
      // wait, and try again.
      {
        std::lock_guard l(c.mu_);
        if (!c.waiting_main_) {
          log(LogLevel::kWarning, "evacuation waits at block " + std::to_string(first) + ": " +
                                      s.to_string());
        }
        c.waiting_main_ = true;
        c.error_ = "waiting: " + s.to_string();
      }
      idle(std::chrono::seconds(1));
      continue;
    }
    const double bytes = static_cast<double>(last - first) * c.bs_;
    {
      std::unique_lock l(c.mu_);
      c.waiting_main_ = false;
      c.error_.clear();
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
      const uint64_t left = c.blocks_ - c.cursor_ + c.resync_.size() * c.rb_;
      c.eta_ = c.rate_ > 0 ? static_cast<double>(left) * c.bs_ / c.rate_ : -1;
    }
    if (now_ms() - c.last_save_ms_.load() >= kSaveEveryMs) (void)c.checkpoint(state);
  }
  // Stopped (pause, abort, the Evacuator going): the place so far, flushed.
  if (c.live_.load() && !c.closing_.load()) {
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
  auto keep = core();
  if (!keep) return Status::error(EINVAL, "no evacuation to verify");
  Core& c = *keep;
  const EvacProgress p = c.progress();
  std::shared_ptr<BlockDevice> target = c.current_target();
  if (p.state == EvacState::kFinished) {
    OpenOptions o = target_open_;
    o.read_only = true;
    o.exclusive = false;
    auto opened = open_device(p.target, "NEW", o);
    if (!opened.is_ok()) return opened.take_status();
    target = opened.value();
  } else if (p.state != EvacState::kSynced || p.resync_regions > 0 || !target) {
    return Status::error(EINVAL, std::string("NEW is not in sync (the evacuation is ") +
                                     evac_state_name(p.state) +
                                     (p.resync_regions > 0 ? ", copying again what a crash left"
                                                           : "") +
                                     ")");
  }
  const std::vector<uint64_t> lost = c.lost_blocks(0, ~uint64_t{0});
  EvacVerify v;
  const uint64_t piece = std::max<uint64_t>(1, kPieceBytes / c.bs_);
  IoBuffer set_buf(piece * c.bs_), new_buf(piece * c.bs_);
  for (uint64_t first = 0; first < c.blocks_; first += piece) {
    if (stopping && stopping()) {
      v.stopped = true;
      break;
    }
    const uint64_t last = std::min(c.blocks_, first + piece);
    const uint64_t len = (last - first) * c.bs_;
    std::vector<uint64_t> bad;
    {
      // Clients' writes to this piece wait until both sides are read.
      std::unique_lock l(c.mu_);
      c.cv_.wait(l, [&] { return !c.win_active_ && !c.held_overlaps(first, last); });
      c.win_first_ = first;
      c.win_last_ = last;
      c.win_active_ = c.win_locked_ = true;
    }
    const Status rs = engine_.scan_read(set_buf.data, len, first * c.bs_, &bad, nullptr);
    const Status rn = target->read(new_buf.data, len, first * c.bs_);
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
      if (std::memcmp(set_buf.data + o, new_buf.data + o, c.bs_) != 0) {
        ++v.differ_count;
        if (v.differ.size() < kMaxListed) v.differ.push_back(b);
      }
    }
    if (step) step(last, c.blocks_);
  }
  return v;
}

}  // namespace dmremap
