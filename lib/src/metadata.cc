#include "dmremap/metadata.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "dmremap/crc32c.h"
#include "endian.h"

namespace dmremap {
namespace {

constexpr char kSuperMagic[8] = {'D', 'M', 'R', 'M', 'P', 'S', 'B', '1'};
constexpr char kCheckpointMagic[8] = {'D', 'M', 'R', 'M', 'P', 'C', 'K', '1'};
constexpr char kJournalMagic[4] = {'D', 'M', 'R', 'J'};
constexpr char kSlotMagic[4] = {'D', 'M', 'S', 'L'};
constexpr char kSlotUnitMagic[8] = {'D', 'M', 'R', 'M', 'P', 'S', 'H', 'U'};
constexpr char kEvacMagic[8] = {'D', 'M', 'R', 'M', 'E', 'V', 'A', 'C'};

void encode_evac(const EvacRecord& e, uint64_t generation, char* out) {
  if (e.state == 0) return;  // all zeros: no evacuation
  char* r = out + kEvacOffset;
  std::memcpy(r, kEvacMagic, 8);
  le::put32(r + 8, e.state);
  le::put64(r + 16, e.cursor);
  le::put64(r + 24, e.started);
  le::put64(r + 32, e.saved);
  le::put64(r + 40, e.rate);
  le::put64(r + 48, e.target_size);
  le::put64(r + 56, e.lost);
  le::put64(r + 64, e.region_blocks);
  le::put64(r + 72, e.synced);
  std::memcpy(r + 80, e.target_identity.data(),
              std::min(e.target_identity.size(), kEvacIdentityBytes - 1));
  std::memcpy(r + 144, e.target.data(), std::min(e.target.size(), kEvacTargetBytes - 1));
  // Ties the record to bytes 0-507: a write torn between them is caught.
  le::put64(out + kEvacGenerationAt, generation);
  if (!e.intent.empty()) {
    std::memcpy(out + kEvacIntentOffset, e.intent.data(),
                std::min(e.intent.size(), kEvacIntentBytes));
  }
  le::put32(out + kEvacCrcAt, crc32c(r, kEvacCrcAt - kEvacOffset));
}

// False when the record is there (its magic) but damaged.
bool decode_evac(const char* in, uint64_t generation, EvacRecord& e) {
  const char* r = in + kEvacOffset;
  if (std::memcmp(r, kEvacMagic, 8) != 0) return true;  // none
  if (le::get32(in + kEvacCrcAt) != crc32c(r, kEvacCrcAt - kEvacOffset)) return false;
  if (le::get64(in + kEvacGenerationAt) != generation) return false;
  e.state = le::get32(r + 8);
  e.cursor = le::get64(r + 16);
  e.started = le::get64(r + 24);
  e.saved = le::get64(r + 32);
  e.rate = le::get64(r + 40);
  e.target_size = le::get64(r + 48);
  e.lost = le::get64(r + 56);
  e.region_blocks = le::get64(r + 64);
  e.synced = le::get64(r + 72);
  e.target_identity.assign(r + 80, strnlen(r + 80, kEvacIdentityBytes - 1));
  e.target.assign(r + 144, strnlen(r + 144, kEvacTargetBytes - 1));
  e.intent.assign(in + kEvacIntentOffset, in + kEvacIntentOffset + kEvacIntentBytes);
  if (e.intent_empty()) e.intent.clear();
  return true;
}

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

}  // namespace

std::string uuid_string(const Uuid& u) {
  char buf[37];
  std::snprintf(buf, sizeof buf,
                "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
                u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14],
                u[15]);
  return buf;
}

Uuid random_uuid() {
  Uuid u{};
  std::random_device rd;
  for (auto& b : u) b = static_cast<uint8_t>(rd());
  u[6] = (u[6] & 0x0F) | 0x40;  // version 4
  u[8] = (u[8] & 0x3F) | 0x80;  // variant 1
  return u;
}

bool valid_block_size(uint64_t b) { return b >= 512 && b <= 65536 && (b & (b - 1)) == 0; }

