// The in-memory picture of the spare's metadata: remaps, pending blocks, bad slots.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace dmremap {

// Why a block was remapped; kept on the spare for `dmremap status`.
enum class Cause : uint8_t {
  kWriteError = 1,    // main failed a write; the client's data went to a slot
  kRescue = 2,        // a weak block that read on a retry was copied to a slot
  kPendingWrite = 3,  // a write to a pending block got a fresh slot
  kManual = 4,        // `dmremap remap BLOCK`
  kSlow = 5,          // it read correctly, but slowly (slow=): copied before it fails
};
inline constexpr Cause kLastCause = Cause::kSlow;
const char* cause_name(Cause cause);

// One journal record. The journal and the checkpoint are lists of these.
struct Record {
  enum Type : uint8_t { kRemap = 1, kPending = 2, kBadSlot = 3 };
  Type type;
  Cause cause;     // kRemap only
  uint64_t block;  // kRemap, kPending
  uint64_t slot;   // kRemap, kBadSlot; for kPending, when it was marked (seconds since 1970, 0 unknown)
  bool operator==(const Record&) const = default;
};

// A sorted map from block number to its state, plus the list of bad slots and
// the slot allocation cursor. 16 bytes per remapped or pending block. A large
// sorted array holds most entries; new ones go to a small sorted delta that is
// merged in when it fills, so an insert costs O(delta) and a range query
// O(log n + hits). Not thread-safe: the engine guards it.
class RemapTable {
 public:
  struct Entry {
    uint64_t block;
    uint64_t value;  // slot | cause << 56, or 0xFF << 56 | the time it became pending
    bool operator==(const Entry&) const = default;
  };
  static constexpr uint64_t kSlotMask = (uint64_t{1} << 56) - 1;
  // A pending block's value: the top byte 0xFF (no cause is), the low 56
  // bits the second it was marked, all ones when that is not known.
  static constexpr uint64_t kPendingValue = ~uint64_t{0};  // time unknown
  static bool is_pending(uint64_t value) { return (value >> 56) == 0xFF; }
  // Times past 2^56 - 3 are taken as not known, so that no pending value
  // is ~0 - 1, which the engine uses as a marker of its own.
  static uint64_t pending_value(uint64_t time) {
    return time == 0 || time >= kSlotMask - 1 ? kPendingValue : (uint64_t{0xFF} << 56) | time;
  }
  // When a pending block was marked (seconds since 1970), 0 when not known.
  static uint64_t pending_time(uint64_t value) {
    const uint64_t t = value & kSlotMask;
    return t == kSlotMask ? 0 : t;
  }
  static uint64_t slot_of(uint64_t value) { return value & kSlotMask; }
  static Cause cause_of(uint64_t value) { return static_cast<Cause>(value >> 56); }

  // Applies one record: a remap replaces a pending entry of the same block.
  void apply(const Record& r);
  // Drops the pending entry of `block`; false when it has none. There is no
  // journal record for this: the caller writes a checkpoint.
  bool erase_pending(uint64_t block);

  std::optional<uint64_t> find(uint64_t block) const;
  // Calls fn(const Entry&) for each entry with first <= block < last, in
  // ascending block order. A callback that returns bool stops the walk by
  // returning false.
  template <class F>
  void for_range(uint64_t first, uint64_t last, F&& fn) const;
  template <class F>
  void for_each(F&& fn) const {
    for_range(0, ~uint64_t{0}, fn);
  }
  // True when no entry lies in [first, last).
  bool none_in(uint64_t first, uint64_t last) const;

  size_t entries() const { return base_.size() + delta_.size(); }
  uint64_t remaps() const { return entries() - pending_; }
  uint64_t pending() const { return pending_; }
  uint64_t remaps_by(Cause c) const { return by_cause_[static_cast<size_t>(c)]; }
  const std::vector<uint64_t>& bad_slots() const { return bad_slots_; }
  // The first slot never handed out; slots below it are used or bad.
  uint64_t next_slot() const { return next_slot_; }
  void set_next_slot(uint64_t s) { next_slot_ = s; }
  // Bytes of heap this table holds.
  size_t memory_bytes() const;
  // Keeps a bitmap of which groups of blocks hold an entry (at most 4 MiB:
  // one bit per block on disks up to 32 Mi blocks, coarser above), so that
  // a range with no entry is answered without searching. `blocks` is the
  // number of blocks of main. The read and write paths of a disk with many
  // remaps spend most lookups on ranges that have none.
  void enable_filter(uint64_t blocks);
  // False only when no entry can lie in [first, last).
  bool might_have(uint64_t first, uint64_t last) const {
    if (filter_.empty() || last <= first) return last > first;
    const uint64_t g0 = first >> filter_shift_;
    const uint64_t g1 = std::min<uint64_t>((last - 1) >> filter_shift_, filter_.size() * 64 - 1);
    if (g0 > g1) return true;
    for (uint64_t w = g0 / 64; w <= g1 / 64; ++w) {
      uint64_t bits = filter_[w];
      if (w == g0 / 64) bits &= ~uint64_t{0} << (g0 % 64);
      if (w == g1 / 64 && g1 % 64 != 63) bits &= (uint64_t{2} << (g1 % 64)) - 1;
      if (bits) return true;
    }
    return false;
  }
  // Moves the delta into the main array.
  void compact();
  // Bulk load from a checkpoint: entries in ascending block order go
  // straight to the main array.
  void load(const Entry& e);

 private:
  static constexpr size_t kDeltaMax = 4096;
  void insert(uint64_t block, uint64_t value);
  void mark(uint64_t block) {
    if (filter_.empty()) return;
    const uint64_t g = block >> filter_shift_;
    if (g < filter_.size() * 64) filter_[g / 64] |= uint64_t{1} << (g % 64);
  }
  void count(uint64_t value, int sign);

  std::vector<Entry> base_;
  std::vector<Entry> delta_;
  std::vector<uint64_t> bad_slots_;
  uint64_t next_slot_ = 0;
  uint64_t pending_ = 0;
  uint64_t by_cause_[8] = {};
  std::vector<uint64_t> filter_;
  unsigned filter_shift_ = 0;
};

template <class F>
void RemapTable::for_range(uint64_t first, uint64_t last, F&& fn) const {
  if (!might_have(first, last)) return;
  auto less = [](const Entry& e, uint64_t b) { return e.block < b; };
  auto a = std::lower_bound(base_.begin(), base_.end(), first, less);
  auto d = std::lower_bound(delta_.begin(), delta_.end(), first, less);
  while (true) {
    const bool a_ok = a != base_.end() && a->block < last;
    const bool d_ok = d != delta_.end() && d->block < last;
    if (!a_ok && !d_ok) return;
    const Entry& e = a_ok && (!d_ok || a->block < d->block) ? *a++ : *d++;
    if constexpr (std::is_same_v<std::invoke_result_t<F&, const Entry&>, bool>) {
      if (!fn(e)) return;
    } else {
      fn(e);
    }
  }
}

}  // namespace dmremap
