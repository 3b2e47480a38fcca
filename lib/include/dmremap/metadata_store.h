// Reads and writes the spare's metadata: superblocks, checkpoints, journal.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dmremap/block_device.h"
#include "dmremap/metadata.h"
#include "dmremap/remap_table.h"

namespace dmremap {

// Slots a writer may hand out past the table's next_slot before their
// remaps are committed (a group commit's slots): a writable open clears the
// headers of that many slots from next_slot on, so that a rebuild never
// takes the header of a remap that did not commit.
inline constexpr uint64_t kSlotsAhead = 8 * 63;

// What open() found, for `dmremap check` and the logs.
struct OpenReport {
  int superblock_copy = -1;          // which copy won (0 or 1)
  bool other_superblock_valid = false;
  uint64_t checkpoint_entries = 0;
  uint64_t journal_units = 0;        // replayed
  uint64_t journal_records = 0;
  uint64_t journal_copy_repairs = 0;  // units read from the second copy
  bool was_clean = false;
  std::vector<std::string> warnings;
};

// The metadata of one spare. Crash safety rests on three rules:
//  - a superblock is written to the older of its two copies, so a torn write
//    leaves the newer intact, and the valid one with the highest generation
//    wins;
//  - a checkpoint is written to the inactive area and flushed before the
//    superblock that points at it (and bumps the epoch) is written;
//  - a journal unit is written once, to both journal copies, and flushed
//    before append() returns; on replay a unit counts only if its CRC, set
//    UUID, epoch and sequence number all match, so torn, stale and foreign
//    units are never trusted.
// Not thread-safe: the engine serialises calls.
class MetadataStore {
 public:
  // Writes fresh metadata for a new set. Does not check what the spare held
  // before (the caller does that; see spare_is_blank()).
  static Result<Superblock> format(BlockDevice& spare, const LayoutParams& params,
                                   const std::string& main_identity);

  // Loads the metadata into `table` (which must be empty). With `writable`,
  // a journal that held records is folded into a new checkpoint (a new epoch,
  // so records from before this recovery can never come back) and the
  // superblock is marked in use (not clean).
  static Result<std::unique_ptr<MetadataStore>> open(std::shared_ptr<BlockDevice> spare,
                                                     RemapTable& table, bool writable,
                                                     OpenReport* report = nullptr);

  // A read-only open of a set that a server may be writing meanwhile
  // (status, list, check: they take no lock). A read that caught the
  // writer half-way (a checkpoint area rewritten while it was read, a
  // unit appended between the steps of the journal scan) is damage that
  // is not there: while the set is in use, such a load is tried again, up
  // to about two seconds, before the error is believed.
  static Result<std::unique_ptr<MetadataStore>> open_snapshot(std::shared_ptr<BlockDevice> spare,
                                                              RemapTable& table,
                                                              OpenReport* report = nullptr);

  // Loads a set whose superblocks are lost, from the geometry kept in the
  // slot header area: the newest complete checkpoint of the set and its
  // journal (the roll-forward of open(), from epoch 0). Read-only; `rebuild`
  // uses it before it falls back to the slot headers.
  static Result<std::unique_ptr<MetadataStore>> open_with_geometry(
      std::shared_ptr<BlockDevice> spare, const Superblock& geometry, RemapTable& table,
      OpenReport* report = nullptr);

  const Superblock& superblock() const { return sb_; }
  uint64_t journal_next() const { return journal_next_; }

