#include "dmremap/scan.h"

#include <algorithm>
#include <ctime>
#include <vector>

#include "dmremap/log.h"

namespace dmremap {

namespace {
constexpr uint64_t kPieceBytes = 256 * 1024;
constexpr int64_t kSaveEveryMs = 30000;
// A client request this recent makes the scan wait...
constexpr int64_t kClientQuietMs = 50;
constexpr auto kYieldStep = std::chrono::milliseconds(10);
// ... but for no longer than this before it reads one piece anyway.
constexpr int kMaxYieldSteps = 100;

int64_t unix_now() { return static_cast<int64_t>(std::time(nullptr)); }
}  // namespace

const char* scan_state_name(ScanState s) {
  switch (s) {
    case ScanState::kNone: return "none";
    case ScanState::kRunning: return "running";
    case ScanState::kPaused: return "paused";
    case ScanState::kDone: return "done";
    case ScanState::kCancelled: return "cancelled";
  }
  return "unknown";
}

Scanner::Scanner(Engine& engine) : engine_(engine) {
  const Engine::ScanMark m = engine_.saved_scan();
  p_.block_size = engine_.block_size();
  p_.blocks = engine_.size() / engine_.block_size();
  p_.state = m.state <= static_cast<uint32_t>(ScanState::kCancelled) ? static_cast<ScanState>(m.state)
                                                                      : ScanState::kNone;
  p_.next_block = std::min(m.next, p_.blocks);
  p_.started = static_cast<int64_t>(m.started);
  p_.rate_limit = m.rate;
  p_.unreadable = m.unreadable;
  p_.rescued = m.rescued;
  std::lock_guard l(mu_);
  if (p_.state == ScanState::kRunning) {
    log(LogLevel::kInfo, "surface scan: going on from block " + std::to_string(p_.next_block) +
                             " of " + std::to_string(p_.blocks) + " (saved " +
                             utc_time(static_cast<int64_t>(m.saved)) + ")");
    launch();
  }
}

Scanner::~Scanner() {
  {
    std::lock_guard l(mu_);
    stop_ = true;
    interrupt_.store(true);
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

Status check_rate_limit(uint64_t rate) {
  if (rate != 0 && rate < kMinRateLimit) {
    return Status::error(EINVAL, "a rate of " + std::to_string(rate) +
                                     " bytes/s is too slow to mean anything: 4096 at least, or 0 "
                                     "for no limit");
  }
  return Status::ok();
}

Status Scanner::start(std::optional<uint64_t> from, uint64_t rate_limit) {
  if (Status s = check_rate_limit(rate_limit); !s.is_ok()) return s;
  std::unique_lock l(mu_);
  if (p_.state == ScanState::kRunning) {
    return Status::error(EBUSY, "a scan is running (block " + std::to_string(p_.next_block) +
                                    " of " + std::to_string(p_.blocks) + ")");
  }
  if (from && *from >= p_.blocks) {
    return Status::error(EINVAL, "block " + std::to_string(*from) + " is past the end (main has " +
                                     std::to_string(p_.blocks) + " blocks)");
  }
  // A thread of an earlier run (paused or cancelled) may still be ending
  // its block: it goes first, so that it cannot write over this run.
  if (thread_.joinable()) {
    halt_ = true;
    interrupt_.store(true);
    cv_.notify_all();
    l.unlock();
    thread_.join();
    l.lock();
  }
  const ScanProgress before = p_;
  const bool go_on = !from && p_.state == ScanState::kPaused;
  if (!go_on) {
    p_.next_block = from.value_or(0);
    p_.started = unix_now();
    p_.unreadable = p_.rescued = p_.yields = 0;
    p_.last_good_read = 0;
  }
  p_.rate_limit = rate_limit;
  p_.rate = 0;
  seconds_per_byte_ = 0;
  p_.eta_seconds = -1;
  p_.error.clear();
  p_.state = ScanState::kRunning;
  // Saved before it runs: a kill in the first 30 s still finds it.
  if (Status s = save(ScanState::kRunning); !s.is_ok()) {
    p_ = before;  // nothing changed
    return s;
  }
  launch();
  return Status::ok();
}

Status Scanner::pause() {
  std::lock_guard l(mu_);
  if (p_.state != ScanState::kRunning) return Status::error(EINVAL, "no scan is running");
  p_.state = ScanState::kPaused;
  halt_ = true;
  interrupt_.store(true);
  cv_.notify_all();
  // Saved now (a kill before the thread ends its block finds it paused),
  // and again by the thread with the place where it stopped.
  return save(ScanState::kPaused);
}

Status Scanner::resume() {
  uint64_t rate = 0;
  {
    std::lock_guard l(mu_);
    if (p_.state != ScanState::kPaused) return Status::error(EINVAL, "no scan is paused");
    rate = p_.rate_limit;
  }
  return start(std::nullopt, rate);
}

Status Scanner::cancel() {
  std::lock_guard l(mu_);
  if (p_.state != ScanState::kRunning && p_.state != ScanState::kPaused) {
    return Status::error(EINVAL, "no scan is running or paused");
  }
  p_.state = ScanState::kCancelled;
  halt_ = true;
  interrupt_.store(true);
  cv_.notify_all();
  return save(ScanState::kCancelled);
}

Status Scanner::set_rate(uint64_t bytes_per_second) {
  if (Status s = check_rate_limit(bytes_per_second); !s.is_ok()) return s;
  std::lock_guard l(mu_);
  p_.rate_limit = bytes_per_second;
  cv_.notify_all();  // a wait under the old rate ends
  return Status::ok();
}

ScanProgress Scanner::progress() {
  std::lock_guard l(mu_);
  return p_;
}

void Scanner::launch() {
  halt_ = false;
  interrupt_.store(false);
  last_save_ms_ = now_ms();
  thread_ = std::thread([this] { run(); });
}

Status Scanner::save(ScanState state) {
  Engine::ScanMark m;
  m.next = p_.next_block;
  m.state = static_cast<uint32_t>(state);
  m.started = static_cast<uint64_t>(p_.started);
  m.saved = static_cast<uint64_t>(unix_now());
  m.rate = p_.rate_limit;
  m.unreadable = p_.unreadable;
  m.rescued = p_.rescued;
  last_save_ms_ = now_ms();
  Status s = engine_.save_scan(m);
  if (!s.is_ok()) {
    log(LogLevel::kWarning, "surface scan: its place could not be saved: " + s.to_string());
  }
  return s;
}

void Scanner::run() {
  const uint32_t bs = p_.block_size;
  const uint64_t piece_blocks = std::max<uint64_t>(1, kPieceBytes / bs);
  std::vector<char> buf(piece_blocks * bs);
  std::unique_lock l(mu_);
  // This run's start, for the rate the scan ends with.
  const auto run_began = std::chrono::steady_clock::now();
  const uint64_t run_first = p_.next_block;
  while (!stop_ && !halt_ && p_.next_block < p_.blocks) {
    const uint64_t first = p_.next_block;
    const uint64_t count = std::min(piece_blocks, p_.blocks - first);
    l.unlock();
    // Clients first.
    const auto t0 = std::chrono::steady_clock::now();
    int waited = 0;
    while (waited < kMaxYieldSteps && !interrupt_.load() &&
           now_ms() - engine_.last_client_request_ms() < kClientQuietMs) {
      std::this_thread::sleep_for(kYieldStep);
      ++waited;
    }
    // Rescued: weak blocks that read on a retry, and slow ones (slow=).
    auto rescues = [this] {
      return engine_.remaps_by(Cause::kRescue) + engine_.remaps_by(Cause::kSlow);
    };
    const uint64_t rescues_before = rescues();
    std::vector<uint64_t> bad;
    const Status s = interrupt_.load()
                         ? Status::error(ECANCELED, "stopping")
                         : engine_.scan_read(buf.data(), count * bs, first * bs, &bad, &interrupt_);
    const double took =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const uint64_t rescues_after = rescues();
    l.lock();
    if (waited > 0) ++p_.yields;
    if (s.code() == ECANCELED) break;  // told to stop: this piece is read again next time
    if (!s.is_ok() && bad.empty()) {
      // Not a bad block: main as a whole, or the engine, refused. Paused,
      // to go on when the admin says so.
      p_.error = s.to_string();
      p_.state = ScanState::kPaused;
      log(LogLevel::kWarning, "surface scan paused at block " + std::to_string(first) + ": " +
                                  p_.error);
      break;
    }
    p_.unreadable += bad.size();
    if (bad.size() < count) p_.last_good_read = unix_now();
    p_.next_block = first + count;
    // Rescues by clients at the same time count too: close enough.
    p_.rescued += rescues_after - rescues_before;
    const double bytes = static_cast<double>(count) * bs;
    // The rate limit: this piece takes at least its share of a second.
    // (A new rate ends the wait: the next piece keeps to it.)
    if (const uint64_t limit = p_.rate_limit; limit > 0) {
      const double share = bytes / static_cast<double>(limit);
      if (took < share) {
        cv_.wait_for(l, std::chrono::duration<double>(share - took),
                     [&] { return stop_ || halt_ || p_.rate_limit != limit; });
      }
    }
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // Averaged as time per byte, not as rates: a piece that took a second
    // weighs as a second (an average of rates would follow the fast ones).
    const double spb = elapsed / bytes;
    seconds_per_byte_ = seconds_per_byte_ == 0 ? spb : 0.9 * seconds_per_byte_ + 0.1 * spb;
    p_.rate = seconds_per_byte_ > 0 ? 1 / seconds_per_byte_ : 0;
    p_.eta_seconds = p_.rate > 0
                         ? static_cast<double>(p_.blocks - p_.next_block) * bs / p_.rate
                         : -1;
    if (now_ms() - last_save_ms_ >= kSaveEveryMs) (void)save(p_.state);
  }
  if (!stop_ && !halt_ && p_.state == ScanState::kRunning && p_.next_block >= p_.blocks) {
    p_.state = ScanState::kDone;
    p_.eta_seconds = 0;
    // Done: the rate of the whole run, waits included.
    const double run_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - run_began).count();
    if (run_seconds > 0) {
      p_.rate = static_cast<double>(p_.blocks - run_first) * bs / run_seconds;
    }
    log(LogLevel::kInfo, "surface scan done: " + std::to_string(p_.blocks) + " blocks read, " +
                             std::to_string(p_.unreadable) + " unreadable (marked pending), " +
                             std::to_string(p_.rescued) + " rescued");
  }
  // The place, as it is now: a scan stopped by the destructor stays
  // "running", so that the next start of the frontend goes on with it.
  (void)save(p_.state);
}

}  // namespace dmremap
