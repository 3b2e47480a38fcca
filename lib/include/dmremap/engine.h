// The remapping engine: a virtual disk over a failing main and a spare.
#pragma once

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dmremap/block_device.h"
#include "dmremap/latency.h"
#include "dmremap/metadata_store.h"
#include "dmremap/remap_table.h"

namespace dmremap {

struct EngineOptions {
  // Extra reads of a block that failed, before it is declared unreadable:
  // every read that included the block counts, so 3 means four in all.
  unsigned read_retries = 3;
  // ... and no new attempt starts once the block's own reads have taken this
  // long in all (a disk without TLER may spend minutes per attempt); one
  // retry is always made.
  std::chrono::milliseconds retry_time{30000};
  // Slow-read rescue (`slow=`): a read of main that succeeds but takes
  // longer than this, and kSlowFactor times main's usual read, is slow; the
  // blocks it names are copied to the spare with the cause `slow`, as a
  // disk's firmware reallocates a sector that read only after its long
  // internal retries. 0: off (the default).
  std::chrono::milliseconds slow_read{0};
  // Refuse writes (EPERM); nothing on the spare is written, not even rescues.
  bool read_only = false;
  // Salvage mode (`unreadable=zero`): an unreadable block reads as zeros
  // instead of failing. Off by default; every such read is logged.
  bool unreadable_zero = false;
  // Health turns to "warning" when this share of the pool is used.
  unsigned warn_percent = 80;
  // While main is offline it is tried again after this wait, doubled after
  // each failed attempt up to `reconnect_max`.
  std::chrono::milliseconds reconnect_first{500};
  std::chrono::milliseconds reconnect_max{8000};
  // A spare that cannot be locked (an NBD export) is leased instead: the
  // superblock is rewritten at this interval, and opening a set that is in
  // use first watches it for two intervals (see MetadataStore::heartbeat).
  std::chrono::milliseconds lease_interval{2000};
  // Seeds the choice of probe blocks (reads rule 7); 0 picks a random seed.
  // Tests set it, so that a run can be repeated.
  uint64_t probe_seed = 0;
};

enum class Health { kOk, kWarning, kFailing };
// "2026-11-30T16:19:06Z" for seconds since the epoch.
std::string utc_time(int64_t seconds);
// Milliseconds of the steady clock.
int64_t now_ms();
int64_t now_us();
// A slow read (EngineOptions::slow_read) also takes this many times main's
// usual read: a main that is slow everywhere (USB, a network) is not
// remapped block by block.
inline constexpr int64_t kSlowFactor = 20;
// The first reads of main after open, which only teach its usual read time.
inline constexpr uint64_t kSlowWarmup = 16;
// Slow reads less than this apart are the device's, not a sector's.
inline constexpr int64_t kSlowQuietMs = 30000;
// A read that starts this long after main last answered may have waited
// for a spin-up: not taken as slow blocks.
inline constexpr int64_t kSlowIdleMs = 30000;
// The longest slow read that is read again block by block to find its
// slow blocks: a scan's piece (64 blocks of 4 KiB, 512 of 512 bytes).
inline constexpr uint64_t kSlowPinpointBytes = 256 * 1024;
const char* health_name(Health h);

// The requests whose time is measured (EngineStats::latency).
enum LatencyOp { kLatencyRead, kLatencyWrite, kLatencyFlush, kLatencyOps };

// Counters for `dmremap status` and the frontends. Remap, pending and slot
// figures come from the spare's metadata; the rest count since open.
struct EngineStats {
  uint64_t reads = 0, writes = 0, flushes = 0, trims = 0, zeroes = 0;
  uint64_t bytes_read = 0, bytes_written = 0;
  uint64_t main_read_errors = 0, main_write_errors = 0;
  uint64_t retry_successes = 0, unreadable_reads = 0, slot_write_errors = 0;
  // Group commit: batches written, records in them, and flushes of the
  // spare the engine asked for (slot data, journal, FLUSH requests).
  uint64_t commit_groups = 0, commit_records = 0, spare_flushes = 0;
  uint64_t remaps = 0, pending = 0;
  uint64_t remaps_by_cause[6] = {};  // indexed by Cause
  // Reads of main that were slow (EngineOptions::slow_read), counted
  // whether or not they were rescued.
  uint64_t slow_reads = 0;
  uint64_t slots_total = 0, slots_used = 0, slots_bad = 0, slots_free = 0;
  uint64_t pending_capacity = 0;
  bool journal_broken = false;
  // Main as a whole stopped answering (reads rule 7): since when (seconds
  // since the epoch, 0 while online) and why.
  int64_t main_offline_since = 0;
  std::string main_offline_reason;
  // The spare stopped answering as a whole (seconds since the epoch): a
  // slot or journal write, or a lease renewal, failed with a device errno;
  // until it takes a journal write or lease renewal again. 0 otherwise. Not part of health: its effects (reads of remapped
  // blocks and new remaps fail) are, as errors.
  int64_t spare_offline_since = 0;
  // An NBD spare's lease not renewed for 2.5 intervals: every request fails
  // (safety rule 3). How long, in seconds; 0 otherwise.
  int64_t lease_lapsed_seconds = 0;
  // How long reads, writes and flushes took, since open.
  LatencyHistogram::Snapshot latency[kLatencyOps];
  // A flush failed with writes outstanding: FLUSH and FUA fail until restart.
  std::string flush_failure;
  // Metadata kept in one copy instead of two (a superblock or journal copy
  // that refuses writes), in words.
  std::vector<std::string> metadata_degraded;
  Health health = Health::kOk;
  std::string health_reason;  // the worst problem, in words
  // Every problem that applies, worst first, as keys: main_offline,
  // lease_lapsed, flush_failed, journal_broken, pool_exhausted, metadata_degraded,
  // pool_nearly_full, pending.
  std::vector<std::string> health_problems;
};
// Every key EngineStats::health_problems may hold, worst first.
inline constexpr const char* kHealthProblems[] = {
    "main_offline",   "lease_lapsed",      "flush_failed",     "journal_broken",
    "pool_exhausted", "metadata_degraded", "pool_nearly_full", "pending"};
// Health from the persistent figures alone (also used offline by the CLI).
void assess_health(EngineStats& s, unsigned warn_percent);
// Fills the persistent figures (remaps, pending, slots) from a table and its
// superblock, then the health. Used by Engine::stats() and, offline, by
// `dmremap status`.
void fill_table_stats(EngineStats& s, const RemapTable& table, const Superblock& sb,
                      unsigned warn_percent);

// A read/write lock that lets a waiting writer in ahead of new readers, so a
// commit is not starved by a stream of lookups. Guards the remap table; it
// is never held across device I/O.
class GateLock {
 public:
  GateLock();
  ~GateLock();
  GateLock(const GateLock&) = delete;
  GateLock& operator=(const GateLock&) = delete;
  void lock_shared() { pthread_rwlock_rdlock(&rw_); }
  void unlock_shared() { pthread_rwlock_unlock(&rw_); }
  void lock() { pthread_rwlock_wrlock(&rw_); }
  void unlock() { pthread_rwlock_unlock(&rw_); }

