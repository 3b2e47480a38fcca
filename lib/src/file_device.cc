#include "dmremap/file_device.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <dirent.h>
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

// For a partition, its number and first sector ("2@2048"), "" for a whole
// disk: partitions take their disk's serial, so it alone cannot tell them
// apart.
std::string partition_key(dev_t rdev) {
  const std::string base =
      "/sys/dev/block/" + std::to_string(major(rdev)) + ":" + std::to_string(minor(rdev)) + "/";
  auto first_line = [](const std::string& path) {
    std::string v;
    if (FILE* f = std::fopen(path.c_str(), "re")) {
      char line[64] = {};
      if (std::fgets(line, sizeof line, f)) v = line;
      std::fclose(f);
    }
    while (!v.empty() && (v.back() == '\n' || v.back() == ' ')) v.pop_back();
    return v;
  };
  const std::string number = first_line(base + "partition");
  return number.empty() ? std::string() : number + "@" + first_line(base + "start");
}

uint64_t round_down(uint64_t v, uint64_t a) { return v / a * a; }
uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

}  // namespace

namespace {

// What open() found at a path: an fd and what it is.
struct Opened {
  int fd = -1;
  struct stat st {};
  uint64_t size = 0;
  size_t align = 1;
};

Result<Opened> open_path(const std::string& path, const std::string& who,
                         const OpenOptions& options) {
  Opened o;
  if (::stat(path.c_str(), &o.st) != 0) return Status::from_errno(who + ": cannot open");
  const bool is_block = S_ISBLK(o.st.st_mode);
  if (!is_block && !S_ISREG(o.st.st_mode)) {
    return Status::error(EINVAL, who + ": not a regular file or a block device");
  }
  const bool direct =
      options.io == IoMode::kDirect || (options.io == IoMode::kAuto && is_block);
  int flags = (options.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  if (direct) flags |= O_DIRECT;
  if (is_block && options.exclusive) flags |= O_EXCL;
  const int fd = ::open(path.c_str(), flags);
  if (fd < 0) {
    if (errno == EBUSY) {
      return Status::error(EBUSY, who + ": in use (mounted, or opened by another dmremap)");
    }
    if (errno == EINVAL && direct) {
      return Status::error(EINVAL, who + ": cannot open with direct I/O (O_DIRECT); this "
                                         "filesystem does not support it: use buffered I/O");
    }
    return Status::from_errno(who + ": cannot open");
  }
  o.fd = fd;
  auto fail = [&](Status s) {
    ::close(fd);
    return s;
  };
  if (!is_block && options.exclusive && ::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    if (err == EWOULDBLOCK) {
      return fail(Status::error(EBUSY, who + ": locked by another process (is a dmremap server "
                                             "using it?)"));
    }
    return fail(Status::error(err, who + ": cannot lock"));
  }
  o.size = static_cast<uint64_t>(o.st.st_size);
  if (is_block && ::ioctl(fd, BLKGETSIZE64, &o.size) != 0) {
    return fail(Status::from_errno(who + ": cannot read the size of the block device"));
  }
  if (direct) {
    int sector = 512;
    if (is_block) ::ioctl(fd, BLKSSZGET, &sector);
    // Regular files: 4096 is safe on every common filesystem.
    o.align = is_block ? static_cast<size_t>(std::max(sector, 512)) : 4096;
    if (o.size % o.align != 0) {
      return fail(Status::error(EINVAL, who + ": size " + std::to_string(o.size) +
                                            " is not a multiple of " + std::to_string(o.align) +
                                            " bytes, which direct I/O needs"));
    }
  }
  return o;
}

}  // namespace

Result<std::shared_ptr<FileDevice>> FileDevice::open(const std::string& path,
                                                     const std::string& role,
                                                     const OpenOptions& options) {
  auto o = open_path(path, role + " (" + path + ")", options);
  if (!o.is_ok()) return o.take_status();
  const bool is_block = S_ISBLK(o->st.st_mode);
  auto dev = std::shared_ptr<FileDevice>(
      new FileDevice(role, path, o->fd, o->size, is_block, options.read_only, o->align));
  dev->options_ = options;
  dev->rdev_ = o->st.st_rdev;
  if (is_block) {
    dev->identity_ = sysfs_identity(o->st.st_rdev);
    dev->partition_ = partition_key(o->st.st_rdev);
  }
  return dev;
}

std::vector<std::string> FileDevice::candidates() const {
  std::vector<std::string> out{path_};
  if (identity_.empty()) return out;
  // A disk that left the bus and came back may have a new name (sdb for
  // sda, while the old one is still held open): look for its serial.
  DIR* d = ::opendir("/sys/class/block");
  if (!d) return out;
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    struct stat st {};
    const std::string dev = std::string("/dev/") + e->d_name;
    if (::stat(dev.c_str(), &st) != 0 || !S_ISBLK(st.st_mode)) continue;
    if (dev != path_ && sysfs_identity(st.st_rdev) == identity_ &&
        partition_key(st.st_rdev) == partition_) {
      out.push_back(dev);
    }
  }
  ::closedir(d);
  return out;
}

Status FileDevice::reconnect() {
  if (!is_block_) return Status::ok();
  std::string why = "not found";
  for (const std::string& path : candidates()) {
    struct stat st {};
    // Still the node we have open: nothing to reopen; a read will tell.
    if (::stat(path.c_str(), &st) == 0 && st.st_rdev == rdev_ && S_ISBLK(st.st_mode)) {
      return Status::ok();
    }
    auto o = open_path(path, name() + " (" + path + ")", options_);
    if (!o.is_ok()) {
      why = o.status().to_string();
      continue;
    }
    const std::string id = sysfs_identity(o->st.st_rdev);
    if (o->size != size_ || o->align != align_ || id != identity_ ||
        partition_key(o->st.st_rdev) != partition_) {
      why = path + " is another disk (" + std::to_string(o->size) + " bytes, \"" + id + "\")";
      ::close(o->fd);
      continue;
    }
    // The disk came back after leaving the bus: its write cache may not.
    // Said before the new descriptor is in place, so no flush on it can
    // vouch for those writes.
    forfeit_unflushed();
    // In place, so requests never see a closed descriptor.
    const int r = ::dup3(o->fd, fd_, O_CLOEXEC);
    const int err = errno;
    ::close(o->fd);
    if (r < 0) return Status::error(err, where("reopen", 0));
    rdev_ = o->st.st_rdev;
    return Status::ok();
  }
  return Status::error(ENODEV, name() + " (" + path_ + ") is gone: " + why);
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
    // Inside the size it had at open: the device has gone (a disk deleted
    // while open reads as empty), which is not a bad sector.
    if (n == 0) return Status::error(ENXIO, where("read", offset) + ": the device has shrunk or gone");
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
      // ENOSPC inside a block device's size: it has gone (its size is 0).
      if (errno == ENOSPC && is_block_) {
        return Status::error(ENXIO, where("write", offset) + ": the device has shrunk or gone");
      }
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
