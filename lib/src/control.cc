#include "dmremap/control.h"

#include "dmremap/evacuate.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <system_error>
#include <thread>
#include <vector>

#include "dmremap/evacuate.h"
#include "dmremap/log.h"
#include "dmremap/metadata_store.h"
#include "dmremap/metrics.h"
#include "dmremap/remap_table.h"
#include "dmremap/scan.h"
#include "dmremap/set_actions.h"
#include "dmremap/unix_socket.h"

namespace dmremap {
namespace {

// A request line longer than this is refused and its connection closed.
constexpr size_t kMaxLine = 1 << 20;
constexpr size_t kMaxClients = 32;

// Replies are JSON; strings from the system (a disk's serial, strerror in
// some locale) need not be UTF-8, and must not make dump() throw.
std::string dump_line(const Json& j) {
  return j.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n";
}

Json error_reply(int code, const std::string& message) {
  Json j;
  j["ok"] = false;
  j["errno"] = code;
  j["error"] = message;
  return j;
}

}  // namespace

std::string format_time(uint64_t seconds) {
  if (seconds == 0) return "unknown";
  const std::time_t tt = static_cast<std::time_t>(seconds);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  char buf[64];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}

Json identity_json(const Superblock& sb) {
  Json j;
  j["uuid"] = uuid_string(sb.uuid);
  j["main_size"] = sb.main_size;
  j["block_size"] = sb.block_size;
  j["spare_size"] = sb.spare_size;
  j["main_identity"] = sb.main_identity;
  j["formatted"] = format_time(sb.format_time);
  return j;
}

Json stats_json(const EngineStats& s, bool live) {
  Json j;
  j["health"] = health_name(s.health);
  j["health_reason"] = s.health_reason;
  j["health_problems"] = s.health_problems;
  j["remaps"] = s.remaps;
  Json causes = Json::object();
  for (int c = 1; c <= static_cast<int>(kLastCause); ++c) causes[cause_name(static_cast<Cause>(c))] = s.remaps_by_cause[c];
  j["remaps_by_cause"] = causes;
  j["pending"] = s.pending;
  j["pending_capacity"] = s.pending_capacity;
  j["slots_total"] = s.slots_total;
  j["slots_used"] = s.slots_used;
  j["slots_bad"] = s.slots_bad;
  j["slots_free"] = s.slots_free;
  if (!live) return j;
  Json main;
  main["state"] = s.main_offline_since != 0 ? "offline" : "online";
  if (s.main_offline_since != 0) {
    main["offline_since"] = utc_time(s.main_offline_since);
    main["reason"] = s.main_offline_reason;
  }
  j["main"] = main;
  j["flush_failure"] = s.flush_failure;
  j["journal_broken"] = s.journal_broken;
  j["metadata_degraded"] = s.metadata_degraded;
  j["requests"] = {{"reads", s.reads},       {"writes", s.writes},
                   {"flushes", s.flushes},   {"trims", s.trims},
                   {"zeroes", s.zeroes},     {"bytes_read", s.bytes_read},
                   {"bytes_written", s.bytes_written}};
  j["errors"] = {{"main_read", s.main_read_errors},
                 {"main_write", s.main_write_errors},
                 {"retry_successes", s.retry_successes},
                 {"unreadable_reads", s.unreadable_reads},
                 {"slot_write", s.slot_write_errors},
                 {"slow_reads", s.slow_reads}};
  // Group commit: how many remaps (and pending marks, bad slots) shared each
  // journal append, and every flush the spare was asked for.
  j["commits"] = {{"groups", s.commit_groups},
                  {"records", s.commit_records},
                  {"spare_flushes", s.spare_flushes}};
  return j;
}

Result<std::unique_ptr<ControlServer>> ControlServer::listen(const std::string& path) {
  return listen(path, Options());
}

Result<std::unique_ptr<ControlServer>> ControlServer::listen(const std::string& path,
                                                             Options options) {
  auto addr = unix_address(path, "control socket");
  if (!addr.is_ok()) return addr.take_status();
  if (Status s = make_way_for_socket(path, "control socket"); !s.is_ok()) return s;
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return Status::from_errno("control socket " + path);
  // Linux creates the socket file with the socket's own mode (less the
  // umask): owner only, from the first moment it exists.
  if (::fchmod(fd, 0600) != 0 ||
      ::bind(fd, reinterpret_cast<const sockaddr*>(&addr.value()), sizeof(sockaddr_un)) != 0 ||
      ::listen(fd, 16) != 0) {
    Status s = Status::from_errno("control socket " + path);
    ::close(fd);
    return s;
  }
  const int wake = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  const int done = wake < 0 ? -1 : ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (done < 0) {
    Status s = Status::from_errno("control socket " + path + ": eventfd");
    if (wake >= 0) ::close(wake);
    ::close(fd);
    ::unlink(path.c_str());
    return s;
  }
  std::unique_ptr<ControlServer> server(new ControlServer(path, fd, wake, done, options));
  server->file_ = SocketFile::bound_at(path);
  return server;
}

Status ControlServer::serve(Handler handler) {
  if (thread_.joinable()) return Status::error(EALREADY, "control socket " + path_ + ": served");
  handler_ = std::move(handler);
  try {
    worker_ = std::thread([this] { work(); });
    thread_ = std::thread([this] { run(); });
  } catch (const std::system_error& e) {
    if (worker_.joinable()) {
      {
        std::lock_guard l(jobs_mu_);
        stopping_ = true;
      }
      jobs_cv_.notify_all();
      worker_.join();
    }
    return Status::error(e.code().value(), "control socket " + path_ + ": no thread");
  }
  return Status::ok();
}

// A request whose handler gave work: the worker runs it, the answering
// thread sends its reply.
struct ControlServer::Job {
  uint64_t client;  // the Client's id
  ControlReply::Work work;
  std::atomic<bool> cancelled{false};  // its client has gone
  std::string reply;                   // the reply line, once done
};

void ControlServer::work() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock l(jobs_mu_);
      jobs_cv_.wait(l, [&] { return stopping_ || !queued_.empty(); });
      if (stopping_) return;
      job = std::move(queued_.front());
      queued_.pop_front();
    }
    if (!job->cancelled.load()) {
      const std::function<bool()> stopping = [this, &job] {
        return stop_work_.load() || job->cancelled.load();
      };
      try {
        Json out;
        out["ok"] = true;
        out.update(job->work(stopping));
        job->reply = dump_line(out);
      } catch (const ControlError& e) {
        job->reply = dump_line(error_reply(e.code, e.message));
      } catch (const std::exception& e) {
        job->reply = dump_line(error_reply(EIO, std::string("internal error: ") + e.what()));
      }
    }
    {
      std::lock_guard l(jobs_mu_);
      finished_.push_back(std::move(job));
    }
    const uint64_t one = 1;
    if (::write(done_fd_, &one, sizeof one) < 0) { /* already readable: nothing lost */ }
  }
}

