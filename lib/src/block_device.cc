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
  Status s = do_write(buf, len, offset);
  if (s.is_ok()) note_change();
  return s;
}

Status BlockDevice::write_expendable(const void* buf, size_t len, uint64_t offset) {
  if (auto s = check_range("write", len, offset); !s.is_ok()) return s;
  if (auto s = check_writable("write", offset); !s.is_ok()) return s;
  if (len == 0) return Status::ok();
  Status s = do_write(buf, len, offset);
  if (s.is_ok()) expendable_.fetch_add(1, std::memory_order_relaxed);
  return s;
}

Status BlockDevice::flush() {
  if (lost_.load()) {
    return Status::error(EIO, name_ + ": flush refused: an earlier flush failed, or the device "
                                      "went away, with writes not yet flushed; they may be lost");
  }
  // Taken before the flush: a write that completes during it may not be
  // covered, so it leaves the device with unflushed writes.
  const uint64_t changed = changed_.load();
  flush_calls_.fetch_add(1, std::memory_order_relaxed);
  Status s = do_flush();
  if (!s.is_ok()) {
    // Any write not yet covered by a flush that worked, including one that
    // completed during this one, may be what the error was about. A device
    // errno (the link or the device gone) says the flush never got there:
    // reconnecting decides (reconnect() forfeits when it needs a new
    // connection or a reopened disk).
    if (classify_failure(s.code()) != FailureKind::kDevice && changed_.load() != flushed_.load()) {
      lost_.store(true);
    }
    return s;
  }
  // Forfeited during this flush (a reconnect under it): it covers only the
  // new connection.
  if (lost_.load()) {
    return Status::error(EIO, name_ + ": flush refused: the device was reconnected with writes "
                                      "not yet flushed; they may be lost");
  }
  uint64_t seen = flushed_.load();
  while (seen < changed && !flushed_.compare_exchange_weak(seen, changed)) {
  }
  return s;
}

Status BlockDevice::trim(size_t len, uint64_t offset) {
  if (auto s = check_range("trim", len, offset); !s.is_ok()) return s;
  if (auto s = check_writable("trim", offset); !s.is_ok()) return s;
  if (len == 0) return Status::ok();
  Status s = do_trim(len, offset);
  if (s.is_ok()) note_change();
  return s;
}

Status BlockDevice::write_zeroes(size_t len, uint64_t offset) {
  if (auto s = check_range("write zeroes", len, offset); !s.is_ok()) return s;
  if (auto s = check_writable("write zeroes", offset); !s.is_ok()) return s;
  if (len == 0) return Status::ok();
  Status s = do_write_zeroes(len, offset);
  if (s.is_ok()) note_change();
  return s;
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

bool BlockDevice::forfeit_unflushed() {
  epoch_.fetch_add(1);
  if (!has_unflushed_writes()) return false;
  lost_.store(true);
  return true;
}

FailureKind classify_failure(int err) {
  switch (err) {
    case ENODATA: case EILSEQ: case EBADMSG:
      return FailureKind::kMedia;
    case ENODEV: case ENXIO: case ENOLINK: case ETIMEDOUT: case ESHUTDOWN: case ENOTCONN:
    case ECONNRESET: case ECONNREFUSED: case ECONNABORTED: case EPIPE: case EHOSTUNREACH:
    case ENETDOWN: case ENETUNREACH: case ENOMEDIUM:
      return FailureKind::kDevice;
    default:
      return FailureKind::kUnknown;
  }
}

bool parse_io_mode(const std::string& text, IoMode& out) {
  if (text == "auto") {
    out = IoMode::kAuto;
  } else if (text == "direct") {
    out = IoMode::kDirect;
  } else if (text == "buffered") {
    out = IoMode::kBuffered;
  } else {
    return false;
  }
  return true;
}

}  // namespace dmremap
