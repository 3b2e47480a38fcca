// dmremap-server's TLS transport under a real GnuTLS client, on a socketpair:
// a whole Session (handshake coroutine, then the lanes) over TLS 1.3 with a
// pre-shared key, while the client asks for TLS 1.3 KeyUpdates in the
// middle of streaming replies. A KeyUpdate switches the keys of one
// direction; GnuTLS handles it in whichever call meets it, so a server that
// let its receiving and sending threads into one GnuTLS session at once
// would encrypt two records with one nonce (the client then fails to
// decrypt), and one that corked its sends would never answer a KeyUpdate
// that asks for the server's own. Every byte read back is checked.
#include <utility>  // before Asio, for Boost 1.74

#include <boost/asio.hpp>
#include <catch2/catch.hpp>
#include <gnutls/gnutls.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "protocol.h"
#include "session.h"
#include "test_util.h"
#include "tls.h"

using namespace dmremap;
using namespace dmremap::server;
namespace asio = boost::asio;
using Socket = asio::local::stream_protocol::socket;

namespace {

constexpr unsigned char kKey[16] = {9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6};

// A PSK file for user "test", as psktool writes it; removed at the end.
struct PskFile {
  std::string path;
  PskFile() {
    char name[] = "/tmp/dmremap-test-psk-XXXXXX";
    const int fd = ::mkstemp(name);
    REQUIRE(fd >= 0);
    path = name;
    std::string line = "test:";
    for (const unsigned char b : kKey) {
      char hex[3];
      std::snprintf(hex, sizeof hex, "%02x", b);
      line += hex;
    }
    line += "\n";
    REQUIRE(::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()));
    ::close(fd);
  }
  ~PskFile() { ::unlink(path.c_str()); }
};

void put(std::string& s, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) s.push_back(static_cast<char>(v >> (8 * i)));
}

std::string option(uint32_t opt, const std::string& data = "") {
  std::string s;
  put(s, nbd::kIHaveOpt, 8);
  put(s, opt, 4);
  put(s, data.size(), 4);
  return s + data;
}

std::string request(uint16_t type, uint64_t cookie, uint64_t offset, uint32_t length) {
  std::string s;
  put(s, nbd::kRequestMagic, 4);
  put(s, 0, 2);
  put(s, type, 2);
  put(s, cookie, 8);
  put(s, offset, 8);
  put(s, length, 4);
  return s;
}

// The client's side: plaintext until STARTTLS, then GnuTLS (blocking).
struct Client {
  int fd;
  gnutls_session_t tls = nullptr;
  gnutls_psk_client_credentials_t psk = nullptr;

  explicit Client(int socket) : fd(socket) {}
  ~Client() {
    if (tls) gnutls_deinit(tls);
    if (psk) gnutls_psk_free_client_credentials(psk);
  }
  void plain_send(const std::string& s) {
    REQUIRE(::send(fd, s.data(), s.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(s.size()));
  }
  void plain_recv(char* out, size_t n) {
    while (n > 0) {
      const ssize_t got = ::recv(fd, out, n, 0);
      REQUIRE(got > 0);
      out += got;
      n -= static_cast<size_t>(got);
    }
  }
  void start_tls() {
    REQUIRE(gnutls_psk_allocate_client_credentials(&psk) == 0);
    const gnutls_datum_t key{const_cast<unsigned char*>(kKey), sizeof kKey};
    REQUIRE(gnutls_psk_set_client_credentials(psk, "test", &key, GNUTLS_PSK_KEY_RAW) == 0);
    REQUIRE(gnutls_init(&tls, GNUTLS_CLIENT | GNUTLS_NO_SIGNAL) == 0);
    REQUIRE(gnutls_priority_set_direct(tls, "NORMAL:-VERS-ALL:+VERS-TLS1.3:+ECDHE-PSK:+PSK",
                                       nullptr) == 0);
    REQUIRE(gnutls_credentials_set(tls, GNUTLS_CRD_PSK, psk) == 0);
    gnutls_transport_set_int(tls, fd);
    int rc;
    do {
      rc = gnutls_handshake(tls);
    } while (rc < 0 && gnutls_error_is_fatal(rc) == 0);
    REQUIRE(rc == 0);
  }
  void send(const std::string& s) {
    for (size_t done = 0; done < s.size();) {
      const ssize_t n = gnutls_record_send(tls, s.data() + done, s.size() - done);
      if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) continue;
      INFO(gnutls_strerror(static_cast<int>(n)));
      REQUIRE(n > 0);
      done += static_cast<size_t>(n);
    }
  }
  void recv(char* out, size_t n) {
    while (n > 0) {
      const ssize_t got = gnutls_record_recv(tls, out, n);
      if (got == GNUTLS_E_AGAIN || got == GNUTLS_E_INTERRUPTED) continue;
      INFO(gnutls_strerror(static_cast<int>(got)));  // "Decryption has failed": one nonce twice
      REQUIRE(got > 0);
      out += got;
      n -= static_cast<size_t>(got);
    }
  }
};

}  // namespace