Result<std::unique_ptr<ControlServer>> ControlServer::start(const std::string& path,
                                                            Handler handler, Options options) {
  auto server = listen(path, options);
  if (!server.is_ok()) return server;
  if (Status s = server.value()->serve(std::move(handler)); !s.is_ok()) return s;
  return server;
}

ControlServer::ControlServer(std::string path, int listen_fd, int wake_fd, int done_fd,
                             Options options)
    : path_(std::move(path)),
      listen_fd_(listen_fd),
      wake_fd_(wake_fd),
      done_fd_(done_fd),
      options_(options) {}

ControlServer::~ControlServer() {
  // Work under way stops after the block it is on; queued work is dropped
  // (its clients are about to be disconnected).
  stop_work_.store(true);
  {
    std::lock_guard l(jobs_mu_);
    stopping_ = true;
  }
  jobs_cv_.notify_all();
  const uint64_t one = 1;
  if (::write(wake_fd_, &one, sizeof one) < 0) { /* the thread still polls the listener */ }
  if (thread_.joinable()) thread_.join();
  if (worker_.joinable()) worker_.join();
  ::close(listen_fd_);
  ::close(wake_fd_);
  ::close(done_fd_);
  file_.remove();  // only if it is still ours
}

void ControlServer::run() {
  using Clock = std::chrono::steady_clock;
  // Replies queued beyond this stop the reading of that client's requests
  // until it takes them.
  constexpr size_t kMaxQueued = 1 << 20;
  struct Client {
    int fd;
    uint64_t id;
    Json peer;  // who connected (SO_PEERCRED), added to each request
    std::shared_ptr<Job> job;  // its request being worked on, if any
    std::string in;
    size_t scanned = 0;  // bytes of `in` known to hold no newline
    std::string out;
    size_t sent = 0;        // bytes of `out` already sent
    bool eof = false;       // the client sends no more
    bool closing = false;   // close once `out` is sent
    Clock::time_point active = Clock::now();
  };
  std::vector<Client> clients;
  uint64_t next_id = 0;
  Clock::time_point listen_paused_until{};
  // The reply line, or "" when the request went to the worker (c.job).
  auto answer = [this](Client& c, const std::string& line) -> std::string {
    try {
      Json request = Json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (request.is_discarded() || !request.is_object()) {
        return dump_line(error_reply(EINVAL, "a request is one JSON object on one line"));
      }
      request["peer"] = c.peer;  // the kernel's word, not the client's
      ControlReply r = handler_(request);
      if (r.work) {
        auto job = std::make_shared<Job>();
        job->client = c.id;
        job->work = std::move(r.work);
        {
          std::lock_guard l(jobs_mu_);
          queued_.push_back(job);
        }
        jobs_cv_.notify_one();
        c.job = std::move(job);
        return "";
      }
      Json out;
      out["ok"] = true;
      out.update(r.reply);
      return dump_line(out);
    } catch (const ControlError& e) {
      return dump_line(error_reply(e.code, e.message));
    } catch (const std::exception& e) {
      return dump_line(error_reply(EIO, std::string("internal error: ") + e.what()));
    }
  };
  // Answers the complete lines in `c.in`, as far as the queue allows.
  auto answer_lines = [&](Client& c) {
    while (!c.closing && !c.job && c.out.size() - c.sent < kMaxQueued) {
      const size_t nl = c.in.find('\n', c.scanned);
      if (nl == std::string::npos) {
        c.scanned = c.in.size();
        break;
      }
      c.out += answer(c, c.in.substr(0, nl));
      c.in.erase(0, nl + 1);
      c.scanned = 0;
    }
    if (!c.closing && c.in.size() > kMaxLine) {
      c.out += dump_line(error_reply(E2BIG, "request line too long"));
      c.in.clear();
      c.closing = true;
    }
    // A client that said all it will say is closed once answered.
    if (c.eof && !c.job && c.in.find('\n') == std::string::npos) c.closing = true;
  };
  for (;;) {
    const Clock::time_point now = Clock::now();
    std::vector<pollfd> fds;
    fds.push_back({wake_fd_, POLLIN, 0});
    fds.push_back({now >= listen_paused_until ? listen_fd_ : -1, POLLIN, 0});
    fds.push_back({done_fd_, POLLIN, 0});
    constexpr size_t kFirstClient = 3;
    Clock::time_point wake_at = now + options_.idle_timeout;
    for (const Client& c : clients) {
      short ev = 0;
      // Not read while its work runs (what it pipelines waits in the
      // socket); POLLHUP still says when it goes.
      if (!c.eof && !c.closing && !c.job && c.out.size() - c.sent < kMaxQueued) ev |= POLLIN;
      if (c.sent < c.out.size()) ev |= POLLOUT;
      fds.push_back({c.fd, ev, 0});
      if (!c.job) wake_at = std::min(wake_at, c.active + options_.idle_timeout);
    }
    if (now < listen_paused_until) wake_at = std::min(wake_at, listen_paused_until);
    const auto wait_ms = std::chrono::duration_cast<std::chrono::milliseconds>(wake_at - now);
    if (::poll(fds.data(), fds.size(), static_cast<int>(std::max<int64_t>(wait_ms.count(), 0)) + 1) <
        0) {
      if (errno == EINTR) continue;
      log(LogLevel::kError, "control socket " + path_ + ": poll: " + std::strerror(errno));
      break;
    }
    if (fds[0].revents != 0) break;
    if (fds[2].revents != 0) {
      uint64_t count;
      if (::read(done_fd_, &count, sizeof count) < 0) { /* raced with another read: fine */ }
      std::vector<std::shared_ptr<Job>> done;
      {
        std::lock_guard l(jobs_mu_);
        done.swap(finished_);
      }
      for (const auto& job : done) {
        for (Client& c : clients) {
          if (c.id != job->client || c.job != job) continue;
          c.out += job->reply;  // then answer_lines goes on with its next request
          c.job.reset();
          c.active = Clock::now();
        }
      }
    }
    for (size_t i = 0; i < clients.size(); ++i) {
      Client& c = clients[i];
      const short ev = fds[i + kFirstClient].revents;
      try {
        // Gone altogether (not just done sending): its work stops.
        if ((ev & (POLLHUP | POLLERR)) && c.job) {
          c.job->cancelled.store(true);
          c.job.reset();
          c.closing = true;
        }
        if ((ev & (POLLIN | POLLHUP | POLLERR)) && !c.eof && !c.closing && !c.job) {
          char buf[65536];
          const ssize_t n = ::recv(c.fd, buf, sizeof buf, 0);
          if (n > 0) {
            c.in.append(buf, static_cast<size_t>(n));
            c.active = Clock::now();
          } else if (n == 0) {
            c.eof = true;
          } else if (errno != EAGAIN && errno != EINTR) {
            c.closing = true;
            c.out.clear();
            c.sent = 0;
          }
        }
        answer_lines(c);
        while (c.sent < c.out.size()) {
          const ssize_t n = ::send(c.fd, c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL);
          if (n > 0) {
            c.sent += static_cast<size_t>(n);
            c.active = Clock::now();
            continue;
          }
          if (n < 0 && errno != EAGAIN && errno != EINTR) {
            c.closing = true;
            c.out.clear();
            c.sent = 0;
          }
          break;
        }
        if (c.sent == c.out.size()) {
          c.out.clear();
          c.sent = 0;
        }
        // Neither a request nor a reply taken for a whole idle timeout
        // (work under way for it does not count).
        if (!c.job && Clock::now() - c.active > options_.idle_timeout) {
          c.closing = true;
          c.out.clear();
          c.sent = 0;
        }
      } catch (const std::exception& e) {
        log(LogLevel::kWarning, "control socket " + path_ + ": dropping a client: " + e.what());
        c.closing = true;
        c.out.clear();
        c.sent = 0;
      }
    }
    for (size_t i = clients.size(); i-- > 0;) {
      if (clients[i].closing && clients[i].out.empty()) {
        if (clients[i].job) clients[i].job->cancelled.store(true);
        ::close(clients[i].fd);
        clients.erase(clients.begin() + static_cast<std::ptrdiff_t>(i));
      }
    }
    if (fds[1].fd >= 0 && (fds[1].revents & POLLIN)) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) {
        // Out of descriptors or memory: the listener stays readable, so
        // wait a little instead of spinning.
        if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
          listen_paused_until = Clock::now() + std::chrono::milliseconds(100);
        }
      } else if (clients.size() >= options_.max_clients) {
        const std::string busy =
            dump_line(error_reply(EBUSY, "too many control connections; try again later"));
        (void)::send(fd, busy.data(), busy.size(), MSG_NOSIGNAL);
        ::close(fd);
      } else {
        ucred cred{};
        socklen_t len = sizeof cred;
        Json peer = nullptr;
        if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
          peer = {{"uid", cred.uid}, {"pid", cred.pid}};
        }
        clients.push_back(Client{fd, next_id++, std::move(peer)});
      }
    }
  }
  for (const Client& c : clients) {
    if (c.job) c.job->cancelled.store(true);
    ::close(c.fd);
  }
}

