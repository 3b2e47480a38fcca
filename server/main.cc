// dmremap-server: serves a dmremap set over NBD without nbdkit.
//
//   dmremap-server --main DISK --spare SPARE [--unix PATH] [--tcp [ADDR:]PORT]
#include <utility>  // before Asio (Boost 1.74 with GCC 12)

#include <CLI/CLI.hpp>
#include <boost/asio.hpp>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "dmremap/control.h"
#include "dmremap/log.h"
#include "dmremap/open_set.h"
#include "session.h"

namespace {

// Seconds as given on the command line, as a duration.
std::chrono::milliseconds to_ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

namespace asio = boost::asio;
using dmremap::server::ExportInfo;
using dmremap::server::Session;

// Runs one session; `done` is called when it has ended.
template <class Socket, class Done>
void serve(Socket socket, ExportInfo& info, Done done) {
  auto session = std::make_shared<Session<Socket>>(std::move(socket), info);
  // The lambda's capture keeps the session alive until run() ends.
  asio::co_spawn(
      session->strand(), [session]() -> asio::awaitable<void> { co_await session->run(); },
      std::move(done));
}

template <class Acceptor>
asio::awaitable<void> accept_loop(Acceptor& acceptor, ExportInfo& info) {
  while (acceptor.is_open()) {
    boost::system::error_code ec;
    auto socket = co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
      if (ec == asio::error::operation_aborted || !acceptor.is_open()) co_return;
      dmremap::log(dmremap::LogLevel::kWarning, "accept: " + ec.message());
      continue;
    }
    serve(std::move(socket), info, asio::detached);
  }
}

// "[ADDR:]PORT" -> endpoint; ADDR defaults to loopback.
asio::ip::tcp::endpoint parse_tcp(const std::string& spec) {
  std::string addr = "127.0.0.1";
  std::string port = spec;
  if (const auto colon = spec.rfind(':'); colon != std::string::npos) {
    addr = spec.substr(0, colon);
    port = spec.substr(colon + 1);
    if (addr.size() > 2 && addr.front() == '[' && addr.back() == ']') addr = addr.substr(1, addr.size() - 2);
  }
  return {asio::ip::make_address(addr), static_cast<unsigned short>(std::stoul(port))};
}

int socket_domain(int fd) {
  int domain = -1;
  socklen_t len = sizeof domain;
  if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) return -1;
  return domain;
}

bool is_listening(int fd) {
  int on = 0;
  socklen_t len = sizeof on;
  return ::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &on, &len) == 0 && on != 0;
}

