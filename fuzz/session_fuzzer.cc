// libFuzzer target: arbitrary bytes from a client of dmremap-server, through
// a whole Session: handshake I/O, lanes, read-ahead, in-flight budget and
// replies on a socket. Slower than server_fuzzer (one session, with its
// threads, per input); they share the seed corpus fuzz/corpus/server.
//
// Each input is what one client sends, from the first byte of the handshake
// on. A real Session (the server's own code) serves it over a socketpair on
// an engine in memory, while this side reads and drops every reply; the
// input's end is the client closing its side. The server's watchdog runs, and
// two blocks of main are slow, so helper lanes start and the outbox is sent
// by them; the input's first byte may ask for a drain (SIGTERM's) half way.
// With bit 2 of the first byte the client speaks TLS (serve_tls): bytes
// before STARTTLS in plaintext, the same bytes injected after it, then over
// TLS.
// The properties:
// - the server never crashes, hangs or allocates without bound (libFuzzer's
//   -timeout, -rss_limit_mb and -malloc_limit_mb, and the sanitizers);
// - the session ends when the client goes away, whatever it sent;
// - on a read-only export (chosen by the input's first byte) the disk is
//   never changed;
// - afterwards an honest client on another connection still writes, flushes
//   and reads back its data.
#include <utility>  // before Asio, for Boost 1.74

#include <boost/asio.hpp>
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <memory>
#include <string>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "dmremap/engine.h"
#include "dmremap/faulty_device.h"
#include "dmremap/log.h"
#include "dmremap/memory_device.h"
#include "dmremap/metadata_store.h"
#include "protocol.h"
#include "session.h"
#include "tls.h"

using namespace dmremap;
namespace asio = boost::asio;
using Socket = asio::local::stream_protocol::socket;

namespace {

constexpr uint64_t kMainSize = 4 << 20;
constexpr uint32_t kBlock = 4096;
// The TLS client's key, in the server's PSK file (World).
constexpr char kPskUser[] = "fuzz";
constexpr unsigned char kPskKey[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "session_fuzzer: %s\n", what);
  std::abort();
}

struct World {
  std::shared_ptr<MemoryDevice> main_mem;
  std::unique_ptr<Engine> engine;
  server::ExportInfo rw, ro;
  std::unique_ptr<server::TlsCredentials> credentials;
  server::ExportInfo tls_on, tls_required;  // --tls=on and require, on rw's engine
};

World& world() {
  static World* w = [] {
    // DMREMAP_FUZZ_LOG=1 shows the server's log, to study a finding.
    if (std::getenv("DMREMAP_FUZZ_LOG")) {
      set_log_debug(true);
    } else {
      set_log_sink([](LogLevel, const std::string&) {});
    }
    auto* x = new World;
    x->main_mem = std::make_shared<MemoryDevice>(kMainSize, "main");
    // Two slow blocks, so that requests get stuck and the watchdog starts
    // helper lanes and sends replies that wait (Session::watch).
    auto main = std::make_shared<FaultyDevice>(x->main_mem, kBlock, "main");
    main->add_slow_block(100, std::chrono::milliseconds(4));
    main->add_slow_block(700, std::chrono::milliseconds(4));
    auto spare = std::make_shared<MemoryDevice>(2 << 20, "spare");
    LayoutParams lp;
    lp.main_size = kMainSize;
    lp.block_size = kBlock;
    if (!MetadataStore::format(*spare, lp, "").is_ok()) die("format failed");
    auto e = Engine::open(main, spare, {});
    if (!e.is_ok()) die("open failed");
    x->engine = std::move(e.value());
    for (auto* info : {&x->rw, &x->ro}) {
      info->engine = x->engine.get();
      info->max_lanes = 4;
      info->max_in_flight_bytes = 32 << 20;
      info->handshake_timeout = std::chrono::milliseconds(5000);
    }
    x->ro.read_only = true;
    // TLS: one PSK user, in a file as psktool writes it.
    char path[] = "/tmp/dmremap-fuzz-psk-XXXXXX";
    const int fd = ::mkstemp(path);
    if (fd < 0) die("mkstemp failed");
    std::string line = std::string(kPskUser) + ":";
    for (const unsigned char b : kPskKey) {
      static constexpr char kHex[] = "0123456789abcdef";
      line += kHex[b >> 4];
      line += kHex[b & 15];
    }
    line += "\n";
    if (::write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size())) die("write");
    ::close(fd);
    server::TlsConfig config;
    config.mode = server::TlsMode::kRequire;
    config.psk_file = path;
    x->credentials = server::TlsCredentials::load(config);
    // GnuTLS reads the file at each handshake: it goes when the run ends.
    static std::string psk_path = path;
    std::atexit([] { ::unlink(psk_path.c_str()); });
    for (auto* info : {&x->tls_on, &x->tls_required}) {
      info->engine = x->engine.get();
      info->max_lanes = 4;
      info->max_in_flight_bytes = 32 << 20;
      info->handshake_timeout = std::chrono::milliseconds(5000);
      info->tls_credentials = x->credentials.get();
    }
    x->tls_on.tls = server::TlsMode::kOn;
    x->tls_required.tls = server::TlsMode::kRequire;
    // The server's watchdog, as main.cc runs it.
    std::thread([x] {
      while (true) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        x->rw.watch_all();
        x->ro.watch_all();
        x->tls_on.watch_all();
        x->tls_required.watch_all();
      }
    }).detach();
    return x;
  }();
  return *w;
}

