// Work on a set's metadata as a whole, outside serving: waiting out another
// owner's lease, upgrading version 1 to 2, rebuilding from the slot headers.
#include <algorithm>
#include <map>
#include <thread>

#include "dmremap/log.h"
#include "dmremap/metadata_store.h"
#include "metadata_io.h"

namespace dmremap {
namespace {

using detail::MetaBuffer;

uint64_t round_down(uint64_t v, uint64_t a) { return v / a * a; }

// Writes `sb` to both superblock copies, the older first, each flushed, so
// that a torn write leaves the other copy whole. `sb.generation` is the
// first one written.
Status write_both_superblocks(BlockDevice& spare, Superblock sb, int older) {
  MetaBuffer buf(kMetaUnit);
  for (int copy : {older, 1 - older}) {
    sb.encode(buf.data);
    if (auto s = spare.write(buf.data, kMetaUnit, kSuperblockOffset[copy]); !s.is_ok()) return s;
    if (auto s = spare.flush(); !s.is_ok()) return s;
    ++sb.generation;
  }
  return Status::ok();
}

// Writes the slot header units that hold the headers of `table`'s remapped
// slots (and unit 0, the geometry).
Result<uint64_t> write_all_slot_headers(BlockDevice& spare, const Superblock& sb,
                                        const RemapTable& table, uint64_t epoch) {
  if (auto s = detail::write_geometry_backup(spare, sb); !s.is_ok()) return s;
  std::map<uint64_t, std::vector<SlotHeader>> units;  // unit index -> its headers
  uint64_t n = 0;
  table.for_each([&](const RemapTable::Entry& e) {
    if (RemapTable::is_pending(e.value)) return;
    const uint64_t slot = RemapTable::slot_of(e.value);
    units[1 + slot / kSlotHeadersPerUnit].push_back(
        SlotHeader{sb.uuid, slot, e.block, epoch, RemapTable::cause_of(e.value)});
    ++n;
  });
  MetaBuffer buf(kMetaUnit);
  for (const auto& [index, headers] : units) {
    std::memset(buf.data, 0, kMetaUnit);
    SlotHeaderUnit{sb.uuid, index}.encode(buf.data);
    for (const SlotHeader& h : headers) h.encode(buf.data + slot_header_pos(h.slot));
    if (auto s = spare.write(buf.data, kMetaUnit, sb.slot_header_offset + index * kMetaUnit);
        !s.is_ok()) {
      return s;
    }
  }
  return n;
}

}  // namespace

Status wait_out_lease(BlockDevice& spare, std::chrono::milliseconds interval) {
  if (spare.locked()) return Status::ok();
  auto found = read_superblock(spare);
  if (!found.is_ok() || found->sb.clean()) return Status::ok();
  // In use, or a crash left it so. A live owner rewrites the superblock
  // every interval, and stops serving when it has not for 2.5 of them:
  // watch for 4 before taking the set over.
  const auto watch = 4 * interval;
  log(LogLevel::kInfo, spare.name() + " was not closed cleanly; checking for " +
                           std::to_string(watch.count() / 1000) +
                           " s that no other dmremap is using it");
  std::this_thread::sleep_for(watch);
  auto again = read_superblock(spare);
  if (!again.is_ok()) return again.take_status();
  if (again->sb.generation != found->sb.generation) {
    return Status::error(EBUSY, spare.name() + " is in use by another dmremap (set " +
                                    uuid_string(found->sb.uuid) +
                                    "; its lease was renewed while we watched). Stop that "
                                    "server first");
  }
  return Status::ok();
}

Result<UpgradeReport> upgrade_metadata(std::shared_ptr<BlockDevice> spare) {
  auto found = read_superblock(*spare);
  if (!found.is_ok()) return found.take_status();
  if (found->sb.version >= kFormatVersion) {
    return Status::error(EALREADY, spare->name() + ": already format version " +
                                       std::to_string(found->sb.version));
  }
  // The whole state, journal included, as a reader sees it (rolled forward
  // if a superblock was lost).
  RemapTable table;
  OpenReport report;
  auto store = MetadataStore::open(spare, table, /*writable=*/false, &report);
  if (!store.is_ok()) return store.take_status();
  const Superblock old = store.value()->superblock();
  const uint32_t bs = old.block_size;

  // New regions from the end backwards: slot headers (sized for the old
  // pool, which is at least the new one), then the second checkpoint copy
  // of each area. The pool ends where they begin.
  Superblock sb = old;
  sb.version = kFormatVersion;
  uint64_t end = round_down(std::min(old.spare_size, spare->size()), kMetaUnit);
  sb.slot_header_bytes = slot_header_area_bytes(old.slot_count);
  const auto carve = [&end](uint64_t bytes) -> uint64_t {
    end = end >= bytes ? end - bytes : 0;
    return end;
  };
  sb.slot_header_offset = carve(sb.slot_header_bytes);
  sb.checkpoint_copy_offset[1] = carve(old.checkpoint_bytes);
  sb.checkpoint_copy_offset[0] = carve(old.checkpoint_bytes);
  const uint64_t pool_end = round_down(end, std::max<uint64_t>(bs, kMetaUnit));
  sb.slot_count = pool_end > old.slot_offset ? (pool_end - old.slot_offset) / bs : 0;
  sb.slot_count = std::min(sb.slot_count, old.slot_count);
  if (sb.slot_count < table.next_slot() || sb.slot_count == 0) {
    return Status::error(ENOSPC,
                         spare->name() + ": the upgrade needs the last " +
                             std::to_string(old.slot_count - sb.slot_count) +
                             " slots of the pool, but slots up to " +
                             std::to_string(table.next_slot()) +
                             " are in use. Copy the set to a bigger spare instead");
  }
  if (const std::string why = sb.geometry_problem(); !why.empty()) {
    return Status::error(EINVAL, spare->name() + ": cannot upgrade: " + why);
  }
  // 1. What no version 1 reader looks at: the carved regions (slots never
  //    handed out) get the slot headers; the inactive area gets the new
  //    checkpoint in both copies (its version 2 header makes a version 1
  //    reader ignore it; a version 2 reader rolls forward to it, which is
  //    the same state).
  auto headers = write_all_slot_headers(*spare, sb, table, old.epoch + 1);
  if (!headers.is_ok()) return headers.take_status();
  const int area = 1 - static_cast<int>(old.active_checkpoint);
  for (int copy = 0; copy < 2; ++copy) {
    if (auto s = detail::write_checkpoint(*spare, sb, sb.checkpoint_at(area, copy), table,
                                          old.epoch + 1);
        !s.is_ok()) {
      return s;
    }
  }
  if (auto s = spare->flush(); !s.is_ok()) return s;
  // 2. The superblocks, the older copy first: until it is durable the set
  //    is version 1 and whole; after, version 2.
  sb.active_checkpoint = static_cast<uint32_t>(area);
  sb.epoch = old.epoch + 1;
  sb.generation = old.generation + 1;
  if (auto s = write_both_superblocks(*spare, sb, 1 - report.superblock_copy); !s.is_ok()) {
    return s;
  }
  log(LogLevel::kInfo, spare->name() + ": upgraded to format version " +
                           std::to_string(kFormatVersion));
  return UpgradeReport{old.slot_count, sb.slot_count, headers.value()};
}

Result<RebuildReport> rebuild_metadata(
    std::shared_ptr<BlockDevice> spare, const std::function<void(uint64_t, uint64_t)>& progress) {
  RebuildReport rep;
  // The geometry: a valid superblock, or the copy kept in the slot header
  // area, which lies where it says it does.
  Superblock sb;
  uint64_t generation = 0;
  auto found = read_superblock(*spare);
  if (found.is_ok()) {
    sb = found->sb;
    generation = found->sb.generation;
    if (sb.version < 2) {
      return Status::error(ENOTSUP, spare->name() + ": format version " +
                                        std::to_string(sb.version) +
                                        " has no slot headers to rebuild from");
    }
  } else {
    rep.geometry_from_backup = true;
    const uint64_t size = round_down(spare->size(), kMetaUnit);
    MetaBuffer buf(detail::kIoChunk);
    bool have = false;
    for (uint64_t pos = 2 * kMetaUnit; pos < size && !have; pos += detail::kIoChunk) {
      const size_t n = std::min<uint64_t>(detail::kIoChunk, size - pos);
      if (!spare->read(buf.data, n, pos).is_ok()) continue;
      for (size_t off = 0; off < n; off += kMetaUnit) {
        auto cand = Superblock::decode(buf.data + off);
        if (cand && cand->version >= 2 && cand->slot_header_offset == pos + off &&
            cand->spare_size <= spare->size()) {
          sb = *cand;
          have = true;
          break;
        }
      }
      if (progress) progress(pos + n, size);
    }
    if (!have) {
      return Status::error(ENOENT, spare->name() +
                                       ": no superblock and no copy of the geometry was found: "
                                       "not a dmremap spare of format version 2");
    }
  }
  // Every slot header of this set, unit by unit.
  const uint64_t main_blocks = sb.main_size / sb.block_size;
  std::map<uint64_t, std::pair<uint64_t, Cause>> latest;  // block -> (slot, cause)
  uint64_t max_epoch = sb.epoch;
  uint64_t top_slot = 0;  // one past the highest slot with a header
  {
    const uint64_t units = sb.slot_header_bytes / kMetaUnit;
    MetaBuffer buf(kMetaUnit);
    for (uint64_t index = 1; index < units; ++index) {
      if (!spare->read(buf.data, kMetaUnit, sb.slot_header_offset + index * kMetaUnit).is_ok()) {
        continue;
      }
      const auto desc = SlotHeaderUnit::decode(buf.data);
      if (!desc || desc->uuid != sb.uuid || desc->index != index) continue;
      for (uint64_t j = 0; j < kSlotHeadersPerUnit; ++j) {
        const uint64_t slot = (index - 1) * kSlotHeadersPerUnit + j;
        const auto h = SlotHeader::decode(buf.data + slot_header_pos(slot));
        if (!h || h->uuid != sb.uuid || h->slot != slot || slot >= sb.slot_count ||
            h->block >= main_blocks) {
          continue;
        }
        ++rep.headers;
        max_epoch = std::max(max_epoch, h->epoch);
        top_slot = std::max(top_slot, slot + 1);
        auto [it, fresh] = latest.try_emplace(h->block, slot, h->cause);
        if (!fresh && it->second.first < slot) it->second = {slot, h->cause};
      }
    }
  }
  // A new epoch above any unit, checkpoint or superblock of this set still
  // on the spare, so nothing written before the rebuild can come back.
  {
    MetaBuffer buf(kMetaUnit);
    for (int area = 0; area < 2; ++area) {
      for (int copy = 0; copy < 2; ++copy) {
        if (!spare->read(buf.data, kMetaUnit, sb.checkpoint_at(area, copy)).is_ok()) continue;
        const auto h = CheckpointHeader::decode(buf.data);
        if (h && h->uuid == sb.uuid) max_epoch = std::max(max_epoch, h->epoch);
      }
    }
    for (int copy = 0; copy < 2; ++copy) {
      for (uint64_t i = 0; i < sb.journal_units(); ++i) {
        if (!spare->read(buf.data, kMetaUnit, sb.journal_offset[copy] + i * kMetaUnit).is_ok()) {
          continue;
        }
        const auto u = JournalUnit::decode(buf.data);
        if (u && u->uuid == sb.uuid) max_epoch = std::max(max_epoch, u->epoch);
      }
    }
  }
  RemapTable table;
  std::vector<bool> claimed(top_slot, false);
  for (const auto& [block, where] : latest) {
    table.apply(Record{Record::kRemap, where.second, block, where.first});
    claimed[where.first] = true;
  }
  for (uint64_t slot = 0; slot < top_slot; ++slot) {
    if (!claimed[slot]) table.apply(Record{Record::kBadSlot, Cause::kManual, 0, slot});
  }
  table.set_next_slot(top_slot);
  table.compact();
  rep.remaps = latest.size();
  rep.bad_slots = top_slot - latest.size();
  rep.epoch = max_epoch + 1;
  // Both checkpoint copies of area 0, then both superblocks, each flushed.
  sb.epoch = rep.epoch;
  sb.active_checkpoint = 0;
  sb.flags = kFlagClean;
  sb.generation = generation + 1;
  for (int copy = 0; copy < 2; ++copy) {
    if (auto s = detail::write_checkpoint(*spare, sb, sb.checkpoint_at(0, copy), table, sb.epoch);
        !s.is_ok()) {
      return s;
    }
  }
  if (auto s = detail::write_geometry_backup(*spare, sb); !s.is_ok()) return s;
  if (auto s = spare->flush(); !s.is_ok()) return s;
  if (auto s = write_both_superblocks(*spare, sb, found.is_ok() ? 1 - found->copy : 0);
      !s.is_ok()) {
    return s;
  }
  log(LogLevel::kInfo, spare->name() + ": rebuilt from " + std::to_string(rep.headers) +
                           " slot headers: " + std::to_string(rep.remaps) + " remapped blocks");
  return rep;
}

}  // namespace dmremap
