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
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dmremap/control.h"
#include "dmremap/evacuate.h"
#include "dmremap/health_log.h"
#include "dmremap/log.h"
#include "dmremap/metrics.h"
#include "dmremap/open_set.h"
#include "dmremap/scan.h"
#include "listeners.h"
#include "metrics_http.h"
#include "session.h"
#include "tls.h"

namespace {

namespace asio = boost::asio;
using dmremap::server::ExportInfo;
using dmremap::server::Listeners;
using dmremap::server::MetricsHttp;

// Exit status, as dmremap's: 0 success, 1 failure, 2 bad usage.
constexpr int kExitOk = 0, kExitFailed = 1, kExitUsage = 2;

// Seconds as given on the command line, as a duration.
std::chrono::milliseconds to_ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

struct Options {
  dmremap::SetConfig set;
  Listeners::Spec listen;
  std::string control_path;
  std::string metrics;  // [ADDR:]PORT
  std::string name;
  unsigned threads = 32;
  bool verbose = false;
  std::string io_mode = "auto";
  std::string unreadable = "error";
  double retry_seconds = 30;
  double slow_seconds = 0;
  double io_timeout_seconds = 30;
  double handshake_seconds = 30;
  double drain_seconds = 30;
  double log_interval_seconds = 3600;
  std::string tls;  // off|on|require; "": require when credentials are given
  dmremap::server::TlsConfig tls_config;
};

void add_options(CLI::App& app, Options& o) {
  app.add_option("-m,--main", o.set.main, "The failing disk: file, block device or NBD URI")
      ->required();
  app.add_option("-s,--spare", o.set.spare, "The spare, formatted by `dmremap format`")
      ->required();
  app.add_option("--tcp", o.listen.tcp,
                 "Listen on [ADDR:]PORT (ADDR defaults to 127.0.0.1; NBD has no authentication, "
                 "so expose it only on a trusted network). Default: 127.0.0.1:10809 when there is "
                 "no --unix and no socket from systemd")
      ->check(CLI::Validator(
          [](std::string& spec) { return dmremap::server::check_tcp_spec(spec); }, "[ADDR:]PORT"));
  app.add_option("--unix", o.listen.unix_path,
                 "Listen on this Unix socket. A stale socket there is replaced; anything else "
                 "(a file, a live server's socket) is refused");
  app.add_option("--control", o.control_path,
                 "Answer dmremap status, list, scan, evacuate, remap and forget-pending --control SOCKET, and "
                 "the metrics, on this "
                 "Unix socket (created mode 0600; only root and this user may change the set "
                 "through it)");
  app.add_option("--metrics", o.metrics,
                 "Serve the set's figures for Prometheus over HTTP on [ADDR:]PORT, at /metrics "
                 "(ADDR defaults to 127.0.0.1; no authentication)")
      ->check(CLI::Validator(
          [](std::string& spec) { return dmremap::server::check_tcp_spec(spec, "--metrics"); },
          "[ADDR:]PORT"));
  app.add_option("--name", o.name, "The export's name (clients may also ask for \"\")");
  app.add_flag("-r,--readonly", o.set.read_only, "Serve read-only; nothing is remapped");
  app.add_option("--io", o.io_mode,
                 "How main and spare are opened: direct (O_DIRECT: a write error is seen by the "
                 "write that caused it), buffered (the page cache), or auto: direct on block "
                 "devices, buffered on image files")
      ->check(CLI::IsMember({"auto", "direct", "buffered"}))
      ->capture_default_str();
  app.add_flag_callback("--direct", [&o] { o.io_mode = "direct"; }, "Same as --io direct");
  app.add_option("--retries", o.set.engine.read_retries,
                 "Extra reads of a failing block before it is unreadable")
      ->capture_default_str();
  // Durations are given in seconds (decimals allowed), up to a day.
  auto seconds = [&app](const char* option, double& value, const char* help) {
    app.add_option(option, value, help)->check(CLI::Range(0.0, 86400.0))->capture_default_str();
  };
  seconds("--retry-time", o.retry_seconds,
          "Seconds of a failing block's own reads after which no new attempt starts "
          "(one retry is always made)");
  seconds("--io-timeout", o.io_timeout_seconds,
          "An NBD main or spare that does not answer a request within this many seconds "
          "has failed it (0: wait for ever)");
  seconds("--slow", o.slow_seconds,
          "A read of main that succeeds but takes this many seconds (and 20 times the usual) "
          "rescues its block to the spare, cause slow (0: off)");
  app.add_option("--warn", o.set.engine.warn_percent,
                 "Health is 'warning' from this percentage of the spare's slots used")
      ->check(CLI::Range(0u, 100u))
      ->capture_default_str();
  seconds("--log-interval", o.log_interval_seconds,
          "Log a summary of the set's figures this often (0: never); a change of health is "
          "logged when it happens");
  app.add_option("--unreadable", o.unreadable,
                 "error, or zero (salvage: unreadable blocks read as zeros, logged)")
      ->check(CLI::IsMember({"error", "zero"}))
      ->capture_default_str();
  app.add_option("--inject", o.set.inject,
                 "Testing only: faults on main, e.g. read:10,write:20-21,weak:30x2,slow:40x1000");
  app.add_option("--inject-spare", o.set.inject_spare,
                 "Testing only: faults on the spare (512-byte units), and flush:MS, a slow flush");
  app.add_option("--threads", o.threads,
                 "Requests run at once per client: a connection uses one thread while the "
                 "disk keeps up, and up to this many when requests get stuck on a slow disk "
                 "or wait for a group commit of remaps")
      ->check(CLI::Range(1u, 1024u))
      ->capture_default_str();
  app.add_flag("--stdio", o.listen.stdio,
               "Serve one client on standard input (a connected socket, as libnbd's "
               "nbd_connect_command and inetd give), then exit. (`nbdinfo -- [ CMD ]` uses "
               "socket activation instead, which needs no option)");
  app.add_option("--handshake-timeout", o.handshake_seconds,
                 "Seconds a client may take to finish the handshake before it is dropped")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--shutdown-timeout", o.drain_seconds,
                 "On SIGTERM/SIGINT, seconds to wait for requests in flight. Past it, clients "
                 "still busy are cut; if a request is still stuck in a disk, the server exits "
                 "with status 1 and the spare is left as after a crash (its journal replays at "
                 "the next start)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--tls", o.tls,
                 "off: STARTTLS is refused; on: clients may use TLS; require: every option "
                 "before STARTTLS is refused (NBD has no authentication: use TLS across any "
                 "network you do not trust). Default: require when --tls-certificates or "
                 "--tls-psk is given, else off")
      ->check(CLI::IsMember({"off", "on", "require"}));
  app.add_option("--tls-certificates", o.tls_config.certificates,
                 "X.509: a directory with ca-cert.pem, server-cert.pem, server-key.pem and "
                 "optionally ca-crl.pem, as nbdkit's (default for --tls=on|require without "
                 "--tls-psk: /etc/pki/dmremap for root, else $HOME/.pki/dmremap)")
      ->check(CLI::ExistingDirectory);
  app.add_flag("--tls-verify-peer", o.tls_config.verify_peer,
               "X.509: clients must present a certificate issued by ca-cert.pem (and not in "
               "ca-crl.pem)");
  app.add_option("--tls-psk", o.tls_config.psk_file,
                 "TLS with pre-shared keys instead of certificates: a file of username:hexkey "
                 "lines, as psktool writes")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-priority", o.tls_config.priority,
                 "GnuTLS priority string: which TLS versions and ciphers are offered (e.g. "
                 "NORMAL:-VERS-ALL:+VERS-TLS1.3 for TLS 1.3 only)")
      ->capture_default_str();
  app.add_flag("-v,--verbose", o.verbose,
               "Every log line, debug included (each session, each refused request)");
  app.footer(
      "Listening: --tcp and --unix may be combined; with neither, sockets passed by systemd "
      "socket activation (LISTEN_FDS) are used, or else 127.0.0.1:10809.\n"
      "Stopping: SIGTERM or SIGINT stops accepting; requests in flight are answered, later ones "
      "get ESHUTDOWN; then the spare is flushed and closed cleanly.\n"
      "Exit status: 0 stopped cleanly, 1 failure (cannot open or serve, or not closed cleanly), "
      "2 bad usage.\n"
      "Manual: docs/server.md");
  app.set_version_flag("-V,--version", "dmremap-server " DMREMAP_VERSION);
}

