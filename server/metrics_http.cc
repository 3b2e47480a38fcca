#include "metrics_http.h"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <stdexcept>

#include "dmremap/log.h"
#include "dmremap/metrics.h"
#include "listeners.h"

namespace dmremap::server {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using asio::ip::tcp;

namespace {
constexpr int kMaxConnections = 16;
constexpr auto kRequestTimeout = std::chrono::seconds(10);
constexpr uint32_t kHeaderLimit = 8192;
constexpr uint64_t kBodyLimit = 65536;
}  // namespace

MetricsHttp::MetricsHttp(const std::string& spec, Render render)
    : acceptor_(io_), render_(std::move(render)) {
  const tcp::endpoint at = parse_tcp(spec);
  boost::system::error_code ec;
  acceptor_.open(at.protocol(), ec);
  if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor_.bind(at, ec);
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) throw std::runtime_error("--metrics " + spec + ": " + ec.message());
  endpoint_ = acceptor_.local_endpoint();
  asio::co_spawn(io_, accept_loop(), asio::detached);
  thread_ = std::thread([this] { io_.run(); });
}

MetricsHttp::~MetricsHttp() {
  io_.stop();
  if (thread_.joinable()) thread_.join();
}

asio::awaitable<void> MetricsHttp::accept_loop() {
  for (;;) {
    boost::system::error_code ec;
    tcp::socket socket =
        co_await acceptor_.async_accept(asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
      if (ec == asio::error::operation_aborted) co_return;
      // Out of descriptors, say: wait a little instead of spinning.
      asio::steady_timer pause(io_, std::chrono::milliseconds(100));
      co_await pause.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      continue;
    }
    if (open_ >= kMaxConnections) continue;  // the socket closes as it goes
    ++open_;
    asio::co_spawn(io_, serve(std::move(socket)), [this](std::exception_ptr) { --open_; });
  }
}

asio::awaitable<void> MetricsHttp::serve(tcp::socket socket) {
  beast::tcp_stream stream(std::move(socket));
  beast::flat_buffer buffer;
  // A body (nobody should send one) is read and ignored, up to a limit, so
  // that a POST gets its 405.
  http::request_parser<http::string_body> parser;
  parser.header_limit(kHeaderLimit);
  parser.body_limit(kBodyLimit);
  stream.expires_after(kRequestTimeout);
  boost::system::error_code ec;
  co_await http::async_read(stream, buffer, parser, asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return;  // timed out, too big, not HTTP: closed unanswered
  const auto& req = parser.get();
  http::response<http::string_body> res;
  res.version(req.version());
  res.keep_alive(false);
  res.set(http::field::server, "dmremap-server");
  const beast::string_view target = req.target();
  const beast::string_view path = target.substr(0, target.find('?'));
  if (req.method() != http::verb::get && req.method() != http::verb::head) {
    res.result(http::status::method_not_allowed);
    res.set(http::field::allow, "GET, HEAD");
    res.set(http::field::content_type, "text/plain; charset=utf-8");
    res.body() = "only GET and HEAD\n";
  } else if (path == "/metrics") {
    res.result(http::status::ok);
    res.set(http::field::content_type, kPrometheusContentType);
    try {
      res.body() = render_();
    } catch (const std::exception& e) {
      res.result(http::status::internal_server_error);
      res.set(http::field::content_type, "text/plain; charset=utf-8");
      res.body() = std::string("cannot render the metrics: ") + e.what() + "\n";
    }
  } else if (path == "/") {
    res.result(http::status::ok);
    res.set(http::field::content_type, "text/plain; charset=utf-8");
    res.body() = "dmremap-server: the set's metrics are at /metrics\n";
  } else {
    res.result(http::status::not_found);
    res.set(http::field::content_type, "text/plain; charset=utf-8");
    res.body() = "not found; the metrics are at /metrics\n";
  }
  res.prepare_payload();
  if (req.method() == http::verb::head) {
    // The length of what GET would send, and no body.
    http::response<http::empty_body> head{res.result(), res.version()};
    for (const auto& field : res) head.set(field.name_string(), field.value());
    co_await http::async_write(stream, head, asio::redirect_error(asio::use_awaitable, ec));
  } else {
    co_await http::async_write(stream, res, asio::redirect_error(asio::use_awaitable, ec));
  }
  beast::error_code ignored;
  stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
}

}  // namespace dmremap::server
