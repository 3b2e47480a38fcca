// The surface scan (`dmremap scan`): reads every block of main through the
// engine, so that weak blocks are rescued to the spare and dead ones marked
// pending before a client needs them, as a disk's own background scan or
// ZFS's scrub does. One Scanner per engine, in the frontend that serves the
// set or in the CLI that opened it.
//
// - It reads in pieces of 256 KiB (or one block, if larger), each through
//   Engine::scan_read, and keeps to its rate limit (bytes per second, 0:
//   none), which may change while it runs.
// - It yields to clients: while a client request entered the engine in the
//   last 50 ms it waits, 10 ms at a time, for up to a second; then it reads
//   one piece anyway, so a busy set is still scanned, slowly.
// - Its place is saved in the spare's superblock at least every 30 s and
//   when it is paused, cancelled, finished or stopped, so it survives a kill
//   and a restart: a Scanner made on a set whose saved scan was running
//   goes on from there (a paused one stays paused).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "dmremap/engine.h"

namespace dmremap {

// The slowest rate a background task (scan, evacuation) takes, in bytes
// per second; 0 means no limit. EINVAL, with a message, below it.
inline constexpr uint64_t kMinRateLimit = 4096;
Status check_rate_limit(uint64_t rate);

enum class ScanState : uint32_t { kNone = 0, kRunning = 1, kPaused = 2, kDone = 3, kCancelled = 4 };
const char* scan_state_name(ScanState s);

struct ScanProgress {
  ScanState state = ScanState::kNone;
  uint64_t next_block = 0;    // the next block to read
  uint64_t blocks = 0;        // main's blocks
  uint32_t block_size = 0;
  uint64_t rate_limit = 0;    // bytes per second, 0: none
  double rate = 0;            // bytes per second read lately
  double eta_seconds = -1;    // -1: unknown
  int64_t started = 0;        // seconds since 1970, 0: never
  int64_t last_good_read = 0; // seconds since 1970 of the last piece that read, 0: none yet
  uint64_t unreadable = 0;    // blocks found unreadable (marked pending) by this scan
  uint64_t rescued = 0;       // blocks rescued while it ran (weak: read on a retry)
  // Both are kept with its place, across pauses and restarts.
  uint64_t yields = 0;        // times it waited for clients
  std::string error;          // why it stopped, when the engine refused (main offline...)
};

class Scanner {
 public:
  // Picks up the saved scan: a running one goes on at once.
  explicit Scanner(Engine& engine);
  // Stops the thread after the block it is on (a failed block is not
  // retried further, nor marked) and saves the place (the state stays as it
  // was, so the next Scanner on this set goes on).
  ~Scanner();
  Scanner(const Scanner&) = delete;
  Scanner& operator=(const Scanner&) = delete;

  // Starts a scan at block `from` (a new one, or again from there), or goes
  // on with a paused one when `from` is not given. EBUSY when one runs;
  // EINVAL for a rate below 4 KiB/s (other than 0, no limit). A thread of
  // an earlier run still ending its block is waited for first.
  Status start(std::optional<uint64_t> from, uint64_t rate_limit);
  Status pause();
  Status resume();
  Status cancel();
  // Takes effect at once, even in the middle of a wait. EINVAL as start().
  Status set_rate(uint64_t bytes_per_second);
  ScanProgress progress();

 private:
  void run();
  void launch();  // with mu_ held
  Status save(ScanState state);  // with mu_ held

  Engine& engine_;
  std::mutex mu_;
  std::condition_variable cv_;
  ScanProgress p_;        // under mu_
  bool stop_ = false;     // under mu_: the destructor's
  bool halt_ = false;     // under mu_: pause or cancel asked
  // Either of them, for the engine's read to stop at the block it is on.
  std::atomic<bool> interrupt_{false};
  std::thread thread_;
  int64_t last_save_ms_ = 0;
  double seconds_per_byte_ = 0;  // the rate's running average, guarded by mu_
};

}  // namespace dmremap