void Superblock::encode(char* out) const {
  std::memset(out, 0, kMetaUnit);
  std::memcpy(out, kSuperMagic, 8);
  le::put32(out + 8, kFormatVersion);
  le::put32(out + 12, kSuperblockCrcBytes + 4);
  le::put64(out + 16, generation);
  std::memcpy(out + 24, uuid.data(), 16);
  le::put64(out + 40, main_size);
  le::put32(out + 48, block_size);
  le::put32(out + 52, flags);
  le::put64(out + 56, spare_size);
  le::put64(out + 64, checkpoint_offset[0]);
  le::put64(out + 72, checkpoint_offset[1]);
  le::put64(out + 80, checkpoint_bytes);
  le::put64(out + 88, journal_offset[0]);
  le::put64(out + 96, journal_offset[1]);
  le::put64(out + 104, journal_bytes);
  le::put64(out + 112, slot_offset);
  le::put64(out + 120, slot_count);
  le::put64(out + 128, pending_capacity);
  le::put32(out + 136, active_checkpoint);
  le::put64(out + 144, epoch);
  le::put64(out + 152, format_time);
  std::memcpy(out + 160, main_identity.data(), std::min<size_t>(main_identity.size(), 63));
  le::put64(out + 224, checkpoint_copy_offset[0]);
  le::put64(out + 232, checkpoint_copy_offset[1]);
  le::put64(out + 240, slot_header_offset);
  le::put64(out + 248, slot_header_bytes);
  le::put64(out + 256, scan_next);
  le::put32(out + 264, scan_state);
  le::put64(out + 272, scan_started);
  le::put64(out + 280, scan_saved);
  le::put64(out + 288, scan_rate);
  le::put64(out + 296, scan_unreadable);
  le::put64(out + 304, scan_rescued);
  std::memcpy(out + 312, control_path.data(), std::min(control_path.size(), kControlPathBytes - 1));
  le::put32(out + kSuperblockCrcBytes, crc32c(out, kSuperblockCrcBytes));
  encode_evac(evac, generation, out);
}

std::optional<Superblock> Superblock::decode(const char* in, std::string* problem) {
  if (std::memcmp(in, kSuperMagic, 8) != 0) return std::nullopt;
  const uint32_t version = le::get32(in + 8);
  if (version < kOldestFormatVersion || version > kFormatVersion) {
    // Only believed with a good CRC at either place; otherwise it is noise.
    if (problem && (le::get32(in + kSuperblockCrcBytes) == crc32c(in, kSuperblockCrcBytes) ||
                    le::get32(in + kSuperblockCrcBytesV1) == crc32c(in, kSuperblockCrcBytesV1))) {
      *problem = "format version " + std::to_string(version) +
                 " is not one this dmremap reads (1 to " + std::to_string(kFormatVersion) +
                 "); use a newer dmremap";
    }
    return std::nullopt;
  }
  const size_t crc_at = version == 1 ? kSuperblockCrcBytesV1 : kSuperblockCrcBytes;
  if (le::get32(in + crc_at) != crc32c(in, crc_at)) return std::nullopt;
  Superblock s;
  s.version = version;
  s.generation = le::get64(in + 16);
  std::memcpy(s.uuid.data(), in + 24, 16);
  s.main_size = le::get64(in + 40);
  s.block_size = le::get32(in + 48);
  s.flags = le::get32(in + 52);
  s.spare_size = le::get64(in + 56);
  s.checkpoint_offset[0] = le::get64(in + 64);
  s.checkpoint_offset[1] = le::get64(in + 72);
  s.checkpoint_bytes = le::get64(in + 80);
  s.journal_offset[0] = le::get64(in + 88);
  s.journal_offset[1] = le::get64(in + 96);
  s.journal_bytes = le::get64(in + 104);
  s.slot_offset = le::get64(in + 112);
  s.slot_count = le::get64(in + 120);
  s.pending_capacity = le::get64(in + 128);
  s.active_checkpoint = le::get32(in + 136);
  s.epoch = le::get64(in + 144);
  s.format_time = le::get64(in + 152);
  s.main_identity.assign(in + 160, strnlen(in + 160, 63));
  if (version >= 2) {
    s.checkpoint_copy_offset[0] = le::get64(in + 224);
    s.checkpoint_copy_offset[1] = le::get64(in + 232);
    s.slot_header_offset = le::get64(in + 240);
    s.slot_header_bytes = le::get64(in + 248);
    s.scan_next = le::get64(in + 256);
    s.scan_state = le::get32(in + 264);
    s.scan_started = le::get64(in + 272);
    s.scan_saved = le::get64(in + 280);
    s.scan_rate = le::get64(in + 288);
    s.scan_unreadable = le::get64(in + 296);
    s.scan_rescued = le::get64(in + 304);
    s.control_path.assign(in + 312, strnlen(in + 312, kControlPathBytes - 1));
    // A damaged record makes the copy untrusted, as a damaged superblock
    // does: the other copy (an older place) wins.
    if (!decode_evac(in, s.generation, s.evac)) {
      if (problem) *problem = "its evacuation record fails its checksum, or is not of this write";
      return std::nullopt;
    }
    // Its bitmap must cover main in the bits it has.
    if (s.evac.state != 0 && s.block_size != 0 &&
        (s.evac.region_blocks == 0 ||
         (s.main_size / s.block_size + s.evac.region_blocks - 1) / s.evac.region_blocks >
             kEvacIntentBytes * 8)) {
      if (problem) *problem = "its evacuation record's regions do not fit its bitmap";
      return std::nullopt;
    }
  }
  // A checksummed superblock with impossible geometry is still not trusted:
  // it is damaged, or made to harm whoever reads it.
  const std::string why = s.geometry_problem();
  if (!why.empty()) {
    if (problem) *problem = why;
    return std::nullopt;
  }
  return s;
}