// One io_context for the whole run, as in the server: sessions end (and are
// destroyed) on its thread while it is still alive.
asio::io_context& loop() {
  static asio::io_context* io = [] {
    auto* x = new asio::io_context;
    static auto guard = asio::make_work_guard(*x);
    std::thread([x] { x->run(); }).detach();
    return x;
  }();
  return *io;
}

size_t thread_count() {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
  return n;
}

// A Session of `info` serving one end of a socketpair; `client` is the
// other end.
struct Connection {
  const size_t threads_before = thread_count();
  int client = -1;
  std::promise<void> ended;
  std::weak_ptr<server::Session<Socket>> session;

  explicit Connection(server::ExportInfo& info) {
    Socket server_side(loop()), client_side(loop());
    asio::local::connect_pair(server_side, client_side);
    client = ::dup(client_side.native_handle());
    client_side.close();
    auto s = std::make_shared<server::Session<Socket>>(std::move(server_side), info);
    asio::co_spawn(s->strand(), [s]() -> asio::awaitable<void> { co_await s->run(); },
                   [this](std::exception_ptr) { ended.set_value(); });
    session = s;
  }
  // Waits for the session's end (the client has closed its side).
  ~Connection() {
    ended.get_future().wait();  // run() returned: every lane has finished its work
    ::close(client);
    // The lanes are detached threads that exit just after that; wait for
    // them, or libFuzzer's leak check would count their last buffers as
    // leaks.
    for (int i = 0; i < 2000 && thread_count() > threads_before; ++i) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
};

bool send_all(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t sent = ::send(fd, p, n, MSG_NOSIGNAL);
    if (sent < 0 && errno == EINTR) continue;  // libFuzzer's timer signal
    if (sent <= 0) return false;               // the server closed on us: allowed
    p += sent;
    n -= static_cast<size_t>(sent);
  }
  return true;
}