// Stops the server on SIGTERM/SIGINT: stop accepting, drain the sessions
// (requests in flight are answered), and stop the loop once they are gone or
// --shutdown-timeout has passed.
class Shutdown {
 public:
  Shutdown(asio::io_context& io, ExportInfo& info, Listeners& listeners,
           std::chrono::milliseconds timeout)
      : io_(io), info_(info), listeners_(listeners), timeout_(timeout), signals_(io, SIGINT, SIGTERM),
        poll_(io) {
    signals_.async_wait([this](const boost::system::error_code& ec, int sig) {
      if (ec) return;
      std::fprintf(stderr, "dmremap-server: signal %d: shutting down\n", sig);
      listeners_.close();
      deadline_ = std::chrono::steady_clock::now() + timeout_;
      info_.drain_all();
      poll();
    });
  }
  // The --stdio client is gone: nothing more to wait for.
  void cancel() {
    boost::system::error_code ignored;
    signals_.cancel(ignored);
    poll_.cancel();
  }
  // When close() may wait for requests still inside the engine: until the
  // deadline (at least 100 ms); none when no signal came.
  std::optional<std::chrono::milliseconds> close_wait() const {
    if (!deadline_) return std::nullopt;
    return std::max(std::chrono::milliseconds(100),
                    std::chrono::duration_cast<std::chrono::milliseconds>(
                        *deadline_ - std::chrono::steady_clock::now()));
  }