namespace {

// Changing the set is for the user the frontend runs as, and root; anyone
// else who may open the socket (its mode or group widened by an admin) may
// only look.
void require_admin(const Json& request, const std::string& command) {
  const Json& peer = request.contains("peer") ? request["peer"] : Json();
  const bool admin = peer.is_object() && peer.contains("uid") && peer["uid"].is_number() &&
                     (peer["uid"] == 0 || peer["uid"] == ::geteuid());
  if (!admin) {
    throw ControlError{EPERM, "\"" + command + "\" changes the set: only root or the user " +
                                  std::to_string(::geteuid()) + " that serves it may"};
  }
}

std::vector<uint64_t> blocks_of(const Json& request) {
  std::vector<uint64_t> blocks;
  if (!request.contains("blocks")) return blocks;
  const Json& list = request["blocks"];
  if (!list.is_array()) throw ControlError{EINVAL, "\"blocks\" must be a list of block numbers"};
  for (const Json& b : list) {
    if (!b.is_number_unsigned()) {
      throw ControlError{EINVAL, "\"blocks\" must be a list of block numbers"};
    }
    blocks.push_back(b.get<uint64_t>());
  }
  return blocks;
}

}  // namespace

ControlServer::Handler engine_commands(Engine& engine, Scanner* scanner, Evacuator* evacuator) {
  // Fixed at format; copied now so the control thread never reads the
  // superblock while the lease rewrites it.
  const Superblock fixed = engine.geometry();
  const Json identity = identity_json(fixed);
  return [&engine, identity, fixed, scanner, evacuator](const Json& request) -> ControlReply {
    const Json& cmd = request.contains("command") ? request["command"] : Json();
    if (!cmd.is_string()) throw ControlError{EINVAL, "the request names no \"command\""};
    if (cmd == "status") {
      Json j = identity;
      j["served"] = true;
      j.update(stats_json(engine.stats(), /*live=*/true));
      if (evacuator != nullptr) {
        const EvacProgress ev = evacuator->progress();
        if (ev.state != EvacState::kNone) j["evacuation"] = evac_progress_json(ev);
      }
      return j;
    }
    if (cmd == "list") return list_json(engine, list_query(request));
    if (cmd == "scan") {
      if (scanner == nullptr) {
        throw ControlError{ENOTSUP, "this set is served read-only: there is no scan"};
      }
      const Json& action = request.contains("action") ? request["action"] : Json("status");
      if (!action.is_string()) throw ControlError{EINVAL, "\"action\" must be a string"};
      if (action != "status") require_admin(request, "scan");
      return scan_json(*scanner, request);
    }
    if (cmd == "evacuate") {
      if (evacuator == nullptr) {
        throw ControlError{ENOTSUP, "this set is served read-only: it cannot be evacuated here"};
      }
      const Json& action = request.contains("action") ? request["action"] : Json("status");
      if (action != "status" && action != "lost") require_admin(request, "evacuate");
      return evacuate_json(*evacuator, request);
    }
    if (cmd == "metrics") {
      const ScanProgress scan = scanner ? scanner->progress() : ScanProgress{};
      return Json{{"text", prometheus_text(engine.stats(), fixed, /*live=*/true,
                                           scanner ? &scan : nullptr)},
                  {"content_type", kPrometheusContentType}};
    }
    // The commands that change the set read main, with retries: the
    // worker runs them, so that status and list are answered meanwhile.
    if (cmd == "remap") {
      require_admin(request, "remap");
      return ControlReply::later(
          [&engine, blocks = blocks_of(request)](const std::function<bool()>& stopping) {
            return remap_json(engine, blocks, stopping);
          });
    }
    if (cmd == "forget-pending") {
      require_admin(request, "forget-pending");
      const bool all = request.contains("all") && request["all"] == true;
      return ControlReply::later(
          [&engine, blocks = blocks_of(request), all](const std::function<bool()>& stopping) {
            return forget_pending_json(engine, blocks, all, stopping);
          });
    }
    if (cmd == "import") {
      require_admin(request, "import");
      const bool check = request.contains("check") && request["check"] == true;
      return ControlReply::later([&engine, blocks = blocks_of(request),
                                  check](const std::function<bool()>& stopping) {
        return import_json(engine, blocks, check, stopping);
      });
    }
    throw ControlError{EINVAL, "unknown command \"" + cmd.get<std::string>() +
                                   "\" (this server knows: status, list, metrics, scan, evacuate, "
                                   "remap, forget-pending, import)"};
  };
}

