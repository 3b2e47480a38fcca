// Where dmremap-server takes its clients from: TCP and Unix listeners, sockets
// passed by systemd socket activation, or one connected socket on standard
// input (--stdio). Each accepted connection becomes a Session.
#pragma once

#include <utility>  // before Asio (Boost 1.74 with GCC 12)

#include <boost/asio.hpp>
#include <functional>
#include <memory>
#include <string>
#include <sys/types.h>
#include <utility>
#include <vector>

#include "dmremap/unix_socket.h"
#include "export_info.h"

namespace dmremap::server {

namespace asio = boost::asio;

// "[ADDR:]PORT" checked for --tcp (or `option`): "" when it is good, else
// why not. ADDR defaults to 127.0.0.1.
std::string check_tcp_spec(const std::string& spec, const char* option = "--tcp");
// A checked "[ADDR:]PORT" as an endpoint.
asio::ip::tcp::endpoint parse_tcp(const std::string& spec);

class Listeners {
 public:
  struct Spec {
    std::vector<std::string> tcp;  // [ADDR:]PORT
    std::string unix_path;
    bool stdio = false;
  };

  Listeners(asio::io_context& io, ExportInfo& info) : io_(io), info_(info) {}

  // What can be checked before the set is opened: --unix names nothing but
  // a stale socket. Throws std::runtime_error with a message for the user.
  static void check(const Spec& spec);

  // Binds every listener the spec asks for (with none: systemd's sockets,
  // or 127.0.0.1:10809), and starts the --stdio session, whose end calls
  // `on_stdio_end`. Throws std::runtime_error with a message for the user.
  void open(const Spec& spec, std::function<void()> on_stdio_end);
  // Stops accepting.
  void close();
  // Removes the --unix socket this server created.
  void remove_socket_file();

 private:
  void listen_activated(int fd);
  void listen_unix(const std::string& path);
  void serve_stdio(std::function<void()> on_end);

  asio::io_context& io_;
  ExportInfo& info_;
  std::vector<std::unique_ptr<asio::ip::tcp::acceptor>> tcp_;
  std::unique_ptr<asio::local::stream_protocol::acceptor> unix_;
  SocketFile socket_file_;  // the --unix socket this server bound
};

}  // namespace dmremap::server