 private:
  pthread_rwlock_t rw_;
};

// Sees every change a client makes to the virtual disk, around the
// engine's own work: an evacuation (lib/evacuate.h) copies each write to
// the new disk before the write is answered. Attached with
// Engine::attach_mirror; called from many threads at once.
class WriteMirror {
 public:
  enum class Op { kWrite, kZeroes, kTrim };
  virtual ~WriteMirror() = default;
  // A write, write-zeroes or trim of [offset, offset+len), checked and
  // admitted by the engine: `apply` does the set's part and its status is
  // the request's. `buf` is null but for kWrite.
  virtual Status change(Op op, const void* buf, uint64_t len, uint64_t offset, bool fua,
                        const std::function<Status()>& apply) = 0;
  // After a FLUSH of the set that worked.
  virtual void flushed() = 0;
  // Blocks [first, last) are about to read differently without a client
  // write (a pending mark cleared by forget-pending): called before it is
  // recorded; an error stops the change.
  virtual Status will_change(uint64_t first, uint64_t last) = 0;
  // ... and after: they now read differently.
  virtual void refresh(uint64_t first, uint64_t last) = 0;
  // Engine::close, once requests have drained and the set is flushed:
  // the record to write with the clean checkpoint, if it changed.
  virtual std::optional<EvacRecord> closing() = 0;
};

// Reads and writes the virtual disk (exactly main's size) as
// docs/behaviour.md says. All public methods are thread-safe and may be
// called from many threads at once.
//
// Concurrency. No lock is held across device I/O on the fast path: a
// request looks its blocks up in the table (the gate, shared, for the
// lookup only), then reads and writes main and the spare. Whatever changes
// what one block holds outside the fast path (retries and rescue, a pending
// mark, read-modify-write of a partial block, a write-error remap, moving a
// failing slot) first *claims* that block: writes that reach the block
// afterwards wait for the claim, and the claim waits for writes already on
// their way to it to finish. So no write can slip between the read of a
// block's data and the moment its remap becomes visible, and a bad block
// holds up only the requests that touch it. Remaps that are ready at the
// same time share one flush of the slots' data and one journal append
// (group commit); the order for each is unchanged: data durable, record
// durable, visible, reply.
//
// A failure of main is judged on evidence about the block: a media errno
// (ENODATA, EILSEQ, EBADMSG) is, a device errno (ENODEV, ENOTCONN, ...) is
// not, and a plain EIO (or one request timing out) is only when main still
// reads a block that read before. Otherwise main is offline: requests that
// need it fail with EIO at once, nothing is journaled, blocks on the spare
// are still served, and main is reconnected (BlockDevice::reconnect) with
// backoff.
class Engine {
 public:
  // Opens the set. Refuses a spare formatted for another main (size or
  // identity differ), an unformatted spare, or damaged metadata, each with
  // a message that says what to do.
  static Result<std::unique_ptr<Engine>> open(std::shared_ptr<BlockDevice> main,
                                               std::shared_ptr<BlockDevice> spare,
                                               const EngineOptions& options,
                                               OpenReport* report = nullptr);
  // Does no I/O: call close() for a clean shutdown.
  ~Engine();