 private:
  void poll() {
    poll_.expires_after(std::chrono::milliseconds(20));
    poll_.async_wait([this](const boost::system::error_code& ec) {
      if (ec) return;
      if (info_.live() == 0 || std::chrono::steady_clock::now() > *deadline_) {
        if (info_.live() != 0) {
          std::fprintf(stderr, "dmremap-server: %zu client(s) still busy: closing anyway\n",
                       info_.live());
        }
        io_.stop();
        return;
      }
      poll();
    });
  }

  asio::io_context& io_;
  ExportInfo& info_;
  Listeners& listeners_;
  std::chrono::milliseconds timeout_;
  asio::signal_set signals_;
  asio::steady_timer poll_;
  std::optional<std::chrono::steady_clock::time_point> deadline_;
};

// Closes the set after the loop has stopped. Requests still running past
// --shutdown-timeout (stuck in a device) keep the engine: it is never
// destroyed under them. The spare is left as after a crash (its journal
// consistent), and the process ends here.
int close_set(dmremap::Engine& engine, std::optional<std::chrono::milliseconds> wait) {
  const dmremap::Status s = engine.close(wait);
  if (!s.is_ok()) {
    std::fprintf(stderr, "dmremap-server: closing the set: %s\n", s.to_string().c_str());
    if (s.code() == EBUSY) {
      std::fflush(stderr);
      std::_Exit(kExitFailed);
    }
    return kExitFailed;
  }
  std::fprintf(stderr, "dmremap-server: the spare is closed cleanly\n");
  return kExitOk;
}

