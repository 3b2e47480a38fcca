#include "session.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <string_view>
#include <sys/socket.h>
#include <sys/uio.h>
#include <system_error>
#include <thread>
#include <type_traits>

#include "dmremap/log.h"
#include "protocol.h"

namespace dmremap::server {

using asio::awaitable;
using asio::use_awaitable;

namespace {

// Memory counted for every request, whatever it is, so that a flood of tiny
// or invalid requests is bounded like big ones.
constexpr uint64_t kRequestOverhead = 512;
// What a BLOCK_STATUS reply may hold (2 contexts of 8192 runs).
constexpr uint64_t kMaxStatusReplyBytes = 2 * (24 + 8 * 8192);
// A lane takes up to this many requests that have already arrived, runs them
// in turn and posts their replies: at queue depth 32 one recv and one
// sendmsg serve many requests.
constexpr size_t kMaxBatch = 32;
constexpr uint64_t kMaxBatchBytes = 1 << 20;
// Replies go out once this many wait, or the oldest has waited kReplyWaitNs,
// so the client can send more requests while the rest of a batch runs.
constexpr size_t kRepliesPerSend = 8;
constexpr int64_t kReplyWaitNs = 1'000'000;
// A lane that has made no progress for this long is stuck on a slow disk.
constexpr int64_t kStuckNs = 3'000'000;
// Options arriving after a shutdown began are refused for this long; then a
// client still in the handshake is dropped.
constexpr std::chrono::seconds kShutdownGrace{2};
// After a thread could not be created, none is tried for this long.
constexpr int64_t kSpawnBackoffNs = 1'000'000'000;

}  // namespace

template <class Socket>
Session<Socket>::Session(Socket socket, ExportInfo& info)
    : socket_(std::move(socket)),
      info_(info),
      handshake_(info),
      strand_(asio::make_strand(socket_.get_executor())),
      wake_(strand_) {}

template <class Socket>
void Session<Socket>::drain() {
  asio::post(strand_, [self = this->shared_from_this(), this] {
    if (closed_ || draining_) return;
    draining_ = true;
    if (in_handshake_) {
      // Later options get NBD_REP_ERR_SHUTDOWN; a client that sends none is
      // dropped after a grace period.
      handshake_.shut_down();
      auto timer = std::make_shared<asio::steady_timer>(strand_, kShutdownGrace);
      timer->async_wait([self, this, timer](const boost::system::error_code& ec) {
        if (!ec && in_handshake_) close();
      });
      return;
    }
    wake_reader();
  });
}

// A reader waiting between requests re-checks the drain (recv_exact).
template <class Socket>
void Session<Socket>::wake_reader() {
  if (wake_fd_ >= 0) {
    const uint64_t one = 1;
    (void)!::write(wake_fd_, &one, sizeof one);
  }
}

// Lanes finish the request they hold and send its reply; a lane waiting on
// the socket wakes up with end-of-file, and the sender ends.
template <class Socket>
void Session<Socket>::stop_lanes() {
  stop_ = true;
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RD);
  {
    std::lock_guard lock(lanes_mu_);
    room_.notify_all();
  }
  std::lock_guard lock(outbox_mu_);
  send_cv_.notify_all();
}

