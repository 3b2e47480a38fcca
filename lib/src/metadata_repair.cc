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
  // Every unit up to the last slot handed out gets its descriptor, even
  // one with no remapped slot: its old contents (pool data) are not damage.
  std::map<uint64_t, std::vector<SlotHeader>> units;  // unit index -> its headers
  for (uint64_t index = 1; index <= (table.next_slot() + kSlotHeadersPerUnit - 1) / kSlotHeadersPerUnit;
       ++index) {
    units[index];
  }
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
  // if a superblock was lost, or an earlier upgrade was cut short).
  RemapTable table;
  OpenReport report;
  auto store = MetadataStore::open(spare, table, /*writable=*/false, &report);
  if (!store.is_ok()) return store.take_status();
  Superblock old = store.value()->superblock();
  // The new checkpoint goes to the area the version 1 superblock does not
  // name, with the epoch after its own: a version 1 reader keeps its set
  // whole until the end, even when this upgrade runs again after a cut.
  old.active_checkpoint = found->sb.active_checkpoint;
  old.epoch = found->sb.epoch;
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

namespace {

// The set's geometry when no superblock is valid: the copy at the start of
// its slot header area. Every unit of the spare is looked at, since a
// spare formatted again (format --force) may still hold an older set's
// copy, earlier or later; the most recently formatted set wins. A chunk
// that fails to read is read again unit by unit.
std::optional<Superblock> find_geometry(BlockDevice& spare,
                                        const std::function<void(uint64_t, uint64_t)>& progress) {
  const uint64_t size = round_down(spare.size(), kMetaUnit);
  MetaBuffer buf(detail::kIoChunk);
  std::optional<Superblock> best;
  auto consider = [&](const char* unit, uint64_t at) {
    auto cand = Superblock::decode(unit);
    if (!cand || cand->version < 2 || cand->slot_header_offset != at ||
        cand->spare_size > spare.size()) {
      return;
    }
    if (!best || cand->format_time > best->format_time ||
        (cand->format_time == best->format_time && at > best->slot_header_offset)) {
      best = cand;
    }
  };
  for (uint64_t pos = 2 * kMetaUnit; pos < size; pos += detail::kIoChunk) {
    const size_t n = std::min<uint64_t>(detail::kIoChunk, size - pos);
    if (spare.read(buf.data, n, pos).is_ok()) {
      for (size_t off = 0; off < n; off += kMetaUnit) consider(buf.data + off, pos + off);
    } else {
      for (size_t off = 0; off < n; off += kMetaUnit) {
        if (spare.read(buf.data, kMetaUnit, pos + off).is_ok()) consider(buf.data, pos + off);
      }
    }
    if (progress) progress(pos + n, size);
  }
  return best;
}

// Far above any epoch or generation of the set that could not be read
// during the rebuild (a unit that fails now may read again later), so
// that nothing from before the rebuild can win over it.
constexpr uint64_t kRebuildJump = uint64_t{1} << 32;

}  // namespace

