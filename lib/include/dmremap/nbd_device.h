// A device served by an NBD server, reached through libnbd.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dmremap/block_device.h"

struct nbd_handle;

namespace dmremap {

// Opens `connections` connections to the URI (nbd://, nbd+unix://, nbds://)
// when the server advertises multi-conn, one otherwise, and hands one to
// each request, so requests run in parallel. Errors keep the server's errno;
// a server that goes away gives ENOTCONN (a device failure, not a hang or a
// crash: libnbd fails every call on a dead connection at once), and
// reconnect() replaces the connections that are gone. FLUSH goes to one
// connection when the server advertises multi-conn and to every connection
// otherwise, so it always covers every completed write. A request that gets
// no answer within OpenOptions::request_timeout fails with ETIMEDOUT and its
// connection is cut (the next request reconnects): a server stuck on a
// dying disk is a failure, not a hang. Thread-safe.
class NbdDevice final : public BlockDevice {
 public:
  static Result<std::shared_ptr<NbdDevice>> open(const std::string& uri, const std::string& role,
                                                 const OpenOptions& options,
                                                 unsigned connections = 8);
  ~NbdDevice() override;

  uint64_t size() const override { return size_; }
  bool read_only() const override { return read_only_; }
  bool can_trim() const override { return can_trim_; }
  bool locked() const override { return false; }
  const std::string& uri() const { return uri_; }
  // Replaces every connection whose server has gone; the export must have
  // the same size.
  Status reconnect() override;

 protected:
  Status do_read(void* buf, size_t len, uint64_t offset) override;
  Status do_write(const void* buf, size_t len, uint64_t offset) override;
  Status do_flush() override;
  Status do_trim(size_t len, uint64_t offset) override;
  Status do_write_zeroes(size_t len, uint64_t offset) override;

 private:
  NbdDevice(std::string name, std::string uri);
  class Lease;
  nbd_handle* acquire();
  // Waits until connection `i` is idle and takes it.
  nbd_handle* take(size_t i);
  // Replaces the held connection `h` when its server has gone (rate-limited).
  void revive(nbd_handle*& h);
  void release(nbd_handle* h);
  Status failure(nbd_handle* h, const char* what, uint64_t offset) const;
  // Waits for command `cookie` on `h`: 0 done, -1 failed (libnbd's error),
  // -2 no answer within the timeout (the connection is then cut), -3 the
  // connection failed and the command could not be retired. On return
  // libnbd holds no reference to the command's buffer: if it could not be
  // made to retire the command, `h` was closed and replaced.
  int complete(nbd_handle*& h, int64_t cookie);
  // Closes `h` (forfeiting unflushed writes) and puts an unconnected
  // placeholder in its place.
  void discard(nbd_handle*& h);
  // True (once) when `h` is such a placeholder: it acknowledged nothing.
  bool is_placeholder(nbd_handle* h);
  Status outcome(nbd_handle* h, int r, const char* what, uint64_t offset) const;
  template <class F>
  Status chunked(const char* what, size_t len, uint64_t offset, F&& start);

  std::string uri_;
  uint64_t size_ = 0;
  bool read_only_ = false;
  bool can_trim_ = false;
  bool can_zero_ = false;
  bool multi_conn_ = false;
  uint64_t max_request_ = 32 << 20;
  std::chrono::milliseconds timeout_{0};
  std::vector<nbd_handle*> all_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<nbd_handle*> idle_;
  // Unconnected handles put in place of discarded ones (guarded by mu_).
  std::vector<nbd_handle*> placeholders_;
  std::atomic<int64_t> last_failed_revive_ms_{-1000000};
  static constexpr int kReconnectDeadlineMs = 3000;
};

}  // namespace dmremap