std::string Superblock::geometry_problem() const {
  const auto num = [](uint64_t v) { return std::to_string(v); };
  if (!valid_block_size(block_size)) return "block size " + num(block_size) + " is not possible";
  if (main_size == 0 || main_size % block_size != 0) {
    return "main's size " + num(main_size) + " is not a non-zero multiple of the block size";
  }
  if (active_checkpoint > 1) return "active checkpoint " + num(active_checkpoint) + " is not 0 or 1";
  if (slot_count == 0 || slot_count > RemapTable::kSlotMask ||
      slot_count > spare_size / block_size) {
    return "slot count " + num(slot_count) + " is out of range";
  }
  if (pending_capacity > kMaxPendingCapacity) {
    return "pending capacity " + num(pending_capacity) + " is out of range";
  }
  if (journal_bytes < kMetaUnit || journal_bytes % kMetaUnit != 0 ||
      journal_bytes > kMaxJournalBytes) {
    return "journal size " + num(journal_bytes) + " is not a multiple of 4096 up to 1 GiB";
  }
  if (checkpoint_bytes % kMetaUnit != 0 ||
      checkpoint_bytes < kMetaUnit + (slot_count + pending_capacity) * kCheckpointEntryBytes) {
    return "checkpoint size " + num(checkpoint_bytes) +
           " cannot hold every slot and pending block";
  }
  if (slot_offset % block_size != 0 || slot_offset % kMetaUnit != 0) {
    return "slot pool offset " + num(slot_offset) + " is not aligned";
  }
  if (version >= 2 && (slot_header_bytes % kMetaUnit != 0 ||
                       slot_header_bytes < slot_header_area_bytes(slot_count))) {
    return "slot header area of " + num(slot_header_bytes) + " bytes cannot hold " +
           num(slot_count) + " slots";
  }
  // Every region inside the spare, none overlapping another. The sizes are
  // bounded above, so none of these sums overflows.
  struct Region {
    const char* name;
    uint64_t start, bytes;
  };
  std::vector<Region> regions = {
      {"the superblocks", 0, 2 * kMetaUnit},
      {"checkpoint area 0", checkpoint_offset[0], checkpoint_bytes},
      {"checkpoint area 1", checkpoint_offset[1], checkpoint_bytes},
      {"journal copy 0", journal_offset[0], journal_bytes},
      {"journal copy 1", journal_offset[1], journal_bytes},
      {"the slot pool", slot_offset, slot_count * block_size},
  };
  if (version >= 2) {
    regions.push_back({"checkpoint area 0 copy 1", checkpoint_copy_offset[0], checkpoint_bytes});
    regions.push_back({"checkpoint area 1 copy 1", checkpoint_copy_offset[1], checkpoint_bytes});
    regions.push_back({"the slot headers", slot_header_offset, slot_header_bytes});
  }
  for (const Region& r : regions) {
    if (r.start % kMetaUnit != 0) return std::string(r.name) + " is not 4096-byte aligned";
    if (r.start > spare_size || r.bytes > spare_size - r.start) {
      return std::string(r.name) + " ends past the spare's " + num(spare_size) + " bytes";
    }
  }
  for (size_t i = 0; i < regions.size(); ++i) {
    for (size_t j = i + 1; j < regions.size(); ++j) {
      const Region& a = regions[i];
      const Region& b = regions[j];
      if (a.start < b.start + b.bytes && b.start < a.start + a.bytes) {
        return std::string(a.name) + " overlaps " + b.name;
      }
    }
  }
  return {};
}

