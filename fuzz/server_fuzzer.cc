// libFuzzer target: arbitrary bytes from a client of dmremap-server, through
// the protocol side of the server: the handshake (Handshake), validation and
// execution of commands (validate, refuse, execute) and reply encoding, on an
// engine in memory. No socket and no thread: each input runs in a few
// microseconds. session_fuzzer drives the same bytes through a whole Session
// (transport, lanes) instead.
//
// Each input is what one client sends, from its first flags on; its first
// byte chooses the writable (bit 0 clear) or read-only export, and with bit 1
// a server that is shutting down (after the first option). The bytes are
// framed as a real session frames them. The properties:
// - no crash, hang or unbounded allocation (the sanitizers and libFuzzer's
//   limits);
// - every reply is well-formed: the cookie of its request, an error the
//   protocol defines, a simple reply's data only on success, structured
//   chunks that stay inside the request, content chunks within the maximum
//   payload, a DONE flag on the last chunk only, and error messages of at
//   most 256 bytes of valid UTF-8;
// - a read-only export never changes the disk;
// - afterwards an honest client still writes, flushes and reads back.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "commands.h"
#include "dmremap/engine.h"
#include "dmremap/log.h"
#include "dmremap/memory_device.h"
#include "dmremap/metadata_store.h"
#include "handshake.h"
#include "protocol.h"
#include "replies.h"

using namespace dmremap;
using namespace dmremap::server;

namespace {

constexpr uint64_t kMainSize = 1 << 20;
constexpr uint32_t kBlock = 4096;
// Requests served per input: enough for any sequence worth finding.
constexpr int kMaxRequests = 256;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "server_fuzzer: %s\n", what);
  std::abort();
}

struct World {
  std::shared_ptr<MemoryDevice> main;
  std::unique_ptr<Engine> engine;
  ExportInfo rw, ro;
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
      info->name = "disk";
    }
    x->ro.read_only = true;
    return x;
  }();
  return *w;
}

// The client's bytes, consumed in order.
struct Input {
  const uint8_t* p;
  size_t left;
  bool take(void* out, size_t n) {
    if (left < n) return false;
    std::memcpy(out, p, n);
    p += n;
    left -= n;
    return true;
  }
  bool skip(size_t n) {
    if (left < n) return false;
    p += n;
    left -= n;
    return true;
  }
};

bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size() || c == 0) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
    }
    i += n;
  }
  return true;
}

bool defined_error(uint32_t e) {
  return e == 1 || e == 5 || e == 12 || e == 22 || e == 28 || e == 75 || e == 95 || e == 108;
}

// The wire bytes of a reply, as send_replies() puts them together.
std::string wire(const Reply& r) {
  if (r.pieces.empty()) return std::string(r.meta.begin(), r.meta.end());
  std::string out;
  for (const auto& p : r.pieces) {
    const char* base = p.in_data ? r.data.bytes.get() : r.meta.data();
    if (p.offset + static_cast<uint64_t>(p.length) > (p.in_data ? r.data.size : r.meta.size())) {
      die("a reply piece lies outside its buffer");
    }
    out.append(base + p.offset, p.length);
  }
  return out;
}

// Checks one reply against its request.
void check_reply(const nbd::Request& r, const Negotiated& n, const std::string& w) {
  if (w.size() >= 4 && nbd::get32(w.data()) == nbd::kSimpleReplyMagic) {
    if (w.size() < 16 || nbd::get64(w.data() + 8) != r.cookie) die("simple reply: bad cookie");
    const uint32_t err = nbd::get32(w.data() + 4);
    if (err != 0 && !defined_error(err)) die("simple reply: an error NBD does not define");
    if (r.type == nbd::kCmdRead && n.structured) die("a READ got a simple reply");
    if (r.type == nbd::kCmdBlockStatus && err == 0) die("BLOCK_STATUS data in a simple reply");
    const size_t data = r.type == nbd::kCmdRead && err == 0 ? r.length : 0;
    if (w.size() != 16 + data) die("simple reply: wrong length");
    return;
  }
  if (!n.structured) die("a structured reply that was not negotiated");
  size_t at = 0;
  bool done = false;
  while (at < w.size()) {
    if (done) die("a chunk after DONE");
    if (w.size() - at < 20 || nbd::get32(w.data() + at) != nbd::kStructuredReplyMagic) {
      die("structured reply: bad chunk header");
    }
    const uint16_t flags = nbd::get16(w.data() + at + 4);
    const uint16_t type = nbd::get16(w.data() + at + 6);
    const uint32_t len = nbd::get32(w.data() + at + 16);
    if (nbd::get64(w.data() + at + 8) != r.cookie) die("chunk: bad cookie");
    if (w.size() - at - 20 < len) die("chunk: longer than the reply");
    const char* body = w.data() + at + 20;
    done = flags & nbd::kReplyFlagDone;
    switch (type) {
      case nbd::kChunkNone:
        if (len != 0 || !done) die("NONE chunk: bad");
        break;
      case nbd::kChunkOffsetData: {
        if (r.type != nbd::kCmdRead || len < 9) die("OFFSET_DATA: bad");
        const uint64_t off = nbd::get64(body);
        if (len - 8 > kMaxPayload) die("OFFSET_DATA: over the maximum payload");
        if (off < r.offset || off + (len - 8) > r.offset + r.length) die("OFFSET_DATA: outside");
        break;
      }
      case nbd::kChunkBlockStatus:
        if (r.type != nbd::kCmdBlockStatus || len < 4 || (len - 4) % 8 != 0) die("BLOCK_STATUS: bad");
        if ((r.flags & nbd::kCmdFlagReqOne) && len != 12) die("REQ_ONE: more than one extent");
        break;
      case nbd::kChunkError:
      case nbd::kChunkErrorOffset: {
        if (len < 6) die("error chunk: short");
        if (!defined_error(nbd::get32(body))) die("error chunk: an error NBD does not define");
        const uint16_t mlen = nbd::get16(body + 4);
        const uint32_t want = 6u + mlen + (type == nbd::kChunkErrorOffset ? 8 : 0);
        if (len != want) die("error chunk: bad length");
        if (mlen > 256 || !valid_utf8(std::string_view(body + 6, mlen))) die("error message");
        if (type == nbd::kChunkErrorOffset) {
          const uint64_t off = nbd::get64(body + 6 + mlen);
          if (off < r.offset || off >= r.offset + r.length) die("ERROR_OFFSET: outside");
        }
        break;
      }
      default: die("chunk: unknown type");
    }
    at += 20 + len;
  }
  if (!done) die("structured reply without DONE");
}

