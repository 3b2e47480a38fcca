// A device held in memory, for tests and benchmarks.
#pragma once

#include <memory>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "dmremap/block_device.h"

namespace dmremap {

// Starts as all zeros. Thread-safe (readers share a lock, writers exclude).
class MemoryDevice final : public BlockDevice {
 public:
  explicit MemoryDevice(uint64_t size, std::string name = "memory");

  uint64_t size() const override { return data_.size(); }
  bool can_trim() const override { return true; }
  bool can_fast_zero() const override { return true; }
  // Direct access for tests; not synchronised with concurrent writers.
  const std::vector<char>& contents() const { return data_; }

 protected:
  Status do_read(void* buf, size_t len, uint64_t offset) override;
  Status do_write(const void* buf, size_t len, uint64_t offset) override;
  Status do_flush() override { return Status::ok(); }
  Status do_trim(size_t len, uint64_t offset) override { return do_write_zeroes(len, offset); }
  Status do_write_zeroes(size_t len, uint64_t offset) override;

 private:
  mutable std::shared_mutex mu_;
  std::vector<char> data_;
};

}  // namespace dmremap