template <class Socket>
awaitable<void> Session<Socket>::run() {
  auto self = this->shared_from_this();
  info_.add(self);
  boost::system::error_code ec;
  if constexpr (std::is_same_v<Socket, asio::ip::tcp::socket>) {
    // Replies are whole messages: send them at once, never waiting for the
    // client's delayed ACK (the protocol says SHOULD).
    socket_.set_option(asio::ip::tcp::no_delay(true), ec);
  }
  bool go = false;
  try {
    // A client that stalls in the handshake is dropped.
    asio::steady_timer deadline(strand_, info_.handshake_timeout);
    deadline.async_wait([this](const boost::system::error_code& e) {
      if (!e && in_handshake_) {
        log(LogLevel::kWarning, "a client stalled in the handshake: disconnecting it");
        close();
      }
    });
    go = co_await handshake();
    in_handshake_ = false;
    deadline.cancel();
  } catch (const boost::system::system_error& e) {
    // The client went away or sent something we refuse: this session ends,
    // the others go on.
    if (e.code() != asio::error::eof && e.code() != asio::error::operation_aborted) {
      log(LogLevel::kDebug, std::string("session ended: ") + e.what());
    }
  } catch (const std::exception& e) {
    log(LogLevel::kWarning, std::string("session ended: ") + e.what());
  }
  in_handshake_ = false;
  if (go) log(LogLevel::kDebug, "a client has finished its handshake");
  // Transmission even if a drain began meanwhile: requests the client sent
  // right after GO are then answered ESHUTDOWN, not dropped.
  if (go && !closed_) {
    // Transmission: blocking I/O on the lanes, off the Asio threads.
    // The lanes own a duplicate of the socket, and Asio's copy is closed:
    // otherwise its reactor would still wake on every packet that arrives.
    fd_ = ::fcntl(socket_.native_handle(), F_DUPFD_CLOEXEC, 0);
    socket_.close(ec);
    if (tls_) tls_->attach(fd_);
    wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd_ >= 0 && wake_fd_ >= 0) {
      // Non-blocking: a reader with nothing to read waits in poll(), where a
      // drain can wake it (recv_exact).
      ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) | O_NONBLOCK);
      // Room for a few 1 MiB requests and replies in the kernel, so that big
      // transfers take fewer system calls and wake-ups.
      const int bytes = 4 << 20;
      ::setsockopt(fd_, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
      ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
      ahead_.resize(256 * 1024);  // no lane runs yet
      start_lane(/*first=*/true);
      // The last lane to end cancels the wait.
      wake_.expires_at(asio::steady_timer::time_point::max());
      co_await wake_.async_wait(asio::redirect_error(use_awaitable, ec));
    }
    // TLS ends with close_notify, so the client knows nothing was cut.
    if (tls_ && fd_ >= 0) tls_->bye();
  }
  close();
  info_.remove(this);
  if (go) log(LogLevel::kDebug, "a client's session has ended");
}

template <class Socket>
void Session<Socket>::close() {
  if (closed_) return;
  closed_ = true;
  boost::system::error_code ec;
  socket_.shutdown(Socket::shutdown_both, ec);
  socket_.close(ec);
  if (fd_ >= 0) {
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
    fd_ = -1;
  }
  if (wake_fd_ >= 0) {
    ::close(wake_fd_);
    wake_fd_ = -1;
  }
}

// Reads each option off the socket and sends what Handshake answers.
template <class Socket>
awaitable<bool> Session<Socket>::handshake() {
  co_await write_out(Handshake::greeting());
  char cflags[4];
  co_await read_exact(cflags, sizeof cflags);
  if (!handshake_.client_flags(nbd::get32(cflags))) co_return false;

  std::vector<char> data;
  std::string out;
  while (true) {
    char head[16];
    co_await read_exact(head, sizeof head);
    if (nbd::get64(head) != nbd::kIHaveOpt) {
      log(LogLevel::kInfo, "a client sent an option with a bad magic: disconnecting it");
      co_return false;
    }
    const uint32_t option = nbd::get32(head + 8);
    const uint32_t length = nbd::get32(head + 12);
    out.clear();
    Handshake::Outcome next;
    if (length > Handshake::kMaxOptionBytes) {
      next = handshake_.oversized(option, length, out);
      if (next == Handshake::Outcome::kEnd) co_return false;
      // Skipped without keeping it; the handshake timeout bounds how long.
      data.resize(Handshake::kMaxOptionBytes);
      for (uint32_t left = length; left > 0;) {
        const size_t n = std::min<size_t>(left, data.size());
        co_await read_exact(data.data(), n);
        left -= static_cast<uint32_t>(n);
      }
    } else {
      data.resize(length);
      co_await read_exact(data.data(), length);
      next = handshake_.option(option, std::string_view(data.data(), length), out);
    }
    if (next == Handshake::Outcome::kStartTls) {
      if (!co_await start_tls(out)) co_return false;
      continue;
    }
    if (!out.empty()) co_await write_out(out);
    if (next == Handshake::Outcome::kTransmit) co_return true;
    if (next == Handshake::Outcome::kEnd) co_return false;
  }
}

