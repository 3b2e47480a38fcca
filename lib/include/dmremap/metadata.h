// The on-disk format of the spare, version 2 (version 1 is read, and
// upgraded by `dmremap upgrade`). docs/metadata-format.md describes every
// byte; keep the two in step.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dmremap/remap_table.h"
#include "dmremap/status.h"

namespace dmremap {

inline constexpr uint32_t kFormatVersion = 2;  // what is written
inline constexpr uint32_t kOldestFormatVersion = 1;  // what is still read
inline constexpr size_t kMetaUnit = 4096;  // superblocks, checkpoint header, journal units
inline constexpr uint64_t kSuperblockOffset[2] = {0, kMetaUnit};
inline constexpr size_t kControlPathBytes = 108;  // superblock bytes 312-419, NUL-padded
// CRC32C of bytes 0..N-1 stored at N: 252 in version 1, 508 in version 2.
inline constexpr size_t kSuperblockCrcBytesV1 = 252;
inline constexpr size_t kSuperblockCrcBytes = 508;
inline constexpr size_t kJournalHeaderBytes = 48;
inline constexpr size_t kJournalRecordBytes = 24;
inline constexpr size_t kRecordsPerUnit = (kMetaUnit - kJournalHeaderBytes) / kJournalRecordBytes;
inline constexpr size_t kCheckpointEntryBytes = 16;
inline constexpr uint64_t kBadSlotKey = ~uint64_t{0};  // checkpoint key of a bad-slot entry
inline constexpr uint32_t kFlagClean = 1;              // superblock flag: closed cleanly
// Bounds on what a superblock may say, so that a hostile image cannot make
// open loop for ever or allocate without end.
inline constexpr uint64_t kMaxJournalBytes = uint64_t{1} << 30;
inline constexpr uint64_t kMaxPendingCapacity = uint64_t{1} << 40;

// The evacuation record (`dmremap evacuate`), superblock bytes 512-4095.
inline constexpr size_t kEvacOffset = 512;
inline constexpr size_t kEvacTargetBytes = 512;    // NEW's path or URI, NUL-padded
inline constexpr size_t kEvacIdentityBytes = 64;   // NEW's serial or WWID, NUL-padded
inline constexpr size_t kEvacGenerationAt = 1168;  // the superblock's generation, again
inline constexpr size_t kEvacIntentOffset = 1184;  // the write-intent bitmap
inline constexpr size_t kEvacIntentBytes = 2880;   // 23,040 regions
inline constexpr size_t kEvacCrcAt = 4092;         // CRC32C of bytes 512-4091

// Where an evacuation is: which disk it copies to (NEW), how far the copy
// has come, and which regions of the disk may hold writes that NEW does not
// hold durably yet (set before such a write, cleared once NEW and the set
// are flushed): after a crash those regions are copied again.
struct EvacRecord {
  uint32_t state = 0;      // EvacState (lib/evacuate.h); 0: none
  uint64_t cursor = 0;     // blocks below it are on NEW (flushed)
  uint64_t started = 0;    // seconds since 1970
  uint64_t saved = 0;      // when this was written
  uint64_t rate = 0;       // the copy's limit, bytes per second (0: none)
  uint64_t target_size = 0;
  uint64_t lost = 0;       // blocks the copy could not read so far
  uint64_t region_blocks = 0;  // blocks per bit of `intent`
  uint64_t synced = 0;     // when NEW first held the whole disk (0: not yet)
  std::string target;      // at most 511 bytes
  std::string target_identity;  // at most 63 bytes
  std::vector<uint8_t> intent;  // kEvacIntentBytes, or empty (all clear)

  bool intent_bit(uint64_t region) const {
    return region / 8 < intent.size() && (intent[region / 8] >> (region % 8)) & 1;
  }
  void set_intent_bit(uint64_t region) {
    if (intent.empty()) intent.assign(kEvacIntentBytes, 0);
    intent[region / 8] = static_cast<uint8_t>(intent[region / 8] | (1u << (region % 8)));
  }
  void clear_intent_bit(uint64_t region) {
    if (region / 8 < intent.size()) {
      intent[region / 8] = static_cast<uint8_t>(intent[region / 8] & ~(1u << (region % 8)));
    }
  }
  bool intent_empty() const {
    for (uint8_t b : intent) {
      if (b != 0) return false;
    }
    return true;
  }
};

using Uuid = std::array<uint8_t, 16>;
std::string uuid_string(const Uuid& u);
Uuid random_uuid();

struct Superblock {
  uint32_t version = kFormatVersion;
  uint64_t generation = 0;
  Uuid uuid{};
  uint64_t main_size = 0;
  uint32_t block_size = 0;
  uint32_t flags = 0;
  uint64_t spare_size = 0;
  uint64_t checkpoint_offset[2] = {0, 0};
  // Version 2: the second copy of each checkpoint area (0 in version 1).
  uint64_t checkpoint_copy_offset[2] = {0, 0};
  uint64_t checkpoint_bytes = 0;
  uint64_t journal_offset[2] = {0, 0};
  uint64_t journal_bytes = 0;
  uint64_t slot_offset = 0;
  uint64_t slot_count = 0;
  uint64_t pending_capacity = 0;
  uint32_t active_checkpoint = 0;
  uint64_t epoch = 0;
  uint64_t format_time = 0;
  std::string main_identity;  // at most 63 bytes
  // Version 2: the slot header area (0 in version 1).
  uint64_t slot_header_offset = 0;
  uint64_t slot_header_bytes = 0;
  // Version 2: the surface scan's saved place (all 0: no scan). `scan_state`
  // is a ScanState; `scan_next` the next block to read; `scan_started` and
  // `scan_saved` seconds since 1970; `scan_rate` its limit in bytes/s (0:
  // none). Older dmremaps read and write the superblock without them.
  uint64_t scan_next = 0;
  uint32_t scan_state = 0;
  uint64_t scan_started = 0;
  uint64_t scan_saved = 0;
  uint64_t scan_rate = 0;
  uint64_t scan_unreadable = 0;  // blocks it found unreadable so far
  uint64_t scan_rescued = 0;     // and rescued
  // Version 2: while a frontend serves the set, its control socket (an
  // absolute path, at most 107 bytes), so that `dmremap --spare` finds it;
  // empty when closed cleanly. Saved as the scan's fields are.
  std::string control_path;
  // Version 2: an evacuation in progress or ended (bytes 512-4095, with a
  // CRC of their own). Older dmremaps write zeros there: they forget it.
  EvacRecord evac;