  uint64_t size() const { return size_; }
  uint32_t block_size() const { return block_; }
  bool read_only() const { return options_.read_only; }
  // True when write_zeroes() never falls back to writing buffers of zeros on
  // healthy blocks.
  bool can_fast_zero() const { return main_->can_fast_zero() && spare_->can_fast_zero(); }
  // Not while requests run: checkpoints and the lease rewrite it.
  const Superblock& superblock() const { return store_->superblock(); }
  // A copy of it, taken under the lock that its writers hold: for the
  // fields fixed at format (identity, sizes), at any time.
  Superblock geometry();

  // Out of range: EINVAL. An unreadable block: EIO, with error_offset() the
  // first byte of the request that could not be read; every other byte of
  // `buf` holds the right data.
  Status read(void* buf, uint64_t len, uint64_t offset) { return read(buf, len, offset, nullptr); }
  // As above; when the error is unreadable blocks, `unreadable` receives
  // every one of them, sorted, so that a frontend can send the good bytes on
  // both sides of each (NBD's ERROR_OFFSET chunks).
  Status read(void* buf, uint64_t len, uint64_t offset, std::vector<uint64_t>* unreadable);
  // Past the end: ENOSPC. Read-only: EPERM. Needs a slot and none is left:
  // ENOSPC. Journal broken: EIO. With `fua`, durable before it returns.
  Status write(const void* buf, uint64_t len, uint64_t offset, bool fua);
  // With `fast` (NBD's FAST_ZERO), ENOTSUP at once, having done nothing,
  // when zeroing would not be faster than writing: a device that cannot
  // zero quickly, or remapped or pending blocks in the range (their zeros
  // are written to the spare).
  Status write_zeroes(uint64_t len, uint64_t offset, bool fua, bool fast = false);
  // Passed to main for unmapped blocks; remapped and pending blocks keep
  // their state. Past the end: EINVAL (the NBD rule for trims).
  Status trim(uint64_t len, uint64_t offset, bool fua);
  // Makes every write that has completed durable on main and spare. A
  // flush that fails while writes are outstanding is sticky: this and every
  // later flush (and FUA) fail with EIO until restart, since the kernel
  // reports a lost buffered write to one fsync only.
  Status flush();