template <class Socket>
awaitable<void> Session<Socket>::read_exact(char* out, size_t n) {
  if (!tls_) {
    co_await asio::async_read(socket_, asio::buffer(out, n), use_awaitable);
    co_return;
  }
  while (n > 0) {
    const ssize_t got = tls_->recv(out, n);
    if (got > 0) {
      out += got;
      n -= static_cast<size_t>(got);
    } else if (got == 0) {
      throw boost::system::system_error(asio::error::eof);
    } else if (got == -EAGAIN) {
      co_await feed_tls();
    } else {
      throw std::runtime_error("TLS: the client sent a record that does not decrypt");
    }
  }
}

template <class Socket>
awaitable<void> Session<Socket>::write_out(const std::string& out) {
  if (!tls_) {
    co_await asio::async_write(socket_, asio::buffer(out), use_awaitable);
    co_return;
  }
  if (!tls_->send(out.data(), out.size())) throw std::runtime_error("TLS: cannot encrypt");
  const std::string cipher = tls_->take_output();
  co_await asio::async_write(socket_, asio::buffer(cipher), use_awaitable);
}

template <class Socket>
awaitable<void> Session<Socket>::feed_tls() {
  tls_in_.resize(64 * 1024);
  const size_t got = co_await socket_.async_read_some(asio::buffer(tls_in_), use_awaitable);
  tls_->feed(tls_in_.data(), got);
}

template <class Socket>
awaitable<bool> Session<Socket>::start_tls(const std::string& ack) {
  // A client waits for the ACK before its TLS handshake: whatever it sent
  // after STARTTLS and before the ACK is not from its TLS stack. Those bytes
  // are dropped, never read as options (the plaintext injection of
  // CVE-2021-3716). Options are read exactly, so nothing was read ahead.
  // More than a client could have in flight is a flood: the session ends.
  constexpr size_t kMaxDropped = 64 * 1024;
  size_t dropped = 0;
  char junk[4096];
  while (dropped <= kMaxDropped) {
    const ssize_t got = ::recv(socket_.native_handle(), junk, sizeof junk, MSG_DONTWAIT);
    if (got <= 0) break;
    dropped += static_cast<size_t>(got);
  }
  if (dropped > kMaxDropped) {
    log(LogLevel::kWarning, "a client sent over 64 KiB after NBD_OPT_STARTTLS, before the TLS "
                            "handshake: disconnecting it");
    co_return false;
  }
  if (dropped > 0) {
    log(LogLevel::kWarning, "a client sent " + std::to_string(dropped) +
                                " bytes after NBD_OPT_STARTTLS, before the TLS handshake: "
                                "discarded them");
  }
  co_await write_out(ack);
  tls_ = std::make_unique<TlsSession>(*info_.tls_credentials);
  std::string why;
  while (true) {
    const TlsSession::Step step = tls_->handshake(why);
    const std::string cipher = tls_->take_output();  // an alert too, when it failed
    if (!cipher.empty()) co_await asio::async_write(socket_, asio::buffer(cipher), use_awaitable);
    if (step == TlsSession::Step::kDone) break;
    if (step == TlsSession::Step::kFailed) {
      log(LogLevel::kWarning, "a client's TLS handshake failed: " + why);
      co_return false;
    }
    // Input already received goes to GnuTLS before the socket is read.
    if (tls_->pending() == 0) co_await feed_tls();
  }
  log(LogLevel::kDebug, "a client is on TLS: " + tls_->describe());
  co_return true;
}

