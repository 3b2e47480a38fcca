#include "dmremap/file_device.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace dmremap {
namespace {

struct AlignedBuffer {
  AlignedBuffer(size_t align, size_t len) {
    if (posix_memalign(&ptr, align, len) != 0) ptr = nullptr;
  }
  ~AlignedBuffer() { std::free(ptr); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  void* ptr = nullptr;
};

// A block device's serial or WWID from sysfs (partitions look at their disk).
std::string sysfs_identity(dev_t rdev) {
  const std::string base =
      "/sys/dev/block/" + std::to_string(major(rdev)) + ":" + std::to_string(minor(rdev)) + "/";
  for (const char* rel : {"device/wwid", "device/serial", "serial", "../device/wwid",
                          "../device/serial", "../serial"}) {
    FILE* f = std::fopen((base + rel).c_str(), "re");
    if (!f) continue;
    char line[128] = {};
    const bool got = std::fgets(line, sizeof line, f) != nullptr;
    std::fclose(f);
    std::string v = got ? line : "";
    while (!v.empty() && (v.back() == '\n' || v.back() == ' ')) v.pop_back();
    if (!v.empty()) return v;
  }
  return {};
}

uint64_t round_down(uint64_t v, uint64_t a) { return v / a * a; }
uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

}  // namespace

Result<std::shared_ptr<FileDevice>> FileDevice::open(const std::string& path,
                                                     const std::string& role,
                                                     const OpenOptions& options) {
  const std::string who = role + " (" + path + ")";
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return Status::from_errno(who + ": cannot open");
  const bool is_block = S_ISBLK(st.st_mode);
  if (!is_block && !S_ISREG(st.st_mode)) {
    return Status::error(EINVAL, who + ": not a regular file or a block device");
  }
  int flags = (options.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  if (options.direct) flags |= O_DIRECT;
  if (is_block && options.exclusive) flags |= O_EXCL;
  const int fd = ::open(path.c_str(), flags);
  if (fd < 0) {
    if (errno == EBUSY) {
      return Status::error(EBUSY, who + ": in use (mounted, or opened by another dmremap)");
    }
    return Status::from_errno(who + ": cannot open");
  }
  if (!is_block && options.exclusive && ::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(fd);
    if (err == EWOULDBLOCK) {
      return Status::error(EBUSY, who + ": locked by another process (is a dmremap server using it?)");
    }
    return Status::error(err, who + ": cannot lock");
  }
  uint64_t size = static_cast<uint64_t>(st.st_size);
  size_t align = 1;
  if (is_block) {
    if (::ioctl(fd, BLKGETSIZE64, &size) != 0) {
      const int err = errno;
      ::close(fd);
      return Status::error(err, who + ": cannot read the size of the block device");
    }
  }
  if (options.direct) {
    int sector = 512;
    if (is_block) ::ioctl(fd, BLKSSZGET, &sector);
    // Regular files: 4096 is safe on every common filesystem.
    align = is_block ? static_cast<size_t>(std::max(sector, 512)) : 4096;
    if (size % align != 0) {
      ::close(fd);
      return Status::error(EINVAL, who + ": size " + std::to_string(size) +
                                       " is not a multiple of " + std::to_string(align) +
                                       " bytes, which direct I/O needs");
    }
  }
  auto dev = std::shared_ptr<FileDevice>(
      new FileDevice(role, path, fd, size, is_block, options.read_only, align));
  if (is_block) dev->identity_ = sysfs_identity(st.st_rdev);
  return dev;
}

FileDevice::FileDevice(std::string name, std::string path, int fd, uint64_t size, bool is_block,
                       bool read_only, size_t align)
    : BlockDevice(std::move(name)),
      path_(std::move(path)),
      fd_(fd),
      size_(size),
      is_block_(is_block),
      read_only_(read_only),
      align_(align) {}

FileDevice::~FileDevice() { ::close(fd_); }

bool FileDevice::aligned(const void* buf, size_t len, uint64_t offset) const {
  if (align_ == 1) return true;
  return reinterpret_cast<uintptr_t>(buf) % align_ == 0 && len % align_ == 0 &&
         offset % align_ == 0;
}

Status FileDevice::raw_read(void* buf, size_t len, uint64_t offset) {
  auto* p = static_cast<char*>(buf);
  while (len > 0) {
    const ssize_t n = ::pread(fd_, p, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::from_errno(where("read", offset));
    }
    if (n == 0) return Status::error(EIO, where("read", offset) + ": unexpected end of device");
    p += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::ok();
}

Status FileDevice::raw_write(const void* buf, size_t len, uint64_t offset) {
  const auto* p = static_cast<const char*>(buf);
  while (len > 0) {
    const ssize_t n = ::pwrite(fd_, p, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::from_errno(where("write", offset));
    }
    if (n == 0) return Status::error(EIO, where("write", offset) + ": device accepted no bytes");
    p += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::ok();
}

Status FileDevice::bounced_read(void* buf, size_t len, uint64_t offset) {
  const uint64_t start = round_down(offset, align_);
  const uint64_t end = std::min<uint64_t>(round_up(offset + len, align_), round_up(size_, align_));
  AlignedBuffer bounce(align_, end - start);
  if (!bounce.ptr) return Status::error(ENOMEM, where("read", offset) + ": bounce buffer");
  if (auto s = raw_read(bounce.ptr, end - start, start); !s.is_ok()) return s;
  std::memcpy(buf, static_cast<char*>(bounce.ptr) + (offset - start), len);
  return Status::ok();
}

Status FileDevice::bounced_write(const void* buf, size_t len, uint64_t offset) {
  const uint64_t start = round_down(offset, align_);
  const uint64_t end = round_up(offset + len, align_);
  AlignedBuffer bounce(align_, end - start);
  if (!bounce.ptr) return Status::error(ENOMEM, where("write", offset) + ": bounce buffer");
  auto* b = static_cast<char*>(bounce.ptr);
  // Partial sectors at either end keep their current contents.
  if (start != offset) {
    if (auto s = raw_read(b, align_, start); !s.is_ok()) return s;
  }
  if (end != offset + len && (end - align_ != start || start == offset)) {
    if (auto s = raw_read(b + (end - start - align_), align_, end - align_); !s.is_ok()) return s;
  }
  std::memcpy(b + (offset - start), buf, len);
  return raw_write(b, end - start, start);
}

Status FileDevice::do_read(void* buf, size_t len, uint64_t offset) {
  return aligned(buf, len, offset) ? raw_read(buf, len, offset) : bounced_read(buf, len, offset);
}

Status FileDevice::do_write(const void* buf, size_t len, uint64_t offset) {
  return aligned(buf, len, offset) ? raw_write(buf, len, offset)
                                   : bounced_write(buf, len, offset);
}

uint64_t FileDevice::next_data(uint64_t offset) const {
  if (is_block_ || offset >= size_) return std::min(offset, size_);
  const off_t pos = ::lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
  if (pos < 0) return errno == ENXIO ? size_ : offset;
  return std::min<uint64_t>(static_cast<uint64_t>(pos), size_);
}

uint64_t FileDevice::next_hole(uint64_t offset) const {
  if (is_block_ || offset >= size_) return size_;
  const off_t pos = ::lseek(fd_, static_cast<off_t>(offset), SEEK_HOLE);
  if (pos < 0) return size_;
  return std::min<uint64_t>(static_cast<uint64_t>(pos), size_);
}

Status FileDevice::do_flush() {
  if (::fdatasync(fd_) != 0) return Status::from_errno(name() + ": flush");
  return Status::ok();
}

Status FileDevice::do_trim(size_t len, uint64_t offset) {
  if (is_block_) {
    // The kernel wants whole logical sectors; a partial one is simply kept.
    const uint64_t start = round_up(offset, 512);
    const uint64_t end = round_down(offset + len, 512);
    if (end <= start) return Status::ok();
    uint64_t range[2] = {start, end - start};
    if (::ioctl(fd_, BLKDISCARD, range) != 0 && errno != EOPNOTSUPP && errno != ENOTTY) {
      return Status::from_errno(where("discard", offset));
    }
    return Status::ok();
  }
  if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(len)) != 0 &&
      errno != EOPNOTSUPP) {
    return Status::from_errno(where("punch hole", offset));
  }
  return Status::ok();
}

Status FileDevice::do_write_zeroes(size_t len, uint64_t offset) {
  if (is_block_) {
    if (offset % 512 == 0 && len % 512 == 0) {
      uint64_t range[2] = {offset, len};
      if (::ioctl(fd_, BLKZEROOUT, range) == 0) return Status::ok();
      if (errno != EOPNOTSUPP && errno != ENOTTY && errno != EINVAL) {
        return Status::from_errno(where("zero out", offset));
      }
    }
    return BlockDevice::do_write_zeroes(len, offset);
  }
  if (::fallocate(fd_, FALLOC_FL_ZERO_RANGE, static_cast<off_t>(offset),
                  static_cast<off_t>(len)) == 0) {
    return Status::ok();
  }
  if (errno != EOPNOTSUPP) return Status::from_errno(where("zero range", offset));
  if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(len)) == 0) {
    return Status::ok();
  }
  return BlockDevice::do_write_zeroes(len, offset);
}

}  // namespace dmremap