// Serves `in` as one client's bytes, as a session would.
void serve(const ExportInfo& info, Input in, bool shutting_down) {
  Handshake hs(info);
  uint8_t flags[4];
  if (!in.take(flags, 4) || !hs.client_flags(nbd::get32(reinterpret_cast<char*>(flags)))) return;
  std::string out;
  while (true) {
    char head[16];
    if (!in.take(head, sizeof head)) return;
    if (nbd::get64(head) != nbd::kIHaveOpt) return;
    const uint32_t option = nbd::get32(head + 8);
    const uint32_t length = nbd::get32(head + 12);
    out.clear();
    Handshake::Outcome next;
    if (length > Handshake::kMaxOptionBytes) {
      next = hs.oversized(option, length, out);
      if (next != Handshake::Outcome::kEnd && !in.skip(length)) return;
    } else {
      if (in.left < length) return;
      next = hs.option(option, std::string_view(reinterpret_cast<const char*>(in.p), length), out);
      in.skip(length);
    }
    if (next == Handshake::Outcome::kEnd) return;
    if (next == Handshake::Outcome::kTransmit) break;
    if (shutting_down) hs.shut_down();
  }
  const Negotiated& n = hs.negotiated();
  for (int i = 0; i < kMaxRequests; ++i) {
    char head[nbd::kRequestBytes];
    if (!in.take(head, sizeof head) || nbd::get32(head) != nbd::kRequestMagic) return;
    const nbd::Request r = nbd::parse_request(head);
    if (r.type == nbd::kCmdDisc) return;
    Buffer payload;
    if (r.type == nbd::kCmdWrite) {
      if (r.length > info.accept_request || in.left < r.length) return;
      payload = Buffer(r.length);
      in.take(payload.data(), r.length);
    }
    Verdict v = validate(r, n, info);
    if (shutting_down && v.error == 0 && (r.cookie & 1)) v = {nbd::kEshutdown, "shutting down"};
    const Reply reply = v.error != 0 ? refuse(r, v, n) : execute(r, payload, n, info);
    check_reply(r, n, wire(reply));
  }
}


// An honest client: write, flush, read back.
void witness(uint64_t n) {
  World& w = world();
  Negotiated neg;
  const uint64_t offset = (n % (kMainSize / kBlock)) * kBlock;
  Buffer block(kBlock);
  for (size_t i = 0; i < kBlock; ++i) block.data()[i] = static_cast<char>(n * 31 + i * 7);
  const std::string want(block.data(), kBlock);
  nbd::Request r{0, nbd::kCmdWrite, 1, offset, kBlock};
  if (validate(r, neg, w.rw).error != 0) die("the honest write was refused");
  std::string got = wire(execute(r, block, neg, w.rw));
  if (nbd::get32(got.data() + 4) != 0) die("the honest write failed");
  Buffer none;
  r = {0, nbd::kCmdFlush, 2, 0, 0};
  got = wire(execute(r, none, neg, w.rw));
  if (nbd::get32(got.data() + 4) != 0) die("the honest flush failed");
  r = {0, nbd::kCmdRead, 3, offset, kBlock};
  got = wire(execute(r, none, neg, w.rw));
  if (got.size() != 16 + kBlock || nbd::get32(got.data() + 4) != 0 || got.substr(16) != want) {
    die("the honest client read other data");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static uint64_t runs = 0;
  World& w = world();
  const bool read_only = size > 0 && (data[0] & 1);
  const bool shutting_down = size > 0 && (data[0] & 2);
  Input in{data + (size > 0), size - (size > 0)};
  if (read_only) {
    const uint64_t before = w.main->changes();
    serve(w.ro, in, shutting_down);
    if (w.main->changes() != before) die("a read-only export changed the disk");
  } else {
    serve(w.rw, in, shutting_down);
  }
  witness(++runs);
  return 0;
}