int serve(Options& o) {
  o.set.engine.unreadable_zero = o.unreadable == "zero";
  o.set.engine.retry_time = to_ms(o.retry_seconds);
  o.set.engine.slow_read = to_ms(o.slow_seconds);
  o.set.io_timeout = to_ms(o.io_timeout_seconds);
  (void)dmremap::parse_io_mode(o.io_mode, o.set.io);
  try {
    Listeners::check(o.listen);  // before the set is opened: nothing to undo
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "dmremap-server: cannot serve: %s\n", ex.what());
    return kExitFailed;
  }

  // TLS credentials before the set is opened: a wrong file stops start-up
  // with nothing to undo.
  std::unique_ptr<dmremap::server::TlsCredentials> tls;
  if (o.tls_config.mode != dmremap::server::TlsMode::kOff) {
    try {
      tls = dmremap::server::TlsCredentials::load(o.tls_config);
    } catch (const std::exception& ex) {
      std::fprintf(stderr, "dmremap-server: cannot serve: %s\n", ex.what());
      return kExitFailed;
    }
    std::fprintf(stderr, "dmremap-server: TLS %s: %s\n",
                 o.tls_config.mode == dmremap::server::TlsMode::kRequire ? "required" : "offered",
                 tls->describe().c_str());
  }

  auto engine = dmremap::open_set(o.set);
  if (!engine.is_ok()) {
    std::fprintf(stderr, "dmremap-server: %s\n", engine.status().to_string().c_str());
    return kExitFailed;
  }
  dmremap::Engine& e = *engine.value();
  ExportInfo info;
  info.engine = &e;
  info.max_lanes = o.threads;
  info.name = o.name;
  info.description = "dmremap set " + dmremap::uuid_string(e.superblock().uuid);
  info.read_only = o.set.read_only;
  info.handshake_timeout = to_ms(o.handshake_seconds);
  info.tls = o.tls_config.mode;
  info.tls_credentials = tls.get();

  // The surface scan (writable sets): a saved running scan goes on.
  std::unique_ptr<dmremap::Scanner> scanner;
  if (!o.set.read_only) scanner = std::make_unique<dmremap::Scanner>(e);
  // An evacuation under way goes on: its NEW is opened again and every
  // write reaches it too, from before the first client is served.
  std::unique_ptr<dmremap::Evacuator> evacuator;
  if (!o.set.read_only) evacuator = dmremap::make_evacuator(e, o.set);
  info.evacuator = evacuator.get();

  // Before any NBD socket is bound: a failure here leaves nothing behind.
  std::unique_ptr<dmremap::ControlServer> control;
  if (!o.control_path.empty()) {
    auto started = dmremap::ControlServer::start(o.control_path,
                                                 dmremap::engine_commands(e, scanner.get(),
                                                                          evacuator.get()));
    if (!started.is_ok()) {
      std::fprintf(stderr, "dmremap-server: cannot serve: %s\n",
                   started.status().to_string().c_str());
      scanner.reset();
      evacuator.reset();
      (void)e.close();
      return kExitFailed;
    }
    control = std::move(started.value());
    std::fprintf(stderr, "dmremap-server: control socket %s\n", o.control_path.c_str());
    dmremap::advertise_control(e, o.control_path);
  }

  // Also before the NBD sockets: a port in use stops start-up here.
  std::unique_ptr<MetricsHttp> metrics;
  if (!o.metrics.empty()) {
    const dmremap::Superblock fixed = e.geometry();
    try {
      metrics = std::make_unique<MetricsHttp>(o.metrics, [&e, fixed, &scanner] {
        const dmremap::ScanProgress scan = scanner ? scanner->progress() : dmremap::ScanProgress{};
        return dmremap::prometheus_text(e.stats(), fixed, /*live=*/true,
                                        scanner ? &scan : nullptr);
      });
    } catch (const std::exception& ex) {
      std::fprintf(stderr, "dmremap-server: cannot serve: %s\n", ex.what());
      control.reset();
      scanner.reset();
      evacuator.reset();
      (void)e.close();
      return kExitFailed;
    }
    const auto at = metrics->endpoint();
    const std::string host = at.address().is_v6() ? "[" + at.address().to_string() + "]"
                                                   : at.address().to_string();
    std::fprintf(stderr, "dmremap-server: metrics at http://%s:%u/metrics\n", host.c_str(),
                 static_cast<unsigned>(at.port()));
  }

  asio::io_context io;
  Listeners listeners(io, info);
  std::unique_ptr<Shutdown> shutdown;
  try {
    listeners.open(o.listen, [&shutdown] { shutdown->cancel(); });
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "dmremap-server: cannot serve: %s\n", ex.what());
    metrics.reset();
    control.reset();
    scanner.reset();
    evacuator.reset();
    (void)e.close();
    return kExitFailed;
  }
  shutdown = std::make_unique<Shutdown>(io, info, listeners, to_ms(o.drain_seconds));
  std::signal(SIGPIPE, SIG_IGN);

  // Health changes and a periodic summary, in the log.
  auto health = std::make_unique<dmremap::HealthLog>(e, to_ms(o.log_interval_seconds));

  // A watchdog gives a connection another lane when its lanes are stuck on a
  // slow disk, or replies wait behind a slow request (see Session::watch).
  std::atomic<bool> watching{true};
  std::thread watchdog([&] {
    while (watching) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      info.watch_all();
    }
  });
  // One thread accepts and runs handshakes; each connection's requests run
  // on its own threads (see session.h).
  io.run();
  watching = false;
  watchdog.join();
  listeners.remove_socket_file();
  metrics.reset();
  control.reset();
  scanner.reset();  // saves its place
  evacuator.reset();  // saves its place; writes in flight still reach NEW
  health.reset();  // as the plugin: no health line while the set closes
  const int status = close_set(e, shutdown->close_wait());
  if (info.live() != 0) {
    // Clients cut at the deadline may still have threads here (blocked on
    // their sockets), using the export: end without destroying it.
    std::fflush(stderr);
    std::_Exit(status);
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app(
      "dmremap-server: serves a failing disk (MAIN) over NBD, with the blocks it cannot hold "
      "remapped to SPARE. Format SPARE first with: dmremap format --main MAIN --spare SPARE",
      "dmremap-server");
  Options o;
  add_options(app, o);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);  // --help, --version
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitUsage;
  }
  if (o.listen.stdio && (!o.listen.tcp.empty() || !o.listen.unix_path.empty())) {
    std::fprintf(stderr, "dmremap-server: --stdio serves one client; it takes no --tcp or --unix\n");
    return kExitUsage;
  }
  const bool credentials = !o.tls_config.certificates.empty() || !o.tls_config.psk_file.empty() ||
                           o.tls_config.verify_peer;
  if (o.tls.empty()) o.tls = credentials ? "require" : "off";
  auto usage = [](const char* why) {
    std::fprintf(stderr, "dmremap-server: %s\n", why);
    return kExitUsage;
  };
  if (o.tls == "off" && credentials) {
    return usage("--tls=off takes no --tls-certificates, --tls-psk or --tls-verify-peer");
  }
  if (!o.tls_config.certificates.empty() && !o.tls_config.psk_file.empty()) {
    return usage("--tls-certificates and --tls-psk are two ways to authenticate: choose one");
  }
  if (o.tls_config.verify_peer && !o.tls_config.psk_file.empty()) {
    return usage("--tls-verify-peer checks X.509 certificates; with --tls-psk the key itself "
                 "authenticates the client");
  }
  if (o.tls_config.verify_peer && o.tls == "on") {
    return usage("--tls-verify-peer with --tls=on would still serve clients without TLS: use "
                 "--tls=require");
  }
  o.tls_config.mode = o.tls == "require" ? dmremap::server::TlsMode::kRequire
                      : o.tls == "on"    ? dmremap::server::TlsMode::kOn
                                         : dmremap::server::TlsMode::kOff;
  dmremap::log_to_stderr("dmremap-server",
                         o.verbose ? dmremap::LogLevel::kDebug : dmremap::LogLevel::kInfo);
  return serve(o);
}