// Sockets passed by systemd socket activation (sd_listen_fds(3)): fds 3..,
// when LISTEN_PID names this process. The variables are removed so that
// nothing started later takes them for its own.
std::vector<int> activation_fds() {
  std::vector<int> fds;
  const char* pid = std::getenv("LISTEN_PID");
  const char* count = std::getenv("LISTEN_FDS");
  if (pid != nullptr && count != nullptr && std::strtol(pid, nullptr, 10) == ::getpid()) {
    const long n = std::strtol(count, nullptr, 10);
    for (long i = 0; i < n && i < 64; ++i) fds.push_back(3 + static_cast<int>(i));
  }
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_FDNAMES");
  return fds;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app(
      "dmremap-server: serves a failing disk (MAIN) over NBD, with the blocks it cannot hold "
      "remapped to SPARE. Format SPARE first with: dmremap format --main MAIN --spare SPARE",
      "dmremap-server");
  dmremap::SetConfig set;
  std::vector<std::string> tcp;
  std::string unix_path;
  std::string name;
  unsigned threads = 32;
  bool verbose = false;
  app.add_option("-m,--main", set.main, "The failing disk: file, block device or NBD URI")->required();
  app.add_option("-s,--spare", set.spare, "The spare, formatted by `dmremap format`")->required();
  app.add_option("--tcp", tcp,
                 "Listen on [ADDR:]PORT (ADDR defaults to 127.0.0.1; NBD has no authentication, "
                 "so expose it only on a trusted network). Default: 127.0.0.1:10809 when there is "
                 "no --unix and no socket from systemd");
  app.add_option("--unix", unix_path, "Listen on this Unix socket");
  std::string control_path;
  app.add_option("--control", control_path,
                 "Answer `dmremap status --control SOCKET` on this Unix socket (created mode "
                 "0600: its owner only)");
  app.add_option("--name", name, "The export's name (clients may also ask for \"\")");
  app.add_flag("-r,--readonly", set.read_only, "Serve read-only; nothing is remapped");
  std::string io_mode = "auto";
  app.add_option("--io", io_mode,
                 "How main and spare are opened: direct (O_DIRECT: a write error is seen by the "
                 "write that caused it), buffered (the page cache), or auto: direct on block "
                 "devices, buffered on image files")
      ->check(CLI::IsMember({"auto", "direct", "buffered"}))
      ->capture_default_str();
  app.add_flag_callback("--direct", [&] { io_mode = "direct"; }, "Same as --io direct");
  app.add_option("--retries", set.engine.read_retries,
                 "Extra reads of a failing block before it is unreadable")
      ->capture_default_str();
  // Durations are given in seconds (decimals allowed), up to a day.
  auto seconds_option = [&](const char* option, double& value, const char* help) {
    app.add_option(option, value, help)->check(CLI::Range(0.0, 86400.0))->capture_default_str();
  };
  double retry_seconds = 30;
  seconds_option("--retry-time", retry_seconds,
                 "Seconds of a failing block's own reads after which no new attempt starts "
                 "(one retry is always made)");
  double io_timeout_seconds = 30;
  seconds_option("--io-timeout", io_timeout_seconds,
                 "An NBD main or spare that does not answer a request within this many seconds "
                 "has failed it (0: wait for ever)");
  std::string unreadable = "error";
  app.add_option("--unreadable", unreadable, "error, or zero (salvage: unreadable blocks read as zeros, logged)")
      ->check(CLI::IsMember({"error", "zero"}))
      ->capture_default_str();
  app.add_option("--inject", set.inject,
                 "Testing only: faults on main, e.g. read:10,write:20-21,weak:30x2,slow:40x1000");
  app.add_option("--inject-spare", set.inject_spare,
                 "Testing only: faults on the spare (512-byte units), and flush:MS, a slow flush");
  app.add_option("--threads", threads,
                 "Requests run at once per client: a connection uses one thread while the "
                 "disk keeps up, and up to this many when requests get stuck on a slow disk "
                 "or wait for a group commit of remaps")
      ->check(CLI::Range(1u, 1024u))
      ->capture_default_str();
  bool stdio = false;
  app.add_flag("--stdio", stdio,
               "Serve one client on standard input (a connected socket, as libnbd's "
               "nbd_connect_command and inetd give), then exit. (`nbdinfo -- [ CMD ]` uses "
               "socket activation instead, which needs no option)");
  double handshake_seconds = 30;
  app.add_option("--handshake-timeout", handshake_seconds,
                 "Seconds a client may take to finish the handshake before it is dropped")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  double drain_seconds = 30;
  app.add_option("--shutdown-timeout", drain_seconds,
                 "On SIGTERM/SIGINT, seconds to wait for requests in flight before closing")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_flag("-v,--verbose", verbose, "Debug logging (sessions, requests that fail)");
  app.footer(
      "Listening: --tcp and --unix may be combined; with neither, sockets passed by systemd "
      "socket activation (LISTEN_FDS) are used, or else 127.0.0.1:10809.\n"
      "Stopping: SIGTERM or SIGINT stops accepting, answers what is in flight, flushes and "
      "closes the spare cleanly; exit status 0.\n"
      "Manual: docs/server.md");
  app.set_version_flag("-V,--version", "dmremap-server " DMREMAP_VERSION);
  CLI11_PARSE(app, argc, argv);
  set.engine.unreadable_zero = unreadable == "zero";
  set.engine.retry_time = to_ms(retry_seconds);
  set.io_timeout = to_ms(io_timeout_seconds);
  (void)dmremap::parse_io_mode(io_mode, set.io);
  dmremap::set_log_debug(verbose);
  dmremap::set_log_sink([](dmremap::LogLevel level, const std::string& line) {
    static const char* const kTag[] = {"debug: ", "", "warning: ", "error: "};
    std::fprintf(stderr, "dmremap-server: %s%s\n", kTag[static_cast<int>(level)], line.c_str());
  });

  auto engine = dmremap::open_set(set);
  if (!engine.is_ok()) {
    std::fprintf(stderr, "dmremap-server: %s\n", engine.status().to_string().c_str());
    return 1;
  }
  asio::io_context io;
  ExportInfo info;
  info.engine = engine.value().get();
  info.max_lanes = std::max(1u, threads);
  info.name = name;
  info.description = "dmremap set " + dmremap::uuid_string(info.engine->superblock().uuid);
  info.read_only = set.read_only;
  info.min_block = info.engine->block_size();
  info.preferred_block = std::max<uint32_t>(info.engine->block_size(), 4096);
  info.handshake_timeout =
      to_ms(handshake_seconds);
  const std::vector<int> passed = activation_fds();
  if (stdio && (!tcp.empty() || !unix_path.empty() || !passed.empty())) {
    std::fprintf(stderr, "dmremap-server: --stdio serves one client; it takes no --tcp or --unix\n");
    (void)engine.value()->close();
    return 2;
  }

  // Before any NBD socket is bound: a failure here leaves nothing behind.
  std::unique_ptr<dmremap::ControlServer> control;
  if (!control_path.empty()) {
    auto started =
        dmremap::ControlServer::start(control_path, dmremap::engine_commands(*engine.value()));
    if (!started.is_ok()) {
      std::fprintf(stderr, "dmremap-server: cannot serve: %s\n",
                   started.status().to_string().c_str());
      (void)engine.value()->close();
      return 1;
    }
    control = std::move(started.value());
    std::fprintf(stderr, "dmremap-server: control socket %s\n", control_path.c_str());
  }

  std::vector<std::unique_ptr<asio::ip::tcp::acceptor>> tcp_acceptors;
  std::unique_ptr<asio::local::stream_protocol::acceptor> unix_acceptor;
  std::chrono::steady_clock::time_point drain_deadline;
  // Set when the server should stop by itself: the --stdio client is gone.
  std::function<void()> on_session_end = [] {};
  try {
    if (stdio) {
      // One connected socket on fd 0; fd 1 may be the same socket, or not.
      const int fd = ::dup(0);
      const int domain = fd < 0 ? -1 : socket_domain(fd);
      if (domain == AF_UNIX) {
        asio::local::stream_protocol::socket sock(io);
        sock.assign(asio::local::stream_protocol(), fd);
        serve(std::move(sock), info, [&](std::exception_ptr) { on_session_end(); });
      } else if (domain == AF_INET || domain == AF_INET6) {
        asio::ip::tcp::socket sock(io);
        sock.assign(domain == AF_INET ? asio::ip::tcp::v4() : asio::ip::tcp::v6(), fd);
        serve(std::move(sock), info, [&](std::exception_ptr) { on_session_end(); });
      } else {
        throw std::runtime_error(
            "--stdio needs a connected socket on standard input (as nbd_connect_command "
            "or inetd give), not a terminal, file or pipe");
      }
    }
    for (const int fd : passed) {
      const int domain = socket_domain(fd);
      if (!is_listening(fd)) {
        throw std::runtime_error("socket-activation fd " + std::to_string(fd) +
                                 " is not a listening socket (use Accept=no)");
      }
      if (domain == AF_UNIX) {
        unix_acceptor = std::make_unique<asio::local::stream_protocol::acceptor>(
            io, asio::local::stream_protocol(), fd);
        asio::co_spawn(io, accept_loop(*unix_acceptor, info), asio::detached);
      } else if (domain == AF_INET || domain == AF_INET6) {
        auto a = std::make_unique<asio::ip::tcp::acceptor>(
            io, domain == AF_INET ? asio::ip::tcp::v4() : asio::ip::tcp::v6(), fd);
        asio::co_spawn(io, accept_loop(*a, info), asio::detached);
        tcp_acceptors.push_back(std::move(a));
      } else {
        throw std::runtime_error("socket-activation fd " + std::to_string(fd) +
                                 " is neither a TCP nor a Unix socket");
      }
      std::fprintf(stderr, "dmremap-server: listening on the socket passed as fd %d\n", fd);
    }
    if (tcp.empty() && unix_path.empty() && passed.empty() && !stdio) tcp.push_back("10809");
    for (const auto& spec : tcp) {
      auto a = std::make_unique<asio::ip::tcp::acceptor>(io, parse_tcp(spec), true);
      asio::co_spawn(io, accept_loop(*a, info), asio::detached);
      std::fprintf(stderr, "dmremap-server: listening on %s\n",
                   (a->local_endpoint().address().to_string() + ":" +
                    std::to_string(a->local_endpoint().port()))
                       .c_str());
      tcp_acceptors.push_back(std::move(a));
    }
    if (!unix_path.empty()) {
      if (unix_acceptor) throw std::runtime_error("--unix and a socket-activation Unix socket");
      ::unlink(unix_path.c_str());
      unix_acceptor = std::make_unique<asio::local::stream_protocol::acceptor>(
          io, asio::local::stream_protocol::endpoint(unix_path));
      asio::co_spawn(io, accept_loop(*unix_acceptor, info), asio::detached);
      std::fprintf(stderr, "dmremap-server: listening on %s\n", unix_path.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dmremap-server: cannot serve: %s\n", e.what());
    (void)engine.value()->close();
    return 1;
  }

  // SIGTERM/SIGINT: stop accepting, stop reading requests, answer those in
  // flight, then stop; the engine then flushes and closes the spare cleanly.
  // Clients that do not take their replies within --shutdown-timeout are cut.
  asio::signal_set signals(io, SIGINT, SIGTERM);
  asio::steady_timer drain_timer(io);
  std::function<void()> poll_drained;
  poll_drained = [&] {
    drain_timer.expires_after(std::chrono::milliseconds(20));
    drain_timer.async_wait([&](const boost::system::error_code& ec) {
      if (ec) return;
      if (info.live() == 0 || std::chrono::steady_clock::now() > drain_deadline) {
        if (info.live() != 0) {
          std::fprintf(stderr, "dmremap-server: %zu client(s) still busy: closing anyway\n",
                       info.live());
        }
        io.stop();
        return;
      }
      poll_drained();
    });
  };
  signals.async_wait([&](const boost::system::error_code& ec, int sig) {
    if (ec) return;
    std::fprintf(stderr, "dmremap-server: signal %d: shutting down\n", sig);
    for (auto& a : tcp_acceptors) a->close();
    if (unix_acceptor) unix_acceptor->close();
    drain_deadline = std::chrono::steady_clock::now() +
                     to_ms(drain_seconds);
    info.drain_all();
    poll_drained();
  });
  if (stdio) {
    on_session_end = [&] {
      boost::system::error_code ignored;
      signals.cancel(ignored);
      drain_timer.cancel();
    };
  }
  std::signal(SIGPIPE, SIG_IGN);

  // A watchdog gives a connection another lane when its lanes are stuck on a
  // slow disk (see Session::watch).
  std::atomic<bool> watching{true};
  std::thread watchdog([&] {
    while (watching) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      info.watch_all();
    }
  });
  // One thread accepts and runs handshakes; each connection's requests run
  // on its own threads (see session.h).
  io.run();
  watching = false;
  watchdog.join();
  if (!unix_path.empty()) ::unlink(unix_path.c_str());
  control.reset();
  // Requests still running past --shutdown-timeout (stuck in a device) keep
  // the engine: it is never destroyed under them. The spare is left as
  // after a crash (its journal consistent), and the process ends here.
  std::optional<std::chrono::milliseconds> wait;
  if (drain_deadline != std::chrono::steady_clock::time_point{}) {
    wait = std::max(std::chrono::milliseconds(100),
                    std::chrono::duration_cast<std::chrono::milliseconds>(
                        drain_deadline - std::chrono::steady_clock::now()));
  }
  const dmremap::Status s = engine.value()->close(wait);
  if (s.code() == EBUSY) {
    std::fprintf(stderr, "dmremap-server: closing the set: %s\n", s.to_string().c_str());
    std::fflush(stderr);
    std::_Exit(1);
  }
  if (!s.is_ok()) {
    std::fprintf(stderr, "dmremap-server: closing the set: %s\n", s.to_string().c_str());
    return 1;
  }
  std::fprintf(stderr, "dmremap-server: the spare is closed cleanly\n");
  return 0;
}