  // `dmremap remap BLOCK`: moves a block to a slot, with its data when it
  // reads; an unreadable block is marked pending (EIO). EEXIST if already
  // remapped.
  Status remap_block(uint64_t block);
  // `dmremap forget-pending`: clears the pending mark of each listed block
  // that main reads now (the mark was wrong, or the sector recovered), with
  // one checkpoint for all of them; a block that still fails keeps its mark.
  // Each block is read once, with no retries and no claim held, so clients
  // are not held up; the marks are then cleared under claims of only the
  // blocks that read, after checking they are still pending.
  struct ForgetResult {
    std::vector<uint64_t> cleared;  // read now: mark cleared
    std::vector<uint64_t> kept;     // still unreadable: mark kept
    std::vector<uint64_t> moved;    // a write gave it a slot meanwhile
    std::vector<uint64_t> untried;  // `stopping` said stop before them
  };
  // `listed`: the caller named the blocks, so each must be pending (EINVAL
  // for one that is not, or past the end, and nothing is changed). Without
  // it (--all) a block that is no longer pending is reported as moved.
  // `stopping` is asked before each read. EPERM read-only; EIO when the
  // checkpoint cannot be written (every mark stays; `cleared` is empty).
  Status forget_pending(const std::vector<uint64_t>& blocks, bool listed, ForgetResult& result,
                        const std::function<bool()>& stopping = {});
  // Describes [offset, offset+len) as runs of data and holes, in order and
  // without gaps: fn(offset, length, hole). A hole reads as zeros. Remapped
  // and pending blocks are always data; elsewhere main says (a file's
  // holes; a device that cannot tell is all data). Runs may extend past the
  // range's end up to a block boundary.
  Status extents(uint64_t len, uint64_t offset,
                 const std::function<void(uint64_t, uint64_t, bool)>& fn);
  // Calls fn(entry) for every remapped or pending block in [first, last).
  void for_each_entry(uint64_t first, uint64_t last,
                      const std::function<void(const RemapTable::Entry&)>& fn);
  // The surface scan (lib/scan.h). Its place, as the superblock keeps it.
  struct ScanMark {
    uint64_t next = 0;
    uint32_t state = 0;  // ScanState
    uint64_t started = 0, saved = 0, rate = 0;
    uint64_t unreadable = 0, rescued = 0;  // what it found so far
  };
  ScanMark saved_scan();
  // Writes it to the superblock and flushes. EPERM read-only; EIO once the
  // lease has lapsed. Losing it is harmless (the scan reads a little
  // again), so it is written as a lease renewal is: expendable.
  Status save_scan(const ScanMark& mark);
  // The evacuation's record, as the superblock keeps it.
  EvacRecord saved_evacuation();
  // Writes it to the superblock and flushes (durable when ok). EPERM
  // read-only; EIO once closed or the lease has lapsed.
  Status save_evacuation(const EvacRecord& record);
  // Every client write, write-zeroes, trim and flush from now on goes
  // through `mirror` too (null: none). Returns once the writes that began
  // without it have finished.
  void attach_mirror(std::shared_ptr<WriteMirror> mirror);
  // While one lives, this thread's requests are a background task's (an
  // evacuation's), not a client's: the scan and the copy do not back off
  // for them (last_client_request_ms).
  class Background {
   public:
    Background();
    ~Background();
    Background(const Background&) = delete;
    Background& operator=(const Background&) = delete;

   private:
    bool was_;
  };
  // Flushes main and the spare for a background task (an evacuation's
  // save): not counted as a client's request.
  Status flush_background();
  // False while main as a whole does not answer (reads rule 7).
  bool main_is_online() const { return main_online(); }
  // Records the frontend's control socket (an absolute path) in the
  // superblock, written as save_scan is, so that `dmremap ... --spare`
  // finds the frontend; a clean close clears it. EPERM read-only.
  Status advertise_control(const std::string& path);
  // A read as Engine::read does it (weak blocks rescued, dead ones marked
  // pending), but not a client's: it does not count as client activity,
  // which the scan backs off for (last_client_request_ms), and salvage mode
  // does not hide its unreadable blocks. When `stop` turns true, the
  // failed blocks not yet retried are left alone (not marked) and the read
  // ends with ECANCELED: a scan stops after the block it is on.
  Status scan_read(void* buf, uint64_t len, uint64_t offset, std::vector<uint64_t>* unreadable,
                   const std::atomic<bool>* stop = nullptr);
  // now_ms() of the last client request that entered the engine, 0 if none.
  int64_t last_client_request_ms() const { return last_client_ms_.load(std::memory_order_relaxed); }

