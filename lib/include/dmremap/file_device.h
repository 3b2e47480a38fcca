// A regular file or a block device (a disk, a partition, a loop device).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <sys/types.h>

#include "dmremap/block_device.h"

namespace dmremap {

// Reads and writes with pread/pwrite. The size of a block device comes from
// the kernel (BLKGETSIZE64). With direct I/O (the default on block devices;
// see IoMode), the file is opened O_DIRECT and
// requests that are not aligned to the device's logical sector are bounced
// through aligned buffers. With `exclusive`, a regular file is flock()ed and
// a block device is opened O_EXCL; a second opener gets EBUSY with a message
// that says the device is in use. Thread-safe.
class FileDevice final : public BlockDevice {
 public:
  static Result<std::shared_ptr<FileDevice>> open(const std::string& path, const std::string& role,
                                                  const OpenOptions& options);
  ~FileDevice() override;

  uint64_t size() const override { return size_; }
  bool read_only() const override { return read_only_; }
  bool can_trim() const override { return true; }
  // fallocate() on a regular file; a block device may fall back to writes.
  bool can_fast_zero() const override { return !is_block_; }
  uint64_t next_data(uint64_t offset) const override;
  uint64_t next_hole(uint64_t offset) const override;
  std::string identity() const override { return identity_; }
  bool is_block_device() const { return is_block_; }
  // The alignment O_DIRECT needs (1 without direct I/O).
  size_t alignment() const override { return align_; }
  const std::string& path() const { return path_; }
  // A block device that vanished is looked for under its path, then by its
  // serial or WWID under any name, and reopened in place when its size,
  // identity and (for a partition) number and start match.
  Status reconnect() override;

 protected:
  Status do_read(void* buf, size_t len, uint64_t offset) override;
  Status do_write(const void* buf, size_t len, uint64_t offset) override;
  Status do_flush() override;
  Status do_trim(size_t len, uint64_t offset) override;
  Status do_write_zeroes(size_t len, uint64_t offset) override;

 private:
  FileDevice(std::string name, std::string path, int fd, uint64_t size, bool is_block,
             bool read_only, size_t align);
  bool aligned(const void* buf, size_t len, uint64_t offset) const;
  Status bounced_read(void* buf, size_t len, uint64_t offset);
  Status bounced_write(const void* buf, size_t len, uint64_t offset);
  Status raw_read(void* buf, size_t len, uint64_t offset);
  Status raw_write(const void* buf, size_t len, uint64_t offset);
  // Where the device may be now: its path, then block devices with its identity.
  std::vector<std::string> candidates() const;

  std::string path_;
  int fd_;
  uint64_t size_;
  bool is_block_;
  bool read_only_;
  size_t align_;
  std::string identity_;
  std::string partition_;  // "number@start" for a partition
  OpenOptions options_;
  dev_t rdev_ = 0;
};

}  // namespace dmremap