Result<RebuildReport> rebuild_metadata(
    std::shared_ptr<BlockDevice> spare, const std::function<void(uint64_t, uint64_t)>& progress) {
  RebuildReport rep;
  // The geometry: a valid superblock, or the copy kept in the slot header
  // area, which lies where it says it does.
  Superblock sb;
  uint64_t generation = 0;
  int target_area = 0;
  auto found = read_superblock(*spare);
  if (found.is_ok()) {
    sb = found->sb;
    generation = found->sb.generation;
    if (sb.version < 2) {
      return Status::error(ENOTSUP, spare->name() + ": format version " +
                                        std::to_string(sb.version) +
                                        " has no slot headers to rebuild from");
    }
    // Not over the area the superblock names: if it was whole after all, a
    // cut before the new superblock leaves it so.
    target_area = 1 - static_cast<int>(sb.active_checkpoint);
  } else {
    rep.geometry_from_backup = true;
    auto geometry = find_geometry(*spare, progress);
    if (!geometry) {
      return Status::error(ENOENT, spare->name() +
                                       ": no superblock and no copy of the geometry was found: "
                                       "not a dmremap spare of format version 2");
    }
    sb = *geometry;
  }
  uint64_t max_epoch = sb.epoch;
  RemapTable table;
  // Without superblocks, the checkpoints and journal may be whole: they
  // hold everything, pending marks too.
  if (rep.geometry_from_backup) {
    OpenReport orep;
    auto whole = MetadataStore::open_with_geometry(spare, sb, table, &orep);
    if (whole.is_ok()) {
      rep.from_checkpoint = true;
      max_epoch = whole.value()->superblock().epoch;
    } else {
      table = RemapTable();
      rep.warnings.push_back("the checkpoints and journal do not load either (" +
                             whole.status().to_string() + "): from the slot headers");
    }
  }
  if (!rep.from_checkpoint) {
    // Every slot header of this set. A header counts on its own (its CRC,
    // set and slot), whatever its unit's descriptor says.
    const uint64_t main_blocks = sb.main_size / sb.block_size;
    std::map<uint64_t, std::pair<uint64_t, Cause>> latest;  // block -> (slot, cause)
    uint64_t top_slot = 0;  // one past the highest slot known to be handed out
    std::vector<std::pair<uint64_t, uint64_t>> unknown;  // slot ranges of unreadable units
    const uint64_t units = sb.slot_header_bytes / kMetaUnit;
    MetaBuffer buf(kMetaUnit);
    for (uint64_t index = 1; index < units; ++index) {
      const uint64_t first = (index - 1) * kSlotHeadersPerUnit;
      if (first >= sb.slot_count) break;
      const uint64_t end = std::min(first + kSlotHeadersPerUnit, sb.slot_count);
      if (!spare->read(buf.data, kMetaUnit, sb.slot_header_offset + index * kMetaUnit).is_ok()) {
        unknown.emplace_back(first, end);
        continue;
      }
      for (uint64_t slot = first; slot < end; ++slot) {
        const auto h = SlotHeader::decode(buf.data + slot_header_pos(slot));
        if (!h || h->uuid != sb.uuid || h->slot != slot || h->block >= main_blocks) continue;
        ++rep.headers;
        max_epoch = std::max(max_epoch, h->epoch);
        top_slot = std::max(top_slot, slot + 1);
        auto [it, fresh] = latest.try_emplace(h->block, slot, h->cause);
        if (!fresh && it->second.first < slot) it->second = {slot, h->cause};
      }
    }
    // Slots whose headers could not be read may hold remaps: never hand
    // them out again.
    for (const auto& [first, end] : unknown) {
      top_slot = std::max(top_slot, end);
      rep.unreadable_units += 1;
      rep.warnings.push_back("the headers of slots " + std::to_string(first) + "-" +
                             std::to_string(end - 1) +
                             " cannot be read: their blocks, if any, are not found, and the "
                             "slots are marked bad");
    }
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
  }
  // Epochs still on the spare, of checkpoints and journal units of this set.
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
  rep.remaps = table.remaps();
  rep.pending = table.pending();
  rep.bad_slots = table.bad_slots().size();
  rep.epoch = max_epoch + kRebuildJump;
  // Both copies of the target area, then both superblocks, each flushed.
  sb.epoch = rep.epoch;
  sb.active_checkpoint = static_cast<uint32_t>(target_area);
  sb.flags = kFlagClean;
  sb.generation = generation + kRebuildJump;
  for (int copy = 0; copy < 2; ++copy) {
    if (auto s = detail::write_checkpoint(*spare, sb, sb.checkpoint_at(target_area, copy), table,
                                          sb.epoch);
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
  log(LogLevel::kInfo, spare->name() + ": rebuilt " +
                           (rep.from_checkpoint ? std::string("from the checkpoint and journal")
                                                : "from " + std::to_string(rep.headers) +
                                                      " slot headers") +
                           ": " + std::to_string(rep.remaps) + " remapped blocks");
  return rep;
}

}  // namespace dmremap
