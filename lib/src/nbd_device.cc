#include "dmremap/nbd_device.h"

#include <libnbd.h>

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

namespace dmremap {

namespace {
bool looks_gone(nbd_handle* h);
}  // namespace

// Borrows a connection for the length of one request. A connection whose
// server has gone (dead, or its socket at end of file) is replaced first,
// so a server that restarts is used again without anyone asking; after a
// failed attempt, the next waits a second.
class NbdDevice::Lease {
 public:
  explicit Lease(NbdDevice& dev) : dev_(dev), h_(dev.acquire()) {
    if (looks_gone(h_)) dev_.revive(h_);
  }
  ~Lease() { dev_.release(h_); }
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  nbd_handle* get() const { return h_; }
  // The handle itself, for calls that may replace it (discard()).
  nbd_handle*& handle() { return h_; }

 private:
  NbdDevice& dev_;
  nbd_handle* h_;
};

namespace {

// The server's errno where it says something about the request or the
// data; a failure of the connection keeps an errno that says so
// (classify_failure() calls it a device failure); anything else is EIO.
int data_errno(int err) {
  switch (err) {
    case EINVAL: case ENOSPC: case EPERM: case EROFS: case ENOMEM: case EOVERFLOW:
    case ENOTSUP: case EIO:
      return err;
    default:
      return classify_failure(err) == FailureKind::kDevice ? err : EIO;
  }
}

// A connected handle whose server has gone: with no request in flight a
// server sends nothing, so a readable socket means end of file or an error.
bool looks_gone(nbd_handle* h) {
  if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1) return true;
  const int fd = nbd_aio_get_fd(h);
  if (fd < 0) return true;
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) != 0;
}

// Connects within `deadline_ms` (no limit when negative): a server that is
// gone may leave a TCP connect hanging for minutes.
Result<nbd_handle*> connect(const std::string& uri, const std::string& who,
                            int deadline_ms = -1) {
  nbd_handle* h = nbd_create();
  if (!h) return Status::error(ENOMEM, who + ": " + nbd_get_error());
  auto fail = [&](int fallback) {
    const int err = nbd_get_errno();
    const std::string msg = nbd_get_error() ? nbd_get_error() : "cannot connect";
    nbd_close(h);
    return Status::error(err ? err : fallback, who + ": " + msg);
  };
  // The URI is the operator's own (a command line, a unit file): nbds://
  // may name its credentials with tls-certificates= or tls-psk-file=.
  // Every reconnection uses the same URI, so the same credentials.
  if (nbd_set_uri_allow_local_file(h, true) == -1) return fail(EINVAL);
  if (deadline_ms < 0) {
    if (nbd_connect_uri(h, uri.c_str()) == -1) return fail(ECONNREFUSED);
    return h;
  }
  if (nbd_aio_connect_uri(h, uri.c_str()) == -1) return fail(ECONNREFUSED);
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(deadline_ms);
  while (nbd_aio_is_connecting(h) == 1) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          until - std::chrono::steady_clock::now())
                          .count();
    if (left <= 0) {
      nbd_close(h);
      return Status::error(ETIMEDOUT, who + ": no answer within " +
                                          std::to_string(deadline_ms) + " ms");
    }
    if (nbd_poll(h, static_cast<int>(left)) == -1) return fail(ECONNREFUSED);
  }
  if (nbd_aio_is_ready(h) != 1) return fail(ECONNREFUSED);
  return h;
}

}  // namespace

NbdDevice::NbdDevice(std::string name, std::string uri)
    : BlockDevice(std::move(name)), uri_(std::move(uri)) {}

NbdDevice::~NbdDevice() {
  for (nbd_handle* h : all_) {
    nbd_shutdown(h, 0);
    nbd_close(h);
  }
}

Result<std::shared_ptr<NbdDevice>> NbdDevice::open(const std::string& uri,
                                                   const std::string& role,
                                                   const OpenOptions& options,
                                                   unsigned connections) {
  std::shared_ptr<NbdDevice> dev(new NbdDevice(role, uri));
  dev->timeout_ = options.request_timeout;
  const std::string who = role + " (" + uri + ")";
  auto first = connect(uri, who);
  if (!first.is_ok()) return first.take_status();
  nbd_handle* h = first.value();
  dev->all_.push_back(h);
  const int64_t size = nbd_get_size(h);
  if (size < 0) return Status::error(EIO, who + ": " + nbd_get_error());
  dev->size_ = static_cast<uint64_t>(size);
  dev->read_only_ = options.read_only || nbd_is_read_only(h) == 1;
  dev->can_trim_ = nbd_can_trim(h) == 1;
  dev->can_zero_ = nbd_can_zero(h) == 1;
  dev->multi_conn_ = nbd_can_multi_conn(h) == 1;
  const int64_t max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
  if (max > 0) dev->max_request_ = std::min<uint64_t>(dev->max_request_, max);
  // Without multi-conn the server does not promise that connections see
  // each other's writes (and may take only one client, as qemu-nbd does by
  // default): one connection, requests in turn.
  const unsigned wanted = dev->multi_conn_ ? std::max(1u, connections) : 1;
  for (unsigned i = 1; i < wanted; ++i) {
    auto more = connect(uri, who);
    if (!more.is_ok()) return more.take_status();
    dev->all_.push_back(more.value());
  }
  dev->idle_ = dev->all_;
  return dev;
}