  // Makes `records` durable. If the journal has no room, `table` (the state
  // before these records) is checkpointed first. After any failed append or
  // checkpoint the store refuses (EIO) every later one: what is on the spare
  // is no longer known (a checkpoint may be complete on disk while the
  // superblock is not), and only a reopen finds out.
  // Without `flush_last`, the last unit is written but not flushed: the
  // caller's next flush of the spare makes it durable (every earlier unit
  // is flushed before the next is written, as always), and until then the
  // records must not be relied on.
  Status append(const std::vector<Record>& records, const RemapTable& table,
                bool flush_last = true);
  // The same for several independent changes at once (a group commit):
  // each group's records go in one unit (one larger than a unit fills
  // units of its own), so a crash keeps a group whole or not at all.
  Status append_groups(const std::vector<std::vector<Record>>& groups, const RemapTable& table,
                       bool flush_last = true);
  // After a write of the caller's failed (its flush of an append): what is
  // on the spare is no longer known, so nothing more is written, as after
  // a failed append.
  void refuse_from_now();
  // The lease on a spare that cannot be locked (an NBD export), in the way
  // of ext4's multi-mount protection: the owner rewrites the superblock
  // every few seconds (a new generation, nothing else changes), and stops
  // with EBUSY when the spare holds a generation it did not write: another
  // program has opened the set. Changes only the superblock's generation,
  // which nothing reads concurrently.
  // Records the surface scan's place in the superblock (Superblock::scan_*),
  // written and flushed as a lease renewal is (expendable, epoch-checked).
  Status save_scan(uint64_t next_block, uint32_t state, uint64_t started, uint64_t saved,
                   uint64_t rate, uint64_t unreadable, uint64_t rescued);
  // Records the frontend's control socket (Superblock::control_path) the
  // same way; a clean close clears it.
  Status advertise_control(const std::string& path);
  // Records the evacuation (Superblock::evac) the same way. Its writer
  // waits for the flush, so a record that returned ok is durable.
  Status save_evacuation(const EvacRecord& record);
  // Sets it in memory only: the next superblock write (a clean close's
  // checkpoint) carries it.
  void set_evacuation(const EvacRecord& record) { sb_.evac = record; }
  Status heartbeat();
  // Writes `table` as the new checkpoint and empties the journal. With
  // `clean`, the superblock says the set was closed cleanly.
  Status checkpoint(const RemapTable& table, bool clean = false);
  // Records in the slot header area that `slot` now holds `block` (version
  // 2; a no-op on version 1), for a rebuild when every other copy of the
  // table is lost. Written with the slot's data, before the journal record.
  // A header unit that refuses the write, or cannot be read to be updated
  // (its other headers are then rewritten from `table`), degrades the set;
  // only a spare that is gone as a whole fails it.
  Status write_slot_header(uint64_t slot, uint64_t block, Cause cause, const RemapTable& table);
  // The same for several slots at once (a group commit): one read and one
  // write per header unit. Slots from `handed_out` on are not handed out:
  // their headers in the units written are cleared.
  struct SlotHeaderWrite {
    uint64_t slot;
    uint64_t block;
    Cause cause;
  };
  Status write_slot_headers(std::vector<SlotHeaderWrite> slots, const RemapTable& table,
                            uint64_t handed_out);
  // What works with one copy instead of two since open (a superblock or
  // journal copy that refuses writes), in words; empty when nothing does.
  // Thread-safe.
  std::vector<std::string> degraded() const;

 private:
  MetadataStore(std::shared_ptr<BlockDevice> spare, Superblock sb, int sb_copy)
      : spare_(std::move(spare)), sb_(std::move(sb)), sb_copy_(sb_copy) {}
  // open()'s reading: roll-forward, the checkpoint, the journal, checks.
  Status load(RemapTable& table, OpenReport& rep, int* checkpoint_copy);
  // open()'s writing: repairs what load() found damaged (a checkpoint
  // copy, the geometry's copy, stale slot headers) and marks the set in
  // use, or checkpoints the replayed journal.
  Status repair_on_open(const RemapTable& table, OpenReport& rep, int checkpoint_copy);
  // Clears the slot headers of slots from `from` on (not handed out) in
  // the unit holding `from` and the next one, but `keep`'s.
  Status clear_stale_slot_headers(uint64_t from, uint64_t keep);
  Status write_superblock(Superblock next);
  // Writes `next` to the older superblock copy, or to the current one when
  // the older refuses writes; returns the copy written.
  // renewal: a lease heartbeat (see BlockDevice::write_expendable).
  Result<int> put_superblock(const Superblock& next, bool renewal = false);
  // A superblock write that may be lost (the scan's place, the control
  // socket): put_superblock as a renewal.
  Status write_renewal(Superblock next);
  void note_degraded(const std::string& what);
  Status checkpoint_now(const RemapTable& table, bool clean);
  // Writes the checkpoint of `epoch` to every copy of `area`.
  Status write_checkpoint_area(uint32_t area, const RemapTable& table, uint64_t epoch);
  Status append_units(const std::vector<std::vector<Record>>& units, const RemapTable& table,
                      bool flush_last);
  Status refused() const;

