#include "session.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <climits>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <optional>

#include "dmremap/log.h"
#include "protocol.h"

namespace dmremap::server {

using asio::awaitable;
using asio::use_awaitable;

namespace {

// Largest option payload read during the handshake; bigger ones end the
// session (a client cannot make the server allocate without bound).
constexpr uint32_t kMaxOptionBytes = 64 * 1024;
// Memory counted for every request, whatever it is, so that a flood of tiny
// or invalid requests is bounded like big ones.
constexpr uint64_t kRequestOverhead = 512;
// A BLOCK_STATUS reply describes at most this many runs per context (the
// protocol lets a server describe less than was asked).
constexpr size_t kMaxStatusRuns = 8192;
constexpr uint64_t kMaxStatusReplyBytes = 2 * (24 + 8 * kMaxStatusRuns);
// A lane takes up to this many requests that have already arrived, runs them
// in turn and sends their replies together: at queue depth 32 one recv and
// one sendmsg serve many requests.
constexpr size_t kMaxBatch = 32;
constexpr uint64_t kMaxBatchBytes = 1 << 20;
// Replies of a batch go out in groups of this many, so the client can
// send more requests while the rest of the batch runs.
constexpr size_t kRepliesPerSend = 8;
// A lane that has made no progress for this long is stuck on a slow disk.
constexpr int64_t kStuckNs = 3'000'000;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string be16(uint16_t v) {
  char b[2];
  nbd::put16(b, v);
  return std::string(b, 2);
}
std::string be32(uint32_t v) {
  char b[4];
  nbd::put32(b, v);
  return std::string(b, 4);
}
std::string be64(uint64_t v) {
  char b[8];
  nbd::put64(b, v);
  return std::string(b, 8);
}

}  // namespace

void ExportInfo::add(const std::shared_ptr<SessionBase>& s) {
  bool drain_now = false;
  {
    std::lock_guard lock(mu_);
    std::erase_if(live_, [](const auto& w) { return w.expired(); });
    live_.push_back(s);
    drain_now = draining_;
  }
  if (drain_now) s->drain();
}

void ExportInfo::remove(const SessionBase* s) {
  std::lock_guard lock(mu_);
  std::erase_if(live_, [s](const auto& w) {
    auto p = w.lock();
    return !p || p.get() == s;
  });
}

std::vector<std::shared_ptr<SessionBase>> ExportInfo::snapshot() const {
  std::vector<std::shared_ptr<SessionBase>> sessions;
  std::lock_guard lock(mu_);
  for (const auto& w : live_) {
    if (auto p = w.lock()) sessions.push_back(std::move(p));
  }
  return sessions;
}

void ExportInfo::drain_all() {
  {
    std::lock_guard lock(mu_);
    draining_ = true;  // sessions added from now on drain at once
  }
  for (auto& s : snapshot()) s->drain();
}

void ExportInfo::watch_all() {
  const int64_t now = now_ns();
  for (auto& s : snapshot()) s->watch(now);
}

size_t ExportInfo::live() const {
  std::lock_guard lock(mu_);
  return static_cast<size_t>(std::count_if(live_.begin(), live_.end(),
                                           [](const auto& w) { return !w.expired(); }));
}

template <class Socket>
Session<Socket>::Session(Socket socket, ExportInfo& info)
    : socket_(std::move(socket)),
      info_(info),
      strand_(asio::make_strand(socket_.get_executor())),
      wake_(strand_) {}

template <class Socket>
void Session<Socket>::drain() {
  asio::post(strand_, [self = this->shared_from_this(), this] {
    if (draining_ || closed_) return;
    draining_ = true;
    if (in_handshake_) {
      close();  // nothing to finish yet
      return;
    }
    stop_lanes();
  });
}

// Lanes finish the request they hold and write its reply; a lane blocked
// reading the socket wakes up with end-of-file.
template <class Socket>
void Session<Socket>::stop_lanes() {
  stop_ = true;
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RD);
  std::lock_guard lock(lanes_mu_);
  room_.notify_all();
}