  // Copies of at most `max` entries from block `from` on that `want`
  // accepts, in block order. The table's lock is held only while they are
  // copied, and the walk stops at the first entry past them.
  std::vector<RemapTable::Entry> entries(uint64_t from, size_t max,
                                         const std::function<bool(const RemapTable::Entry&)>& want);
  // `dmremap import`: marks `blocks` pending without reading them, as known
  // bad from another tool's list, so that no read waits on them. Blocks
  // already remapped or pending are left as they are. Refused as a whole
  // (ENOSPC) when the pending list has no room for all the new ones; EINVAL
  // for a block past the end. `stopping` is asked between journal units.
  struct KnownBadResult {
    uint64_t marked = 0, already = 0, untried = 0;
  };
  Status mark_known_bad(const std::vector<uint64_t>& blocks, KnownBadResult& result,
                        const std::function<bool()>& stopping = {});
  // Blocks mark_known_bad marks per group commit: well inside one journal
  // unit (168 records), which the round's other commits share.
  static constexpr size_t kImportBatch = 64;
  // Blocks of the list that are new (neither remapped nor pending) and the
  // room the pending list has: what mark_known_bad checks first.
  struct KnownBadRoom {
    uint64_t fresh = 0, room = 0;
  };
  KnownBadRoom known_bad_room(const std::vector<uint64_t>& blocks);
  // The spare's bad slots, sorted.
  std::vector<uint64_t> bad_slots();
  // Blocks remapped for `cause` (a count the table keeps; no stats built).
  uint64_t remaps_by(Cause cause);
  // When each of `slots` was handed out (read_slot_times): reads of the
  // spare, with no lock held; all unknown while the spare is away.
  std::vector<uint64_t> slot_times(const std::vector<uint64_t>& slots);
  // Where `slot` lies on the spare, in bytes.
  uint64_t slot_spare_offset(uint64_t slot) const { return slot_offset(slot); }
  EngineStats stats();
  // Refuses new requests, waits for those in flight, flushes and writes a
  // clean checkpoint; the engine refuses I/O after. With `wait`, gives up
  // after that long: EBUSY, and the set is left as after a crash (the
  // journal is consistent; nothing more is journaled, no clean mark is
  // written). The engine must then outlive the requests still running:
  // a frontend exits without destroying it.
  Status close(std::optional<std::chrono::milliseconds> wait = std::nullopt);
  // Requests running now.
  int64_t in_flight() const { return active_.load(); }
  // Requests waiting for a group commit now: a frontend that runs requests
  // one at a time while the disk keeps up should run more at once then, so
  // that they share the commit.
  int waiting_for_commit() const { return commit_waiters_.load(std::memory_order_relaxed); }

  // A remap that finds this many slots in a row refusing writes records them
  // as bad before trying more; if that journal write fails too, the spare is
  // failing and the write gets EIO.
  static constexpr size_t kSlotFailuresPerCheck = 8;

 private:
  Engine(std::shared_ptr<BlockDevice> main, std::shared_ptr<BlockDevice> spare,
         std::unique_ptr<MetadataStore> store, RemapTable table, const EngineOptions& options);

  // Admission: every public request holds one while it runs, so that
  // close() knows when none is left.
  class Admit;
  // Why the table may not change now (closed, lease lapsed, read-only, the
  // journal broken), or ok: for remap, forget-pending and import.
  Status refuse_table_change(const Admit& admit);
  // A claim on one block (see the class comment); released on destruction.
  class Claim;
  // Whether someone holds a claim on `block` now.
  bool is_claimed(uint64_t block);
  // A chunk of a write or trim, counted against claims while it is on its
  // way to its blocks.
  class CountedChunk;
  // One remap, pending mark or list of bad slots on its way to the journal.
  struct Commit;

