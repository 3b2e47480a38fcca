// A wrapper that makes a healthy device fail the way disks fail.
#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "dmremap/block_device.h"

namespace dmremap {

// One switch shared by several devices, so that a simulated power cut hits
// main and spare at the same instant. Every mutating operation (write, trim,
// write-zeroes, flush) on a device attached to the switch counts one tick.
// Thread-safe.
class PowerSwitch {
 public:
  // The power goes out during the `n`-th mutating operation from now (n >= 1).
  // That operation is applied as an unflushed write (so it can be torn) and
  // fails; everything after it fails with EIO.
  void cut_after(uint64_t n) {
    countdown_.store(n);
    off_.store(false);
  }
  // Power on, no cut armed.
  void reset() {
    countdown_.store(0);
    off_.store(false);
  }
  bool is_off() const { return off_.load(); }
  // Operations counted so far (armed or not).
  uint64_t ticks() const { return ticks_.load(); }

  enum class Tick { kOn, kCutNow, kOff };
  Tick tick();

 private:
  std::atomic<uint64_t> countdown_{0};
  std::atomic<uint64_t> ticks_{0};
  std::atomic<bool> off_{false};
};

// In the spirit of dm-dust and LevelDB's FaultInjectionTestEnv. Faults are set
// per fault block (`fault_block` bytes, 512 by default):
//  - read errors: reads touching the block fail with EIO until the block is
//    written (a write clears it, as a disk reallocates a pending sector);
//  - write errors: writes touching the block fail with EIO forever; the part
//    of the write before the bad block is written, as on a real disk. Reads of
//    the block still return its old contents;
//  - weak blocks: the next N reads touching the block fail, then reads work;
//  - the whole device gone (set_gone): every operation fails with one errno,
//    as a disk that dropped off the bus or an NBD server that died, until
//    set_back(); reconnect() fails while it is gone;
//  - write errors at writeback (set_errors_at_flush): a write to a bad block
//    "succeeds" without storing the bad part, and the next flush fails once,
//    as the kernel reports a buffered write's error to one fsync only;
//  - slow operations (set_delay): every read, write and flush first sleeps;
//  - slow blocks (add_slow_block): a read touching the block first sleeps,
//    as a disk retries a bad sector internally; the others do not wait;
//  - slow flushes (set_flush_delay), as a disk's cache flush; a device that
//    goes (set_gone) during one fails it with its errno;
// With a PowerSwitch attached it remembers every write not yet flushed, and
// power_cut() then drops them, or tears them (each 512-byte sector
// independently kept or lost); a read error that an undone write had cleared
// comes back. Thread-safe.
class FaultyDevice final : public BlockDevice {
 public:
  explicit FaultyDevice(std::shared_ptr<BlockDevice> inner, uint32_t fault_block = 512,
                        std::string name = "");

  uint64_t size() const override { return inner_->size(); }
  bool read_only() const override { return inner_->read_only(); }
  bool can_trim() const override { return inner_->can_trim(); }
  bool can_fast_zero() const override { return inner_->can_fast_zero(); }
  size_t alignment() const override { return inner_->alignment(); }
  bool locked() const override { return !unlockable_.load() && inner_->locked(); }
  // As an NBD export: nothing locks it against a second opener, so an
  // engine leases it (heartbeats on its superblock).
  void set_unlockable() { unlockable_.store(true); }
  uint64_t next_data(uint64_t offset) const override { return inner_->next_data(offset); }
  uint64_t next_hole(uint64_t offset) const override { return inner_->next_hole(offset); }
  const std::shared_ptr<BlockDevice>& inner() const { return inner_; }
  uint32_t fault_block() const { return fault_block_; }

  void add_read_error(uint64_t block);
  void add_write_error(uint64_t block);
  void add_weak_block(uint64_t block, unsigned failures);
  void add_slow_block(uint64_t block, std::chrono::milliseconds per_read);
  void clear_faults();
  bool has_read_error(uint64_t block) const;
  void set_gone(int err = EIO) { gone_.store(err); }
  // With `new_device`, it returns as a new connection or device node,
  // which cannot vouch for the writes the old one had not flushed: they are
  // forfeited now, before any request reaches it (NbdDevice reconnects on
  // the first request that finds its connection dead).
  void set_back(bool new_device = false) {
    gone_.store(0);
    if (new_device) forfeit_unflushed();
  }
  void set_errors_at_flush(bool on);
  void set_delay(std::chrono::microseconds delay) { delay_us_.store(delay.count()); }
  void set_flush_delay(std::chrono::microseconds delay) { flush_delay_us_.store(delay.count()); }
  Status reconnect() override;
  uint64_t reconnects() const { return reconnects_.load(); }

  void attach(std::shared_ptr<PowerSwitch> power);
  enum class CutMode { kDrop, kTear };
  // Undoes the unflushed writes as `mode` says (`seed` picks the torn
  // sectors) and forgets them, and starts the device's flush accounting
  // afresh, as after a reboot. Call with the devices' users stopped.
  void power_cut(CutMode mode, uint64_t seed);
  size_t unflushed_writes() const;

  // Counters for tests.
  uint64_t failed_reads() const { return failed_reads_.load(); }
  uint64_t failed_writes() const { return failed_writes_.load(); }

 protected:
  Status do_read(void* buf, size_t len, uint64_t offset) override;
  Status do_write(const void* buf, size_t len, uint64_t offset) override;
  Status do_flush() override;
  Status do_trim(size_t len, uint64_t offset) override;
  Status do_write_zeroes(size_t len, uint64_t offset) override;

 private:
  template <class Apply>
  Status mutate(const char* what, size_t len, uint64_t offset, Apply apply);
  Status save_undo(size_t len, uint64_t offset);

  std::shared_ptr<BlockDevice> inner_;
  const uint32_t fault_block_;
  mutable std::mutex mu_;
  std::set<uint64_t> read_errors_;
  std::set<uint64_t> write_errors_;
  std::map<uint64_t, unsigned> weak_;
  std::map<uint64_t, std::chrono::milliseconds> slow_;
  std::shared_ptr<PowerSwitch> power_;
  struct Undo {
    uint64_t offset;
    std::vector<char> old;
    // Read errors this write cleared: a rewrite that never reached the
    // medium leaves the sector as unreadable as it was.
    std::vector<uint64_t> cleared_read_errors;
  };
  std::vector<Undo> undo_;
  std::atomic<uint64_t> failed_reads_{0};
  std::atomic<uint64_t> failed_writes_{0};
  std::atomic<int> gone_{0};
  std::atomic<int64_t> delay_us_{0};
  std::atomic<int64_t> flush_delay_us_{0};
  std::atomic<bool> unlockable_{false};
  std::atomic<uint64_t> reconnects_{0};
  bool errors_at_flush_ = false;
  bool writeback_error_ = false;
  // Fails with the gone errno, after the delay.
  Status enter(const char* what, uint64_t offset) const;
};

}  // namespace dmremap
