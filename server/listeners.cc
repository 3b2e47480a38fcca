#include "listeners.h"

#include <cstdlib>
#include <stdexcept>
#include <sys/socket.h>
#include <unistd.h>

#include "dmremap/log.h"
#include "dmremap/unix_socket.h"
#include "session.h"

namespace dmremap::server {

namespace {

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
      log(LogLevel::kWarning, "accept: " + ec.message());
      continue;
    }
    serve(std::move(socket), info, asio::detached);
  }
}

struct TcpSpec {
  std::string addr = "127.0.0.1";
  std::string port;
};

TcpSpec split_tcp(const std::string& spec) {
  TcpSpec t;
  t.port = spec;
  if (const auto colon = spec.rfind(':'); colon != std::string::npos) {
    t.addr = spec.substr(0, colon);
    t.port = spec.substr(colon + 1);
    if (t.addr.size() > 2 && t.addr.front() == '[' && t.addr.back() == ']') {
      t.addr = t.addr.substr(1, t.addr.size() - 2);
    }
  }
  return t;
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

asio::ip::tcp::endpoint parse_tcp(const std::string& spec) {
  const TcpSpec t = split_tcp(spec);
  return {asio::ip::make_address(t.addr),
          static_cast<unsigned short>(std::strtoul(t.port.c_str(), nullptr, 10))};
}

std::string check_tcp_spec(const std::string& spec, const char* option) {
  const TcpSpec t = split_tcp(spec);
  if (t.port.empty() || t.port.size() > 5 ||
      t.port.find_first_not_of("0123456789") != std::string::npos ||
      std::strtoul(t.port.c_str(), nullptr, 10) > 65535) {
    return std::string(option) + " " + spec + ": the port must be a number from 0 to 65535";
  }
  boost::system::error_code ec;
  (void)asio::ip::make_address(t.addr, ec);
  if (ec) return std::string(option) + " " + spec + ": '" + t.addr + "' is not an IP address";
  return {};
}

void Listeners::check(const Spec& spec) {
  if (spec.unix_path.empty()) return;
  if (Status s = make_way_for_socket(spec.unix_path, "--unix"); !s.is_ok()) {
    throw std::runtime_error(s.to_string());
  }
}

void Listeners::open(const Spec& spec, std::function<void()> on_stdio_end) {
  const std::vector<int> passed = activation_fds();
  if (spec.stdio) {
    if (!passed.empty()) throw std::runtime_error("--stdio serves one client; it takes no sockets from systemd");
    serve_stdio(std::move(on_stdio_end));
    return;
  }
  for (const int fd : passed) listen_activated(fd);
  std::vector<std::string> tcp = spec.tcp;
  if (tcp.empty() && spec.unix_path.empty() && passed.empty()) tcp.push_back("10809");
  for (const auto& t : tcp) {
    auto a = std::make_unique<asio::ip::tcp::acceptor>(io_, parse_tcp(t), true);
    asio::co_spawn(io_, accept_loop(*a, info_), asio::detached);
    const auto ep = a->local_endpoint();
    std::fprintf(stderr, "dmremap-server: listening on %s:%u\n", ep.address().to_string().c_str(),
                 ep.port());
    tcp_.push_back(std::move(a));
  }
  if (!spec.unix_path.empty()) {
    if (unix_) throw std::runtime_error("--unix and a socket-activation Unix socket");
    listen_unix(spec.unix_path);
  }
}

void Listeners::listen_activated(int fd) {
  const int domain = socket_domain(fd);
  if (!is_listening(fd)) {
    throw std::runtime_error("socket-activation fd " + std::to_string(fd) +
                             " is not a listening socket (use Accept=no)");
  }
  if (domain == AF_UNIX) {
    unix_ = std::make_unique<asio::local::stream_protocol::acceptor>(
        io_, asio::local::stream_protocol(), fd);
    asio::co_spawn(io_, accept_loop(*unix_, info_), asio::detached);
  } else if (domain == AF_INET || domain == AF_INET6) {
    auto a = std::make_unique<asio::ip::tcp::acceptor>(
        io_, domain == AF_INET ? asio::ip::tcp::v4() : asio::ip::tcp::v6(), fd);
    asio::co_spawn(io_, accept_loop(*a, info_), asio::detached);
    tcp_.push_back(std::move(a));
  } else {
    throw std::runtime_error("socket-activation fd " + std::to_string(fd) +
                             " is neither a TCP nor a Unix socket");
  }
  std::fprintf(stderr, "dmremap-server: listening on the socket passed as fd %d\n", fd);
}

void Listeners::listen_unix(const std::string& path) {
  // Checked before the set was opened; a stale socket that appeared since
  // is replaced, anything else refused.
  if (Status s = make_way_for_socket(path, "--unix"); !s.is_ok()) {
    throw std::runtime_error(s.to_string());
  }
  unix_ = std::make_unique<asio::local::stream_protocol::acceptor>(
      io_, asio::local::stream_protocol::endpoint(path));
  socket_file_ = SocketFile::bound_at(path);
  asio::co_spawn(io_, accept_loop(*unix_, info_), asio::detached);
  std::fprintf(stderr, "dmremap-server: listening on %s\n", path.c_str());
}

// One connected socket on fd 0; fd 1 may be the same socket, or not.
void Listeners::serve_stdio(std::function<void()> on_end) {
  const int fd = ::dup(0);
  const int domain = fd < 0 ? -1 : socket_domain(fd);
  auto done = [on_end = std::move(on_end)](std::exception_ptr) { on_end(); };
  if (domain == AF_UNIX) {
    asio::local::stream_protocol::socket sock(io_);
    sock.assign(asio::local::stream_protocol(), fd);
    serve(std::move(sock), info_, std::move(done));
  } else if (domain == AF_INET || domain == AF_INET6) {
    asio::ip::tcp::socket sock(io_);
    sock.assign(domain == AF_INET ? asio::ip::tcp::v4() : asio::ip::tcp::v6(), fd);
    serve(std::move(sock), info_, std::move(done));
  } else {
    if (fd >= 0) ::close(fd);
    throw std::runtime_error(
        "--stdio needs a connected socket on standard input (as nbd_connect_command "
        "or inetd give), not a terminal, file or pipe");
  }
}

void Listeners::close() {
  for (auto& a : tcp_) {
    boost::system::error_code ec;
    a->close(ec);
  }
  if (unix_) {
    boost::system::error_code ec;
    unix_->close(ec);
  }
}

void Listeners::remove_socket_file() { socket_file_.remove(); }

}  // namespace dmremap::server
