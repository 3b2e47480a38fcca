// The one interface through which dmremap touches storage.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "dmremap/status.h"

namespace dmremap {

// A fixed-size array of bytes: a file, a block device, memory, an NBD export,
// or a wrapper that injects faults. Offsets and lengths are in bytes.
//
// The public methods check that the range lies inside the device (EINVAL
// otherwise) and then call the do_* hooks, which implementations override.
// Every method may be called from many threads at once; implementations must
// be thread-safe. Reads and writes either transfer all `len` bytes or fail.
class BlockDevice {
 public:
  explicit BlockDevice(std::string name) : name_(std::move(name)) {}
  virtual ~BlockDevice() = default;
  BlockDevice(const BlockDevice&) = delete;
  BlockDevice& operator=(const BlockDevice&) = delete;

  // A short name for messages ("main", "spare", a path or a URI).
  const std::string& name() const { return name_; }
  // The size in bytes; fixed while the device is open.
  virtual uint64_t size() const = 0;
  // True when writes, trims and zeroing are refused with EPERM.
  virtual bool read_only() const { return false; }
  // What identifies the hardware (a disk's serial or WWID), or "" when there
  // is nothing better than the path. Recorded at format time.
  virtual std::string identity() const { return {}; }
  // True when write_zeroes() is much faster than writing zeros (NBD's
  // FAST_ZERO promise).
  virtual bool can_fast_zero() const { return false; }
  // True when trim() really discards (reads afterwards may return zeros).
  virtual bool can_trim() const { return false; }
  // True when open_device() locked the device against a second opener (a
  // file's flock, a block device's O_EXCL) or nobody else can reach it;
  // false for an NBD export, which any client may open.
  virtual bool locked() const { return true; }
  // The smallest unit the device writes without reading and rewriting what
  // is around it (the logical sector under direct I/O); 1 when any size is.
  virtual size_t alignment() const { return 1; }

  // The first offset at or after `offset` that may hold data: the device
  // reads zeros before it. size() when only a hole follows. Devices that
  // cannot tell return `offset`.
  virtual uint64_t next_data(uint64_t offset) const { return offset; }
  // The first offset at or after `offset` where a hole begins, or size()
  // (devices that cannot tell have no holes).
  virtual uint64_t next_hole(uint64_t /*offset*/) const { return size(); }

  Status read(void* buf, size_t len, uint64_t offset);
  Status write(const void* buf, size_t len, uint64_t offset);
  // A write whose loss harms no one, because a valid copy stays beside it
  // and the next one replaces it (a lease renewal). It is not counted as
  // unflushed: when the device goes away before its flush, or that flush
  // fails, the writes that matter are not forfeited with it.
  Status write_expendable(const void* buf, size_t len, uint64_t offset);
  // Makes every completed write durable. Once a flush has failed with
  // writes outstanding (other than with a device errno, which reconnect()
  // settles), or they were forfeited, every later flush fails (EIO): the
  // kernel reports a lost buffered write to one fsync only, so a later
  // success would claim writes that are gone ("fsyncgate").
  Status flush();
  // True when a write, trim or write-zeroes has completed since the start of
  // the last flush that succeeded: a flush that fails now may lose data.
  bool has_unflushed_writes() const { return changed_.load() != flushed_.load(); }
  // Writes (expendable ones too), trims and write-zeroes completed since
  // open (tests and fuzzers check with it that nothing wrote).
  uint64_t changes() const { return changed_.load() + expendable_.load(); }
  // Flushes asked of the device since open (for benchmarks and status).
  uint64_t flush_calls() const { return flush_calls_.load(std::memory_order_relaxed); }
  // True once acknowledged writes may have been lost (see flush()).
  bool lost_writes() const { return lost_.load(); }
  // The device went away: writes not yet flushed may be lost with its
  // cache. True when there were some (flush() fails from now on). Every
  // call also starts a new connection epoch.
  bool forfeit_unflushed();
  // Raised each time the device is replaced by a new connection or a
  // reopened disk (forfeit_unflushed): a write made before a change of
  // epoch is not covered by a flush made after it, even an expendable one.
  uint64_t connection_epoch() const { return epoch_.load(); }

