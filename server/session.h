// One NBD client connection: the fixed-newstyle handshake as an Asio
// coroutine, then transmission on "lanes": threads of this connection that
// read requests off the socket, run them on the engine (which blocks on disk
// I/O) and write their replies, so a request never changes thread. One lane
// serves the connection while the disk keeps up; the watchdog (watch())
// adds lanes when requests get stuck, up to ExportInfo::max_lanes. Replies
// go out as they finish, in any order.
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
#include <string>
#include <vector>

#include "dmremap/engine.h"

namespace dmremap::server {

namespace asio = boost::asio;

// A byte buffer that is not zeroed when it is made: request payloads and read
// data are overwritten at once, so clearing them first would be wasted work.
struct Buffer {
  std::unique_ptr<char[]> bytes;
  size_t size = 0;
  Buffer() = default;
  explicit Buffer(size_t n) : bytes(std::make_unique_for_overwrite<char[]>(n)), size(n) {}
  char* data() { return bytes.get(); }
};

// A reply as it goes on the wire: headers in `meta`, read data in `data`,
// and the order in which slices of the two are sent. The data is never
// copied into the headers' buffer.
struct Reply {
  struct Piece {
    bool in_data;
    uint32_t offset;
    uint32_t length;
  };
  std::vector<char> meta;
  Buffer data;
  std::vector<Piece> pieces;  // empty: all of `meta`
};

class SessionBase {
 public:
  virtual ~SessionBase() = default;
  // Stop reading requests, answer those in flight, then close. Thread-safe.
  virtual void drain() = 0;
  // Starts another lane if the session's lanes are all stuck. Thread-safe.
  virtual void watch(int64_t now_ns) = 0;
};

// What every session shares.
struct ExportInfo {
  Engine* engine = nullptr;
  unsigned max_lanes = 32;  // threads per connection (--threads)
  std::string name;          // the export's name ("" is the default export)
  std::string description;
  bool read_only = false;
  uint32_t min_block = 4096, preferred_block = 4096;
  uint32_t max_request = 32 << 20;  // advertised
  uint32_t accept_request = 64 << 20;  // accepted, as nbdkit does
  uint64_t max_in_flight_bytes = 256 << 20;  // per session, then reading pauses
  std::chrono::milliseconds handshake_timeout{30000};

  // Live sessions, so that a shutdown can drain them.
  void add(const std::shared_ptr<SessionBase>& s);
  void remove(const SessionBase* s);
  // Drains every session; from now on new sessions are drained at once.
  void drain_all();
  size_t live() const;
  // Runs watch() of every session; main calls it every few milliseconds.
  void watch_all();

 private:
  // The sessions still alive.
  std::vector<std::shared_ptr<SessionBase>> snapshot() const;

  mutable std::mutex mu_;
  std::vector<std::weak_ptr<SessionBase>> live_;
  bool draining_ = false;
};

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
  struct Request {
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint64_t offset;
    uint32_t length;
  };
  asio::awaitable<bool> handshake();
  asio::awaitable<void> option_reply(uint32_t option, uint32_t type, const std::string& data);
  std::string export_info(uint16_t type) const;
  uint16_t transmission_flags() const;
  // Checks a request; returns 0 or the NBD error to answer with.
  uint32_t validate(const Request& r) const;
  Reply simple_reply(uint64_t cookie, uint32_t error) const;
  // NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT.
  asio::awaitable<void> meta_context_option(uint32_t option, const std::vector<char>& data);
  Reply block_status_reply(const Request& r, Status& s) const;
  Reply read_reply(const Request& r, Buffer data, const Status& s,
                   const std::vector<uint64_t>& unreadable) const;
  void close();

  // Transmission, on the lanes.
  void start_lane(bool first);
  void lane();
  struct Item {
    Request r;
    uint32_t err = 0;   // NBD error from validation, or 0
    uint64_t cost = 0;  // bytes counted in the in-flight budget
    Buffer payload;
  };
  // Takes the next request off the socket, and any more that have already
  // arrived whole (under read_mu_). False: nothing more is to be read.
  bool next_batch(std::vector<Item>& batch);
  uint64_t cost_of(const Request& r, uint32_t err) const;
  bool take_queued(Item& item);
  bool read_more(Item& item);
  Reply answer(Item& item);
  // Fills `out` with exactly `n` bytes, from what was read ahead first.
  bool recv_exact(char* out, size_t n);
  Reply execute(const Request& r, Buffer& payload);
  bool send_replies(std::vector<Reply>& replies);
  void release(uint64_t cost);
  void stop_lanes();

  Socket socket_;
  ExportInfo& info_;
  asio::strand<typename Socket::executor_type> strand_;
  asio::steady_timer wake_;  // run() waits here for the lanes to end
  int fd_ = -1;
  bool structured_ = false;
  bool want_allocation_ = false;  // base:allocation selected
  bool want_remapped_ = false;    // dmremap:remapped selected
  bool no_zeroes_ = false;
  bool in_handshake_ = true;
  bool draining_ = false;  // on the strand
  bool closed_ = false;    // on the strand

  std::atomic<bool> stop_{false};  // lanes: take no more requests
  std::mutex read_mu_;             // one lane reads the socket at a time
  std::vector<char> ahead_;        // bytes read ahead of the current request
  size_t ahead_pos_ = 0, ahead_end_ = 0;
  std::mutex queue_mu_;
  std::deque<Item> queued_;  // received, not yet taken by a lane
  std::mutex write_mu_;      // one lane's replies at a time on the wire
  thread_local static inline std::vector<iovec> iov_;
  std::mutex lanes_mu_;
  std::condition_variable room_;  // the in-flight budget has room, or stop_
  unsigned lanes_ = 0;                   // under lanes_mu_
  std::atomic<unsigned> readers_{0};     // lanes waiting to read or reading
  std::atomic<unsigned> executing_{0};   // lanes running requests
  std::atomic<int64_t> progress_ns_{0};  // when a lane last finished a request
  uint64_t in_flight_bytes_ = 0;  // under lanes_mu_
};

}  // namespace dmremap::server