// Called every few milliseconds by the server's watchdog thread. A lane
// runs its requests one after another, which costs the least CPU while the
// disk is fast. Another lane starts when:
// - replies have waited in the outbox past kReplyWaitNs, because the lanes
//   that posted them are running slower requests: it sends them;
// - a request has held every lane for a while (a failing disk retrying a
//   block), or waits for a group commit of remaps, and nobody reads the
//   socket: it takes the connection's next requests.
template <class Socket>
void Session<Socket>::watch(int64_t now) {
  const int64_t since = outbox_since_.load();
  if (since != 0 && now - since > kReplyWaitNs) {
    if (!sender_) {
      start_sender();
    } else {
      std::lock_guard lock(outbox_mu_);
      send_due_ = true;
      send_cv_.notify_one();
    }
  }
  if (executing_ == 0 || readers_ > 0) return;
  // A request waiting for a group commit is stuck at once: the commit
  // grows with the requests that join it, so the connection's next ones
  // should run now rather than queue behind it.
  if (now - progress_ns_ < kStuckNs && info_.engine->waiting_for_commit() == 0) return;
  if (stop_) {
    // Nothing more will be read; a helper is useful only for requests
    // already queued behind the stuck one.
    std::lock_guard lock(queue_mu_);
    if (queued_.empty()) return;
  }
  progress_ns_ = now;  // one more lane per period at most
  start_lane(/*first=*/false);
}

// The first lane starts the transmission; later ones join only while some
// lane still runs (checked under the same lock as the last lane's exit), so
// no lane can start after the session has closed its socket.
template <class Socket>
template <class Body>
bool Session<Socket>::spawn(bool first, bool capped, Body body) {
  if (now_ns() < no_spawn_until_) return false;
  {
    std::lock_guard lock(lanes_mu_);
    if (!first && (lanes_ == 0 || (capped && lanes_ >= info_.max_lanes))) return false;
    ++lanes_;
  }
  try {
    std::thread([self = this->shared_from_this(), body]() mutable {
      body();
      self->lane_done(std::move(self));
    }).detach();
    return true;
  } catch (const std::exception& e) {
    // Out of threads (a pids limit) or memory: this connection goes on with
    // the threads it has (with none, it ends), and tries again later.
    no_spawn_until_ = now_ns() + kSpawnBackoffNs;
    log(LogLevel::kWarning, std::string("cannot start a thread for a client: ") + e.what());
    lane_done(this->shared_from_this());
    return false;
  }
}

template <class Socket>
void Session<Socket>::start_lane(bool first) {
  if (!spawn(first, /*capped=*/true, [this] { lane(); }) && first) stop_lanes();
}

template <class Socket>
void Session<Socket>::start_sender() {
  sender_ = true;
  if (!spawn(/*first=*/false, /*capped=*/false, [this] { sender(); })) sender_ = false;
}

template <class Socket>
void Session<Socket>::sender() {
  while (flush_outbox()) {
    std::unique_lock lock(outbox_mu_);
    send_cv_.wait(lock, [this] { return send_due_ || stop_; });
    if (stop_) break;
    send_due_ = false;
  }
  flush_outbox();
}

template <class Socket>
void Session<Socket>::lane_done(std::shared_ptr<Session> self) {
  bool last = false;
  {
    std::lock_guard lock(lanes_mu_);
    last = --lanes_ == 0;
  }
  if (last) {
    // Wake run() on the strand: the session is over. The last reference
    // this thread held goes with the handler, to the io thread.
    asio::post(strand_, [self = std::move(self)] { self->wake_.cancel(); });
  }
}

template <class Socket>
void Session<Socket>::lane() {
  while (true) {
    Item item;
    if (take_queued(item)) {
      // Replies that have waited long enough go out before another request.
      const int64_t since = outbox_since_.load();
      if (since != 0 && now_ns() - since > kReplyWaitNs) flush_outbox();
    } else {
      // Nothing received is waiting: the replies go out before this lane
      // waits for the client, which may be waiting for them.
      flush_outbox();
      // A helper lane that finds another lane already reading has nothing
      // to do: it ends, and the connection is back to the lanes it needs.
      if (readers_ > 0) {
        std::lock_guard lock(lanes_mu_);
        if (lanes_ > 1) break;
      }
      if (!read_more(item)) break;
    }
    ++executing_;
    Reply reply = answer(item);
    progress_ns_ = now_ns();
    // Posting may send the outbox, and wait for the sender's lock or for
    // room in the socket: that is not a request stuck in the disk, and
    // another lane would only wait behind it (TLS makes sends slow).
    --executing_;
    post(std::move(reply), item.cost);
    if (draining_) wake_reader();
  }
  flush_outbox();
}

