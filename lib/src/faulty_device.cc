#include "dmremap/faulty_device.h"

#include <algorithm>
#include <random>
#include <thread>
#include <utility>

namespace dmremap {

PowerSwitch::Tick PowerSwitch::tick() {
  ticks_.fetch_add(1);
  if (off_.load()) return Tick::kOff;
  uint64_t c = countdown_.load();
  while (c > 0) {
    if (countdown_.compare_exchange_weak(c, c - 1)) {
      if (c == 1) {
        off_.store(true);
        return Tick::kCutNow;
      }
      return Tick::kOn;
    }
  }
  return Tick::kOn;
}

FaultyDevice::FaultyDevice(std::shared_ptr<BlockDevice> inner, uint32_t fault_block,
                           std::string name)
    : BlockDevice(name.empty() ? inner->name() : std::move(name)),
      inner_(std::move(inner)),
      fault_block_(fault_block) {}

void FaultyDevice::add_read_error(uint64_t block) {
  std::lock_guard lock(mu_);
  read_errors_.insert(block);
}

void FaultyDevice::add_write_error(uint64_t block) {
  std::lock_guard lock(mu_);
  write_errors_.insert(block);
}

void FaultyDevice::add_weak_block(uint64_t block, unsigned failures) {
  std::lock_guard lock(mu_);
  weak_[block] = failures;
}

void FaultyDevice::clear_faults() {
  std::lock_guard lock(mu_);
  slow_.clear();
  read_errors_.clear();
  write_errors_.clear();
  weak_.clear();
}

bool FaultyDevice::has_read_error(uint64_t block) const {
  std::lock_guard lock(mu_);
  return read_errors_.count(block) != 0;
}

void FaultyDevice::attach(std::shared_ptr<PowerSwitch> power) {
  std::lock_guard lock(mu_);
  power_ = std::move(power);
}

size_t FaultyDevice::unflushed_writes() const {
  std::lock_guard lock(mu_);
  return undo_.size();
}

Status FaultyDevice::enter(const char* what, uint64_t offset) const {
  if (const int64_t us = delay_us_.load(); us > 0) {
    std::this_thread::sleep_for(std::chrono::microseconds(us));
  }
  if (const int err = gone_.load(); err != 0) {
    return Status::error(err, where(what, offset) + ": the device is gone");
  }
  return Status::ok();
}

void FaultyDevice::set_errors_at_flush(bool on) {
  std::lock_guard lock(mu_);
  errors_at_flush_ = on;
}

Status FaultyDevice::reconnect() {
  reconnects_.fetch_add(1);
  if (const int err = gone_.load(); err != 0) {
    return Status::error(ENODEV, name() + ": not back yet");
  }
  return inner_->reconnect();
}

void FaultyDevice::add_slow_block(uint64_t block, std::chrono::milliseconds per_read) {
  std::lock_guard lock(mu_);
  slow_[block] = per_read;
}

Status FaultyDevice::do_read(void* buf, size_t len, uint64_t offset) {
  if (auto s = enter("read", offset); !s.is_ok()) {
    failed_reads_.fetch_add(1);
    return s;
  }
  std::chrono::milliseconds slow{0};
  {
    std::lock_guard lock(mu_);
    const uint64_t first = offset / fault_block_;
    const uint64_t last = (offset + len - 1) / fault_block_;
    for (auto it = slow_.lower_bound(first); it != slow_.end() && it->first <= last; ++it) {
      slow = std::max(slow, it->second);
    }
  }
  // As a disk spends its internal retries on a bad sector: this request
  // waits, the others do not.
  if (slow.count() > 0) std::this_thread::sleep_for(slow);
  {
    std::lock_guard lock(mu_);
    if (power_ && power_->is_off()) {
      failed_reads_.fetch_add(1);
      return Status::error(EIO, where("read", offset) + ": power is off");
    }
    const uint64_t first = offset / fault_block_;
    const uint64_t last = (offset + len - 1) / fault_block_;
    bool fail = false;
    uint64_t bad = 0;
    for (auto it = read_errors_.lower_bound(first); it != read_errors_.end() && *it <= last;) {
      fail = true;
      bad = *it;
      break;
    }
    // Every weak block the read touches uses up one of its failures.
    for (auto it = weak_.lower_bound(first); it != weak_.end() && it->first <= last;) {
      if (it->second > 0) {
        --it->second;
        if (!fail) bad = it->first;
        fail = true;
      }
      it = it->second == 0 ? weak_.erase(it) : std::next(it);
    }
    if (fail) {
      failed_reads_.fetch_add(1);
      return Status::error(EIO, where("read", bad * fault_block_) + ": injected read error");
    }
  }
  return inner_->read(buf, len, offset);
}

Status FaultyDevice::save_undo(size_t len, uint64_t offset) {
  Undo u{offset, std::vector<char>(len)};
  if (auto s = inner_->read(u.old.data(), len, offset); !s.is_ok()) return s;
  undo_.push_back(std::move(u));
  return Status::ok();
}

template <class Apply>
Status FaultyDevice::mutate(const char* what, size_t len, uint64_t offset, Apply apply) {
  if (auto s = enter(what, offset); !s.is_ok()) {
    failed_writes_.fetch_add(1);
    return s;
  }
  std::lock_guard lock(mu_);
  bool cut_now = false;
  if (power_) {
    const auto t = power_->tick();
    if (t == PowerSwitch::Tick::kOff) {
      failed_writes_.fetch_add(1);
      return Status::error(EIO, where(what, offset) + ": power is off");
    }
    cut_now = t == PowerSwitch::Tick::kCutNow;
  }
  const uint64_t first = offset / fault_block_;
  const uint64_t last = (offset + len - 1) / fault_block_;
  auto bad = write_errors_.lower_bound(first);
  size_t apply_len = len;
  if (bad != write_errors_.end() && *bad <= last) {
    apply_len = *bad * fault_block_ > offset ? static_cast<size_t>(*bad * fault_block_ - offset) : 0;
  }
  if (apply_len > 0) {
    if (power_) {
      if (auto s = save_undo(apply_len, offset); !s.is_ok()) return s;
    }
    if (auto s = apply(apply_len, offset); !s.is_ok()) return s;
    // Written blocks read again, as on a disk that reallocated them.
    const uint64_t written_last = (offset + apply_len - 1) / fault_block_;
    const auto lo = read_errors_.lower_bound(first);
    const auto hi = read_errors_.upper_bound(written_last);
    if (power_ && lo != hi) undo_.back().cleared_read_errors.assign(lo, hi);
    read_errors_.erase(lo, hi);
  }
  if (cut_now) {
    failed_writes_.fetch_add(1);
    return Status::error(EIO, where(what, offset) + ": power cut");
  }
  if (apply_len < len && errors_at_flush_) {
    // Accepted now; the loss shows at the next flush.
    writeback_error_ = true;
    return Status::ok();
  }
  if (apply_len < len) {
    failed_writes_.fetch_add(1);
    return Status::error(EIO, where(what, *bad * fault_block_) + ": injected write error");
  }
  return Status::ok();
}

Status FaultyDevice::do_write(const void* buf, size_t len, uint64_t offset) {
  return mutate("write", len, offset, [&](size_t n, uint64_t off) {
    return inner_->write(buf, n, off);
  });
}

Status FaultyDevice::do_trim(size_t len, uint64_t offset) {
  return mutate("trim", len, offset,
                [&](size_t n, uint64_t off) { return inner_->trim(n, off); });
}

Status FaultyDevice::do_write_zeroes(size_t len, uint64_t offset) {
  return mutate("write zeroes", len, offset,
                [&](size_t n, uint64_t off) { return inner_->write_zeroes(n, off); });
}

Status FaultyDevice::do_flush() {
  if (auto s = enter("flush", 0); !s.is_ok()) return s;
  if (const int64_t us = flush_delay_us_.load(); us > 0) {
    std::this_thread::sleep_for(std::chrono::microseconds(us));
    // The device went while the flush was in flight: it never got there.
    if (const int err = gone_.load(); err != 0) {
      return Status::error(err, name() + ": flush: the device went away during it");
    }
  }
  std::lock_guard lock(mu_);
  if (std::exchange(writeback_error_, false)) {
    failed_writes_.fetch_add(1);
    return Status::error(EIO, name() + ": flush: a write failed at writeback");
  }
  if (power_) {
    const auto t = power_->tick();
    if (t != PowerSwitch::Tick::kOn) {
      failed_writes_.fetch_add(1);
      return Status::error(EIO, name() + ": flush: power is off");
    }
  }
  if (auto s = inner_->flush(); !s.is_ok()) return s;
  undo_.clear();
  return Status::ok();
}

void FaultyDevice::power_cut(CutMode mode, uint64_t seed) {
  std::lock_guard lock(mu_);
  // The machine restarts: whoever uses the device next opens it afresh.
  restart_accounting();
  std::mt19937_64 rng(seed);
  constexpr size_t kSector = 512;
  // Newest first, so that a sector written twice can end up with either
  // version or with its last flushed contents: all states a disk may keep.
  for (auto it = undo_.rbegin(); it != undo_.rend(); ++it) {
    if (mode == CutMode::kDrop) {
      (void)inner_->write(it->old.data(), it->old.size(), it->offset);
      read_errors_.insert(it->cleared_read_errors.begin(), it->cleared_read_errors.end());
      continue;
    }
    for (size_t pos = 0; pos < it->old.size(); pos += kSector) {
      const size_t n = std::min(kSector, it->old.size() - pos);
      if (!(rng() & 1)) continue;
      (void)inner_->write(it->old.data() + pos, n, it->offset + pos);
      const uint64_t fb = (it->offset + pos) / fault_block_;
      if (std::binary_search(it->cleared_read_errors.begin(), it->cleared_read_errors.end(), fb)) {
        read_errors_.insert(fb);
      }
    }
  }
  undo_.clear();
}

}  // namespace dmremap