void advertise_control(Engine& engine, const std::string& path) {
  if (engine.read_only()) return;
  std::error_code ec;
  const std::string abs = std::filesystem::absolute(path, ec).lexically_normal().string();
  const Status s = engine.advertise_control(ec ? path : abs);
  if (!s.is_ok()) {
    log(LogLevel::kWarning, "the control socket is not recorded on the spare (" + s.to_string() +
                                "): dmremap commands given --spare will not find it; give them "
                                "--control " + path);
  }
}

std::string find_control(BlockDevice& spare, std::chrono::milliseconds timeout) {
  auto found = read_superblock(spare);
  if (!found.is_ok() || found->sb.clean() || found->sb.control_path.empty()) return "";
  const std::string& path = found->sb.control_path;
  // Only a socket of root's or of this user's: anyone may bind a socket
  // where a frontend's used to be, and answer with the set's UUID, which
  // is no secret.
  struct stat st{};
  if (::lstat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode) ||
      (st.st_uid != 0 && st.st_uid != ::geteuid())) {
    return "";
  }
  auto reply = control_call(path, Json{{"command", "status"}}, timeout);
  if (!reply.is_ok() || !reply.value().is_object()) return "";
  if (reply.value().value("uuid", std::string()) != uuid_string(found->sb.uuid)) return "";
  return path;
}