TEST_CASE("tls: KeyUpdates in the middle of streaming replies; every byte checked",
          "[server][tls]") {
  auto set = test::make_set({.main_size = 32 << 20, .spare_size = 2 << 20});
  PskFile psk_file;
  TlsConfig config;
  config.mode = TlsMode::kRequire;
  config.psk_file = psk_file.path;
  const auto credentials = TlsCredentials::load(config);
  ExportInfo info;
  info.engine = set.engine.get();
  info.tls = TlsMode::kRequire;
  info.tls_credentials = credentials.get();
  info.max_lanes = 4;

  asio::io_context io;
  Socket server_side(io), client_side(io);
  asio::local::connect_pair(server_side, client_side);
  std::promise<void> ended;
  {
    auto session = std::make_shared<Session<Socket>>(std::move(server_side), info);
    asio::co_spawn(session->strand(),
                   [session]() -> asio::awaitable<void> { co_await session->run(); },
                   [&ended](std::exception_ptr) { ended.set_value(); });
  }
  std::thread loop([&io] { io.run(); });
  // The server's watchdog, as main.cc runs it: it starts the helper lanes
  // and the sender that make receiving and sending run at once.
  std::atomic<bool> watching{true};
  std::thread watchdog([&] {
    while (watching) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      info.watch_all();
    }
  });
  const int fd = ::dup(client_side.native_handle());
  client_side.close();

  Client c(fd);
  char greeting[18];
  c.plain_recv(greeting, sizeof greeting);
  std::string hello;
  put(hello, nbd::kClientFixedNewstyle | nbd::kClientNoZeroes, 4);
  c.plain_send(hello + option(nbd::kOptStartTls));
  char reply[20];
  c.plain_recv(reply, sizeof reply);
  REQUIRE(nbd::get32(reply + 12) == nbd::kRepAck);
  c.start_tls();
  c.send(option(nbd::kOptExportName));
  char export_info[10];
  c.recv(export_info, sizeof export_info);

  // The disk: 32 pieces of 1 MiB, each written with its own bytes.
  constexpr uint32_t kPiece = 1 << 20;
  constexpr int kPieces = 32;
  auto bytes_of = [](int piece) {
    std::vector<char> v = test::pattern(kPiece, 1000 + piece);
    return std::string(v.begin(), v.end());
  };
  std::string writes;
  for (int p = 0; p < kPieces; ++p) {
    writes += request(nbd::kCmdWrite, 1000 + p, uint64_t{kPiece} * static_cast<uint64_t>(p), kPiece) + bytes_of(p);
  }
  c.send(writes);
  for (int p = 0; p < kPieces; ++p) {
    char head[16];
    c.recv(head, sizeof head);
    REQUIRE(nbd::get32(head + 4) == 0);
  }

  // Rounds of 16 reads in flight; KeyUpdates while their replies stream:
  // our own keys, and with GNUTLS_KU_PEER the server's too. GnuTLS takes at
  // most 8 a second from a peer (more is a flood), so one every 150 ms.
  int updates = 0;
  auto last_update = std::chrono::steady_clock::now() - std::chrono::seconds(1);
  std::vector<char> data(kPiece);
  for (int round = 0; updates < 16; ++round) {
    // A write first, whose payload keeps the server's receiver decrypting
    // while its sender encrypts the reads' replies.
    const int w = round % kPieces;
    std::string reads = request(nbd::kCmdWrite, 1u << 20, uint64_t{kPiece} * static_cast<uint64_t>(w),
                                kPiece) + bytes_of(w);
    for (int i = 0; i < 16; ++i) {
      const int p = (round * 7 + i * 3) % kPieces;
      reads += request(nbd::kCmdRead, static_cast<uint64_t>(round) << 8 | static_cast<uint64_t>(p),
                       uint64_t{kPiece} * static_cast<uint64_t>(p), kPiece);
    }
    c.send(reads);
    for (int i = 0; i < 17; ++i) {
      const auto now = std::chrono::steady_clock::now();
      if (i % 4 == 1 && now - last_update > std::chrono::milliseconds(130)) {
        last_update = now;
        int rc;
        do {
          rc = gnutls_session_key_update(c.tls, updates % 2 ? GNUTLS_KU_PEER : 0);
        } while (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED);
        REQUIRE(rc == 0);
        ++updates;
      }
      char head[16];
      c.recv(head, sizeof head);
      REQUIRE(nbd::get32(head) == nbd::kSimpleReplyMagic);
      REQUIRE(nbd::get32(head + 4) == 0);
      if (nbd::get64(head + 8) == 1u << 20) continue;  // the write's
      const int p = static_cast<int>(nbd::get64(head + 8) & 0xff);
      c.recv(data.data(), data.size());
      REQUIRE(std::string(data.begin(), data.end()) == bytes_of(p));
    }
  }
  c.send(request(nbd::kCmdDisc, 1, 0, 0));
  (void)gnutls_bye(c.tls, GNUTLS_SHUT_WR);
  ::shutdown(fd, SHUT_WR);
  char rest[4096];
  while (gnutls_record_recv(c.tls, rest, sizeof rest) > 0) {
  }
  ended.get_future().wait();
  watching = false;
  watchdog.join();
  ::close(fd);
  io.stop();
  loop.join();
}
