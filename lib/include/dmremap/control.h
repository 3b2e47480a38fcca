// The control channel: a Unix socket into a running set, the same for both
// frontends (docs/design.md, "The control channel").
//
// One JSON object per line each way. A request names a command:
//   {"command":"status"}
// and its reply says whether it worked:
//   {"ok":true, ...}   or   {"ok":false,"errno":5,"error":"..."}
// A connection may carry any number of requests, answered in order.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <sys/types.h>
#include <thread>

#include "dmremap/engine.h"
#include "dmremap/metadata.h"
#include "dmremap/status.h"
#include "dmremap/unix_socket.h"

namespace dmremap {

using Json = nlohmann::ordered_json;

// What a set is: the superblock fields that never change after format.
Json identity_json(const Superblock& sb);
// "2026-11-30 16:19:06 UTC", or "unknown" for 0.
std::string format_time(uint64_t seconds);
// A set's health and figures, as `dmremap status --json` prints them. With
// `live`, also the state of main and the request counters, which only a
// running engine knows.
Json stats_json(const EngineStats& s, bool live);

// Limits of a ControlServer (see there).
struct ControlOptions {
  std::chrono::milliseconds idle_timeout{60000};
  size_t max_clients = 32;
};

// What a handler returns: the reply now, or work that may take long (a
// block's reads and retries on a real disk take many seconds) for the
// server's worker thread. The work is given `stopping`, which turns true
// when the server stops or the client that asked has gone; it asks it
// between blocks and says in its reply what it did not do.
struct ControlReply {
  using Work = std::function<Json(const std::function<bool()>& stopping)>;
  ControlReply(Json now) : reply(std::move(now)) {}  // NOLINT: a plain reply
  static ControlReply later(Work work) {
    ControlReply r{Json()};
    r.work = std::move(work);
    return r;
  }
  Json reply;
  Work work;
};

// Listens on a Unix socket and answers requests on its own thread. Access
// is the socket file's: it is created for its owner only (mode 0600), and an
// admin may chmod or chgrp it to share it.
//
// No client can harm the process that serves the disk: a client that does
// not read its replies is not read from either (its queued replies are
// capped), one that sends nothing for `idle_timeout` is dropped, at most
// `max_clients` are served at once (the next gets EBUSY), and a request line
// longer than 1 MiB ends its connection. Long work runs on a second thread,
// one request at a time, so that `status` is answered meanwhile; its client's
// later requests wait for it, and the idle timeout does not count it.
class ControlServer {
 public:
  // Takes a request, returns the reply (without "ok", which is added) or
  // the work that makes it. A handler (or its work) reports failure by
  // throwing ControlError; it is called on the server's thread, one request
  // at a time. The server adds "peer": {"uid", "pid"} to each request, as
  // the kernel reports the client (SO_PEERCRED), replacing whatever the
  // client put there.
  using Handler = std::function<ControlReply(const Json& request)>;
  using Options = ControlOptions;

  // Creates the socket and listens; nothing is answered until serve(). The
  // socket survives a fork, so nbdkit's plugin binds it before it forks
  // (a bad path stops start-up on the terminal) and serves after.
  // Refuses a path where another server answers or is busy (EADDRINUSE), a
  // file that is not a socket (EEXIST), and a socket it cannot probe
  // (EACCES...); only a socket that refuses connections (its process is
  // gone) is replaced.
  static Result<std::unique_ptr<ControlServer>> listen(const std::string& path);
  static Result<std::unique_ptr<ControlServer>> listen(const std::string& path, Options options);
  // Starts the threads that answer. Once only.
  Status serve(Handler handler);
  // listen() and serve().
  static Result<std::unique_ptr<ControlServer>> start(const std::string& path, Handler handler,
                                                      Options options = Options());
  // Stops the threads (work under way is told to stop, and is waited for:
  // at most the block it is on), closes every connection and removes the
  // socket.
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  const std::string& path() const { return path_; }

 private:
  struct Job;
  ControlServer(std::string path, int listen_fd, int wake_fd, int done_fd, Options options);
  void run();
  void work();

  std::string path_;
  int listen_fd_;
  int wake_fd_;
  int done_fd_;  // the worker says a job is done
  SocketFile file_;  // the socket this server bound
  Options options_;
  Handler handler_;
  std::thread thread_;
  std::thread worker_;
  std::mutex jobs_mu_;
  std::condition_variable jobs_cv_;
  std::deque<std::shared_ptr<Job>> queued_;      // under jobs_mu_
  std::vector<std::shared_ptr<Job>> finished_;   // under jobs_mu_
  bool stopping_ = false;                        // under jobs_mu_
  std::atomic<bool> stop_work_{false};
};

// A handler's failure: the reply carries its errno and message.
struct ControlError {
  int code;
  std::string message;
};

// The commands a served set answers (docs/design.md, "The control
// channel"): "status" and "list" for anyone who may connect; "remap" and
// "forget-pending" (they change the set) only for root and the user the
// frontend runs as. Unknown commands get EINVAL.
// With a scanner, also "scan" (see scan_json): "action" status for anyone,
// start, pause, resume, cancel and rate for root and the serving user.
// With an evacuator, also "evacuate" (see evacuate_json): "action" status
// and lost for anyone, the rest for root and the serving user.
class Scanner;
class Evacuator;
ControlServer::Handler engine_commands(Engine& engine, Scanner* scanner = nullptr,
                                       Evacuator* evacuator = nullptr);

// Records `path` (made absolute) on the spare (Engine::advertise_control),
// so that `dmremap COMMAND --spare SPARE` finds the frontend; a failure is
// logged as a warning, not fatal. Nothing for a read-only engine.
void advertise_control(Engine& engine, const std::string& path);

// The control socket recorded on `spare` by the frontend serving its set,
// when one answers there for this very set (same UUID) within `timeout`;
// "" otherwise (not served, closed cleanly, a crash's stale path).
std::string find_control(BlockDevice& spare,
                         std::chrono::milliseconds timeout = std::chrono::seconds(3));

// Client side: connects to `path`, sends one request, waits up to `timeout`
// for the reply. ENOENT or ECONNREFUSED: nothing serves that socket. A reply
// with "ok": false becomes its errno and message.
Result<Json> control_call(const std::string& path, const Json& request,
                          std::chrono::milliseconds timeout = std::chrono::seconds(30));

}  // namespace dmremap