  enum class Data { kBuffer, kZeroes };
  Status do_write(const char* src, Data kind, uint64_t len, uint64_t offset, bool fua);
  Status do_trim(uint64_t len, uint64_t offset, bool fua);
  uint64_t slot_offset(uint64_t slot) const;
  // What a read found on its way: blocks main failed on (to retry), with
  // the reads of each that were made already; blocks that cannot be read
  // (pending, or a slot the spare fails on); the first byte not served
  // because main is offline; and when the first failed read began.
  struct ReadFindings {
    struct Failed {
      uint64_t block;
      unsigned attempts;  // reads that included it so far
      int64_t spent_ms;   // and the time they took
    };
    std::vector<Failed> failed;
    std::vector<uint64_t> unreadable;
    std::vector<uint64_t> bad_slot_reads;
    uint64_t offline_from = UINT64_MAX;
    bool scan_stopped = false;  // a scan read told to stop (scan_read)
    // Reads of main's blocks [first, last) that were slow (slow_read), with
    // their number among all slow reads (slow_seq_).
    struct Slow {
      uint64_t first, last, seq;
    };
    std::vector<Slow> slow;
  };
  // After a read of main's blocks [first, last) that began at `started_us`
  // (now_us), when main had last answered at `answered_ms`, and succeeded:
  // a slow one joins f.slow, unless another slow read came within
  // kSlowQuietMs before it, or main had been idle for kSlowIdleMs before it
  // (a spin-up).
  void note_main_read(int64_t started_us, int64_t answered_ms, uint64_t first, uint64_t last,
                      ReadFindings& f);
  // A read of main that took `us` microseconds: true when it is slow
  // (counted with `count`). Every read moves main's usual read time.
  bool read_was_slow(int64_t us, bool count);
  // False once another slow read came after the one numbered `seq` (they
  // waited for the same stall), and once the pool is at the warning level.
  bool slow_rescue_allowed(uint64_t seq);
  // The blocks of each slow read, each claimed in turn: a range of one
  // block is rescued; one of up to kSlowPinpointBytes is read again
  // block by block, and the blocks that are slow alone are rescued. Within
  // retry_time; stops at a failed read (main gone is said at once).
  void rescue_slow(ReadFindings& f);
  // The fast path of a read: no lock is held while devices are read.
  void read_fast(char* buf, uint64_t len, uint64_t offset, ReadFindings& f);
  // After a failed read of main's blocks [first, last): reads them one by
  // one (clipped to the request) to name the blocks that fail; each of
  // those reads counts as an attempt.
  void read_main_narrowing(char* buf, uint64_t req_off, uint64_t req_len, uint64_t first,
                           uint64_t last, int64_t range_ms, ReadFindings& f);
  // Each failed block, claimed in turn: retries, rescues and pending marks.
  void recover_reads(char* buf, uint64_t len, uint64_t offset, ReadFindings& f);
  // The read's result from its findings.
  Status finish_read(char* buf, uint64_t len, uint64_t offset, ReadFindings& f,
                     std::vector<uint64_t>* unreadable_out);

