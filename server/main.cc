// dmremap-server: serves a dmremap set over NBD without nbdkit.
//
//   dmremap-server --main DISK --spare SPARE [--unix PATH] [--tcp [ADDR:]PORT]
#include <utility>  // before Asio (Boost 1.74 with GCC 12)

#include <CLI/CLI.hpp>
#include <boost/asio.hpp>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "dmremap/log.h"
#include "dmremap/open_set.h"
#include "session.h"

namespace {

namespace asio = boost::asio;
using dmremap::server::ExportInfo;
using dmremap::server::Session;

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
    using S = Session<typename Acceptor::protocol_type::socket>;
    auto session = std::make_shared<S>(std::move(socket), info);
    // The lambda's capture keeps the session alive until run() ends.
    asio::co_spawn(
        session->strand(), [session]() -> asio::awaitable<void> { co_await session->run(); },
        asio::detached);
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
  unsigned threads = std::max(4u, 2 * std::thread::hardware_concurrency());
  bool verbose = false;
  app.add_option("-m,--main", set.main, "The failing disk: file, block device or NBD URI")->required();
  app.add_option("-s,--spare", set.spare, "The spare, formatted by `dmremap format`")->required();
  app.add_option("--tcp", tcp,
                 "Listen on [ADDR:]PORT (ADDR defaults to 127.0.0.1; NBD has no authentication, "
                 "so expose it only on a trusted network). Default: 127.0.0.1:10809 when no "
                 "--unix is given");
  app.add_option("--unix", unix_path, "Listen on this Unix socket");
  app.add_option("--name", name, "The export's name (clients may also ask for \"\")");
  app.add_flag("-r,--readonly", set.read_only, "Serve read-only; nothing is remapped");
  app.add_flag("--direct", set.direct, "O_DIRECT on main and spare");
  app.add_option("--retries", set.engine.read_retries, "Extra reads of a failing block")
      ->capture_default_str();
  std::string unreadable = "error";
  app.add_option("--unreadable", unreadable, "error, or zero (salvage: unreadable blocks read as zeros, logged)")
      ->check(CLI::IsMember({"error", "zero"}))
      ->capture_default_str();
  app.add_option("--inject", set.inject, "Testing only: faults on main, e.g. read:10,write:20-21,weak:30x2");
  app.add_option("--threads", threads, "Worker threads for disk I/O")->capture_default_str();
  app.add_flag("-v,--verbose", verbose, "Log each session");
  app.set_version_flag("-V,--version", "dmremap-server " DMREMAP_VERSION);
  CLI11_PARSE(app, argc, argv);
  set.engine.unreadable_zero = unreadable == "zero";
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
  asio::thread_pool workers(threads);
  ExportInfo info;
  info.engine = engine.value().get();
  info.workers = &workers;
  info.name = name;
  info.description = "dmremap set " + dmremap::uuid_string(info.engine->superblock().uuid);
  info.read_only = set.read_only;
  info.min_block = info.engine->block_size();
  info.preferred_block = std::max<uint32_t>(info.engine->block_size(), 4096);

  std::vector<std::unique_ptr<asio::ip::tcp::acceptor>> tcp_acceptors;
  std::unique_ptr<asio::local::stream_protocol::acceptor> unix_acceptor;
  try {
    if (tcp.empty() && unix_path.empty()) tcp.push_back("10809");
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
      ::unlink(unix_path.c_str());
      unix_acceptor = std::make_unique<asio::local::stream_protocol::acceptor>(
          io, asio::local::stream_protocol::endpoint(unix_path));
      asio::co_spawn(io, accept_loop(*unix_acceptor, info), asio::detached);
      std::fprintf(stderr, "dmremap-server: listening on %s\n", unix_path.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dmremap-server: cannot listen: %s\n", e.what());
    (void)engine.value()->close();
    return 1;
  }

  // SIGTERM/SIGINT: stop accepting and stop the loop; requests already with
  // the workers finish, then the engine flushes and closes the spare cleanly.
  asio::signal_set signals(io, SIGINT, SIGTERM);
  signals.async_wait([&](const boost::system::error_code& ec, int sig) {
    if (ec) return;
    std::fprintf(stderr, "dmremap-server: signal %d: shutting down\n", sig);
    for (auto& a : tcp_acceptors) a->close();
    if (unix_acceptor) unix_acceptor->close();
    io.stop();
  });
  std::signal(SIGPIPE, SIG_IGN);

  std::vector<std::thread> io_threads;
  const unsigned n_io = std::max(1u, std::thread::hardware_concurrency());
  for (unsigned i = 1; i < n_io; ++i) io_threads.emplace_back([&] { io.run(); });
  io.run();
  for (auto& t : io_threads) t.join();
  workers.join();
  if (!unix_path.empty()) ::unlink(unix_path.c_str());
  const dmremap::Status s = engine.value()->close();
  if (!s.is_ok()) {
    std::fprintf(stderr, "dmremap-server: closing the set: %s\n", s.to_string().c_str());
    return 1;
  }
  std::fprintf(stderr, "dmremap-server: the spare is closed cleanly\n");
  return 0;
}
