// One NBD client connection: the transport. The handshake (handshake.h) runs
// as an Asio coroutine on the session's strand; then transmission runs on
// "lanes": threads of this connection that read requests off the socket, run
// them (commands.h, which blocks on disk I/O) and send the replies, so a
// request never changes thread. One lane serves the connection while the
// disk keeps up; the watchdog (watch()) adds lanes when requests get stuck,
// up to ExportInfo::max_lanes, and sends replies that would otherwise wait
// behind a slow request. Replies go out as they finish, in any order.
#pragma once

#include <utility>  // Boost 1.74's Asio needs it before <boost/asio/awaitable.hpp>

#include <atomic>
#include <boost/asio.hpp>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <sys/uio.h>
#include <vector>

#include "commands.h"
#include "export_info.h"
#include "handshake.h"
#include "replies.h"

namespace dmremap::server {

namespace asio = boost::asio;

template <class Socket>
class Session : public SessionBase, public std::enable_shared_from_this<Session<Socket>> {
 public:
  Session(Socket socket, ExportInfo& info);
  // Runs the session to its end; on the session's strand.
  asio::awaitable<void> run();
  asio::strand<typename Socket::executor_type>& strand() { return strand_; }
  void drain() override;
  void watch(int64_t now_ns) override;

 private:
  asio::awaitable<bool> handshake();
  // The handshake's I/O: plaintext on the socket, or through TLS once
  // STARTTLS is acknowledged.
  asio::awaitable<void> read_exact(char* out, size_t n);
  asio::awaitable<void> write_out(const std::string& out);
  // Receives more of the TLS handshake's ciphertext.
  asio::awaitable<void> feed_tls();
  // STARTTLS was acknowledged (`ack`): discards what the client sent after
  // it, sends the ACK and runs the TLS handshake. False: the session ends.
  asio::awaitable<bool> start_tls(const std::string& ack);
  void close();

  // Transmission, on the lanes.
  struct Item {
    nbd::Request r;
    Verdict verdict;        // from validate()
    bool late = false;      // read after the drain began: ESHUTDOWN
    uint64_t cost = 0;      // bytes counted in the in-flight budget
    Buffer payload;
  };
  void start_lane(bool first);
  // The sender: one thread per session, started the first time replies wait
  // behind slow requests, beyond --threads if need be (it runs no request);
  // the watchdog wakes it whenever they wait again. It ends with reading.
  void start_sender();
  void sender();
  // Runs `body` on a new thread of this session, counted in lanes_ (so that
  // run() waits for it); false when there is no such thread.
  template <class Body>
  bool spawn(bool first, bool capped, Body body);
  void lane();
  // A lane or the sender has ended; the last one wakes run(), handing it
  // `self` so that the session is destroyed on the io thread.
  void lane_done(std::shared_ptr<Session> self);
  // Takes the next request off the socket, and any more that have already
  // arrived whole (under read_mu_). False: nothing more is to be read.
  bool next_batch(std::vector<Item>& batch);
  uint64_t cost_of(const nbd::Request& r, const Verdict& v) const;
  bool take_queued(Item& item);
  bool read_more(Item& item);
  Reply answer(Item& item);
  // Fills `out` with exactly `n` bytes, from what was read ahead first.
  // `boundary`: these are a request's first bytes; while draining, finding
  // nothing there ends reading (false) instead of waiting.
  bool recv_exact(char* out, size_t n, bool boundary = false);
  // One receive on the lanes' descriptor, through TLS if it is on: as
  // recv(2) with MSG_DONTWAIT (-1 and errno on failure).
  ssize_t receive(char* out, size_t n);
  void release(uint64_t cost);
  void stop_lanes();
  void wake_reader();
  bool read_after_drain();

  // Finished replies wait in the outbox until a lane (or the sender) sends
  // them. Any lane may send any reply.
  void post(Reply reply, uint64_t cost);
  // Sends what is in the outbox; false when the client is gone.
  bool flush_outbox();
  bool send_replies(std::vector<Reply>& replies);

  Socket socket_;
  ExportInfo& info_;
  Handshake handshake_;
  std::unique_ptr<TlsSession> tls_;  // after STARTTLS
  std::vector<char> tls_in_;         // ciphertext read during the handshake
  asio::strand<typename Socket::executor_type> strand_;
  asio::steady_timer wake_;  // run() waits here for the lanes to end
  int fd_ = -1;
  bool in_handshake_ = true;  // on the strand
  bool closed_ = false;       // on the strand

  std::atomic<bool> stop_{false};      // lanes: take no more requests
  std::atomic<bool> draining_{false};  // requests read from now on: ESHUTDOWN
  int wake_fd_ = -1;                   // eventfd: the drain wakes a reader waiting in poll()
  std::atomic<bool> sender_{false};    // the sender thread runs
  std::atomic<int64_t> no_spawn_until_{0};  // after a failed thread creation: hold off
  std::mutex read_mu_;                 // one lane reads the socket at a time
  std::vector<char> ahead_;            // bytes read ahead of the current request
  size_t ahead_pos_ = 0, ahead_end_ = 0;
  uint64_t delivered_ = 0;             // bytes of requests taken so far (under read_mu_)
  uint64_t drain_budget_ = UINT64_MAX;  // draining: read up to this many (read_after_drain)
  std::mutex queue_mu_;
  std::deque<Item> queued_;  // received, not yet taken by a lane
  std::mutex write_mu_;      // one sender at a time on the wire
  thread_local static inline std::vector<iovec> iov_;
  std::mutex outbox_mu_;
  std::condition_variable send_cv_;    // wakes the sender
  bool send_due_ = false;              // under outbox_mu_
  std::vector<Reply> outbox_;          // under outbox_mu_
  uint64_t outbox_cost_ = 0;           // under outbox_mu_
  std::atomic<int64_t> outbox_since_{0};  // when the oldest waiting reply was posted; 0: empty
  std::mutex lanes_mu_;
  std::condition_variable room_;  // the in-flight budget has room, or stop_
  unsigned lanes_ = 0;                   // under lanes_mu_
  std::atomic<unsigned> readers_{0};     // lanes waiting to read or reading
  std::atomic<unsigned> executing_{0};   // lanes running requests
  std::atomic<int64_t> progress_ns_{0};  // when a lane last finished a request
  uint64_t in_flight_bytes_ = 0;  // under lanes_mu_
};

}  // namespace dmremap::server
