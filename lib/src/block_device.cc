#include "dmremap/block_device.h"

#include <algorithm>
#include <vector>

namespace dmremap {

std::string BlockDevice::where(const char* what, uint64_t offset) const {
  return name_ + ": " + what + " at offset " + std::to_string(offset);
}

Status BlockDevice::check_range(const char* what, size_t len, uint64_t offset) const {
  const uint64_t sz = size();
  if (offset > sz || len > sz - offset) {
    return Status::error(EINVAL, where(what, offset) + ", length " + std::to_string(len) +
                                     ": beyond the end of the device (" + std::to_string(sz) +
                                     " bytes)");
  }
  return Status::ok();
}

Status BlockDevice::check_writable(const char* what, uint64_t offset) const {
  if (read_only()) return Status::error(EPERM, where(what, offset) + ": device is read-only");
  return Status::ok();
}

Status BlockDevice::read(void* buf, size_t len, uint64_t offset) {
  if (auto s = check_range("read", len, offset); !s.is_ok()) return s;
  if (len == 0) return Status::ok();
  return do_read(buf, len, offset);
}

Status BlockDevice::write(const void* buf, size_t len, uint64_t offset) {
  if (auto s = check_range("write", len, offset); !s.is_ok()) return s;
  if (auto s = check_writable("write", offset); !s.is_ok()) return s;
  if (len == 0) return Status::ok();
  return do_write(buf, len, offset);
}

Status BlockDevice::trim(size_t len, uint64_t offset) {
  if (auto s = check_range("trim", len, offset); !s.is_ok()) return s;
  if (auto s = check_writable("trim", offset); !s.is_ok()) return s;
  if (len == 0) return Status::ok();
  return do_trim(len, offset);
}

Status BlockDevice::write_zeroes(size_t len, uint64_t offset) {
  if (auto s = check_range("write zeroes", len, offset); !s.is_ok()) return s;
  if (auto s = check_writable("write zeroes", offset); !s.is_ok()) return s;
  if (len == 0) return Status::ok();
  return do_write_zeroes(len, offset);
}

Status BlockDevice::do_write_zeroes(size_t len, uint64_t offset) {
  constexpr size_t kChunk = 1 << 20;
  const std::vector<char> zeros(std::min(len, kChunk), 0);
  while (len > 0) {
    const size_t n = std::min(len, zeros.size());
    if (auto s = do_write(zeros.data(), n, offset); !s.is_ok()) return s;
    len -= n;
    offset += n;
  }
  return Status::ok();
}

}  // namespace dmremap