Result<Superblock> plan_layout(const LayoutParams& p) {
  if (!valid_block_size(p.block_size)) {
    return Status::error(EINVAL, "block size " + std::to_string(p.block_size) +
                                     " is not a power of two from 512 to 65536");
  }
  if (p.main_size == 0 || p.main_size % p.block_size != 0) {
    return Status::error(EINVAL, "main's size (" + std::to_string(p.main_size) +
                                     " bytes) is not a non-zero multiple of the block size (" +
                                     std::to_string(p.block_size) + ")");
  }
  Superblock s;
  s.main_size = p.main_size;
  s.block_size = p.block_size;
  s.spare_size = p.spare_size;
  s.epoch = 1;
  s.journal_bytes = p.journal_bytes
                        ? round_up(p.journal_bytes, kMetaUnit)
                        : std::clamp<uint64_t>(round_up(p.spare_size / 1024, kMetaUnit),
                                               256 * 1024, 32 << 20);
  if (s.journal_bytes > kMaxJournalBytes) {
    return Status::error(EINVAL, "journal size " + std::to_string(s.journal_bytes) +
                                     " is over the limit of 1 GiB");
  }
  if (p.pending_capacity > kMaxPendingCapacity) {
    return Status::error(EINVAL, "pending capacity " + std::to_string(p.pending_capacity) +
                                     " is over the limit of " +
                                     std::to_string(kMaxPendingCapacity));
  }
  const uint64_t align = std::max<uint64_t>(p.block_size, kMetaUnit);
  auto layout = [&](uint64_t slots) {
    const uint64_t pending = p.pending_capacity ? p.pending_capacity : std::max<uint64_t>(slots, 64);
    s.pending_capacity = pending;
    s.checkpoint_bytes = round_up(kMetaUnit + (slots + pending) * kCheckpointEntryBytes, kMetaUnit);
    s.slot_header_bytes = slot_header_area_bytes(slots);
    // The two copies of each structure lie apart, with the slot headers
    // between them, so that one run of bad sectors takes at most one.
    uint64_t at = 2 * kMetaUnit;
    const auto place = [&at](uint64_t bytes) {
      const uint64_t here = at;
      at += bytes;
      return here;
    };
    s.checkpoint_offset[0] = place(s.checkpoint_bytes);
    s.checkpoint_offset[1] = place(s.checkpoint_bytes);
    s.journal_offset[0] = place(s.journal_bytes);
    s.slot_header_offset = place(s.slot_header_bytes);
    s.checkpoint_copy_offset[0] = place(s.checkpoint_bytes);
    s.checkpoint_copy_offset[1] = place(s.checkpoint_bytes);
    s.journal_offset[1] = place(s.journal_bytes);
    s.slot_offset = round_up(at, align);
    return s.slot_offset;
  };
  uint64_t slots = p.spare_size / p.block_size;
  for (int i = 0; i < 64; ++i) {
    const uint64_t off = layout(slots);
    const uint64_t fit = off < p.spare_size ? (p.spare_size - off) / p.block_size : 0;
    if (fit >= slots) break;
    slots = fit;
  }
  layout(slots);
  s.slot_count = slots;
  if (slots == 0) {
    return Status::error(ENOSPC, "spare of " + std::to_string(p.spare_size) +
                                     " bytes is too small: the metadata alone needs " +
                                     std::to_string(s.slot_offset) + " bytes");
  }
  return s;
}

void CheckpointHeader::encode(char* out) const {
  std::memset(out, 0, kMetaUnit);
  std::memcpy(out, kCheckpointMagic, 8);
  le::put32(out + 8, version);
  le::put64(out + 16, epoch);
  le::put64(out + 24, entries);
  le::put64(out + 32, next_slot);
  le::put32(out + 40, entries_crc);
  std::memcpy(out + 44, uuid.data(), 16);
  le::put32(out + 60, crc32c(out, 60));
}

std::optional<CheckpointHeader> CheckpointHeader::decode(const char* in) {
  if (std::memcmp(in, kCheckpointMagic, 8) != 0) return std::nullopt;
  if (le::get32(in + 60) != crc32c(in, 60)) return std::nullopt;
  const uint32_t version = le::get32(in + 8);
  if (version < kOldestFormatVersion || version > kFormatVersion) return std::nullopt;
  CheckpointHeader h;
  h.version = version;
  h.epoch = le::get64(in + 16);
  h.entries = le::get64(in + 24);
  h.next_slot = le::get64(in + 32);
  h.entries_crc = le::get32(in + 40);
  std::memcpy(h.uuid.data(), in + 44, 16);
  return h;
}