  uint64_t journal_units() const { return journal_bytes / kMetaUnit; }
  uint64_t checkpoint_capacity() const {
    return (checkpoint_bytes - kMetaUnit) / kCheckpointEntryBytes;
  }
  bool clean() const { return flags & kFlagClean; }
  // Checkpoint area `area`, copy `copy` (version 2 has two copies).
  uint64_t checkpoint_at(int area, int copy) const {
    return copy == 0 ? checkpoint_offset[area] : checkpoint_copy_offset[area];
  }
  int checkpoint_copies() const { return version >= 2 ? 2 : 1; }

  // Writes the 4096-byte image (CRC included), always as version 2.
  void encode(char* out) const;
  // Parses a 4096-byte image; nullopt when the magic, version or CRC is
  // wrong, or when the geometry is impossible (then `problem` says why).
  static std::optional<Superblock> decode(const char* in, std::string* problem = nullptr);
  // "" when every region lies inside the spare, aligned and apart from the
  // others, and every count is in bounds; otherwise what is wrong.
  std::string geometry_problem() const;
};

// Where everything goes on a spare of `spare_size` bytes.
struct LayoutParams {
  uint64_t main_size = 0;
  uint64_t spare_size = 0;
  uint32_t block_size = 4096;
  uint64_t pending_capacity = 0;  // 0: as many as slots
  uint64_t journal_bytes = 0;     // 0: sized from the spare
};
// A Superblock with the geometry filled in (generation 0, epoch 1, no uuid),
// or EINVAL/ENOSPC with a message when the parameters cannot work.
Result<Superblock> plan_layout(const LayoutParams& p);
// True for a power of two from 512 to 65536.
bool valid_block_size(uint64_t b);

// The slot header area (version 2): unit 0 is a copy of the superblock as
// formatted (the geometry, for a rebuild when every superblock is gone);
// unit u >= 1 starts with a descriptor and holds the headers of slots
// (u-1)*63 .. (u-1)*63+62, 64 bytes each.
inline constexpr size_t kSlotHeaderBytes = 64;
inline constexpr uint64_t kSlotHeadersPerUnit = kMetaUnit / kSlotHeaderBytes - 1;  // 63
// Bytes of the slot header area for `slots` slots.
uint64_t slot_header_area_bytes(uint64_t slots);
// Where the header of `slot` is: its unit's offset and its byte in the unit.
uint64_t slot_header_unit(const Superblock& sb, uint64_t slot);
size_t slot_header_pos(uint64_t slot);

// What a slot holds, written with its data (before the journal record): a
// rebuild finds the table in these when every other copy of it is lost.
struct SlotHeader {
  Uuid uuid{};
  uint64_t slot = 0;
  uint64_t block = 0;
  uint64_t epoch = 0;  // the epoch in which the slot was handed out
  Cause cause = Cause::kWriteError;
  uint64_t time = 0;  // when it was handed out, seconds since 1970; 0 unknown
  void encode(char* out) const;  // 64 bytes
  static std::optional<SlotHeader> decode(const char* in);
};
// The descriptor at the start of a slot header unit (64 bytes).
struct SlotHeaderUnit {
  Uuid uuid{};
  uint64_t index = 0;  // the unit's index in the area
  void encode(char* out) const;
  static std::optional<SlotHeaderUnit> decode(const char* in);
};

// Checkpoint: a header unit, then the entries.
struct CheckpointHeader {
  uint32_t version = kFormatVersion;
  uint64_t epoch = 0;
  uint64_t entries = 0;
  uint64_t next_slot = 0;
  uint32_t entries_crc = 0;
  Uuid uuid{};
  void encode(char* out) const;
  static std::optional<CheckpointHeader> decode(const char* in);
};

// Journal unit: a header and up to kRecordsPerUnit records.
struct JournalUnit {
  uint64_t epoch = 0;
  uint64_t sequence = 0;
  Uuid uuid{};
  std::vector<Record> records;
  void encode(char* out) const;
  // nullopt when the magic or CRC is wrong, or a record is malformed.
  static std::optional<JournalUnit> decode(const char* in);
};

}  // namespace dmremap
