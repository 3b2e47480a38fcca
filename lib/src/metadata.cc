#include "dmremap/metadata.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>

#include "dmremap/crc32c.h"
#include "endian.h"

namespace dmremap {
namespace {

constexpr char kSuperMagic[8] = {'D', 'M', 'R', 'M', 'P', 'S', 'B', '1'};
constexpr char kCheckpointMagic[8] = {'D', 'M', 'R', 'M', 'P', 'C', 'K', '1'};
constexpr char kJournalMagic[4] = {'D', 'M', 'R', 'J'};

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
  le::put32(out + kSuperblockCrcBytes, crc32c(out, kSuperblockCrcBytes));
}

std::optional<Superblock> Superblock::decode(const char* in) {
  if (std::memcmp(in, kSuperMagic, 8) != 0) return std::nullopt;
  if (le::get32(in + kSuperblockCrcBytes) != crc32c(in, kSuperblockCrcBytes)) return std::nullopt;
  if (le::get32(in + 8) != kFormatVersion) return std::nullopt;
  Superblock s;
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
  // A checksummed superblock with impossible geometry is still not trusted.
  const bool sane = valid_block_size(s.block_size) && s.active_checkpoint < 2 &&
                    s.checkpoint_bytes >= kMetaUnit && s.journal_bytes >= kMetaUnit &&
                    s.journal_bytes % kMetaUnit == 0 &&
                    s.slot_offset % s.block_size == 0 &&
                    s.slot_count <= (s.spare_size - std::min(s.spare_size, s.slot_offset)) /
                                        s.block_size &&
                    s.slot_count <= RemapTable::kSlotMask;
  if (!sane) return std::nullopt;
  return s;
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
  const uint64_t align = std::max<uint64_t>(p.block_size, kMetaUnit);
  auto layout = [&](uint64_t slots) {
    const uint64_t pending = p.pending_capacity ? p.pending_capacity : std::max<uint64_t>(slots, 64);
    s.pending_capacity = pending;
    s.checkpoint_bytes = round_up(kMetaUnit + (slots + pending) * kCheckpointEntryBytes, kMetaUnit);
    s.checkpoint_offset[0] = 2 * kMetaUnit;
    s.checkpoint_offset[1] = s.checkpoint_offset[0] + s.checkpoint_bytes;
    s.journal_offset[0] = s.checkpoint_offset[1] + s.checkpoint_bytes;
    s.journal_offset[1] = s.journal_offset[0] + s.journal_bytes;
    s.slot_offset = round_up(s.journal_offset[1] + s.journal_bytes, align);
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
  le::put32(out + 8, kFormatVersion);
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
  if (le::get32(in + 8) != kFormatVersion) return std::nullopt;
  CheckpointHeader h;
  h.epoch = le::get64(in + 16);
  h.entries = le::get64(in + 24);
  h.next_slot = le::get64(in + 32);
  h.entries_crc = le::get32(in + 40);
  std::memcpy(h.uuid.data(), in + 44, 16);
  return h;
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
                     r.cause <= Cause::kManual) ||
                    r.type == Record::kPending || r.type == Record::kBadSlot;
    if (!ok) return std::nullopt;
    u.records.push_back(r);
  }
  return u;
}

}  // namespace dmremap