uint64_t slot_header_area_bytes(uint64_t slots) {
  return kMetaUnit * (1 + (slots + kSlotHeadersPerUnit - 1) / kSlotHeadersPerUnit);
}

uint64_t slot_header_unit(const Superblock& sb, uint64_t slot) {
  return sb.slot_header_offset + (1 + slot / kSlotHeadersPerUnit) * kMetaUnit;
}

size_t slot_header_pos(uint64_t slot) {
  return static_cast<size_t>((1 + slot % kSlotHeadersPerUnit) * kSlotHeaderBytes);
}

void SlotHeader::encode(char* out) const {
  std::memset(out, 0, kSlotHeaderBytes);
  std::memcpy(out, kSlotMagic, 4);
  std::memcpy(out + 8, uuid.data(), 16);
  le::put64(out + 24, slot);
  le::put64(out + 32, block);
  le::put64(out + 40, epoch);
  out[48] = static_cast<char>(cause);
  le::put64(out + 56, time);
  le::put32(out + 4, crc32c(out + 8, kSlotHeaderBytes - 8));
}

std::optional<SlotHeader> SlotHeader::decode(const char* in) {
  if (std::memcmp(in, kSlotMagic, 4) != 0) return std::nullopt;
  if (le::get32(in + 4) != crc32c(in + 8, kSlotHeaderBytes - 8)) return std::nullopt;
  SlotHeader h;
  std::memcpy(h.uuid.data(), in + 8, 16);
  h.slot = le::get64(in + 24);
  h.block = le::get64(in + 32);
  h.epoch = le::get64(in + 40);
  h.cause = static_cast<Cause>(in[48]);
  h.time = le::get64(in + 56);
  if (h.cause < Cause::kWriteError || h.cause > kLastCause) return std::nullopt;
  return h;
}

void SlotHeaderUnit::encode(char* out) const {
  std::memset(out, 0, kSlotHeaderBytes);
  std::memcpy(out, kSlotUnitMagic, 8);
  std::memcpy(out + 8, uuid.data(), 16);
  le::put64(out + 24, index);
  le::put32(out + 60, crc32c(out, 60));
}

std::optional<SlotHeaderUnit> SlotHeaderUnit::decode(const char* in) {
  if (std::memcmp(in, kSlotUnitMagic, 8) != 0) return std::nullopt;
  if (le::get32(in + 60) != crc32c(in, 60)) return std::nullopt;
  SlotHeaderUnit u;
  std::memcpy(u.uuid.data(), in + 8, 16);
  u.index = le::get64(in + 24);
  return u;
}

void JournalUnit::encode(char* out) const {
  std::memset(out, 0, kMetaUnit);
  std::memcpy(out, kJournalMagic, 4);
  le::put64(out + 8, epoch);
  le::put64(out + 16, sequence);
  le::put32(out + 24, static_cast<uint32_t>(records.size()));
  std::memcpy(out + 32, uuid.data(), 16);
  char* p = out + kJournalHeaderBytes;
  for (const Record& r : records) {
    p[0] = static_cast<char>(r.type);
    p[1] = static_cast<char>(r.cause);
    le::put64(p + 8, r.block);
    le::put64(p + 16, r.slot);
    p += kJournalRecordBytes;
  }
  le::put32(out + 4, crc32c(out + 8, kMetaUnit - 8));
}

std::optional<JournalUnit> JournalUnit::decode(const char* in) {
  if (std::memcmp(in, kJournalMagic, 4) != 0) return std::nullopt;
  if (le::get32(in + 4) != crc32c(in + 8, kMetaUnit - 8)) return std::nullopt;
  JournalUnit u;
  u.epoch = le::get64(in + 8);
  u.sequence = le::get64(in + 16);
  const uint32_t n = le::get32(in + 24);
  if (n == 0 || n > kRecordsPerUnit) return std::nullopt;
  std::memcpy(u.uuid.data(), in + 32, 16);
  const char* p = in + kJournalHeaderBytes;
  for (uint32_t i = 0; i < n; ++i, p += kJournalRecordBytes) {
    Record r{static_cast<Record::Type>(p[0]), static_cast<Cause>(p[1]), le::get64(p + 8),
             le::get64(p + 16)};
    const bool ok = (r.type == Record::kRemap && r.cause >= Cause::kWriteError &&
                     r.cause <= kLastCause) ||
                    r.type == Record::kPending || r.type == Record::kBadSlot;
    if (!ok) return std::nullopt;
    u.records.push_back(r);
  }
  return u;
}

}  // namespace dmremap