template <class Socket>
void Session<Socket>::post(Reply reply, uint64_t cost) {
  bool send_now = false;
  {
    std::lock_guard lock(outbox_mu_);
    const int64_t now = now_ns();
    outbox_.push_back(std::move(reply));
    outbox_cost_ += cost;
    if (outbox_.size() == 1) outbox_since_ = now;
    send_now = outbox_.size() >= kRepliesPerSend || now - outbox_since_ > kReplyWaitNs;
  }
  if (send_now) flush_outbox();
}

template <class Socket>
bool Session<Socket>::flush_outbox() {
  std::vector<Reply> replies;
  uint64_t cost = 0;
  {
    std::lock_guard lock(outbox_mu_);
    if (outbox_.empty()) return true;
    replies.swap(outbox_);
    cost = std::exchange(outbox_cost_, 0);
    outbox_since_ = 0;
  }
  const bool ok = send_replies(replies);
  release(cost);
  if (!ok) stop_lanes();  // the client is gone
  return ok;
}

template <class Socket>
bool Session<Socket>::take_queued(Item& item) {
  std::lock_guard lock(queue_mu_);
  if (queued_.empty()) return false;
  item = std::move(queued_.front());
  queued_.pop_front();
  return true;
}

// Reads the next requests off the socket: the first is returned, the rest
// (those already whole in the read-ahead buffer) are queued for this lane or
// any other. False: nothing more will be read (end of file, NBD_CMD_DISC, a
// request we cannot follow, or a shutdown), and nothing is queued.
template <class Socket>
bool Session<Socket>::read_more(Item& item) {
  std::vector<Item> batch;
  const bool go_on = next_batch(batch);
  if (batch.empty()) {
    stop_lanes();
    return false;
  }
  if (!go_on) stop_lanes();  // answer what came, read no more
  item = std::move(batch.front());
  if (batch.size() > 1) {
    std::lock_guard lock(queue_mu_);
    for (size_t i = 1; i < batch.size(); ++i) queued_.push_back(std::move(batch[i]));
  }
  return true;
}

template <class Socket>
Reply Session<Socket>::answer(Item& item) {
  const Negotiated& n = handshake_.negotiated();
  if (item.late) return refuse(item.r, {nbd::kEshutdown, "the server is shutting down"}, n);
  if (item.verdict.error != 0) {
    log(LogLevel::kDebug, std::string("refused a request: ") + item.verdict.why);
    return refuse(item.r, item.verdict, n);
  }
  return execute(item.r, item.payload, n, info_);
}