Result<Json> control_call(const std::string& path, const Json& request,
                          std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto fd = connect_unix(path, deadline, "control socket");
  if (!fd.is_ok()) {
    const int code = fd.status().code();
    if (code == ENOENT || code == ECONNREFUSED) {
      return Status::error(code, "control socket " + path + ": no running dmremap answers on it");
    }
    return fd.take_status();
  }
  const int s = fd.value();
  // What is left of the deadline, for each send and receive.
  auto arm = [&]() -> bool {
    const auto left = std::chrono::duration_cast<std::chrono::microseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(left.count() / 1000000);
    tv.tv_usec = static_cast<suseconds_t>(left.count() % 1000000);
    ::setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return true;
  };
  auto fail = [&](Status st) {
    ::close(s);
    return st;
  };
  const std::string line = dump_line(request);
  size_t sent = 0;
  // A server that refuses the connection (too many clients) answers and
  // closes at once: sending may then fail, but its answer is there to read.
  Status send_failed = Status::ok();
  while (sent < line.size()) {
    if (!arm()) return fail(Status::error(ETIMEDOUT, "control socket " + path + ": no reply"));
    const ssize_t n = ::send(s, line.data() + sent, line.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      send_failed = Status::from_errno("control socket " + path + ": sending");
      if (errno != EPIPE && errno != ECONNRESET) return fail(send_failed);
      break;
    }
    sent += static_cast<size_t>(n);
  }
  std::string in;
  while (in.find('\n') == std::string::npos) {
    if (!send_failed.is_ok() && in.empty()) {
      // Only what the server said before it closed.
      char buf[65536];
      const ssize_t n = ::recv(s, buf, sizeof buf, MSG_DONTWAIT);
      if (n <= 0) return fail(send_failed);
      in.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (!arm() || in.size() > kMaxLine * 16) {
      return fail(Status::error(ETIMEDOUT, "control socket " + path + ": no (whole) reply"));
    }
    char buf[65536];
    const ssize_t n = ::recv(s, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) {
      return fail(Status::error(ECONNRESET,
                                "control socket " + path + ": the server closed the connection"));
    }
    if (n < 0) {
      return fail(errno == EAGAIN
                      ? Status::error(ETIMEDOUT, "control socket " + path + ": no reply")
                      : Status::from_errno("control socket " + path + ": receiving"));
    }
    in.append(buf, static_cast<size_t>(n));
  }
  ::close(s);
  Json reply = Json::parse(in.substr(0, in.find('\n')), nullptr, false);
  if (reply.is_discarded() || !reply.is_object() || !reply.contains("ok")) {
    return Status::error(EPROTO, "control socket " + path + ": the reply is not dmremap's");
  }
  if (reply["ok"] != true) {
    const Json code = reply.value("errno", Json(EIO));
    const Json msg = reply.value("error", Json("the request failed"));
    return Status::error(code.is_number_integer() ? code.get<int>() : EIO,
                         msg.is_string() ? msg.get<std::string>() : "the request failed");
  }
  return reply;
}

}  // namespace dmremap