  std::shared_ptr<BlockDevice> spare_;
  Superblock sb_;
  int sb_copy_;  // the copy that holds sb_
  uint64_t journal_next_ = 0;
  bool failed_ = false;
  // The highest generation this store tried to write; one that may or may
  // not have reached the spare.
  uint64_t tried_generation_ = 0;
  // A superblock copy that refused a write: not tried again until reopen.
  int bad_sb_copy_ = -1;
  mutable std::mutex degraded_mu_;
  std::vector<std::string> degraded_;
};

// Reads both superblocks and returns the newest valid one and its copy.
struct FoundSuperblock {
  Superblock sb;
  int copy;
  bool other_valid;
};
Result<FoundSuperblock> read_superblock(BlockDevice& spare);

// When each of `slots` was handed out, from its slot header: seconds since
// 1970, 0 when not known (a version 1 set, a header written before the time
// was kept, or one that does not read or is not that slot's; after a unit
// that does not read, no more are read). One read per slot header unit. Headers are written once, so no lock is needed; a read
// that races a write of its unit fails the header's CRC and gives 0.
std::vector<uint64_t> read_slot_times(BlockDevice& spare, const Superblock& sb,
                                      const std::vector<uint64_t>& slots);

// True when the spare holds only zeros (holes are skipped where the device
// can tell them). `progress` gets (bytes done, total) now and then.
Result<bool> spare_is_blank(BlockDevice& spare,
                            const std::function<void(uint64_t, uint64_t)>& progress = {});

// On a spare that cannot be locked (an NBD export) whose set was not closed
// cleanly: watches the superblock for four lease intervals and returns
// EBUSY if its generation moves (a live owner renews it). Ok at once for a
// clean set or a spare that is locked.
Status wait_out_lease(BlockDevice& spare, std::chrono::milliseconds interval);

// `dmremap upgrade`: rewrites a version 1 set as version 2, in place and
// crash-safely. The second checkpoint copies and the slot header area are
// carved from the end of the spare (past the slot pool, then its last
// slots, which must never have been handed out). Every remap, pending
// block and bad slot is kept; each remapped slot gets its header.
struct UpgradeReport {
  uint64_t slots_before = 0, slots_after = 0;
  uint64_t headers = 0;  // slot headers written
};
Result<UpgradeReport> upgrade_metadata(std::shared_ptr<BlockDevice> spare);

// `dmremap rebuild` (version 2), when the metadata does not open. The
// geometry comes from a valid superblock or, failing that, from the copy
// at the start of the slot header area, found by reading the whole spare
// (the most recently formatted set's copy wins). Without superblocks, the
// newest complete checkpoint and its journal are tried first: they give
// everything back. Otherwise the table comes from the slot headers alone:
// each block goes to the highest slot whose header names it (slots are
// handed out in order, so that is its latest); every other slot below the
// highest, and every slot whose header unit cannot be read, is marked bad.
// Pending marks are not in the slots: they are lost, and those blocks fail
// on main again when read. The new checkpoint (in the area the superblock
// does not name) and superblocks take an epoch and generation 2^32 above
// any on the spare. `progress` gets (bytes scanned, total).
struct RebuildReport {
  bool geometry_from_backup = false;  // no superblock was valid
  // The checkpoints and journal were whole (only the superblocks were
  // lost): everything came back from them, pending marks too.
  bool from_checkpoint = false;
  uint64_t headers = 0;           // valid slot headers of this set
  uint64_t unreadable_units = 0;  // slot header units that could not be read
  uint64_t remaps = 0;
  uint64_t pending = 0;
  uint64_t bad_slots = 0;
  uint64_t epoch = 0;  // the new one
  std::vector<std::string> warnings;
};
Result<RebuildReport> rebuild_metadata(
    std::shared_ptr<BlockDevice> spare,
    const std::function<void(uint64_t, uint64_t)>& progress = {});

// Every problem `dmremap check` can find, in words, plus facts worth showing.
struct CheckReport {
  std::vector<std::string> problems;
  std::vector<std::string> notes;
};
// Reads as open_snapshot() does: while the set is in use, problems that go
// away on a second look were the writer's, not damage.
CheckReport check_metadata(std::shared_ptr<BlockDevice> spare);

}  // namespace dmremap