template <class Socket>
awaitable<void> Session<Socket>::run() {
  auto self = this->shared_from_this();
  info_.add(self);
  bool go = false;
  try {
    // A client that stalls in the handshake is dropped.
    asio::steady_timer deadline(strand_, info_.handshake_timeout);
    deadline.async_wait([this](const boost::system::error_code& ec) {
      if (!ec && in_handshake_) {
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
  if (go && !draining_ && !closed_) {
    // Transmission: blocking I/O on the lanes, off the Asio threads.
    // The lanes own a duplicate of the socket, and Asio's copy is closed:
    // otherwise its reactor would still wake on every packet that arrives.
    boost::system::error_code ec;
    fd_ = ::fcntl(socket_.native_handle(), F_DUPFD_CLOEXEC, 0);
    socket_.close(ec);
    if (fd_ >= 0) {
      ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) & ~O_NONBLOCK);
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
  }
  close();
  info_.remove(this);
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
}

template <class Socket>
uint16_t Session<Socket>::transmission_flags() const {
  uint16_t f = nbd::kHasFlags | nbd::kSendFlush | nbd::kSendFua | nbd::kSendTrim |
               nbd::kSendWriteZeroes | nbd::kCanMultiConn | nbd::kSendCache;
  if (info_.read_only) f |= nbd::kReadOnly;
  if (structured_) f |= nbd::kSendDf;
  if (info_.engine->can_fast_zero()) f |= nbd::kSendFastZero;
  return f;
}

template <class Socket>
std::string Session<Socket>::export_info(uint16_t type) const {
  switch (type) {
    case nbd::kInfoExport:
      return be16(nbd::kInfoExport) + be64(info_.engine->size()) + be16(transmission_flags());
    case nbd::kInfoName: return be16(nbd::kInfoName) + info_.name;
    case nbd::kInfoDescription: return be16(nbd::kInfoDescription) + info_.description;
    case nbd::kInfoBlockSize:
      return be16(nbd::kInfoBlockSize) + be32(info_.min_block) + be32(info_.preferred_block) +
             be32(info_.max_request);
  }
  return {};
}

template <class Socket>
awaitable<void> Session<Socket>::option_reply(uint32_t option, uint32_t type,
                                              const std::string& data) {
  const std::string head = be64(nbd::kOptReplyMagic) + be32(option) + be32(type) +
                           be32(static_cast<uint32_t>(data.size()));
  const std::array<asio::const_buffer, 2> bufs{asio::buffer(head), asio::buffer(data)};
  co_await asio::async_write(socket_, bufs, use_awaitable);
}

template <class Socket>
awaitable<bool> Session<Socket>::handshake() {
  {
    const std::string hello =
        be64(nbd::kNbdMagic) + be64(nbd::kIHaveOpt) + be16(nbd::kFlagFixedNewstyle | nbd::kFlagNoZeroes);
    co_await asio::async_write(socket_, asio::buffer(hello), use_awaitable);
  }
  char cflags[4];
  co_await asio::async_read(socket_, asio::buffer(cflags), use_awaitable);
  const uint32_t client_flags = nbd::get32(cflags);
  if (!(client_flags & nbd::kClientFixedNewstyle) ||
      (client_flags & ~(nbd::kClientFixedNewstyle | nbd::kClientNoZeroes))) {
    co_return false;  // not a fixed-newstyle client, or flags we do not know
  }
  no_zeroes_ = client_flags & nbd::kClientNoZeroes;

  std::vector<char> data;
  while (true) {
    char head[16];
    co_await asio::async_read(socket_, asio::buffer(head), use_awaitable);
    if (nbd::get64(head) != nbd::kIHaveOpt) co_return false;
    const uint32_t option = nbd::get32(head + 8);
    const uint32_t length = nbd::get32(head + 12);
    if (length > kMaxOptionBytes) co_return false;
    data.resize(length);
    co_await asio::async_read(socket_, asio::buffer(data), use_awaitable);

    switch (option) {
      case nbd::kOptExportName: {
        // No reply on error is possible here: an unknown name ends it.
        const std::string name(data.begin(), data.end());
        if (name != info_.name && !name.empty()) co_return false;
        std::string reply = be64(info_.engine->size()) + be16(transmission_flags());
        if (!no_zeroes_) reply.append(124, '\0');
        co_await asio::async_write(socket_, asio::buffer(reply), use_awaitable);
        co_return true;
      }
      case nbd::kOptAbort:
        co_await option_reply(option, nbd::kRepAck, {});
        co_return false;
      case nbd::kOptList:
        if (length != 0) {
          co_await option_reply(option, nbd::kRepErrInvalid, "LIST takes no data");
          break;
        }
        co_await option_reply(option, nbd::kRepServer,
                              be32(static_cast<uint32_t>(info_.name.size())) + info_.name +
                                  info_.description);
        co_await option_reply(option, nbd::kRepAck, {});
        break;
      case nbd::kOptStructuredReply:
        if (length != 0) {
          co_await option_reply(option, nbd::kRepErrInvalid, "STRUCTURED_REPLY takes no data");
          break;
        }
        structured_ = true;
        co_await option_reply(option, nbd::kRepAck, {});
        break;
      case nbd::kOptInfo:
      case nbd::kOptGo: {
        // u32 name length, name, u16 count, count x u16 info types.
        if (length < 6) {
          co_await option_reply(option, nbd::kRepErrInvalid, "short INFO/GO request");
          break;
        }
        const uint32_t name_len = nbd::get32(data.data());
        if (name_len > length - 6) {
          co_await option_reply(option, nbd::kRepErrInvalid, "bad name length");
          break;
        }
        const std::string name(data.data() + 4, name_len);
        const uint16_t count = nbd::get16(data.data() + 4 + name_len);
        if (6 + name_len + 2ull * count != length) {
          co_await option_reply(option, nbd::kRepErrInvalid, "bad INFO/GO request length");
          break;
        }
        if (!name.empty() && name != info_.name) {
          co_await option_reply(option, nbd::kRepErrUnknown, "no export named '" + name + "'");
          break;
        }
        bool sent_name = false, sent_description = false;
        for (uint16_t i = 0; i < count; ++i) {
          const uint16_t type = nbd::get16(data.data() + 6 + name_len + 2 * i);
          if (type == nbd::kInfoName && !sent_name) {
            co_await option_reply(option, nbd::kRepInfo, export_info(type));
            sent_name = true;
          } else if (type == nbd::kInfoDescription && !sent_description) {
            co_await option_reply(option, nbd::kRepInfo, export_info(type));
            sent_description = true;
          }
        }
        // Block sizes always: the client learns the minimum it must honour.
        co_await option_reply(option, nbd::kRepInfo, export_info(nbd::kInfoBlockSize));
        co_await option_reply(option, nbd::kRepInfo, export_info(nbd::kInfoExport));
        co_await option_reply(option, nbd::kRepAck, {});
        if (option == nbd::kOptGo) co_return true;
        break;
      }
      case nbd::kOptListMetaContext:
      case nbd::kOptSetMetaContext:
        co_await meta_context_option(option, data);
        break;
      default:
        co_await option_reply(option, nbd::kRepErrUnsup, "option not supported");
        break;
    }
  }
}

// u32 export name length, name, u32 query count, then u32 length + query.
template <class Socket>
awaitable<void> Session<Socket>::meta_context_option(uint32_t option,
                                                     const std::vector<char>& data) {
  const bool set = option == nbd::kOptSetMetaContext;
  if (set && !structured_) {
    co_await option_reply(option, nbd::kRepErrInvalid, "negotiate structured replies first");
    co_return;
  }
  size_t pos = 0;
  auto take32 = [&](uint32_t& out) {
    if (data.size() - pos < 4) return false;
    out = nbd::get32(data.data() + pos);
    pos += 4;
    return true;
  };
  uint32_t name_len = 0, count = 0;
  if (!take32(name_len) || name_len > data.size() - pos) {
    co_await option_reply(option, nbd::kRepErrInvalid, "bad meta context request");
    co_return;
  }
  const std::string name(data.data() + pos, name_len);
  pos += name_len;
  if (!take32(count)) {
    co_await option_reply(option, nbd::kRepErrInvalid, "bad meta context request");
    co_return;
  }
  std::vector<std::string> queries;
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t len = 0;
    if (!take32(len) || len > data.size() - pos) {
      co_await option_reply(option, nbd::kRepErrInvalid, "bad meta context query");
      co_return;
    }
    queries.emplace_back(data.data() + pos, len);
    pos += len;
  }
  if (pos != data.size()) {
    co_await option_reply(option, nbd::kRepErrInvalid, "bad meta context request length");
    co_return;
  }
  if (!name.empty() && name != info_.name) {
    co_await option_reply(option, nbd::kRepErrUnknown, "no export named '" + name + "'");
    co_return;
  }
  // LIST with no query lists everything; "ns:" matches a whole namespace
  // when listing.
  bool allocation = false, remapped = false;
  if (!set && queries.empty()) allocation = remapped = true;
  for (const auto& q : queries) {
    if (q == "base:allocation" || (!set && q == "base:")) allocation = true;
    if (q == "dmremap:remapped" || (!set && q == "dmremap:")) remapped = true;
  }
  if (set) {
    want_allocation_ = allocation;
    want_remapped_ = remapped;
  }
  if (allocation) {
    co_await option_reply(option, nbd::kRepMetaContext,
                          be32(nbd::kContextAllocation) + "base:allocation");
  }
  if (remapped) {
    co_await option_reply(option, nbd::kRepMetaContext,
                          be32(nbd::kContextRemapped) + "dmremap:remapped");
  }
  co_await option_reply(option, nbd::kRepAck, {});
}

template <class Socket>
uint32_t Session<Socket>::validate(const Request& r) const {
  const uint64_t size = info_.engine->size();
  uint16_t allowed = 0;
  switch (r.type) {
    case nbd::kCmdRead: allowed = structured_ ? nbd::kCmdFlagDf : 0; break;
    case nbd::kCmdWrite: allowed = nbd::kCmdFlagFua; break;
    case nbd::kCmdTrim: allowed = nbd::kCmdFlagFua; break;
    case nbd::kCmdWriteZeroes:
      allowed = nbd::kCmdFlagFua | nbd::kCmdFlagNoHole | nbd::kCmdFlagFastZero;
      break;
    case nbd::kCmdFlush:
    case nbd::kCmdCache:
    case nbd::kCmdDisc: allowed = 0; break;
    case nbd::kCmdBlockStatus:
      if (!structured_ || !(want_allocation_ || want_remapped_)) return nbd::kEinval;
      allowed = nbd::kCmdFlagReqOne;
      break;
    default: return nbd::kEinval;
  }
  if (r.flags & ~allowed) return nbd::kEinval;
  const bool past_end = r.offset > size || r.length > size - r.offset;
  switch (r.type) {
    case nbd::kCmdRead:
    case nbd::kCmdCache:
      if (r.length > info_.accept_request) return nbd::kEinval;
      return past_end ? nbd::kEinval : 0;
    case nbd::kCmdWrite:
    case nbd::kCmdTrim:
    case nbd::kCmdWriteZeroes:
      if (info_.read_only) return nbd::kEperm;
      return past_end ? nbd::kEnospc : 0;
    case nbd::kCmdFlush:
      return (r.offset != 0 || r.length != 0) ? nbd::kEinval : 0;
    case nbd::kCmdBlockStatus:
      return (past_end || r.length == 0) ? nbd::kEinval : 0;
  }
  return 0;
}

// Called every few milliseconds by the server's watchdog thread. A lane
// runs its requests one after another, which costs the least CPU while the
// disk is fast; when a request has held every lane for a while (a failing
// disk retrying a block), or waits for a group commit of remaps, and nobody
// is reading the socket, another lane starts so that the connection's other
// requests go on.
template <class Socket>
void Session<Socket>::watch(int64_t now) {
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
void Session<Socket>::start_lane(bool first) {
  {
    std::lock_guard lock(lanes_mu_);
    if (!first && (lanes_ == 0 || lanes_ >= info_.max_lanes)) return;
    ++lanes_;
  }
  std::thread([self = this->shared_from_this(), this] { lane(); }).detach();
}

template <class Socket>
void Session<Socket>::lane() {
  std::vector<Reply> replies;
  uint64_t cost = 0;  // of the requests whose replies are in `replies`
  auto first_reply = std::chrono::steady_clock::now();
  bool alive = true;
  auto flush = [&] {
    if (replies.empty()) return;
    alive = alive && send_replies(replies);
    replies.clear();
    release(cost);
    cost = 0;
    if (!alive) stop_lanes();  // the client is gone
  };
  while (true) {
    Item item;
    if (!take_queued(item)) {
      // Nothing received is waiting: the replies go out before this lane
      // waits for the client, which may be waiting for them.
      flush();
      // A helper lane that finds another lane already reading has nothing
      // to do: it ends, and the connection is back to the lanes it needs.
      if (readers_ > 0) {
        std::lock_guard lock(lanes_mu_);
        if (lanes_ > 1) break;
      }
      if (!read_more(item)) break;
    }
    ++executing_;
    if (replies.empty()) first_reply = std::chrono::steady_clock::now();
    replies.push_back(answer(item));
    cost += item.cost;
    progress_ns_ = now_ns();
    --executing_;
    // Replies go out in small groups, so the client can send more requests
    // while the rest run, and none waits long behind a slow block.
    if (replies.size() >= kRepliesPerSend ||
        std::chrono::steady_clock::now() - first_reply > std::chrono::milliseconds(1)) {
      flush();
    }
  }
  flush();
  bool last = false;
  {
    std::lock_guard lock(lanes_mu_);
    last = --lanes_ == 0;
  }
  if (last) {
    // Wake run() on the strand: the session is over.
    asio::post(strand_, [self = this->shared_from_this(), this] { wake_.cancel(); });
  }
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
  const Request& r = item.r;
  if (item.err == 0) return execute(r, item.payload);
  // With structured replies a READ must be answered by chunks.
  if (structured_ && r.type == nbd::kCmdRead) {
    const int sys = item.err == nbd::kEperm ? EPERM : item.err == nbd::kEnospc ? ENOSPC : EINVAL;
    return read_reply(r, {}, Status::error(sys, "invalid request"), {});
  }
  return simple_reply(r.cookie, item.err);
}

template <class Socket>
bool Session<Socket>::recv_exact(char* out, size_t n) {
  const size_t have = std::min(n, ahead_end_ - ahead_pos_);
  std::memcpy(out, ahead_.data() + ahead_pos_, have);
  ahead_pos_ += have;
  out += have;
  n -= have;
  while (n > 0) {
    ssize_t got;
    if (n >= ahead_.size() / 4) {
      // Big payloads go straight to their buffer.
      got = ::recv(fd_, out, n, 0);
      if (got > 0) {
        out += got;
        n -= static_cast<size_t>(got);
        continue;
      }
    } else {
      // Read ahead: at queue depth 32 one call brings many requests.
      got = ::recv(fd_, ahead_.data(), ahead_.size(), 0);
      if (got > 0) {
        const size_t take = std::min(n, static_cast<size_t>(got));
        std::memcpy(out, ahead_.data(), take);
        ahead_pos_ = take;
        ahead_end_ = static_cast<size_t>(got);
        out += take;
        n -= take;
        continue;
      }
    }
    if (got < 0 && errno == EINTR) continue;
    return false;  // end of file, shut down, or an error
  }
  return true;
}

// What a request holds until its reply has left: its payload, the data it
// reads, a block-status reply, and the headers. A client that sends but
// does not read its replies stops being read.
template <class Socket>
uint64_t Session<Socket>::cost_of(const Request& r, uint32_t err) const {
  uint64_t cost = kRequestOverhead;
  if (r.type == nbd::kCmdWrite) cost += r.length;
  if (err == 0 && (r.type == nbd::kCmdRead || r.type == nbd::kCmdCache)) cost += r.length;
  if (err == 0 && r.type == nbd::kCmdBlockStatus) cost += kMaxStatusReplyBytes;
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
  uint64_t batch_bytes = 0;
  while (batch.size() < kMaxBatch) {
    const bool first = batch.empty();
    char head[nbd::kRequestBytes];
    if (!first) {
      // More only from what is already read ahead, and only whole requests:
      // the lane never waits on the client with requests in hand.
      if (ahead_end_ - ahead_pos_ < sizeof head) break;
      const char* h = ahead_.data() + ahead_pos_;
      if (nbd::get32(h) != nbd::kRequestMagic) break;  // the next read reports it
      const Request peek{nbd::get16(h + 4), nbd::get16(h + 6), nbd::get64(h + 8),
                         nbd::get64(h + 16), nbd::get32(h + 24)};
      if (peek.type == nbd::kCmdDisc) break;
      const uint64_t body = peek.type == nbd::kCmdWrite ? peek.length : 0;
      if (ahead_end_ - ahead_pos_ - sizeof head < body) break;
      const uint64_t cost = cost_of(peek, validate(peek));
      if (batch_bytes + cost > kMaxBatchBytes) break;
      std::lock_guard lock(lanes_mu_);
      if (in_flight_bytes_ + cost > info_.max_in_flight_bytes) break;
    }
    if (!recv_exact(head, sizeof head)) return false;
    if (nbd::get32(head) != nbd::kRequestMagic) {
      log(LogLevel::kWarning, "client sent a request with a bad magic: disconnecting it");
      return false;
    }
    Item item;
    item.r = Request{nbd::get16(head + 4), nbd::get16(head + 6), nbd::get64(head + 8),
                     nbd::get64(head + 16), nbd::get32(head + 24)};
    const Request& r = item.r;
    if (r.type == nbd::kCmdDisc) return false;
    item.err = validate(r);
    item.cost = cost_of(r, item.err);
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
        release(item.cost);
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
  bool ok = true;
  {
    std::lock_guard lock(write_mu_);
    iovec* v = iov_.data();
    size_t count = iov_.size();
    while (count > 0) {
      msghdr msg{};
      msg.msg_iov = v;
      msg.msg_iovlen = std::min<size_t>(count, IOV_MAX);
      ssize_t sent = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
      if (sent < 0) {
        if (errno == EINTR) continue;
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
  }
  replies.clear();
  return ok;
}

template <class Socket>
Reply Session<Socket>::simple_reply(uint64_t cookie, uint32_t error) const {
  Reply out;
  out.meta.resize(16);
  nbd::put32(out.meta.data(), nbd::kSimpleReplyMagic);
  nbd::put32(out.meta.data() + 4, error);
  nbd::put64(out.meta.data() + 8, cookie);
  return out;
}

namespace {

// Appends a structured chunk's header to `meta`.
void chunk_head(std::vector<char>& meta, uint64_t cookie, uint16_t flags, uint16_t type,
                uint32_t length) {
  const size_t at = meta.size();
  meta.resize(at + 20);
  nbd::put32(meta.data() + at, nbd::kStructuredReplyMagic);
  nbd::put16(meta.data() + at + 4, flags);
  nbd::put16(meta.data() + at + 6, type);
  nbd::put64(meta.data() + at + 8, cookie);
  nbd::put32(meta.data() + at + 16, length);
}

}  // namespace

// A read's reply.
// Simple replies: the header, then the data unless the read failed.
// Structured replies: on success one OFFSET_DATA chunk. When blocks are
// unreadable, every good byte still goes out (OFFSET_DATA chunks around them)
// and each unreadable block gets an ERROR_OFFSET chunk naming its first byte,
// so a client such as ddrescue-over-NBD learns exactly what is lost. With the
// DF flag the client wants no fragments: then only the first error is sent.
// Other errors (main offline) send the good bytes before the failure.
template <class Socket>
Reply Session<Socket>::read_reply(const Request& r, Buffer data, const Status& s,
                                  const std::vector<uint64_t>& unreadable) const {
  Reply out;
  auto add_meta = [&](size_t from) {
    out.pieces.push_back({false, static_cast<uint32_t>(from),
                          static_cast<uint32_t>(out.meta.size() - from)});
  };
  if (!structured_) {
    out = simple_reply(r.cookie, s.is_ok() ? 0 : nbd::wire_error(s.code()));
    if (s.is_ok() && r.length > 0) {
      out.pieces = {{false, 0, 16}, {true, 0, r.length}};
      out.data = std::move(data);
    }
    return out;
  }
  const uint64_t end = r.offset + r.length;
  // [lo, hi) of the request as one OFFSET_DATA chunk.
  auto data_chunk = [&](uint64_t lo, uint64_t hi, uint16_t flags) {
    const size_t at = out.meta.size();
    chunk_head(out.meta, r.cookie, flags, nbd::kChunkOffsetData, static_cast<uint32_t>(8 + hi - lo));
    out.meta.resize(at + 28);
    nbd::put64(out.meta.data() + at + 20, lo);
    add_meta(at);
    out.pieces.push_back({true, static_cast<uint32_t>(lo - r.offset), static_cast<uint32_t>(hi - lo)});
  };
  auto error_chunk = [&](const Status& e, std::optional<uint64_t> offset, uint16_t flags) {
    const std::string msg = e.message().substr(0, 512);
    const uint32_t len = static_cast<uint32_t>(6 + msg.size() + (offset ? 8 : 0));
    const size_t at = out.meta.size();
    chunk_head(out.meta, r.cookie, flags, offset ? nbd::kChunkErrorOffset : nbd::kChunkError, len);
    out.meta.resize(at + 20 + len);
    char* p = out.meta.data() + at + 20;
    nbd::put32(p, nbd::wire_error(e.code()));
    nbd::put16(p + 4, static_cast<uint16_t>(msg.size()));
    std::memcpy(p + 6, msg.data(), msg.size());
    if (offset) nbd::put64(p + 6 + msg.size(), *offset);
    add_meta(at);
  };
  if (s.is_ok()) {
    if (r.length == 0) {
      chunk_head(out.meta, r.cookie, nbd::kReplyFlagDone, nbd::kChunkNone, 0);
      add_meta(0);
    } else {
      data_chunk(r.offset, end, nbd::kReplyFlagDone);
      out.data = std::move(data);
    }
    return out;
  }
  const bool df = r.flags & nbd::kCmdFlagDf;
  if (unreadable.empty() || df) {
    const auto at = s.error_offset();
    const uint64_t good = at && !df ? std::min<uint64_t>(*at - r.offset, r.length) : 0;
    if (good > 0) data_chunk(r.offset, r.offset + good, 0);
    error_chunk(s, at, nbd::kReplyFlagDone);
    if (good > 0) out.data = std::move(data);
    return out;
  }
  const uint64_t bs = info_.engine->block_size();
  uint64_t pos = r.offset;
  for (size_t i = 0; i < unreadable.size(); ++i) {
    const uint64_t lo = std::max(r.offset, unreadable[i] * bs);
    const uint64_t hi = std::min(end, (unreadable[i] + 1) * bs);
    if (lo > pos) data_chunk(pos, lo, 0);
    const bool last = i + 1 == unreadable.size() && hi >= end;
    const Status e = i == 0 ? s
                            : Status::error(EIO, "block " + std::to_string(unreadable[i]) +
                                                     " cannot be read");
    error_chunk(e, lo, last ? nbd::kReplyFlagDone : 0);
    pos = hi;
  }
  if (pos < end) data_chunk(pos, end, nbd::kReplyFlagDone);
  out.data = std::move(data);
  return out;
}

// One BLOCK_STATUS chunk per selected context, the last one DONE; runs are
// clipped to the request and merged when their flags agree.
template <class Socket>
Reply Session<Socket>::block_status_reply(const Request& r, Status& s) const {
  Engine& e = *info_.engine;
  const uint64_t end = r.offset + r.length;
  const bool one = r.flags & nbd::kCmdFlagReqOne;
  using Runs = std::vector<std::pair<uint64_t, uint32_t>>;  // length, flags
  auto add = [&](Runs& runs, uint64_t off, uint64_t len, uint32_t flags) {
    const uint64_t lo = std::max(off, r.offset);
    const uint64_t hi = std::min(off + len, end);
    if (lo >= hi) return;
    if (!runs.empty() && runs.back().second == flags) {
      runs.back().first += hi - lo;
    } else {
      runs.emplace_back(hi - lo, flags);
    }
  };
  std::vector<std::pair<uint32_t, Runs>> contexts;
  if (want_allocation_) {
    Runs runs;
    s = e.extents(r.length, r.offset, [&](uint64_t off, uint64_t len, bool hole) {
      add(runs, off, len, hole ? (nbd::kStateHole | nbd::kStateZero) : 0);
    });
    if (!s.is_ok()) return {};
    contexts.emplace_back(nbd::kContextAllocation, std::move(runs));
  }
  if (want_remapped_) {
    Runs runs;
    const uint32_t bs = e.block_size();
    uint64_t pos = r.offset;
    e.for_each_entry(r.offset / bs, (end + bs - 1) / bs, [&](const RemapTable::Entry& en) {
      const uint64_t at = en.block * bs;
      if (at > pos) add(runs, pos, at - pos, 0);
      add(runs, at, bs, RemapTable::is_pending(en.value) ? nbd::kStatePending : nbd::kStateRemapped);
      pos = std::max(pos, at + bs);
    });
    if (pos < end) add(runs, pos, end - pos, 0);
    contexts.emplace_back(nbd::kContextRemapped, std::move(runs));
  }
  Reply out;
  for (size_t c = 0; c < contexts.size(); ++c) {
    auto& [id, runs] = contexts[c];
    if (one && runs.size() > 1) runs.resize(1);
    if (runs.size() > kMaxStatusRuns) runs.resize(kMaxStatusRuns);
    const uint32_t len = static_cast<uint32_t>(4 + 8 * runs.size());
    const size_t at = out.meta.size();
    chunk_head(out.meta, r.cookie, c + 1 == contexts.size() ? nbd::kReplyFlagDone : 0,
               nbd::kChunkBlockStatus, len);
    out.meta.resize(at + 20 + len);
    char* p = out.meta.data() + at + 20;
    nbd::put32(p, id);
    for (size_t i = 0; i < runs.size(); ++i) {
      nbd::put32(p + 4 + 8 * i, static_cast<uint32_t>(runs[i].first));
      nbd::put32(p + 8 + 8 * i, runs[i].second);
    }
  }
  return out;
}

template <class Socket>
Reply Session<Socket>::execute(const Request& r, Buffer& payload) {
  Reply reply;
  try {
    Engine& e = *info_.engine;
    const bool fua = r.flags & nbd::kCmdFlagFua;
    Status s;
    switch (r.type) {
      case nbd::kCmdRead: {
        Buffer data(r.length);
        std::vector<uint64_t> unreadable;
        s = e.read(data.data(), r.length, r.offset, &unreadable);
        if (!s.is_ok()) log(LogLevel::kWarning, "request failed: " + s.to_string());
        return read_reply(r, std::move(data), s, unreadable);
      }
      case nbd::kCmdWrite: s = e.write(payload.data(), r.length, r.offset, fua); break;
      case nbd::kCmdFlush: s = e.flush(); break;
      case nbd::kCmdTrim: s = e.trim(r.length, r.offset, fua); break;
      case nbd::kCmdWriteZeroes:
        if ((r.flags & nbd::kCmdFlagFastZero) && !e.can_fast_zero()) {
          s = Status::error(ENOTSUP, "fast zero is not possible here");
        } else {
          s = e.write_zeroes(r.length, r.offset, fua);
        }
        break;
      case nbd::kCmdCache: {
        Buffer data(r.length);
        s = e.read(data.data(), r.length, r.offset);
        break;
      }
      case nbd::kCmdBlockStatus:
        reply = block_status_reply(r, s);
        if (s.is_ok()) return reply;
        break;
    }
    if (!s.is_ok() && s.code() != ENOTSUP) {
      log(LogLevel::kWarning, "request failed: " + s.to_string());
    }
    return simple_reply(r.cookie, s.is_ok() ? 0 : nbd::wire_error(s.code()));
  } catch (const std::bad_alloc&) {
    return simple_reply(r.cookie, nbd::kEnomem);
  } catch (const std::exception& ex) {
    log(LogLevel::kError, std::string("request failed: ") + ex.what());
    return simple_reply(r.cookie, nbd::kEio);
  }
}

template class Session<asio::ip::tcp::socket>;
template class Session<asio::local::stream_protocol::socket>;

}  // namespace dmremap::server