void NbdDevice::revive(nbd_handle*& h) {
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::steady_clock::now().time_since_epoch())
                          .count();
  if (now - last_failed_revive_ms_.load() < 1000) return;
  // On the request path: a short deadline.
  auto fresh = connect(uri_, name() + " (" + uri_ + ")", 1000);
  if (fresh.is_ok() && static_cast<uint64_t>(nbd_get_size(fresh.value())) != size_) {
    nbd_close(fresh.value());
    fresh = Status::error(ENODEV, "not the same export");
  }
  if (!fresh.is_ok()) {
    last_failed_revive_ms_.store(now);
    return;
  }
  // Before the new connection can carry a flush: it cannot vouch for what
  // the old one acknowledged (a placeholder acknowledged nothing).
  if (!is_placeholder(h)) forfeit_unflushed();
  {
    std::lock_guard l(mu_);
    *std::find(all_.begin(), all_.end(), h) = fresh.value();
  }
  nbd_close(h);
  h = fresh.value();
}

nbd_handle* NbdDevice::take(size_t i) {
  std::unique_lock l(mu_);
  cv_.wait(l, [&] { return std::find(idle_.begin(), idle_.end(), all_[i]) != idle_.end(); });
  idle_.erase(std::find(idle_.begin(), idle_.end(), all_[i]));
  return all_[i];
}

Status NbdDevice::reconnect() {
  const std::string who = name() + " (" + uri_ + ")";
  for (size_t i = 0; i < all_.size(); ++i) {
    // Each connection in turn, once no request holds it; the others keep
    // serving meanwhile, and no lock is held while connecting.
    nbd_handle* h = take(i);
    Status s;
    if (looks_gone(h)) {
      auto fresh = connect(uri_, who, kReconnectDeadlineMs);
      if (!fresh.is_ok()) {
        s = fresh.take_status();
      } else if (const int64_t size = nbd_get_size(fresh.value());
                 size < 0 || static_cast<uint64_t>(size) != size_) {
        nbd_close(fresh.value());
        s = Status::error(ENODEV, who + ": the export now has " + std::to_string(size) +
                                      " bytes, not " + std::to_string(size_) +
                                      ": not the same disk");
      } else {
        // Writes the old connection acknowledged may have died with the
        // server's cache: no later flush may vouch for them.
        if (!is_placeholder(h)) forfeit_unflushed();
        nbd_close(h);
        h = fresh.value();
        std::lock_guard l(mu_);
        all_[i] = h;
      }
    }
    release(h);
    if (!s.is_ok()) return s;
  }
  return Status::ok();
}

nbd_handle* NbdDevice::acquire() {
  std::unique_lock l(mu_);
  cv_.wait(l, [&] { return !idle_.empty(); });
  nbd_handle* h = idle_.back();
  idle_.pop_back();
  return h;
}

void NbdDevice::release(nbd_handle* h) {
  {
    std::lock_guard l(mu_);
    idle_.push_back(h);
  }
  // Waiters want different handles (any one, or one in particular).
  cv_.notify_all();
}

Status NbdDevice::failure(nbd_handle* h, const char* what, uint64_t offset) const {
  int err = nbd_get_errno();
  const char* msg = nbd_get_error();
  // A connection that is gone makes libnbd refuse the call locally (EINVAL
  // or ENOTCONN for "the handle must be connected"): to the caller that is a
  // device that no longer answers, not a bad request.
  if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1) err = ENOTCONN;
  return Status::error(data_errno(err), where(what, offset) + (msg ? std::string(": ") + msg : ""));
}

int NbdDevice::complete(nbd_handle*& h, int64_t cookie) {
  if (cookie == -1) return -1;
  const bool bounded = timeout_.count() > 0;
  const auto until = std::chrono::steady_clock::now() + timeout_;
  bool timed_out = false;
  while (true) {
    const int done = nbd_aio_command_completed(h, cookie);
    if (done == 1) return 0;
    if (done == -1) return -1;
    int wait = -1;
    if (bounded) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                            until - std::chrono::steady_clock::now())
                            .count();
      if (left <= 0) {
        timed_out = true;
        break;
      }
      wait = static_cast<int>(std::min<int64_t>(left, 60000));
    }
    if (nbd_poll(h, wait) == -1) {
      if (nbd_get_errno() == EINTR) continue;  // a signal, not the connection
      // The connection failed under the command: libnbd retires it with
      // an error, which the next turn reads.
      if (nbd_aio_command_completed(h, cookie) != 0) continue;
      break;
    }
  }
  if (timed_out) {
    // The server (or the disk under it) is stuck on this request. Its
    // connection is cut, so that libnbd retires the command and lets go
    // of the buffer; the next request on it reconnects (and, as after any
    // reconnect, forfeits the writes not yet flushed: see BlockDevice).
    if (const int fd = nbd_aio_get_fd(h); fd >= 0) ::shutdown(fd, SHUT_RDWR);
    for (int turn = 0; turn < 50; ++turn) {
      if (nbd_aio_command_completed(h, cookie) != 0) return -2;
      if (nbd_poll(h, 100) == -1 && nbd_get_errno() != EINTR &&
          nbd_aio_command_completed(h, cookie) != 0) {
        return -2;
      }
    }
  }
  // The command is still not retired: libnbd may yet write into (or read
  // from) the caller's buffer. Closing the handle is the only way to make
  // it let go before the caller reuses that memory; an unconnected handle
  // takes its place, to be connected by the next request that gets it.
  discard(h);
  return timed_out ? -2 : -3;
}

