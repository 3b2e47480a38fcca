// Evacuation (`dmremap evacuate`): copies the virtual disk (main merged with
// its remaps) onto a new disk, NEW, while clients keep using the set, so
// that the failing disk can be replaced. docs/evacuate.md is the user's
// guide; docs/design.md ("Evacuation") says why it works this way.
//
// - The copy reads each piece through the engine (retries, rescues and
//   pending marks as for a client, but not counted as one), so NEW gets the
//   repaired data. A block that cannot be read is written to NEW as zeros
//   and counted lost; the copy goes on.
// - Every client write, write-zeroes and trim is also made on NEW before it
//   is answered (FUA and FLUSH flush NEW too), so no acknowledged write
//   lives only on the old disk. Writes to the same blocks are kept in one
//   order on both disks. A piece the copy read while a client wrote to it
//   is read again, so the copy never puts old data over a newer write.
// - Its place is saved in the spare's superblock (EvacRecord) at least
//   every 30 s, and only after NEW has been flushed. Before a client write
//   reaches a region already copied, that region's bit is set in the
//   record's write-intent bitmap; bits are cleared once NEW and the set are
//   both flushed. After a crash the copy goes on from its saved place, and
//   first copies again every region whose bit is set.
// - It yields to clients, keeps to its rate limit, and waits while main is
//   offline (a disk that left the bus) instead of calling blocks lost.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dmremap/block_device.h"
#include "dmremap/engine.h"

namespace dmremap {

enum class EvacState : uint32_t {
  kNone = 0,
  kRunning = 1,   // copying; writes go to both disks
  kPaused = 2,    // not copying; writes still go to both disks
  kSynced = 3,    // NEW holds the whole disk; writes go to both disks
  kFailed = 4,    // NEW refused a write or could not be opened: ended
  kAborted = 5,   // ended by the user
  kFinished = 6,  // the set closed cleanly while in sync: NEW is complete
};
const char* evac_state_name(EvacState s);

struct EvacProgress {
  EvacState state = EvacState::kNone;
  std::string target;
  uint64_t target_size = 0;
  uint64_t next_block = 0;  // the copy's place: blocks below it are on NEW
  uint64_t blocks = 0;      // the set's blocks
  uint32_t block_size = 0;
  uint64_t rate_limit = 0;  // bytes per second, 0: none
  double rate = 0;          // bytes per second lately
  double eta_seconds = -1;  // -1: unknown
  int64_t started = 0;      // seconds since 1970
  int64_t synced = 0;       // when NEW first held the whole disk, 0: not yet
  uint64_t lost = 0;        // blocks the copy could not read (zeros on NEW)
  uint64_t resync_regions = 0;  // regions still to copy again after a crash
  uint64_t region_blocks = 0;
  uint64_t mirrored = 0;    // client changes made on NEW too, since open
  bool waiting_for_main = false;
  bool target_away = false;  // under way, but NEW cannot be opened now
  std::string error;        // why it failed, or what it waits for
};

// What `start` needs.
struct EvacStart {
  std::string target;      // a path or an NBD URI
  uint64_t rate = 0;       // bytes per second, 0: no limit
  bool force = false;      // NEW may hold data
};

// What a verification found.
struct EvacVerify {
  uint64_t compared = 0;  // blocks read on both disks and compared
  uint64_t lost = 0;      // blocks skipped: lost (unreadable in the set)
  std::vector<uint64_t> differ;  // blocks that differ (the first 1000)
  uint64_t differ_count = 0;
  bool stopped = false;   // told to stop before the end
};

class Evacuator {
 public:
  // `target_open`: how NEW is opened (direct I/O, timeouts). `set_specs`:
  // main's and the spare's paths or URIs, which NEW may not be.
  // Picks up the saved evacuation: one running, paused or in sync opens NEW
  // again (it must be the same size and disk) and mirrors writes from now
  // on; a running one goes on copying at once, first copying again the
  // regions the write-intent bitmap names. When NEW cannot be opened the
  // evacuation fails (logged): writes reach only the set from then on.
  Evacuator(Engine& engine, OpenOptions target_open, std::vector<std::string> set_specs);
  // Stops the copy after its piece and saves its place. The mirror stays
  // attached to the engine, which closes it (Engine::close).
  ~Evacuator();
  Evacuator(const Evacuator&) = delete;
  Evacuator& operator=(const Evacuator&) = delete;

  // Starts a new evacuation. EBUSY while one is running, paused or in sync;
  // EINVAL for a NEW smaller than the set, one that is main or the spare,
  // or a rate under 4 KiB/s; EEXIST for a NEW that holds data without
  // `force`; open errors as open_device says them.
  Status start(const EvacStart& how);
  Status pause();
  Status resume();
  // Ends it: NEW is no longer written. EINVAL when none is under way.
  Status abort();
  Status set_rate(uint64_t bytes_per_second);
  EvacProgress progress();
  // Waits until the copy is not running (in sync, paused, failed...) or
  // `timeout` passes; returns the progress then.
  EvacProgress wait(std::chrono::milliseconds timeout);
  // Blocks NEW does not hold: pending in the set, or that the copy could
  // not read, below the copy's place. Sorted.
  // Only those in [first, last) with a range.
  std::vector<uint64_t> lost_blocks(uint64_t first = 0, uint64_t last = ~uint64_t{0});
  // Compares NEW with the set, block by block, skipping lost blocks.
  // Clients writing to the piece being compared wait for it. `stopping` is
  // asked between pieces; `step` is told the blocks done. EINVAL unless NEW
  // is in sync (or finished: then NEW is opened read-only for it).
  Result<EvacVerify> verify(const std::function<bool()>& stopping = {},
                            const std::function<void(uint64_t, uint64_t)>& step = {});

  class Core;  // the mirror and the record (evacuate.cc)

 private:
  void run();
  void stop_thread();
  void launch();  // the copy thread
  Status switch_state(EvacState from, EvacState to, const char* refusal);
  std::shared_ptr<Core> core();

  Engine& engine_;
  OpenOptions target_open_;
  std::vector<std::string> set_specs_;
  std::shared_ptr<Core> core_;
  std::mutex mu_;
  std::thread thread_;
};

}  // namespace dmremap