template <class Socket>
bool Session<Socket>::recv_exact(char* out, size_t n, bool boundary) {
  const size_t want = n;
  const size_t have = std::min(n, ahead_end_ - ahead_pos_);
  std::memcpy(out, ahead_.data() + ahead_pos_, have);
  ahead_pos_ += have;
  out += have;
  n -= have;
  if (have > 0) boundary = false;
  while (n > 0) {
    ssize_t got;
    if (n >= ahead_.size() / 4) {
      // Big payloads go straight to their buffer.
      got = receive(out, n);
      if (got > 0) {
        out += got;
        n -= static_cast<size_t>(got);
        boundary = false;
        continue;
      }
    } else {
      // Read ahead: at queue depth 32 one call brings many requests.
      got = receive(ahead_.data(), ahead_.size());
      if (got > 0) {
        const size_t take = std::min(n, static_cast<size_t>(got));
        std::memcpy(out, ahead_.data(), take);
        ahead_pos_ = take;
        ahead_end_ = static_cast<size_t>(got);
        out += take;
        n -= take;
        boundary = false;
        continue;
      }
    }
    if (got == 0) return false;  // end of file, or the read side shut
    if (errno == EINTR) continue;
    if (errno == EPROTO && tls_) {
      log(LogLevel::kWarning, "TLS: a client's record failed (" + tls_->last_error() +
                                  "): disconnecting it");
    }
    if (errno != EAGAIN && errno != EWOULDBLOCK) return false;
    // Under TLS GnuTLS may stop short of records already received (after a
    // KeyUpdate, say): those are taken before waiting for the socket.
    if (tls_ && tls_->pending() > 0) continue;
    // Nothing has arrived. Draining, reading ends between requests once no
    // request runs or waits (read_after_drain). Otherwise wait for data, and
    // between requests for a drain or a request's end too.
    if (boundary && draining_ && !read_after_drain()) return false;
    pollfd fds[2] = {{fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    if (::poll(fds, boundary ? 2 : 1, -1) < 0 && errno != EINTR) return false;
    if (fds[1].revents & POLLIN) {
      uint64_t count;
      (void)!::read(wake_fd_, &count, sizeof count);
    }
  }
  delivered_ += want;
  return true;
}

template <class Socket>
ssize_t Session<Socket>::receive(char* out, size_t n) {
  if (!tls_) return ::recv(fd_, out, n, MSG_DONTWAIT);
  ssize_t got = tls_->recv(out, n);
  if (got < 0) {
    errno = static_cast<int>(-got);
    return -1;
  }
  // GnuTLS returns one record per call, and clients send each request in a
  // record of its own: take every record already received, so that a lane
  // gets a batch of requests as it does without TLS.
  size_t total = static_cast<size_t>(got);
  while (got > 0 && total < n && tls_->pending() > 0) {
    got = tls_->recv(out + total, n - total);
    if (got > 0) total += static_cast<size_t>(got);
  }
  return static_cast<ssize_t>(total);
}

// Draining, between requests: while requests run, what arrives is read
// (and answered ESHUTDOWN). Once none runs or waits, only the bytes that had
// arrived by then are read, so that a client that never stops sending does
// not hold the shutdown up; false: reading ends. Under read_mu_.
template <class Socket>
bool Session<Socket>::read_after_drain() {
  if (executing_ > 0) return true;
  {
    std::lock_guard lock(queue_mu_);
    if (!queued_.empty()) return true;
  }
  int in_kernel = 0;
  if (::ioctl(fd_, FIONREAD, &in_kernel) != 0) in_kernel = 0;
  const uint64_t in_tls = tls_ ? tls_->pending() : 0;
  // Under TLS the kernel holds ciphertext, more bytes than the requests it
  // carries: the budget is too big, so reading also ends once nothing more
  // has arrived.
  if (tls_ && in_kernel == 0 && in_tls == 0 && ahead_end_ == ahead_pos_) return false;
  if (drain_budget_ == UINT64_MAX) {
    drain_budget_ = delivered_ + (ahead_end_ - ahead_pos_) + in_tls +
                    static_cast<uint64_t>(in_kernel);
  }
  return delivered_ < drain_budget_;
}

// What a request holds until its reply has left: its payload, the data it
// reads, a block-status reply, and the headers. A client that sends but
// does not read its replies stops being read.
template <class Socket>
uint64_t Session<Socket>::cost_of(const nbd::Request& r, const Verdict& v) const {
  uint64_t cost = kRequestOverhead;
  if (r.type == nbd::kCmdWrite) cost += r.length;
  if (v.error == 0 && r.type == nbd::kCmdRead) cost += r.length;
  if (v.error == 0 && r.type == nbd::kCmdBlockStatus) cost += kMaxStatusReplyBytes;
  return cost;
}

template <class Socket>
bool Session<Socket>::next_batch(std::vector<Item>& batch) {
  ++readers_;
  struct Done {
    std::atomic<unsigned>& n;
    ~Done() { --n; }
  } done{readers_};
  std::lock_guard read_lock(read_mu_);
  if (stop_) return false;
  const Negotiated& n = handshake_.negotiated();
  uint64_t batch_bytes = 0;
  while (batch.size() < kMaxBatch) {
    const bool first = batch.empty();
    char head[nbd::kRequestBytes];
    if (first && draining_ && !read_after_drain()) return false;
    if (!first) {
      // More only from what is already read ahead, and only whole requests:
      // the lane never waits on the client with requests in hand.
      if (ahead_end_ - ahead_pos_ < sizeof head) break;
      const char* h = ahead_.data() + ahead_pos_;
      if (nbd::get32(h) != nbd::kRequestMagic) break;  // the next read reports it
      const nbd::Request peek = nbd::parse_request(h);
      if (peek.type == nbd::kCmdDisc) break;
      const uint64_t body = peek.type == nbd::kCmdWrite ? peek.length : 0;
      if (ahead_end_ - ahead_pos_ - sizeof head < body) break;
      const uint64_t cost = cost_of(peek, validate(peek, n, info_));
      if (batch_bytes + cost > kMaxBatchBytes) break;
      std::lock_guard lock(lanes_mu_);
      if (in_flight_bytes_ + cost > info_.max_in_flight_bytes) break;
    }
    if (!recv_exact(head, sizeof head, /*boundary=*/true)) return false;
    if (nbd::get32(head) != nbd::kRequestMagic) {
      log(LogLevel::kWarning, "client sent a request with a bad magic: disconnecting it");
      return false;
    }
    Item item;
    item.r = nbd::parse_request(head);
    const nbd::Request& r = item.r;
    if (r.type == nbd::kCmdDisc) return false;
    item.verdict = validate(r, n, info_);
    item.late = draining_;
    item.cost = cost_of(r, item.verdict);
    {
      std::unique_lock lock(lanes_mu_);
      room_.wait(lock, [&] {
        return stop_ || in_flight_bytes_ == 0 ||
               in_flight_bytes_ + item.cost <= info_.max_in_flight_bytes;
      });
      in_flight_bytes_ += item.cost;
    }
    if (r.type == nbd::kCmdWrite) {
      // The payload follows whatever we think of the request; one bigger
      // than we accept cannot be skipped safely, so the client goes.
      if (r.length > info_.accept_request) {
        log(LogLevel::kWarning, "client sent a write of " + std::to_string(r.length) +
                                    " bytes, over the limit: disconnecting it");
        release(item.cost);
        return false;
      }
      item.payload = Buffer(r.length);
      if (!recv_exact(item.payload.data(), r.length)) {
        // Cut short. During a drain the client still gets an answer for
        // the request whose header came: ESHUTDOWN.
        if (draining_) {
          item.late = true;
          batch.push_back(std::move(item));
        } else {
          release(item.cost);
        }
        return false;
      }
    }
    batch_bytes += item.cost;
    batch.push_back(std::move(item));
  }
  return true;
}

template <class Socket>
void Session<Socket>::release(uint64_t cost) {
  std::lock_guard lock(lanes_mu_);
  in_flight_bytes_ -= std::min(in_flight_bytes_, cost);
  room_.notify_all();
}

// Sends `replies` with as few sendmsg calls as the iovec limit allows, and
// empties it.
template <class Socket>
bool Session<Socket>::send_replies(std::vector<Reply>& replies) {
  std::lock_guard lock(write_mu_);
  iov_.clear();
  auto add = [&](const char* p, size_t n) {
    if (n > 0) iov_.push_back({const_cast<char*>(p), n});
  };
  for (const auto& reply : replies) {
    if (reply.pieces.empty()) {
      add(reply.meta.data(), reply.meta.size());
      continue;
    }
    for (const auto& p : reply.pieces) {
      add((p.in_data ? reply.data.bytes.get() : reply.meta.data()) + p.offset, p.length);
    }
  }
  if (tls_) {
    const bool sent = tls_->sendv(iov_.data(), iov_.size());
    replies.clear();
    return sent;
  }
  bool ok = true;
  iovec* v = iov_.data();
  size_t count = iov_.size();
  while (count > 0) {
    msghdr msg{};
    msg.msg_iov = v;
    msg.msg_iovlen = std::min<size_t>(count, IOV_MAX);
    ssize_t sent = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        // The socket's buffer is full: wait until the client reads.
        pollfd out{fd_, POLLOUT, 0};
        if (::poll(&out, 1, -1) >= 0 || errno == EINTR) continue;
      }
      ok = false;
      break;
    }
    while (count > 0 && static_cast<size_t>(sent) >= v->iov_len) {
      sent -= static_cast<ssize_t>(v->iov_len);
      ++v;
      --count;
    }
    if (count > 0) {
      v->iov_base = static_cast<char*>(v->iov_base) + sent;
      v->iov_len -= static_cast<size_t>(sent);
    }
  }
  replies.clear();
  return ok;
}

template class Session<asio::ip::tcp::socket>;
template class Session<asio::local::stream_protocol::socket>;

}  // namespace dmremap::server