void NbdDevice::discard(nbd_handle*& h) {
  nbd_handle* fresh = nbd_create();
  if (fresh == nullptr) std::abort();  // out of memory for a few hundred bytes
  // What the old connection acknowledged may be lost with it.
  forfeit_unflushed();
  {
    // In its place before the old one is freed.
    std::lock_guard l(mu_);
    *std::find(all_.begin(), all_.end(), h) = fresh;
    placeholders_.push_back(fresh);
  }
  nbd_close(h);
  h = fresh;
}

bool NbdDevice::is_placeholder(nbd_handle* h) {
  std::lock_guard l(mu_);
  const auto it = std::find(placeholders_.begin(), placeholders_.end(), h);
  if (it == placeholders_.end()) return false;
  placeholders_.erase(it);
  return true;
}

Status NbdDevice::outcome(nbd_handle* h, int r, const char* what, uint64_t offset) const {
  if (r == 0) return Status::ok();
  if (r == -2) {
    return Status::error(ETIMEDOUT, where(what, offset) + ": no answer within " +
                                        std::to_string(timeout_.count() / 1000) +
                                        " s (io-timeout); the connection was cut");
  }
  if (r == -3) {
    return Status::error(ENOTCONN, where(what, offset) +
                                       ": the connection failed under the request");
  }
  return failure(h, what, offset);
}

template <class F>
Status NbdDevice::chunked(const char* what, size_t len, uint64_t offset, F&& start) {
  Lease lease(*this);
  size_t done = 0;
  while (done < len) {
    const size_t n = std::min<uint64_t>(len - done, max_request_);
    const int r = complete(lease.handle(), start(lease.get(), done, n, offset + done));
    if (r != 0) return outcome(lease.get(), r, what, offset + done);
    done += n;
  }
  return Status::ok();
}

Status NbdDevice::do_read(void* buf, size_t len, uint64_t offset) {
  char* p = static_cast<char*>(buf);
  return chunked("read", len, offset, [&](nbd_handle* h, size_t at, size_t n, uint64_t off) {
    return nbd_aio_pread(h, p + at, n, off, NBD_NULL_COMPLETION, 0);
  });
}

Status NbdDevice::do_write(const void* buf, size_t len, uint64_t offset) {
  const char* p = static_cast<const char*>(buf);
  return chunked("write", len, offset, [&](nbd_handle* h, size_t at, size_t n, uint64_t off) {
    return nbd_aio_pwrite(h, p + at, n, off, NBD_NULL_COMPLETION, 0);
  });
}

Status NbdDevice::do_flush() {
  if (multi_conn_) {
    Lease lease(*this);
    const int r = complete(lease.handle(), nbd_aio_flush(lease.get(), NBD_NULL_COMPLETION, 0));
    return outcome(lease.get(), r, "flush", 0);
  }
  // Without multi-conn a flush covers only its own connection's writes, so
  // every connection is flushed.
  for (size_t i = 0; i < all_.size(); ++i) {
    // A connection busy with a request is flushed once it is free.
    nbd_handle* h = take(i);
    const int r = complete(h, nbd_aio_flush(h, NBD_NULL_COMPLETION, 0));
    Status s = outcome(h, r, "flush", 0);
    release(h);
    if (!s.is_ok()) return s;
  }
  return Status::ok();
}

Status NbdDevice::do_trim(size_t len, uint64_t offset) {
  if (!can_trim_) return Status::ok();
  return chunked("trim", len, offset, [&](nbd_handle* h, size_t, size_t n, uint64_t off) {
    return nbd_aio_trim(h, n, off, NBD_NULL_COMPLETION, 0);
  });
}

Status NbdDevice::do_write_zeroes(size_t len, uint64_t offset) {
  if (!can_zero_) return BlockDevice::do_write_zeroes(len, offset);
  return chunked("write zeroes", len, offset, [&](nbd_handle* h, size_t, size_t n, uint64_t off) {
    return nbd_aio_zero(h, n, off, NBD_NULL_COMPLETION, LIBNBD_CMD_FLAG_NO_HOLE);
  });
}

}  // namespace dmremap