bool recv_all(int fd, void* data, size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t got = ::recv(fd, p, n, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    p += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

// Serves `input` as one client's bytes; returns everything the server sent.
// With `drain_at` below `size`, the session is drained (as on SIGTERM) once
// that many bytes have been sent.
std::string serve(server::ExportInfo& info, const uint8_t* input, size_t size,
                  size_t drain_at = SIZE_MAX) {
  Connection c(info);
  const int client = c.client;
  std::weak_ptr<server::Session<Socket>> weak = c.session;
  std::thread writer([&] {
    size_t done = 0;
    while (done < size) {
      if (done >= drain_at) {
        if (auto s = weak.lock()) s->drain();
        drain_at = SIZE_MAX;
      }
      const size_t until = std::min(size, drain_at);  // stop at the drain first
      const ssize_t n = ::send(client, input + done, until - done, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;  // libFuzzer's timer signal
      if (n <= 0) break;  // the server closed on us: allowed
      done += static_cast<size_t>(n);
    }
    ::shutdown(client, SHUT_WR);
  });
  std::string out;
  char buf[65536];
  while (true) {
    const ssize_t n = ::recv(client, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    if (out.size() < (1 << 20)) out.append(buf, static_cast<size_t>(n));
  }
  writer.join();
  return out;
}

void put(std::string& s, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) s.push_back(static_cast<char>(v >> (8 * i)));
}


// How many bytes of `p` are the client's flags and then whole options, up
// to and including the first STARTTLS; `starttls` says whether one came.
// (An option cut short, or too long to be read, ends the plaintext part:
// the server would wait for the rest of it; so does GO or EXPORT_NAME,
// after which a --tls=on server would take STARTTLS for a request.)
size_t plaintext_part(const uint8_t* p, size_t n, bool& starttls) {
  starttls = false;
  if (n < 4) return 0;
  size_t at = 4;
  while (n - at >= 16) {
    const char* head = reinterpret_cast<const char*>(p + at);
    const uint32_t option = nbd::get32(head + 8), len = nbd::get32(head + 12);
    if (len > server::Handshake::kMaxOptionBytes || n - at - 16 < len) break;
    if (option == nbd::kOptGo || option == nbd::kOptExportName) break;
    at += 16 + len;
    if (option == nbd::kOptStartTls && len == 0) {
      starttls = true;
      break;
    }
  }
  return at;
}

// A TLS client. Its plaintext: the input's flags and options up to its
// STARTTLS (one is added if it has none), then the rest of the input twice:
// once in plaintext right behind STARTTLS, in the same send (the injection
// of CVE-2021-3716), and once over TLS after the handshake. Properties:
// - before STARTTLS's ACK, under --tls=require, every option is refused
//   with TLS_REQD (ABORT is acknowledged);
// - once the ACK has come, the TLS handshake succeeds: the injected bytes
//   were dropped, not taken for the start of the client's handshake;
// - the session ends when the client goes away.
void serve_tls(server::ExportInfo& info, const uint8_t* input, size_t size) {
  bool has_starttls = false;
  const size_t head = plaintext_part(input, size, has_starttls);
  std::string plain(reinterpret_cast<const char*>(input), head);
  if (head < 4) {
    plain.clear();
    put(plain, nbd::kClientFixedNewstyle | nbd::kClientNoZeroes, 4);
  }
  if (!has_starttls) {
    put(plain, nbd::kIHaveOpt, 8);
    put(plain, nbd::kOptStartTls, 4);
    put(plain, 0, 4);
  }
  const uint8_t* after = input + head;
  const size_t after_size = size - head;
  plain.append(reinterpret_cast<const char*>(after), after_size);

  Connection c(info);
  const int fd = c.client;
  const bool sent = send_all(fd, plain.data(), plain.size());
  // The greeting, then option replies up to STARTTLS's ACK.
  bool acked = false;
  char greeting[18];
  if (sent && recv_all(fd, greeting, sizeof greeting)) {
    char reply[20];
    while (recv_all(fd, reply, sizeof reply)) {
      const uint32_t option = nbd::get32(reply + 8), type = nbd::get32(reply + 12);
      std::string body(nbd::get32(reply + 16), '\0');
      if (!recv_all(fd, body.data(), body.size())) break;
      if (option == nbd::kOptStartTls && type == nbd::kRepAck) {
        acked = true;
        break;
      }
      const bool allowed = type == nbd::kRepErrTlsReqd ||
                           (option == nbd::kOptAbort && type == nbd::kRepAck) ||
                           (option == nbd::kOptStartTls && type == nbd::kRepErrInvalid);
      if (info.tls == server::TlsMode::kRequire && !allowed) {
        die("an option was served before TLS under --tls=require");
      }
    }
  }
  if (!acked) {
    ::shutdown(fd, SHUT_WR);
    char drop[4096];
    while (true) {
      const ssize_t n = ::recv(fd, drop, sizeof drop, 0);
      if (n > 0 || (n < 0 && errno == EINTR)) continue;
      return;
    }
  }
  gnutls_session_t tls;
  gnutls_psk_client_credentials_t psk;
  gnutls_psk_allocate_client_credentials(&psk);
  const gnutls_datum_t key{const_cast<unsigned char*>(kPskKey), sizeof kPskKey};
  gnutls_psk_set_client_credentials(psk, kPskUser, &key, GNUTLS_PSK_KEY_RAW);
  gnutls_init(&tls, GNUTLS_CLIENT | GNUTLS_NO_SIGNAL);  // a server that closed: EPIPE
  gnutls_priority_set_direct(tls, "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK", nullptr);
  gnutls_credentials_set(tls, GNUTLS_CRD_PSK, psk);
  gnutls_transport_set_int(tls, fd);
  int rc;
  do {
    rc = gnutls_handshake(tls);
  } while (rc < 0 && gnutls_error_is_fatal(rc) == 0);
  // Over 64 KiB injected is a flood, which the server cuts off.
  const bool flood = after_size > 64 * 1024;
  if (rc < 0 && !flood) die("the TLS handshake failed after STARTTLS's ACK: injected bytes were used");
  if (rc < 0) {
    gnutls_deinit(tls);
    gnutls_psk_free_client_credentials(psk);
    ::shutdown(fd, SHUT_RDWR);
    return;
  }
  std::thread writer([&] {
    for (size_t done = 0; done < after_size;) {
      const ssize_t n = gnutls_record_send(tls, after + done, after_size - done);
      if (n == GNUTLS_E_INTERRUPTED || n == GNUTLS_E_AGAIN) continue;
      if (n <= 0) break;  // the server closed on us: allowed
      done += static_cast<size_t>(n);
    }
    (void)gnutls_bye(tls, GNUTLS_SHUT_WR);
  });
  char buf[65536];
  while (true) {
    const ssize_t n = gnutls_record_recv(tls, buf, sizeof buf);
    if (n == GNUTLS_E_INTERRUPTED || n == GNUTLS_E_AGAIN) continue;
    if (n <= 0) break;
  }
  writer.join();
  ::shutdown(fd, SHUT_RDWR);
  gnutls_deinit(tls);
  gnutls_psk_free_client_credentials(psk);
}

void request(std::string& s, uint16_t type, uint64_t cookie, uint64_t offset, uint32_t length) {
  put(s, nbd::kRequestMagic, 4);
  put(s, 0, 2);
  put(s, type, 2);
  put(s, cookie, 8);
  put(s, offset, 8);
  put(s, length, 4);
}

// An honest client: EXPORT_NAME "", then write, flush, read, disconnect.
// An honest client: writes and flushes on one connection; once that has
// been answered, reads the block back on another. (Pipelining the read
// behind the write would let the server run them in either order: NBD
// orders nothing between requests in flight, and this server's helper
// lanes do run them out of order.)
void witness(uint64_t n) {
  const uint64_t offset = (n % (kMainSize / kBlock)) * kBlock;
  std::string block(kBlock, '\0');
  for (size_t i = 0; i < block.size(); ++i) block[i] = static_cast<char>(n * 31 + i * 7);
  auto hello = [] {
    std::string s;
    put(s, nbd::kClientFixedNewstyle | nbd::kClientNoZeroes, 4);
    put(s, nbd::kIHaveOpt, 8);
    put(s, nbd::kOptExportName, 4);
    put(s, 0, 4);
    return s;
  };
  // Greeting (18) + export info (8 size + 2 flags), then the simple replies
  // of 16 bytes in any order, a read's followed by its data.
  constexpr size_t kHeader = 18 + 10;
  auto check = [](const std::string& r, uint64_t cookie, size_t at) {
    if (nbd::get32(r.data() + at) != nbd::kSimpleReplyMagic || nbd::get32(r.data() + at + 4) != 0 ||
        nbd::get64(r.data() + at + 8) > cookie) {
      die("the honest client's request failed");
    }
  };
  std::string s = hello();
  request(s, nbd::kCmdWrite, 1, offset, kBlock);
  s += block;
  request(s, nbd::kCmdFlush, 2, 0, 0);
  request(s, nbd::kCmdDisc, 3, 0, 0);
  std::string r = serve(world().rw, reinterpret_cast<const uint8_t*>(s.data()), s.size());
  if (r.size() != kHeader + 2 * 16) die("the honest client's write got a short answer");
  check(r, 2, kHeader);
  check(r, 2, kHeader + 16);
  if (nbd::get64(r.data() + kHeader + 8) == nbd::get64(r.data() + kHeader + 24)) {
    die("the honest client got one reply twice");
  }
  s = hello();
  request(s, nbd::kCmdRead, 4, offset, kBlock);
  request(s, nbd::kCmdDisc, 5, 0, 0);
  r = serve(world().rw, reinterpret_cast<const uint8_t*>(s.data()), s.size());
  if (r.size() != kHeader + 16 + kBlock) die("the honest client's read got a short answer");
  check(r, 4, kHeader);
  if (r.compare(kHeader + 16, kBlock, block) != 0) die("the honest client read other data");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static uint64_t runs = 0;
  World& w = world();
  // The first byte: bit 0 the read-only export, bit 1 a drain (as on
  // SIGTERM) half way through the rest; bit 2 a TLS client (serve_tls) on
  // a server with --tls=on, or with bit 3 too --tls=require.
  const uint8_t mode = size > 0 ? data[0] : 0;
  const size_t rest = size - (size > 0);
  const size_t drain_at = (mode & 2) ? rest / 2 : SIZE_MAX;
  if (mode & 4) {
    serve_tls((mode & 8) ? w.tls_required : w.tls_on, data + 1, rest);
  } else if (mode & 1) {
    const uint64_t before = w.main_mem->changes();
    serve(w.ro, data + 1, rest, drain_at);
    if (w.main_mem->changes() != before) die("a read-only export changed the disk");
  } else {
    serve(w.rw, data + (size > 0), rest, drain_at);
  }
  witness(++runs);
  return 0;
}
