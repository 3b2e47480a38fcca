#include "dmremap/remap_table.h"

#include <algorithm>

namespace dmremap {

const char* cause_name(Cause cause) {
  switch (cause) {
    case Cause::kWriteError: return "write-error";
    case Cause::kRescue: return "rescue";
    case Cause::kPendingWrite: return "pending-write";
    case Cause::kManual: return "manual";
    case Cause::kSlow: return "slow";
  }
  return "unknown";
}

namespace {
auto less_block = [](const RemapTable::Entry& e, uint64_t b) { return e.block < b; };

RemapTable::Entry* find_in(std::vector<RemapTable::Entry>& v, uint64_t block) {
  auto it = std::lower_bound(v.begin(), v.end(), block, less_block);
  return it != v.end() && it->block == block ? &*it : nullptr;
}
}  // namespace

void RemapTable::count(uint64_t value, int sign) {
  if (is_pending(value)) {
    pending_ += sign;
  } else {
    by_cause_[static_cast<size_t>(cause_of(value)) & 7] += sign;
  }
}

void RemapTable::apply(const Record& r) {
  switch (r.type) {
    case Record::kRemap:
      insert(r.block, r.slot | (uint64_t{static_cast<uint8_t>(r.cause)} << 56));
      next_slot_ = std::max(next_slot_, r.slot + 1);
      break;
    case Record::kPending:
      insert(r.block, pending_value(r.slot));
      break;
    case Record::kBadSlot:
      bad_slots_.push_back(r.slot);
      next_slot_ = std::max(next_slot_, r.slot + 1);
      break;
  }
}

bool RemapTable::erase_pending(uint64_t block) {
  for (std::vector<Entry>* v : {&delta_, &base_}) {
    auto it = std::lower_bound(v->begin(), v->end(), block, less_block);
    if (it == v->end() || it->block != block) continue;
    if (!is_pending(it->value)) return false;
    count(it->value, -1);
    v->erase(it);  // the filter keeps its bit: it only ever says "maybe"
    return true;
  }
  return false;
}

void RemapTable::insert(uint64_t block, uint64_t value) {
  Entry* e = find_in(base_, block);
  if (!e) e = find_in(delta_, block);
  if (e) {
    count(e->value, -1);
    e->value = value;
    count(value, +1);
    return;
  }
  count(value, +1);
  mark(block);
  auto it = std::lower_bound(delta_.begin(), delta_.end(), block, less_block);
  delta_.insert(it, Entry{block, value});
  if (delta_.size() >= kDeltaMax) compact();
}

void RemapTable::load(const Entry& e) {
  if (delta_.empty() && (base_.empty() || base_.back().block < e.block)) {
    base_.push_back(e);
    count(e.value, +1);
    mark(e.block);
  } else {
    insert(e.block, e.value);
  }
}

void RemapTable::compact() {
  if (delta_.empty()) return;
  std::vector<Entry> merged;
  merged.reserve(base_.size() + delta_.size());
  std::merge(base_.begin(), base_.end(), delta_.begin(), delta_.end(), std::back_inserter(merged),
             [](const Entry& a, const Entry& b) { return a.block < b.block; });
  base_ = std::move(merged);
  delta_.clear();
}

std::optional<uint64_t> RemapTable::find(uint64_t block) const {
  auto look = [&](const std::vector<Entry>& v) -> std::optional<uint64_t> {
    auto it = std::lower_bound(v.begin(), v.end(), block, less_block);
    if (it != v.end() && it->block == block) return it->value;
    return std::nullopt;
  };
  if (!might_have(block, block + 1)) return std::nullopt;
  if (auto v = look(delta_)) return v;
  return look(base_);
}

bool RemapTable::none_in(uint64_t first, uint64_t last) const {
  if (!might_have(first, last)) return true;
  auto empty_in = [&](const std::vector<Entry>& v) {
    auto it = std::lower_bound(v.begin(), v.end(), first, less_block);
    return it == v.end() || it->block >= last;
  };
  return empty_in(base_) && empty_in(delta_);
}

size_t RemapTable::memory_bytes() const {
  return (base_.capacity() + delta_.capacity()) * sizeof(Entry) +
         bad_slots_.capacity() * sizeof(uint64_t) + filter_.capacity() * sizeof(uint64_t);
}

void RemapTable::enable_filter(uint64_t blocks) {
  constexpr uint64_t kMaxBits = uint64_t{1} << 25;  // 4 MiB
  filter_shift_ = 0;
  while ((blocks >> filter_shift_) > kMaxBits) ++filter_shift_;
  const uint64_t groups = ((blocks + (uint64_t{1} << filter_shift_) - 1) >> filter_shift_);
  filter_.assign(std::max<uint64_t>(1, (groups + 63) / 64), 0);
  for (const Entry& e : base_) mark(e.block);
  for (const Entry& e : delta_) mark(e.block);
}

}  // namespace dmremap
