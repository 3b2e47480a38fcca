// dmremap-server --metrics [ADDR:]PORT: the set's figures for Prometheus,
// over HTTP (Boost.Beast), on a thread and io_context of their own so that
// a scrape never waits behind a client's request, nor the other way round.
#pragma once

#include <utility>  // before Asio (Boost 1.74 with GCC 12)

#include <boost/asio.hpp>
#include <functional>
#include <memory>
#include <string>
#include <thread>

namespace dmremap::server {

class MetricsHttp {
 public:
  // Renders the body of a scrape (the Prometheus text format).
  using Render = std::function<std::string()>;

  // Binds `spec` ([ADDR:]PORT, checked by check_tcp_spec) and serves on
  // its own thread: GET or HEAD /metrics gets the text, / a pointer to it,
  // anything else 404 (405 for another method). One request per
  // connection; at most 16 connections at once (more are closed unread); a
  // request must arrive within 10 s, its header fit in 8 KiB and any body
  // in 64 KiB (else it is closed unanswered). Throws
  // std::runtime_error (with the reason) when it cannot bind.
  MetricsHttp(const std::string& spec, Render render);
  // Stops the thread and closes every connection.
  ~MetricsHttp();
  MetricsHttp(const MetricsHttp&) = delete;
  MetricsHttp& operator=(const MetricsHttp&) = delete;

  // Where it listens (the port the kernel chose for port 0).
  boost::asio::ip::tcp::endpoint endpoint() const { return endpoint_; }

 private:
  boost::asio::awaitable<void> accept_loop();
  boost::asio::awaitable<void> serve(boost::asio::ip::tcp::socket socket);

  boost::asio::io_context io_;
  boost::asio::ip::tcp::acceptor acceptor_;
  boost::asio::ip::tcp::endpoint endpoint_;
  Render render_;
  int open_ = 0;  // connections being served (on the thread only)
  std::thread thread_;
};

}  // namespace dmremap::server
