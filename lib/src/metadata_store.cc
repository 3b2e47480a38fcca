#include "dmremap/metadata_store.h"

#include <algorithm>
#include <cstring>
#include <chrono>
#include <ctime>
#include <thread>

#include "dmremap/crc32c.h"
#include "dmremap/log.h"
#include "endian.h"
#include "metadata_io.h"

namespace dmremap {
namespace detail {

size_t checkpoint_chunk(uint64_t entries) {
  const uint64_t bytes = std::max<uint64_t>(entries * kCheckpointEntryBytes, 1);
  return std::min<uint64_t>(kIoChunk, (bytes + kMetaUnit - 1) / kMetaUnit * kMetaUnit);
}

std::string not_formatted(const BlockDevice& spare) {
  return spare.name() +
         ": holds no valid dmremap superblock (not formatted?). Format it with: dmremap format "
         "--main MAIN --spare SPARE. If it held a set whose metadata was lost, dmremap rebuild "
         "--spare SPARE finds its remaps in the slots";
}

// Streams the checkpoint entries of `table` to the area at `offset`.
Status write_checkpoint(BlockDevice& spare, const Superblock& sb, uint64_t offset,
                        const RemapTable& table, uint64_t epoch) {
  const uint64_t total = table.entries() + table.bad_slots().size();
  if (total > sb.checkpoint_capacity()) {
    return Status::error(ENOSPC, spare.name() + ": checkpoint holds at most " +
                                     std::to_string(sb.checkpoint_capacity()) + " entries, " +
                                     std::to_string(total) + " needed");
  }
  const size_t chunk = checkpoint_chunk(total);
  MetaBuffer buf(chunk);
  size_t used = 0;
  uint64_t pos = offset + kMetaUnit;
  uint32_t crc = 0;
  Status status;
  auto flush_buf = [&]() {
    if (used == 0 || !status.is_ok()) return;
    crc = crc32c(buf.data, used, crc);
    const size_t padded = (used + kMetaUnit - 1) / kMetaUnit * kMetaUnit;
    std::memset(buf.data + used, 0, padded - used);
    status = spare.write(buf.data, padded, pos);
    pos += used;
    used = 0;
  };
  auto put = [&](uint64_t key, uint64_t value) {
    le::put64(buf.data + used, key);
    le::put64(buf.data + used + 8, value);
    used += kCheckpointEntryBytes;
    if (used == chunk) flush_buf();
  };
  table.for_each([&](const RemapTable::Entry& e) { put(e.block, e.value); });
  for (uint64_t s : table.bad_slots()) put(kBadSlotKey, s);
  flush_buf();
  if (!status.is_ok()) return status;
  CheckpointHeader h;
  h.epoch = epoch;
  h.entries = total;
  h.next_slot = table.next_slot();
  h.entries_crc = crc;
  h.uuid = sb.uuid;
  h.encode(buf.data);
  return spare.write(buf.data, kMetaUnit, offset);
}

}  // namespace detail

namespace {
using namespace detail;

// Loads one copy of the active checkpoint into `table`; checks every entry.
Status read_checkpoint_copy(BlockDevice& spare, const Superblock& sb, int copy,
                            RemapTable& table) {
  const uint64_t offset = sb.checkpoint_at(static_cast<int>(sb.active_checkpoint), copy);
  const std::string where = spare.name() + ": checkpoint " + std::to_string(sb.active_checkpoint) +
                            (sb.checkpoint_copies() > 1 ? " copy " + std::to_string(copy) : "");
  std::optional<CheckpointHeader> h;
  {
    MetaBuffer head(kMetaUnit);
    if (auto s = spare.read(head.data, kMetaUnit, offset); !s.is_ok()) return s;
    h = CheckpointHeader::decode(head.data);
  }
  if (!h) return Status::error(EUCLEAN, where + ": header is damaged (bad magic or checksum)");
  if (h->uuid != sb.uuid || h->epoch != sb.epoch) {
    return Status::error(EUCLEAN, where + ": header is from epoch " + std::to_string(h->epoch) +
                                      " or another set, the superblock expects epoch " +
                                      std::to_string(sb.epoch));
  }
  if (h->entries > sb.checkpoint_capacity() || h->next_slot > sb.slot_count) {
    return Status::error(EUCLEAN, where + ": header counts are out of range");
  }
  const uint64_t main_blocks = sb.main_size / sb.block_size;
  const size_t chunk = checkpoint_chunk(h->entries);
  MetaBuffer buf(chunk);
  uint64_t left = h->entries * kCheckpointEntryBytes;
  uint64_t pos = offset + kMetaUnit;
  uint32_t crc = 0;
  uint64_t prev_block = 0;
  bool first = true;
  while (left > 0) {
    const size_t n = std::min<uint64_t>(left, chunk);
    const size_t padded = (n + kMetaUnit - 1) / kMetaUnit * kMetaUnit;
    if (auto s = spare.read(buf.data, padded, pos); !s.is_ok()) return s;
    crc = crc32c(buf.data, n, crc);
    for (size_t i = 0; i < n; i += kCheckpointEntryBytes) {
      const uint64_t key = le::get64(buf.data + i);
      const uint64_t value = le::get64(buf.data + i + 8);
      if (key == kBadSlotKey) {
        if (value >= h->next_slot) return Status::error(EUCLEAN, where + ": bad slot out of range");
        table.apply(Record{Record::kBadSlot, Cause::kManual, 0, value});
        continue;
      }
      const bool value_ok =
          RemapTable::is_pending(value) ||
          (RemapTable::slot_of(value) < h->next_slot &&
           RemapTable::cause_of(value) >= Cause::kWriteError &&
           RemapTable::cause_of(value) <= kLastCause);
      if (key >= main_blocks || !value_ok || (!first && key <= prev_block)) {
        return Status::error(EUCLEAN, where + ": entry for block " + std::to_string(key) +
                                          " is out of range or out of order");
      }
      // A pending entry's time as the table keeps it (pending_value).
      table.load(RemapTable::Entry{
          key, RemapTable::is_pending(value) ? RemapTable::pending_value(value & RemapTable::kSlotMask)
                                             : value});
      prev_block = key;
      first = false;
    }
    left -= n;
    pos += n;
  }
  if (crc != h->entries_crc) return Status::error(EUCLEAN, where + ": entries fail their checksum");
  table.set_next_slot(std::max(table.next_slot(), h->next_slot));
  return Status::ok();
}

// Loads the active checkpoint from the first of its copies that is whole.
// `copy_used` says which; the error is the last copy's, naming every one.
Status read_checkpoint(BlockDevice& spare, const Superblock& sb, RemapTable& table,
                       int* copy_used = nullptr) {
  std::string errors;
  Status last;
  for (int copy = 0; copy < sb.checkpoint_copies(); ++copy) {
    RemapTable t;
    last = read_checkpoint_copy(spare, sb, copy, t);
    if (last.is_ok()) {
      table = std::move(t);
      if (copy_used) *copy_used = copy;
      return last;
    }
    errors += (errors.empty() ? "" : "; ") + last.to_string();
  }
  if (sb.checkpoint_copies() == 1) return last;
  return Status::error(last.code() == EUCLEAN ? EUCLEAN : last.code(),
                       "no copy of the checkpoint is whole: " + errors);
}

// The epoch in the header of checkpoint area `area`, when the header is
// valid and of this set; nothing is said of its entries.
std::optional<uint64_t> checkpoint_epoch(BlockDevice& spare, const Superblock& sb, int area) {
  MetaBuffer head(kMetaUnit);
  std::optional<uint64_t> best;
  for (int copy = 0; copy < sb.checkpoint_copies(); ++copy) {
    if (!spare.read(head.data, kMetaUnit, sb.checkpoint_at(area, copy)).is_ok()) continue;
    auto h = CheckpointHeader::decode(head.data);
    if (h && h->uuid == sb.uuid && (!best || h->epoch > *best)) best = h->epoch;
  }
  return best;
}

bool record_in_range(const Record& r, const Superblock& sb) {
  const uint64_t main_blocks = sb.main_size / sb.block_size;
  switch (r.type) {
    case Record::kRemap: return r.block < main_blocks && r.slot < sb.slot_count;
    case Record::kPending: return r.block < main_blocks;
    case Record::kBadSlot: return r.slot < sb.slot_count;
  }
  return false;
}

// Reads unit `i` from either journal copy; nullopt when neither copy is a
// valid unit of this set, epoch and sequence.
std::optional<JournalUnit> read_unit(BlockDevice& spare, const Superblock& sb, uint64_t i,
                                     char* buf, bool* repaired, bool* unreadable) {
  *repaired = false;
  *unreadable = true;
  for (int copy = 0; copy < 2; ++copy) {
    if (!spare.read(buf, kMetaUnit, sb.journal_offset[copy] + i * kMetaUnit).is_ok()) continue;
    *unreadable = false;
    auto u = JournalUnit::decode(buf);
    if (u && u->uuid == sb.uuid && u->epoch == sb.epoch && u->sequence == i &&
        std::all_of(u->records.begin(), u->records.end(),
                    [&](const Record& r) { return record_in_range(r, sb); })) {
      *repaired = copy == 1;
      return u;
    }
  }
  return std::nullopt;
}

// "" when no slot holds two blocks and no bad slot holds one; otherwise the
// first such slot, in words. Serving such a table would hand one block's
// data to another.
std::string slot_used_twice(const RemapTable& table) {
  std::vector<std::pair<uint64_t, uint64_t>> slots;  // (slot, block), bad: block = ~0
  slots.reserve(table.remaps() + table.bad_slots().size());
  table.for_each([&](const RemapTable::Entry& e) {
    if (!RemapTable::is_pending(e.value)) slots.emplace_back(RemapTable::slot_of(e.value), e.block);
  });
  for (uint64_t s : table.bad_slots()) slots.emplace_back(s, ~uint64_t{0});
  std::sort(slots.begin(), slots.end());
  for (size_t i = 1; i < slots.size(); ++i) {
    if (slots[i].first != slots[i - 1].first) continue;
    if (slots[i].second == ~uint64_t{0} && slots[i - 1].second == ~uint64_t{0}) continue;
    const auto who = [](uint64_t block) {
      return block == ~uint64_t{0} ? std::string("the bad-slot list")
                                   : "block " + std::to_string(block);
    };
    return "slot " + std::to_string(slots[i].first) + " is claimed by " +
           who(slots[i - 1].second) + " and by " + who(slots[i].second);
  }
  return {};
}

}  // namespace
using namespace detail;

Status detail::write_geometry_backup(BlockDevice& spare, const Superblock& sb) {
  Superblock copy = sb;
  copy.generation = 0;
  copy.flags = kFlagClean;
  // Not an evacuation: a rebuild from this copy must not bring one back.
  copy.evac = EvacRecord{};
  MetaBuffer buf(kMetaUnit);
  copy.encode(buf.data);
  return spare.write(buf.data, kMetaUnit, sb.slot_header_offset);
}

Result<FoundSuperblock> read_superblock(BlockDevice& spare) {
  if (spare.size() < 2 * kMetaUnit) return Status::error(EINVAL, not_formatted(spare));
  MetaBuffer buf(kMetaUnit);
  std::optional<Superblock> sb[2];
  std::string problem[2];
  for (int i = 0; i < 2; ++i) {
    if (spare.read(buf.data, kMetaUnit, kSuperblockOffset[i]).is_ok()) {
      sb[i] = Superblock::decode(buf.data, &problem[i]);
    }
  }
  if (!sb[0] && !sb[1]) {
    // A checksummed superblock whose geometry is impossible is not "not
    // formatted": say what is wrong with it.
    for (int i = 0; i < 2; ++i) {
      if (!problem[i].empty()) {
        return Status::error(EUCLEAN, spare.name() + ": superblock copy " + std::to_string(i) +
                                          " is refused: " + problem[i] +
                                          " (damaged, or not written by dmremap)");
      }
    }
    return Status::error(ENOENT, not_formatted(spare));
  }
  const int best = !sb[1] || (sb[0] && sb[0]->generation > sb[1]->generation) ? 0 : 1;
  const bool other = sb[1 - best].has_value();
  if (sb[best]->spare_size > spare.size()) {
    return Status::error(EINVAL, spare.name() + ": is " + std::to_string(spare.size()) +
                                     " bytes, but was formatted as " +
                                     std::to_string(sb[best]->spare_size) + " bytes");
  }
  return FoundSuperblock{*sb[best], best, other};
}

Result<Superblock> MetadataStore::format(BlockDevice& spare, const LayoutParams& params,
                                         const std::string& main_identity) {
  LayoutParams p = params;
  p.spare_size = spare.size();
  auto planned = plan_layout(p);
  if (!planned.is_ok()) return planned.take_status().with_context(spare.name());
  Superblock sb = planned.value();
  sb.uuid = random_uuid();
  sb.format_time = static_cast<uint64_t>(std::time(nullptr));
  sb.main_identity = main_identity.substr(0, 63);
  sb.flags = kFlagClean;
  // An empty checkpoint in area 0; the journal needs no clearing because
  // units of another set or epoch are never trusted.
  RemapTable empty;
  for (int copy = 0; copy < sb.checkpoint_copies(); ++copy) {
    if (auto s = write_checkpoint(spare, sb, sb.checkpoint_at(0, copy), empty, sb.epoch);
        !s.is_ok()) {
      return s;
    }
  }
  // The slot header area's unit 0: the geometry, for a rebuild that finds
  // no superblock. Slot header units come with their first slot.
  if (auto s = write_geometry_backup(spare, sb); !s.is_ok()) return s;
  if (auto s = spare.flush(); !s.is_ok()) return s;
  // Both superblock copies: generation 1 in copy 1, and a stale-proof
  // generation 0 in copy 0 so that any older superblock is gone.
  MetaBuffer buf(kMetaUnit);
  for (int copy = 0; copy < 2; ++copy) {
    sb.generation = static_cast<uint64_t>(copy);
    sb.encode(buf.data);
    if (auto s = spare.write(buf.data, kMetaUnit, kSuperblockOffset[copy]); !s.is_ok()) return s;
  }
  if (auto s = spare.flush(); !s.is_ok()) return s;
  return sb;
}

Result<std::unique_ptr<MetadataStore>> MetadataStore::open(std::shared_ptr<BlockDevice> spare,
                                                           RemapTable& table, bool writable,
                                                           OpenReport* report) {
  OpenReport local;
  OpenReport& rep = report ? *report : local;
  auto found = read_superblock(*spare);
  if (!found.is_ok()) return found.take_status();
  rep.superblock_copy = found->copy;
  rep.other_superblock_valid = found->other_valid;
  rep.was_clean = found->sb.clean();
  if (!found->other_valid) {
    rep.warnings.push_back("superblock copy " + std::to_string(1 - found->copy) +
                           " is damaged; the next metadata write repairs it, if that copy takes writes");
  }
  if (writable && found->sb.version < kFormatVersion) {
    return Status::error(ENOTSUP,
                         spare->name() + ": holds a set in format version " +
                             std::to_string(found->sb.version) +
                             ", which this dmremap only reads. Upgrade it in place (crash-safe, "
                             "nothing is lost) with: dmremap upgrade --spare " + spare->name());
  }
  std::unique_ptr<MetadataStore> store(new MetadataStore(spare, found->sb, found->copy));
  int checkpoint_copy = 0;
  if (auto s = store->load(table, rep, &checkpoint_copy); !s.is_ok()) return s;
  if (writable) {
    if (auto s = store->repair_on_open(table, rep, checkpoint_copy); !s.is_ok()) return s;
  }
  return store;
}

Result<std::unique_ptr<MetadataStore>> MetadataStore::open_with_geometry(
    std::shared_ptr<BlockDevice> spare, const Superblock& geometry, RemapTable& table,
    OpenReport* report) {
  OpenReport local;
  OpenReport& rep = report ? *report : local;
  Superblock sb = geometry;
  sb.epoch = 0;  // every checkpoint of the set is later: the newest wins
  sb.flags &= ~kFlagClean;
  std::unique_ptr<MetadataStore> store(new MetadataStore(spare, sb, 0));
  if (auto s = store->load(table, rep, nullptr); !s.is_ok()) return s;
  return store;
}

Status MetadataStore::load(RemapTable& table, OpenReport& rep, int* checkpoint_copy_out) {
  const std::shared_ptr<BlockDevice>& spare = spare_;
  MetadataStore* store = this;
  // Roll forward: a complete checkpoint of a later epoch than the
  // superblock's means a newer superblock was written, or was about to be,
  // when the newest copy was lost (a bad sector, a torn write). That
  // checkpoint holds everything the older superblock's checkpoint and
  // journal hold, and the journal after it may hold more; falling back to
  // the older state would serve stale data. The later of the two areas
  // wins, so a superblock copy left behind by several checkpoints (the
  // other copy refused writes for a while) still finds the newest state.
  {
    uint64_t best_epoch = store->sb_.epoch;
    int best_area = -1;
    for (int area = 0; area < 2; ++area) {
      const auto epoch = checkpoint_epoch(*spare, store->sb_, area);
      if (!epoch || *epoch <= best_epoch) continue;
      Superblock next = store->sb_;
      next.active_checkpoint = static_cast<uint32_t>(area);
      next.epoch = *epoch;
      RemapTable newer;
      if (!read_checkpoint(*spare, next, newer).is_ok()) continue;
      best_epoch = *epoch;
      best_area = area;
    }
    if (best_area >= 0) {
      rep.warnings.push_back("rolled forward to checkpoint " + std::to_string(best_area) +
                             " of epoch " + std::to_string(best_epoch) + " (the superblock says " +
                             std::to_string(store->sb_.epoch) +
                             "): the newest superblock was lost or never written");
      store->sb_.active_checkpoint = static_cast<uint32_t>(best_area);
      store->sb_.epoch = best_epoch;
      store->sb_.flags &= ~kFlagClean;
    }
  }
  const Superblock& sb = store->sb_;
  int checkpoint_copy = 0;
  if (checkpoint_copy_out) *checkpoint_copy_out = 0;
  if (auto s = read_checkpoint(*spare, sb, table, &checkpoint_copy); !s.is_ok()) return s;
  if (checkpoint_copy_out) *checkpoint_copy_out = checkpoint_copy;
  if (checkpoint_copy != 0) {
    rep.warnings.push_back("checkpoint " + std::to_string(sb.active_checkpoint) +
                           " copy 0 is damaged; copy " + std::to_string(checkpoint_copy) +
                           " was used, and a writable open writes both again");
  }
  rep.checkpoint_entries = table.entries() + table.bad_slots().size();

  MetaBuffer buf(kMetaUnit);
  uint64_t i = 0;
  for (; i < sb.journal_units(); ++i) {
    bool repaired = false;
    bool unreadable = false;
    auto unit = read_unit(*spare, sb, i, buf.data, &repaired, &unreadable);
    if (!unit) {
      // The end of the journal, unless a later unit of this epoch exists:
      // then records were lost, and serving would return stale data.
      // Units are flushed one at a time, so after a crash nothing valid
      // follows the end; every later unit is checked, not just the next.
      for (uint64_t j = i + 1; j < sb.journal_units(); ++j) {
        bool r2 = false;
        bool u2 = false;
        if (read_unit(*spare, sb, j, buf.data, &r2, &u2)) {
          return Status::error(EUCLEAN, spare->name() + ": journal unit " + std::to_string(i) +
                                            " is " + (unreadable ? "unreadable" : "damaged") +
                                            " in both copies, but later units exist (unit " +
                                            std::to_string(j) + "); run `dmremap check` and "
                                            "restore the spare");
        }
      }
      break;
    }
    if (repaired) ++rep.journal_copy_repairs;
    for (const Record& r : unit->records) table.apply(r);
    rep.journal_records += unit->records.size();
  }
  rep.journal_units = i;
  store->journal_next_ = i;
  table.compact();
  if (rep.journal_copy_repairs > 0) {
    rep.warnings.push_back(std::to_string(rep.journal_copy_repairs) +
                           " journal unit(s) were read from the second copy");
  }
  if (table.next_slot() > sb.slot_count) {
    return Status::error(EUCLEAN, spare->name() + ": metadata uses slots beyond the pool");
  }
  if (auto dup = slot_used_twice(table); !dup.empty()) {
    return Status::error(EUCLEAN, spare->name() + ": " + dup +
                                      "; the metadata is damaged. Run `dmremap check`");
  }
  return Status::ok();
}

Status MetadataStore::repair_on_open(const RemapTable& table, OpenReport& rep,
                                     int checkpoint_copy) {
  // A control socket recorded by the last frontend is not this opener's:
  // the superblock this open writes goes without it (a frontend records
  // its own once it serves).
  sb_.control_path.clear();
  const uint64_t replayed = journal_next_;
  // The other copy of the active checkpoint too: one that is damaged is
  // written again, as is copy 0 when copy 1 had to be read.
  bool rewrite = replayed > 0 || checkpoint_copy != 0;
  if (!rewrite && sb_.checkpoint_copies() > 1) {
    RemapTable other;
    if (Status s = read_checkpoint_copy(*spare_, sb_, 1, other); !s.is_ok()) {
      rep.warnings.push_back(s.to_string() + "; a new checkpoint is written");
      rewrite = true;
    }
  }
  if (sb_.version >= 2) {
    // The geometry's copy in the slot header area (for a rebuild).
    MetaBuffer buf(kMetaUnit);
    const bool read = spare_->read(buf.data, kMetaUnit, sb_.slot_header_offset).is_ok();
    const auto copy = read ? Superblock::decode(buf.data) : std::nullopt;
    if (!copy || copy->uuid != sb_.uuid || copy->slot_header_offset != sb_.slot_header_offset) {
      rep.warnings.push_back("the copy of the geometry in slot header unit 0 is damaged; it is "
                             "written again");
      if (Status s = write_geometry_backup(*spare_, sb_); !s.is_ok()) {
        if (classify_failure(s.code()) == FailureKind::kDevice) return s;
        note_degraded("slot header unit 0 refuses writes (" + s.to_string() +
                      "): a rebuild would have to be told the geometry");
      }
    }
    // Headers of slots not handed out (at or past next_slot) are from
    // remaps that never committed (a crash, a failed journal write): a
    // rebuild must not take them.
    if (Status s = clear_stale_slot_headers(table.next_slot(), ~uint64_t{0}); !s.is_ok()) return s;
  }
  // Replayed records, or a damaged checkpoint copy: a new checkpoint
  // (written to every copy) puts them in order.
  if (rewrite) return checkpoint(table, false);
  Superblock next = sb_;
  next.flags &= ~kFlagClean;
  return write_superblock(next);
}

Result<int> MetadataStore::put_superblock(const Superblock& next, bool renewal) {
  MetaBuffer buf(kMetaUnit);
  next.encode(buf.data);
  // The older copy, so that a torn write leaves the newer one. When that
  // copy refuses writes (a bad sector) the current one takes the write
  // instead, and the set goes on with one superblock that is kept up to
  // date: degraded, and said so, but not refused. A spare that is gone
  // as a whole (a device errno) gets no second try.
  int copy = 1 - sb_copy_;
  if (copy == bad_sb_copy_) copy = sb_copy_;
  // A renewal written over the older copy is expendable: lost, it leaves
  // the current one as it was, so it must not cost the remaps' unflushed
  // writes when the spare drops before its flush. Written over the only
  // copy kept up to date, it is not.
  auto put = [&](int which) {
    return renewal && which != sb_copy_
               ? spare_->write_expendable(buf.data, kMetaUnit, kSuperblockOffset[which])
               : spare_->write(buf.data, kMetaUnit, kSuperblockOffset[which]);
  };
  // An expendable renewal is not counted as unflushed, so a reconnect
  // between its write and its flush would not make the flush fail: the
  // connection epoch tells instead, and such a renewal is not durable.
  const uint64_t epoch = spare_->connection_epoch();
  Status w = put(copy);
  if (!w.is_ok() && copy != sb_copy_ && classify_failure(w.code()) != FailureKind::kDevice) {
    bad_sb_copy_ = copy;
    note_degraded("superblock copy " + std::to_string(copy) + " refuses writes (" +
                  w.to_string() + "); copy " + std::to_string(sb_copy_) +
                  " is the only one kept up to date until the set is reopened");
    copy = sb_copy_;
    w = put(copy);
  }
  if (!w.is_ok()) return w;
  if (auto s = spare_->flush(); !s.is_ok()) return s;
  if (renewal && spare_->connection_epoch() != epoch) {
    return Status::error(ENOTCONN, spare_->name() + ": reconnected during the lease renewal; "
                                                    "its write may not have landed");
  }
  return copy;
}

namespace {
constexpr int kSnapshotTries = 40;
constexpr auto kSnapshotGap = std::chrono::milliseconds(50);

// True when the newest superblock says the set is open (or crashed): a
// writer may be at work.
bool in_use(BlockDevice& spare) {
  auto found = read_superblock(spare);
  return found.is_ok() && !found->sb.clean();
}
}  // namespace

Result<std::unique_ptr<MetadataStore>> MetadataStore::open_snapshot(
    std::shared_ptr<BlockDevice> spare, RemapTable& table, OpenReport* report) {
  for (int attempt = 1;; ++attempt) {
    RemapTable t;
    OpenReport rep;
    auto store = open(spare, t, /*writable=*/false, &rep);
    // A checkpoint written meanwhile starts a new journal over the old one:
    // the replay may have stopped at a unit already rewritten, and the
    // table be older than a snapshot taken before. Taken again.
    if (store.is_ok() && attempt < kSnapshotTries) {
      auto now = read_superblock(*spare);
      if (now.is_ok() && now->sb.epoch != store.value()->superblock().epoch) {
        std::this_thread::sleep_for(kSnapshotGap);
        continue;
      }
    }
    if (store.is_ok() || store.status().code() != EUCLEAN || attempt == kSnapshotTries ||
        !in_use(*spare)) {
      if (store.is_ok()) {
        table = std::move(t);
        if (report) *report = std::move(rep);
      }
      return store;
    }
    std::this_thread::sleep_for(kSnapshotGap);
  }
}

Status MetadataStore::write_superblock(Superblock next) {
  next.generation = std::max(sb_.generation, tried_generation_) + 1;
  tried_generation_ = next.generation;
  auto copy = put_superblock(next);
  if (!copy.is_ok()) return copy.take_status();
  sb_ = std::move(next);
  sb_copy_ = copy.value();
  return Status::ok();
}

Status MetadataStore::save_scan(uint64_t next_block, uint32_t state, uint64_t started,
                                uint64_t saved, uint64_t rate, uint64_t unreadable,
                                uint64_t rescued) {
  if (failed_) return refused();
  Superblock next = sb_;
  next.scan_next = next_block;
  next.scan_state = state;
  next.scan_started = started;
  next.scan_saved = saved;
  next.scan_rate = rate;
  next.scan_unreadable = unreadable;
  next.scan_rescued = rescued;
  // Its loss costs nothing but some reading again.
  return write_renewal(std::move(next));
}

Status MetadataStore::write_renewal(Superblock next) {
  // As a lease renewal: a new generation over the older copy (see
  // put_superblock).
  next.generation = std::max(sb_.generation, tried_generation_) + 1;
  tried_generation_ = next.generation;
  auto copy = put_superblock(next, /*renewal=*/true);
  if (!copy.is_ok()) return copy.take_status();
  sb_ = std::move(next);
  sb_copy_ = copy.value();
  return Status::ok();
}

Status MetadataStore::advertise_control(const std::string& path) {
  if (failed_) return refused();
  if (path.size() >= kControlPathBytes) {
    return Status::error(ENAMETOOLONG, "control socket path " + path + " is too long to record");
  }
  Superblock next = sb_;
  next.control_path = path;
  // Its loss costs a `--spare` command the way to the frontend, no more.
  return write_renewal(std::move(next));
}

Status MetadataStore::save_evacuation(const EvacRecord& record) {
  if (failed_) return refused();
  if (record.target.size() >= kEvacTargetBytes) {
    return Status::error(ENAMETOOLONG, "the evacuation's target " + record.target +
                                           " is too long to record (" +
                                           std::to_string(kEvacTargetBytes - 1) + " bytes at most)");
  }
  Superblock next = sb_;
  next.evac = record;
  // A lost save leaves the other copy, an older place: the copy goes over
  // some blocks again, and a region set in the bitmap there is copied again.
  return write_renewal(std::move(next));
}

Status MetadataStore::heartbeat() {
  if (failed_) return refused();
  auto found = read_superblock(*spare_);
  if (!found.is_ok()) return found.take_status();
  if (found->sb.uuid != sb_.uuid ||
      found->sb.generation > std::max(sb_.generation, tried_generation_)) {
    failed_ = true;
    return Status::error(EBUSY, spare_->name() + ": another program has written this set's "
                                                 "superblock (generation " +
                                    std::to_string(found->sb.generation) + ", ours " +
                                    std::to_string(sb_.generation) +
                                    "): two servers are using one spare");
  }
  // Past any generation tried before: a heartbeat whose write landed but
  // whose flush failed is not written again under the same number.
  const uint64_t generation = std::max(sb_.generation, tried_generation_) + 1;
  tried_generation_ = generation;
  Superblock next = sb_;
  next.generation = generation;
  // A failed heartbeat leaves the other copy valid; the next one tries
  // again. Only the generation changes: readers of the other fields (the
  // engine's stats) run at the same time.
  auto copy = put_superblock(next, /*renewal=*/true);
  if (!copy.is_ok()) return copy.take_status();
  sb_.generation = generation;
  sb_copy_ = copy.value();
  return Status::ok();
}

void MetadataStore::note_degraded(const std::string& what) {
  log(LogLevel::kWarning, spare_->name() + ": " + what);
  std::lock_guard l(degraded_mu_);
  if (std::find(degraded_.begin(), degraded_.end(), what) == degraded_.end()) {
    degraded_.push_back(what);
  }
}

std::vector<std::string> MetadataStore::degraded() const {
  std::lock_guard l(degraded_mu_);
  return degraded_;
}

Status MetadataStore::checkpoint_now(const RemapTable& table, bool clean) {
  const uint32_t target = 1 - sb_.active_checkpoint;
  const uint64_t epoch = sb_.epoch + 1;
  if (auto s = write_checkpoint_area(target, table, epoch); !s.is_ok()) return s;
  if (auto s = spare_->flush(); !s.is_ok()) return s;
  Superblock next = sb_;
  next.active_checkpoint = target;
  next.epoch = epoch;
  next.flags = clean ? (next.flags | kFlagClean) : (next.flags & ~kFlagClean);
  if (clean) next.control_path.clear();  // nobody serves it now
  if (auto s = write_superblock(next); !s.is_ok()) return s;
  journal_next_ = 0;
  return Status::ok();
}

Status MetadataStore::write_checkpoint_area(uint32_t area, const RemapTable& table,
                                            uint64_t epoch) {
  // Every copy. One that refuses the write leaves the checkpoint in the
  // other: degraded, said so, but the set goes on. A reader takes the
  // first copy that is whole.
  const int copies = sb_.checkpoint_copies();
  std::vector<Status> failed(static_cast<size_t>(copies));
  int good = 0;
  for (int copy = 0; copy < copies; ++copy) {
    failed[copy] = write_checkpoint(*spare_, sb_, sb_.checkpoint_at(static_cast<int>(area), copy),
                                    table, epoch);
    if (failed[copy].is_ok()) ++good;
  }
  for (int copy = 0; copy < copies; ++copy) {
    if (failed[copy].is_ok()) continue;
    if (good == 0 || classify_failure(failed[copy].code()) == FailureKind::kDevice ||
        failed[copy].code() == ENOSPC) {
      return std::move(failed[copy]);
    }
    note_degraded("checkpoint area " + std::to_string(area) + " copy " + std::to_string(copy) +
                  " refuses writes (" + failed[copy].to_string() +
                  "): the checkpoint is kept in the other copy alone");
  }
  return Status::ok();
}

Status MetadataStore::write_slot_header(uint64_t slot, uint64_t block, Cause cause,
                                        const RemapTable& table) {
  return write_slot_headers({SlotHeaderWrite{slot, block, cause}}, table,
                            std::max(table.next_slot(), slot + 1));
}

Status MetadataStore::write_slot_headers(std::vector<SlotHeaderWrite> slots,
                                         const RemapTable& table, uint64_t handed_out) {
  if (sb_.version < 2 || slots.empty()) return Status::ok();
  std::sort(slots.begin(), slots.end(),
            [](const SlotHeaderWrite& a, const SlotHeaderWrite& b) { return a.slot < b.slot; });
  MetaBuffer buf(kMetaUnit);
  // One read and one write per unit, whatever number of its slots change.
  for (size_t i = 0; i < slots.size();) {
    const uint64_t index = 1 + slots[i].slot / kSlotHeadersPerUnit;
    size_t j = i;
    while (j < slots.size() && 1 + slots[j].slot / kSlotHeadersPerUnit == index) ++j;
    const uint64_t at = slot_header_unit(sb_, slots[i].slot);
    const std::string unit_name = "slot header unit " + std::to_string(index);
    Status read = spare_->read(buf.data, kMetaUnit, at);
    if (!read.is_ok() && classify_failure(read.code()) == FailureKind::kDevice) return read;
    const auto desc = read.is_ok() ? SlotHeaderUnit::decode(buf.data) : std::nullopt;
    const uint64_t first = (index - 1) * kSlotHeadersPerUnit;
    if (!desc || desc->uuid != sb_.uuid || desc->index != index) {
      // A fresh unit (its first slot handed out), or one that cannot be
      // read or holds garbage: start it again, with the headers of its
      // other slots from the table. Never written (zeros) is not damage:
      // its first slots may have been bad ones.
      const bool blank = read.is_ok() && std::all_of(buf.data, buf.data + kMetaUnit,
                                                     [](char c) { return c == 0; });
      std::memset(buf.data, 0, kMetaUnit);
      SlotHeaderUnit u;
      u.uuid = sb_.uuid;
      u.index = index;
      u.encode(buf.data);
      if (!read.is_ok() || first < table.next_slot()) {
        table.for_each([&](const RemapTable::Entry& e) {
          if (RemapTable::is_pending(e.value)) return;
          const uint64_t sl = RemapTable::slot_of(e.value);
          if (sl < first || sl >= first + kSlotHeadersPerUnit) return;
          SlotHeader h{sb_.uuid, sl, e.block, sb_.epoch, RemapTable::cause_of(e.value)};
          h.encode(buf.data + slot_header_pos(sl));
        });
        if (!blank) {
          note_degraded(unit_name + (read.is_ok() ? " was damaged" : " could not be read (" +
                                                                          read.to_string() + ")") +
                        "; it was written again from the table");
        }
      }
    }
    // Headers of this unit's slots that are not handed out (remaps that
    // never committed, from before a crash) go: a rebuild must not take
    // them. Slots handed out but not yet committed keep theirs: their
    // remaps are on their way.
    for (uint64_t k = 0; k < kSlotHeadersPerUnit; ++k) {
      if (first + k >= handed_out) {
        std::memset(buf.data + slot_header_pos(first + k), 0, kSlotHeaderBytes);
      }
    }
    const auto now = static_cast<uint64_t>(std::time(nullptr));
    for (size_t k = i; k < j; ++k) {
      SlotHeader h{sb_.uuid, slots[k].slot, slots[k].block, sb_.epoch, slots[k].cause, now};
      h.encode(buf.data + slot_header_pos(slots[k].slot));
    }
    Status w = spare_->write(buf.data, kMetaUnit, at);
    if (!w.is_ok()) {
      if (classify_failure(w.code()) == FailureKind::kDevice) return w;
      note_degraded(unit_name + " refuses writes (" + w.to_string() +
                    "): a rebuild from the slots would not find the slots it describes");
    }
    i = j;
  }
  return Status::ok();
}

Status MetadataStore::clear_stale_slot_headers(uint64_t from, uint64_t keep) {
  if (sb_.version < 2 || from >= sb_.slot_count) return Status::ok();
  MetaBuffer buf(kMetaUnit);
  const uint64_t first_unit = 1 + from / kSlotHeadersPerUnit;
  const uint64_t units = sb_.slot_header_bytes / kMetaUnit;
  // The engine hands out at most kSlotsAhead slots past the table's
  // next_slot before their remaps commit: their units are all looked at.
  const uint64_t span = 2 + kSlotsAhead / kSlotHeadersPerUnit;
  for (uint64_t index = first_unit; index < std::min(first_unit + span, units); ++index) {
    const uint64_t at = sb_.slot_header_offset + index * kMetaUnit;
    Status r = spare_->read(buf.data, kMetaUnit, at);
    if (!r.is_ok()) {
      if (classify_failure(r.code()) == FailureKind::kDevice) return r;
      continue;  // rewritten from the table when one of its slots is handed out
    }
    const auto desc = SlotHeaderUnit::decode(buf.data);
    if (!desc || desc->uuid != sb_.uuid || desc->index != index) continue;
    bool changed = false;
    for (uint64_t j = 0; j < kSlotHeadersPerUnit; ++j) {
      const uint64_t slot = (index - 1) * kSlotHeadersPerUnit + j;
      char* h = buf.data + slot_header_pos(slot);
      if (slot < from || slot == keep) continue;
      if (std::any_of(h, h + kSlotHeaderBytes, [](char c) { return c != 0; })) {
        std::memset(h, 0, kSlotHeaderBytes);
        changed = true;
      }
    }
    if (!changed) continue;
    if (Status w = spare_->write(buf.data, kMetaUnit, at); !w.is_ok()) {
      if (classify_failure(w.code()) == FailureKind::kDevice) return w;
      note_degraded("slot header unit " + std::to_string(index) + " refuses writes (" +
                    w.to_string() + "): headers of remaps that never committed stay in it");
    }
  }
  return Status::ok();
}

Status MetadataStore::refused() const {
  return Status::error(EIO, spare_->name() +
                                ": an earlier metadata write failed; nothing more is written "
                                "until the set is reopened");
}

Status MetadataStore::checkpoint(const RemapTable& table, bool clean) {
  if (failed_) return refused();
  Status s = checkpoint_now(table, clean);
  if (!s.is_ok()) failed_ = true;
  return s;
}

Status MetadataStore::append(const std::vector<Record>& records, const RemapTable& table,
                             bool flush_last) {
  return append_groups({records}, table, flush_last);
}

Status MetadataStore::append_groups(const std::vector<std::vector<Record>>& groups,
                                    const RemapTable& table, bool flush_last) {
  // Units, each holding whole groups (a group larger than a unit alone
  // fills as many as it needs): the records of one change (a slot's move
  // and its old slot marked bad) are never split across units, of which
  // a crash may keep only the first.
  std::vector<std::vector<Record>> units;
  for (const auto& g : groups) {
    if (g.empty()) continue;
    if (units.empty() || units.back().size() + g.size() > kRecordsPerUnit) units.emplace_back();
    for (const Record& r : g) {
      if (units.back().size() == kRecordsPerUnit) units.emplace_back();
      units.back().push_back(r);
    }
  }
  if (units.empty()) return Status::ok();
  if (units.size() > sb_.journal_units()) {
    return Status::error(E2BIG, spare_->name() + ": too many records for one journal append");
  }
  if (failed_) return refused();
  Status s = append_units(units, table, flush_last);
  if (!s.is_ok()) failed_ = true;
  return s;
}

Status MetadataStore::append_units(const std::vector<std::vector<Record>>& units,
                                   const RemapTable& table, bool flush_last) {
  // Room for all of them first: a checkpoint between two of them would
  // write a table without the first.
  if (journal_next_ + units.size() > sb_.journal_units()) {
    if (auto s = checkpoint(table, false); !s.is_ok()) return s;
  }
  MetaBuffer buf(kMetaUnit);
  for (size_t u = 0; u < units.size(); ++u) {
    JournalUnit unit;
    unit.epoch = sb_.epoch;
    unit.sequence = journal_next_;
    unit.uuid = sb_.uuid;
    unit.records = units[u];
    unit.encode(buf.data);
    // Both copies. One that refuses the write (a bad sector) leaves the
    // journal with one good copy of this unit: a loud warning, not a
    // refusal. Replay reads whichever copy is valid.
    Status failed[2];
    for (int copy = 0; copy < 2; ++copy) {
      const uint64_t off = sb_.journal_offset[copy] + unit.sequence * kMetaUnit;
      failed[copy] = spare_->write(buf.data, kMetaUnit, off);
    }
    if (!failed[0].is_ok() && !failed[1].is_ok()) return std::move(failed[0]);
    for (int copy = 0; copy < 2; ++copy) {
      if (failed[copy].is_ok()) continue;
      if (classify_failure(failed[copy].code()) == FailureKind::kDevice) return failed[copy];
      note_degraded("journal copy " + std::to_string(copy) + " refuses writes (" +
                    failed[copy].to_string() + "): units are kept in copy " +
                    std::to_string(1 - copy) + " alone");
    }
    // One flush per unit: a later unit is never durable before an earlier
    // one, so replay can tell a crash (the journal just ends) from a lost
    // unit in the middle (refused). Groups are independent, so a partly
    // durable append that was never acknowledged is harmless. The last
    // unit's flush may be the caller's.
    if (u + 1 < units.size() || flush_last) {
      if (auto s = spare_->flush(); !s.is_ok()) return s;
    }
    ++journal_next_;
  }
  return Status::ok();
}

void MetadataStore::refuse_from_now() { failed_ = true; }

Result<bool> spare_is_blank(BlockDevice& spare,
                            const std::function<void(uint64_t, uint64_t)>& progress) {
  MetaBuffer buf(kIoChunk);
  const uint64_t size = spare.size();
  uint64_t pos = spare.next_data(0);
  uint64_t reported = 0;
  while (pos < size) {
    const size_t n = std::min<uint64_t>(kIoChunk, size - pos);
    if (auto s = spare.read(buf.data, n, pos); !s.is_ok()) return s;
    if (std::any_of(buf.data, buf.data + n, [](char c) { return c != 0; })) return false;
    pos = spare.next_data(pos + n);
    if (progress && pos - reported >= (256u << 20)) {
      progress(pos, size);
      reported = pos;
    }
  }
  return true;
}

namespace {
CheckReport check_once(const std::shared_ptr<BlockDevice>& spare);
}  // namespace

CheckReport check_metadata(std::shared_ptr<BlockDevice> spare) {
  for (int attempt = 1;; ++attempt) {
    CheckReport r = check_once(spare);
    if (r.problems.empty() || attempt == kSnapshotTries / 2 || !in_use(*spare)) return r;
    std::this_thread::sleep_for(kSnapshotGap * 2);
  }
}

namespace {
CheckReport check_once(const std::shared_ptr<BlockDevice>& spare) {
  CheckReport r;
  RemapTable table;
  OpenReport rep;
  auto store = MetadataStore::open(spare, table, false, &rep);
  if (!store.is_ok()) {
    r.problems.push_back(store.status().to_string());
    return r;
  }
  const Superblock& sb = store.value()->superblock();
  for (auto& w : rep.warnings) r.problems.push_back(w);
  r.notes.push_back("superblock copy " + std::to_string(rep.superblock_copy) + ", generation " +
                    std::to_string(sb.generation) + ", epoch " + std::to_string(sb.epoch));
  r.notes.push_back("checkpoint " + std::to_string(sb.active_checkpoint) + ": " +
                    std::to_string(rep.checkpoint_entries) + " entries");
  r.notes.push_back("journal: " + std::to_string(rep.journal_units) + " unit(s), " +
                    std::to_string(rep.journal_records) + " record(s) since the checkpoint");
  if (!rep.was_clean) r.notes.push_back("the set is in use or was not closed cleanly");

  // Both journal copies should agree on every replayed unit.
  MetaBuffer a(kMetaUnit);
  MetaBuffer b(kMetaUnit);
  for (uint64_t i = 0; i < rep.journal_units; ++i) {
    const bool ra = spare->read(a.data, kMetaUnit, sb.journal_offset[0] + i * kMetaUnit).is_ok();
    const bool rb = spare->read(b.data, kMetaUnit, sb.journal_offset[1] + i * kMetaUnit).is_ok();
    if (!ra || !rb || std::memcmp(a.data, b.data, kMetaUnit) != 0) {
      r.problems.push_back("journal unit " + std::to_string(i) + " differs between the copies or" +
                           " cannot be read in one of them");
    }
  }
  if (table.pending() > sb.pending_capacity) {
    r.problems.push_back("more pending blocks than the pending list can hold");
  }
  if (sb.version < 2) {
    r.notes.push_back("format version " + std::to_string(sb.version) +
                      ": one checkpoint copy, no slot headers (dmremap upgrade makes it 2)");
    return r;
  }
  // Every copy of the active checkpoint whole (open needed only one).
  for (int copy = 0; copy < sb.checkpoint_copies(); ++copy) {
    RemapTable t;
    if (Status s = read_checkpoint_copy(*spare, sb, copy, t); !s.is_ok()) {
      r.problems.push_back(s.to_string());
    }
  }
  // The geometry's copy, which a rebuild needs when both superblocks are
  // lost.
  {
    const bool read = spare->read(a.data, kMetaUnit, sb.slot_header_offset).is_ok();
    const auto copy = read ? Superblock::decode(a.data) : std::nullopt;
    if (!copy || copy->uuid != sb.uuid || copy->slot_header_offset != sb.slot_header_offset) {
      r.problems.push_back("the copy of the geometry in slot header unit 0 is " +
                           std::string(read ? "damaged" : "unreadable") +
                           " (a writable open writes it again)");
    }
  }
  // Every remapped slot's header names its block, so that a rebuild would
  // find the same table.
  uint64_t headers = 0;
  uint64_t unit_at = ~uint64_t{0};
  Status unit_read;
  table.for_each([&](const RemapTable::Entry& e) {
    if (RemapTable::is_pending(e.value) || r.problems.size() > 100) return;
    const uint64_t slot = RemapTable::slot_of(e.value);
    if (slot_header_unit(sb, slot) != unit_at) {
      unit_at = slot_header_unit(sb, slot);
      unit_read = spare->read(a.data, kMetaUnit, unit_at);
    }
    const std::string where = "slot " + std::to_string(slot) + " (block " +
                              std::to_string(e.block) + "): its header ";
    if (!unit_read.is_ok()) {
      r.problems.push_back(where + "cannot be read: " + unit_read.to_string());
      return;
    }
    const auto h = SlotHeader::decode(a.data + slot_header_pos(slot));
    if (!h || h->uuid != sb.uuid || h->slot != slot) {
      r.problems.push_back(where + "is missing or damaged; a rebuild would not find it");
    } else if (h->block != e.block) {
      r.problems.push_back(where + "names block " + std::to_string(h->block));
    } else {
      ++headers;
    }
  });
  r.notes.push_back("slot headers: " + std::to_string(headers) + " of " +
                    std::to_string(table.remaps()) + " remapped slots match the table");
  return r;
}
}  // namespace

std::vector<uint64_t> read_slot_times(BlockDevice& spare, const Superblock& sb,
                                      const std::vector<uint64_t>& slots) {
  std::vector<uint64_t> times(slots.size(), 0);
  if (sb.version < 2 || slots.empty()) return times;
  // By unit, so that each is read once.
  std::vector<size_t> order(slots.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return slots[a] < slots[b]; });
  MetaBuffer buf(kMetaUnit);
  uint64_t unit_at = 0;
  bool unit_ok = false;
  for (size_t i : order) {
    const uint64_t slot = slots[i];
    if (slot >= sb.slot_count) continue;
    if (slot_header_unit(sb, slot) != unit_at) {  // never 0: unit 0 is the copy
      unit_at = slot_header_unit(sb, slot);
      unit_ok = spare.read(buf.data, kMetaUnit, unit_at).is_ok();
      // A spare that fails one read is not asked for more: each may take
      // its io-timeout, and the times are only for the eye.
      if (!unit_ok) break;
    }
    const auto h = SlotHeader::decode(buf.data + slot_header_pos(slot));
    if (h && h->uuid == sb.uuid && h->slot == slot) times[i] = h->time;
  }
  return times;
}

}  // namespace dmremap