  // Main as a whole (reads rule 7). False while it is offline.
  bool main_online() const { return offline_since_.load(std::memory_order_acquire) == 0; }
  // After main failed on blocks [first, last): true when the failure is
  // about those blocks; false when main as a whole failed (it is offline).
  bool failure_is_media(const Status& failure, uint64_t first, uint64_t last);
  // A failure of main that says, by its errno alone, that main as a whole
  // is gone. A request that timed out does not: one slow sector may.
  static bool main_gone(const Status& failure);
  // Marks main offline (once) and wakes the thread that brings it back.
  void set_main_offline(const Status& why);
  // EIO for a request that needs main while it is offline.
  Status offline_error();
  // Up to kProbeBlocks random blocks outside [first, last) and not in the
  // table, to probe main with.
  static constexpr size_t kProbeBlocks = 6;
  std::vector<uint64_t> probe_candidates(uint64_t first, uint64_t last);
  // Ok when any candidate reads (or there is none).
  Status probe_main(const std::vector<uint64_t>& candidates);
  // The engine's thread: reconnects main with backoff while it is
  // offline, and the spare when asked.
  void watch_main();
  void stop_watch();
  // Flushes one device; a failure with writes outstanding is sticky.
  Status flush_device(BlockDevice& dev);
  // FLUSH's work, also a FUA request's own flush (inside its admission).
  Status flush_both();
  // The lease's heartbeat thread (spares that cannot be locked).
  void start_lease();
  void stop_lease();
  void lease_loop();
  // With `block` claimed: its whole current data, or EIO. Retries main
  // (`attempts` reads of it were made already, taking `spent_ms`) within
  // the budget; rescues a weak block, marks a dead one pending.
  Status read_block_claimed(uint64_t block, char* out, unsigned attempts, int64_t spent_ms);
  // With `block` claimed: writes the whole block wherever it belongs.
  // `suspect`: a write to it timed out and may still land, so it is not
  // written where it is again but moved (remapped, or to a new slot).
  Status write_block_claimed(uint64_t block, const char* data, bool suspect = false);
  // With `block` claimed: data to a fresh slot, then a group commit (the
  // slot's header, a flush, the journal record, then visible). Bad slots
  // are journaled and skipped. `abandoned_slot`: the block's old slot,
  // which failed and is marked bad.
  Status commit_remap(uint64_t block, const char* data, Cause cause,
                      std::optional<uint64_t> abandoned_slot = std::nullopt);
  Status mark_pending(uint64_t block);
  // Queues `c` and waits until it is durable and applied (or failed). The
  // first waiter to find no round running leads one for everything queued.
  Status group_commit(Commit& c);
  // One round: the batch's slot headers, the carried group's journal
  // records, then one flush that makes both durable (the batch's data
  // before its records, which go in the next round); then the carried
  // group is applied. In a stream of remaps that is one flush per group.
  // Sets the result of every carried commit, and settles (done) the batch's
  // commits that failed.
  void commit_round(std::vector<Commit*>& carried, std::vector<Commit*>& batch);
  // Runs `fn` while no group commit does (checkpoints: forget-pending,
  // close).
  Status with_commits_stopped(const std::function<Status()>& fn);
  // A free slot above `above` (the block's current slot), or nullopt when
  // the pool is used up.
  std::optional<uint64_t> allocate_slot(std::optional<uint64_t> above);
  // Slots handed out whose remap was abandoned before it was journaled
  // (the spare went away): free again.
  void give_back_slots(const std::vector<uint64_t>& slots);
  // EIO for a write that needs the spare while the spare as a whole fails
  // (a device errno): no slot is judged bad on that.
  Status spare_away(const Status& why);
  // After a slot write failed: true when the slot is to blame (a media
  // errno, or the spare still reads its superblocks), false when the spare
  // as a whole is (it does not read, or its storage is full).
  bool spare_failure_is_slot(const Status& failure);
  // After the spare failed: asks the engine's thread to reconnect or
  // reopen it (BlockDevice::reconnect), at most once a second.
  void revive_spare();
  // Starts the engine's thread if needed and wakes it.
  void wake_watch();
  Status refuse_writes_if_broken() const;
  // EIO once closed, or when the lease on the spare has lapsed.
  Status refuse_if_unusable() const;

  // Writes on their way to each block, counted in a table of kInflight
  // counters (block modulo its size), so that a claim can wait for them.
  static constexpr size_t kInflight = size_t{1} << 16;
  // The fast path of a large write or trim goes in chunks of this many
  // blocks, each counted only for its own I/O.
  static constexpr uint64_t kFastChunk = 1024;
  void count_writes(uint64_t first, uint64_t last, int delta);
  // Claimed blocks in [first, last), sorted; empty at once when none is.
  std::vector<uint64_t> claimed_in(uint64_t first, uint64_t last);

