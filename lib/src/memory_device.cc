#include "dmremap/memory_device.h"

#include <cstring>

namespace dmremap {

MemoryDevice::MemoryDevice(uint64_t size, std::string name)
    : BlockDevice(std::move(name)), data_(size, 0) {}

Status MemoryDevice::do_read(void* buf, size_t len, uint64_t offset) {
  std::shared_lock lock(mu_);
  std::memcpy(buf, data_.data() + offset, len);
  return Status::ok();
}

Status MemoryDevice::do_write(const void* buf, size_t len, uint64_t offset) {
  std::unique_lock lock(mu_);
  std::memcpy(data_.data() + offset, buf, len);
  return Status::ok();
}

Status MemoryDevice::do_write_zeroes(size_t len, uint64_t offset) {
  std::unique_lock lock(mu_);
  std::memset(data_.data() + offset, 0, len);
  return Status::ok();
}

}  // namespace dmremap