  // Re-establishes a device that stopped answering as a whole: a dropped
  // NBD connection, a disk that left the bus and came back under its path or
  // another name. The device found must be the same one (same size; the same
  // serial or WWID where there is one). Ok when it may be used again; a
  // device that cannot tell (a regular file) returns ok and lets the next
  // read decide. A device that had to be reopened or reconnected forfeits
  // its unflushed writes (forfeit_unflushed): the cache that held them may
  // have gone with the old connection or the unplugged disk.
  virtual Status reconnect() { return Status::ok(); }
  // Tells the device the range is no longer needed. Never fails because the
  // device cannot discard: that is a no-op.
  Status trim(size_t len, uint64_t offset);
  // Sets the range to zeros.
  Status write_zeroes(size_t len, uint64_t offset);

 protected:
  virtual Status do_read(void* buf, size_t len, uint64_t offset) = 0;
  virtual Status do_write(const void* buf, size_t len, uint64_t offset) = 0;
  virtual Status do_flush() = 0;
  virtual Status do_trim(size_t /*len*/, uint64_t /*offset*/) { return Status::ok(); }
  // Default: writes zero buffers.
  virtual Status do_write_zeroes(size_t len, uint64_t offset);

  // What a new open of the device starts with: no unflushed writes, no
  // lost ones. For simulated restarts (FaultyDevice::power_cut).
  void restart_accounting() {
    flushed_.store(changed_.load());
    lost_.store(false);
  }

  // "name: what at offset N" for error messages.
  std::string where(const char* what, uint64_t offset) const;

 private:
  Status check_range(const char* what, size_t len, uint64_t offset) const;
  Status check_writable(const char* what, uint64_t offset) const;
  void note_change() { changed_.fetch_add(1, std::memory_order_relaxed); }
  std::string name_;
  std::atomic<uint64_t> changed_{0};
  std::atomic<uint64_t> flushed_{0};
  std::atomic<uint64_t> expendable_{0};
  std::atomic<uint64_t> epoch_{0};
  std::atomic<uint64_t> flush_calls_{0};
  std::atomic<bool> lost_{false};
};

// What a failed request says about a device, from its errno.
enum class FailureKind {
  kMedia,    // the sectors touched (ENODATA, EILSEQ, EBADMSG): the data there is bad
  kDevice,   // the device or the link to it as a whole (ENODEV, ENXIO, ENOTCONN, ...)
  kUnknown,  // plain EIO and the rest: only a look at a block known to be good tells
};
FailureKind classify_failure(int err);

// How a path is opened: O_DIRECT or through the page cache.
enum class IoMode {
  // Direct on block devices, where the kernel reports a write error only at
  // writeback otherwise (and to one fsync only); buffered on image files.
  kAuto,
  kDirect,
  kBuffered,
};
// "auto", "direct", "buffered"; false for anything else.
bool parse_io_mode(const std::string& text, IoMode& out);

// How open_device() opens a path or URI.
struct OpenOptions {
  bool read_only = false;
  // O_DIRECT (with aligned bounce buffers), so that the page cache and
  // read-ahead do not hide which sector of a failing disk fails, and a
  // write error is seen by the write that caused it.
  IoMode io = IoMode::kAuto;
  // Take an exclusive lock (flock for files, O_EXCL for block devices) so
  // that two processes can never write the same device. Off only for
  // read-only inspection of a device another process is using.
  bool exclusive = true;
  // NBD backends: a request with no answer after this long fails with
  // ETIMEDOUT (0: wait for ever). Local disks have the kernel's own
  // timeouts (the SCSI layer's, 30 s per attempt by default).
  std::chrono::milliseconds request_timeout{30000};
};

// True for nbd://, nbd+unix://, nbds:// and nbds+unix:// URIs.
bool is_nbd_uri(const std::string& spec);

// Opens a regular file or a block device by path; an NBD URI (nbd://,
// nbd+unix://, nbds://) where the build has libnbd support. `role` names the
// device in messages ("main", "spare").
Result<std::shared_ptr<BlockDevice>> open_device(const std::string& spec, const std::string& role,
                                                 const OpenOptions& options);

}  // namespace dmremap
