// libFuzzer target: arbitrary bytes from a client of dmremap-server, through
// a whole Session: handshake I/O, lanes, read-ahead, in-flight budget and
// replies on a socket. Slower than server_fuzzer (one session, with its
// threads, per input); they share the seed corpus fuzz/corpus/server.
//
// Each input is what one client sends, from the first byte of the handshake
// on. A real Session (the server's own code) serves it over a socketpair on
// an engine in memory, while this side reads and drops every reply; the
// input's end is the client closing its side. The properties:
// - the server never crashes, hangs or allocates without bound (libFuzzer's
//   -timeout, -rss_limit_mb and -malloc_limit_mb, and the sanitizers);
// - the session ends when the client goes away, whatever it sent;
// - on a read-only export (chosen by the input's first byte) the disk is
//   never changed;
// - afterwards an honest client on another connection still writes, flushes
//   and reads back its data.
#include <utility>  // before Asio, for Boost 1.74

#include <boost/asio.hpp>
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
#include "dmremap/log.h"
#include "dmremap/memory_device.h"
#include "dmremap/metadata_store.h"
#include "protocol.h"
#include "session.h"

using namespace dmremap;
namespace asio = boost::asio;
using Socket = asio::local::stream_protocol::socket;

namespace {

constexpr uint64_t kMainSize = 4 << 20;
constexpr uint32_t kBlock = 4096;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "session_fuzzer: %s\n", what);
  std::abort();
}

struct World {
  std::shared_ptr<MemoryDevice> main;
  std::unique_ptr<Engine> engine;
  server::ExportInfo rw, ro;
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
    x->main = std::make_shared<MemoryDevice>(kMainSize, "main");
    auto spare = std::make_shared<MemoryDevice>(2 << 20, "spare");
    LayoutParams lp;
    lp.main_size = kMainSize;
    lp.block_size = kBlock;
    if (!MetadataStore::format(*spare, lp, "").is_ok()) die("format failed");
    auto e = Engine::open(x->main, spare, {});
    if (!e.is_ok()) die("open failed");
    x->engine = std::move(e.value());
    for (auto* info : {&x->rw, &x->ro}) {
      info->engine = x->engine.get();
      info->max_lanes = 4;
      info->max_in_flight_bytes = 32 << 20;
      info->handshake_timeout = std::chrono::milliseconds(5000);
    }
    x->ro.read_only = true;
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

// Serves `input` as one client's bytes; returns everything the server sent.
std::string serve(server::ExportInfo& info, const uint8_t* input, size_t size) {
  const size_t threads_before = thread_count();
  Socket server_side(loop()), client_side(loop());
  asio::local::connect_pair(server_side, client_side);
  const int client = ::dup(client_side.native_handle());
  client_side.close();
  std::promise<void> ended;
  auto session = std::make_shared<server::Session<Socket>>(std::move(server_side), info);
  asio::co_spawn(session->strand(),
                 [session]() -> asio::awaitable<void> { co_await session->run(); },
                 [&ended](std::exception_ptr) { ended.set_value(); });
  session.reset();
  std::thread writer([&] {
    size_t done = 0;
    while (done < size) {
      const ssize_t n = ::send(client, input + done, size - done, MSG_NOSIGNAL);
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
  ended.get_future().wait();  // run() returned: every lane has finished its work
  ::close(client);
  // The lanes are detached threads that exit just after that; wait for them,
  // or libFuzzer's leak check would count their last buffers as leaks.
  for (int i = 0; i < 2000 && thread_count() > threads_before; ++i) {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  return out;
}

void put(std::string& s, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) s.push_back(static_cast<char>(v >> (8 * i)));
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
void witness(uint64_t n) {
  const uint64_t offset = (n % (kMainSize / kBlock)) * kBlock;
  std::string block(kBlock, '\0');
  for (size_t i = 0; i < block.size(); ++i) block[i] = static_cast<char>(n * 31 + i * 7);
  std::string s;
  put(s, nbd::kClientFixedNewstyle | nbd::kClientNoZeroes, 4);
  put(s, nbd::kIHaveOpt, 8);
  put(s, nbd::kOptExportName, 4);
  put(s, 0, 4);
  request(s, nbd::kCmdWrite, 1, offset, kBlock);
  s += block;
  request(s, nbd::kCmdFlush, 2, 0, 0);
  request(s, nbd::kCmdRead, 3, offset, kBlock);
  request(s, nbd::kCmdDisc, 4, 0, 0);
  const std::string r = serve(world().rw, reinterpret_cast<const uint8_t*>(s.data()), s.size());
  // Greeting (18) + export info (8 size + 2 flags), then three simple
  // replies of 16 bytes in any order, the read's followed by its data.
  size_t at = 18 + 10;
  if (r.size() != at + 3 * 16 + kBlock) {
    std::fprintf(stderr, "session_fuzzer: the honest client got %zu bytes, not %zu\n", r.size(),
                 at + 3 * 16 + kBlock);
    die("the honest client got a short answer");
  }
  unsigned seen = 0;
  for (int k = 0; k < 3; ++k) {
    const char* h = r.data() + at;
    const uint64_t cookie = nbd::get64(h + 8);
    if (nbd::get32(h) != nbd::kSimpleReplyMagic || nbd::get32(h + 4) != 0 || cookie < 1 ||
        cookie > 3 || (seen & (1u << cookie))) {
      die("the honest client's request failed");
    }
    seen |= 1u << cookie;
    at += 16;
    if (cookie == 3) {
      if (r.compare(at, kBlock, block) != 0) die("the honest client read other data");
      at += kBlock;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static uint64_t runs = 0;
  World& w = world();
  const bool read_only = size > 0 && (data[0] & 1);
  if (read_only) {
    const std::vector<char> before = w.main->contents();
    serve(w.ro, data + 1, size - 1);
    if (w.main->contents() != before) die("a read-only export changed the disk");
  } else {
    serve(w.rw, data + (size > 0), size - (size > 0));
  }
  witness(++runs);
  return 0;
}
