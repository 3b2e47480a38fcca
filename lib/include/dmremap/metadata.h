// The on-disk format of the spare, version 1. docs/metadata-format.md
// describes every byte; keep the two in step.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dmremap/remap_table.h"
#include "dmremap/status.h"

namespace dmremap {

inline constexpr uint32_t kFormatVersion = 1;
inline constexpr size_t kMetaUnit = 4096;  // superblocks, checkpoint header, journal units
inline constexpr uint64_t kSuperblockOffset[2] = {0, kMetaUnit};
inline constexpr size_t kSuperblockCrcBytes = 252;  // CRC32C of bytes 0..251 stored at 252
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

using Uuid = std::array<uint8_t, 16>;
std::string uuid_string(const Uuid& u);
Uuid random_uuid();

struct Superblock {
  uint64_t generation = 0;
  Uuid uuid{};
  uint64_t main_size = 0;
  uint32_t block_size = 0;
  uint32_t flags = 0;
  uint64_t spare_size = 0;
  uint64_t checkpoint_offset[2] = {0, 0};
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

  uint64_t journal_units() const { return journal_bytes / kMetaUnit; }
  uint64_t checkpoint_capacity() const {
    return (checkpoint_bytes - kMetaUnit) / kCheckpointEntryBytes;
  }
  bool clean() const { return flags & kFlagClean; }

  // Writes the 4096-byte image (CRC included).
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

// Checkpoint: a header unit, then the entries.
struct CheckpointHeader {
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