  std::shared_ptr<BlockDevice> main_;
  std::shared_ptr<BlockDevice> spare_;
  std::unique_ptr<MetadataStore> store_;
  // Guarded by gate_: lookups shared, changes exclusive. Only a commit's
  // leader, or a caller of with_commits_stopped(), changes it, so they may
  // read it without the gate.
  RemapTable table_;
  const EngineOptions options_;
  const uint64_t size_;
  const uint32_t block_;
  // The spare's geometry, copied at open: the superblock is rewritten by
  // checkpoints and the lease while requests run.
  const uint64_t slot_base_;
  const uint64_t slot_count_;
  const uint64_t pending_capacity_;
  // The superblock as opened, for the fields fixed at format (the slot
  // header area, the UUID): read with no lock.
  const Superblock fixed_;
  GateLock gate_;
  std::unique_ptr<std::atomic<uint32_t>[]> inflight_;
  std::mutex claim_mu_;
  std::condition_variable claim_cv_;
  std::vector<uint64_t> claimed_;     // guarded by claim_mu_
  std::atomic<uint32_t> claims_{0};  // claimed_.size()
  std::mutex commit_mu_;
  std::condition_variable commit_cv_;
  std::vector<Commit*> commit_queue_;  // guarded by commit_mu_
  // Commits whose data is durable, waiting for the next round to write
  // their records. Guarded by commit_mu_ (used by the round's leader).
  std::vector<Commit*> carried_;
  bool committing_ = false;             // guarded by commit_mu_
  // Slot allocation: the next slot never handed out, and slots given back
  // (sorted). Guarded by commit_mu_.
  uint64_t next_alloc_ = 0;
  uint64_t committed_next_slot_ = 0;  // the table's next_slot after the last round
  std::vector<uint64_t> free_slots_;
  // Slots whose data write timed out: it may land later, so they are
  // recorded bad with the next round. Guarded by commit_mu_.
  std::vector<uint64_t> slots_to_retire_;
  std::atomic<int64_t> active_{0};
  std::atomic<int> commit_waiters_{0};
  std::atomic<bool> closing_{false};
  std::mutex active_mu_;
  std::condition_variable active_cv_;
  std::atomic<bool> journal_broken_{false};
  // Set when no more metadata may be written: by close(), also when it
  // gives up waiting. close_done_: the clean close was made (or tried).
  std::atomic<bool> closed_{false};
  std::atomic<bool> close_done_{false};
  std::atomic<int64_t> offline_since_{0};
  std::atomic<int64_t> spare_away_since_{0};  // EngineStats::spare_offline_since
  std::atomic<int64_t> last_client_ms_{0};      // last_client_request_ms()
  std::atomic<bool> spare_revive_wanted_{false};
  // Guards the two reasons (short sections only).
  std::mutex reason_mu_;
  std::string offline_reason_;
  std::string flush_failure_;
  std::mutex rng_mu_;
  std::minstd_rand rng_;
  std::mutex watch_mu_;
  std::condition_variable watch_cv_;
  bool watch_stop_ = false;  // guarded by watch_mu_
  std::thread watch_thread_;
  // Serialises the metadata store between the commit leader and the
  // lease's heartbeat.
  std::mutex store_mu_;
  std::thread lease_thread_;
  std::atomic<bool> lease_active_{false};
  std::atomic<int64_t> lease_renewed_ms_{0};
  std::condition_variable lease_cv_;
  bool lease_stop_ = false;  // guarded by store_mu_
  struct Counters;
  std::unique_ptr<Counters> counters_;
  // A running average of main's reads that were not slow, in microseconds.
  std::atomic<int64_t> main_read_avg_us_{0};
  std::atomic<uint64_t> main_read_samples_{0};
  std::atomic<int64_t> main_answered_ms_{0};  // now_ms() of main's last answered read
  std::atomic<int64_t> last_slow_ms_{0};      // and of the last slow one
  std::atomic<uint64_t> slow_seq_{0};         // slow reads so far
  std::atomic<bool> slow_read_only_logged_{false};
  // attach_mirror's; `has_mirror_` lets requests skip the lock when none.
  std::mutex mirror_mu_;
  std::shared_ptr<WriteMirror> mirror_;
  std::atomic<bool> has_mirror_{false};
  std::shared_ptr<WriteMirror> mirror();
  // Client writes, write-zeroes and trims running, by the parity of the
  // mirror generation they began in (attach_mirror raises it).
  std::atomic<uint64_t> mirror_gen_{0};
  std::atomic<int64_t> in_mirror_[2] = {};
  // A write, write-zeroes or trim: through the mirror when there is one.
  Status mirrored(WriteMirror::Op op, const void* buf, uint64_t len, uint64_t offset, bool fua,
                  const std::function<Status()>& apply);
};

}  // namespace dmremap
