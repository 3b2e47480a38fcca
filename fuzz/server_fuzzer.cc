// libFuzzer target: arbitrary bytes from a client of dmremap-server, through
// the protocol side of the server: the handshake (Handshake), validation and
// execution of commands (validate, refuse, execute) and reply encoding, on an
// engine in memory. No socket and no thread: each input runs in microseconds.
// session_fuzzer drives the same bytes through a whole Session (transport,
// lanes, outbox, drain) instead.
//
// Each input is what one client sends, from its first flags on, framed as a
// session frames it. Its first byte chooses:
// - bit 0: the read-only export (its own read-only engine) or the writable
//   one;
// - bit 1: a server shutting down after the first option (Handshake's own
//   shut_down(); requests with odd cookies then get ESHUTDOWN, as a session
//   answers those read after a drain began);
// - bits 2-7: a fault on main for this input (a read error, a weak block or
//   a write error on one of blocks 64-255; 0: none); their value modulo 3
//   is also the server's --tls: off, on or require. NBD_OPT_STARTTLS, once
//   acknowledged, stands for a TLS handshake that succeeds: the bytes after
//   it are the options and requests the client sends over TLS.
// The properties:
// - no crash, hang or unbounded allocation (the sanitizers and libFuzzer's
//   limits);
// - option replies: the magic, the option echoed, errors with the high bit,
//   INFO_EXPORT before a successful GO/INFO's ACK, context IDs 0 in LIST
//   and distinct non-zero ones in SET, EXPORT_NAME's reply length;
// - TLS: under require, no option but STARTTLS and ABORT is served before
//   STARTTLS (each gets TLS_REQD, or SHUTDOWN) and transmission never starts
//   without it; TLS_REQD never comes from a server without TLS or once TLS
//   is up; STARTTLS is acknowledged once at most, and forgets structured
//   replies and meta contexts;
// - every reply is well-formed: its request's cookie, an error NBD defines,
//   a simple reply's data only on success, structured chunks inside the
//   request, content chunks within the chunk size, DONE on the last chunk
//   only, error messages of at most 256 bytes of valid UTF-8; a successful
//   read is covered exactly by its data chunks, one at most under DF;
//   BLOCK_STATUS has one chunk per selected context, with its ID;
// - the data read is the data written: a model of main (bytes, and which of
//   them are known) is kept across inputs; trims and failed writes make
//   bytes unknown, unreadable blocks are skipped;
// - the read-only export never changes its main or spare;
// - afterwards an honest client still writes, flushes and reads back.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "commands.h"
#include "dmremap/engine.h"
#include "dmremap/faulty_device.h"
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
constexpr uint64_t kBlocks = kMainSize / kBlock;
constexpr uint64_t kFaultFirst = 64;  // blocks below are never faulty (the witness's)
// Requests served per input: enough for any sequence worth finding.
constexpr int kMaxRequests = 256;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "server_fuzzer: %s\n", what);
  std::abort();
}

struct Export {
  std::shared_ptr<MemoryDevice> main_mem, spare_mem;
  std::shared_ptr<FaultyDevice> main;
  std::unique_ptr<Engine> engine;
  ExportInfo info;
};

Export* make_export(bool read_only) {
  auto* x = new Export;
  x->main_mem = std::make_shared<MemoryDevice>(kMainSize, "main");
  x->spare_mem = std::make_shared<MemoryDevice>(2 << 20, "spare");
  x->main = std::make_shared<FaultyDevice>(x->main_mem, kBlock, "main");
  LayoutParams lp;
  lp.main_size = kMainSize;
  lp.block_size = kBlock;
  if (!MetadataStore::format(*x->spare_mem, lp, "").is_ok()) die("format failed");
  EngineOptions o;
  o.read_only = read_only;
  o.read_retries = 1;
  auto e = Engine::open(x->main, x->spare_mem, o);
  if (!e.is_ok()) die("open failed");
  x->engine = std::move(e.value());
  x->info.engine = x->engine.get();
  x->info.name = "disk";
  x->info.read_only = read_only;
  // Small chunks, so that splitting a structured read is always exercised.
  x->info.max_reply_chunk = 16 << 10;
  return x;
}

// What main should hold: bytes, and whether each is known. With the C
// library's bulk calls: loops over bytes here would cost more than the
// server's code under the fuzzer's instrumentation.
struct Model {
  std::vector<char> bytes = std::vector<char>(kMainSize, 0);
  std::vector<char> known = std::vector<char>(kMainSize, 1);
  void set(uint64_t off, uint64_t len, const char* data) {
    if (data) {
      std::memcpy(bytes.data() + off, data, len);
    } else {
      std::memset(bytes.data() + off, 0, len);
    }
    std::memset(known.data() + off, 1, len);
  }
  void forget(uint64_t off, uint64_t len) { std::memset(known.data() + off, 0, len); }
  void check(uint64_t off, const char* data, uint64_t len) const {
    const char* k = known.data() + off;
    for (uint64_t i = 0; i < len;) {
      // The next run of known bytes, compared at once.
      const void* gap = std::memchr(k + i, 0, len - i);
      const uint64_t end = gap ? static_cast<uint64_t>(static_cast<const char*>(gap) - k) : len;
      if (end > i && std::memcmp(bytes.data() + off + i, data + i, end - i) != 0) {
        die("a read returned other data");
      }
      if (!gap) return;
      const void* next = std::memchr(k + end, 1, len - end);
      if (!next) return;
      i = static_cast<uint64_t>(static_cast<const char*>(next) - k);
    }
  }
};

struct World {
  Export* rw = make_export(false);
  Export* ro = make_export(true);
  Model model;
};

World& world() {
  static World* w = [] {
    // DMREMAP_FUZZ_LOG=1 shows the server's log, to study a finding.
    if (std::getenv("DMREMAP_FUZZ_LOG")) {
      set_log_debug(true);
    } else {
      set_log_sink([](LogLevel, const std::string&) {});
    }
    return new World;
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

// The option replies in `out`, checked.
void check_option_replies(uint32_t option, const std::string& out, Handshake::Outcome next,
                          bool no_zeroes) {
  if (option == nbd::kOptExportName && next == Handshake::Outcome::kTransmit) {
    if (out.size() != (no_zeroes ? 10u : 134u)) die("EXPORT_NAME: bad reply length");
    return;
  }
  bool saw_export = false, acked = false;
  std::set<uint32_t> ids;
  for (size_t at = 0; at < out.size();) {
    if (acked) die("an option reply after ACK");
    if (out.size() - at < 20 || nbd::get64(out.data() + at) != nbd::kOptReplyMagic) {
      die("option reply: bad header");
    }
    if (nbd::get32(out.data() + at + 8) != option) die("option reply: another option");
    const uint32_t type = nbd::get32(out.data() + at + 12);
    const uint32_t len = nbd::get32(out.data() + at + 16);
    if (out.size() - at - 20 < len) die("option reply: longer than what was sent");
    const char* body = out.data() + at + 20;
    if (type & 0x80000000) {
      if (len > 256 || !valid_utf8(std::string_view(body, len))) die("option error message");
      if (at + 20 + len != out.size()) die("an option reply after an error");
    } else if (type == nbd::kRepAck) {
      acked = true;
    } else if (type == nbd::kRepInfo) {
      if (len < 2) die("INFO: short");
      if (nbd::get16(body) == nbd::kInfoExport) {
        if (len != 12) die("INFO_EXPORT: bad length");
        saw_export = true;
      }
    } else if (type == nbd::kRepMetaContext) {
      if (len < 5) die("META_CONTEXT: short");
      const uint32_t id = nbd::get32(body);
      if (option == nbd::kOptListMetaContext && id != 0) die("LIST: a context ID that is not 0");
      if (option == nbd::kOptSetMetaContext && (id == 0 || !ids.insert(id).second)) {
        die("SET: a context ID that is 0 or twice");
      }
    }
    at += 20 + len;
  }
  if ((option == nbd::kOptGo || option == nbd::kOptInfo) && acked && !saw_export) {
    die("GO/INFO acknowledged without INFO_EXPORT");
  }
  if (next == Handshake::Outcome::kTransmit && !acked) die("transmission without ACK");
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

// Checks one reply against its request, and a read's data against the
// model; returns the NBD error (0 for success).
uint32_t check_reply(const nbd::Request& r, const Negotiated& n, const ExportInfo& info,
                     const std::string& w, const Model* model) {
  if (w.size() >= 4 && nbd::get32(w.data()) == nbd::kSimpleReplyMagic) {
    if (w.size() < 16 || nbd::get64(w.data() + 8) != r.cookie) die("simple reply: bad cookie");
    const uint32_t err = nbd::get32(w.data() + 4);
    if (err != 0 && !defined_error(err)) die("simple reply: an error NBD does not define");
    if (r.type == nbd::kCmdRead && n.structured) die("a READ got a simple reply");
    if (r.type == nbd::kCmdBlockStatus && err == 0) die("BLOCK_STATUS data in a simple reply");
    const size_t data = r.type == nbd::kCmdRead && err == 0 ? r.length : 0;
    if (w.size() != 16 + data) die("simple reply: wrong length");
    if (data > 0 && model) model->check(r.offset, w.data() + 16, r.length);
    return err;
  }
  if (!n.structured) die("a structured reply that was not negotiated");
  size_t at = 0;
  bool done = false;
  uint32_t error = 0;
  uint64_t covered = 0;
  int content = 0;
  std::vector<uint32_t> contexts;
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
        if (len - 8 > info.max_reply_chunk) die("OFFSET_DATA: over the chunk size");
        if (off < r.offset || off + (len - 8) > r.offset + r.length) die("OFFSET_DATA: outside");
        if (model) model->check(off, body + 8, len - 8);
        covered += len - 8;
        ++content;
        break;
      }
      case nbd::kChunkBlockStatus: {
        if (r.type != nbd::kCmdBlockStatus || len < 12 || (len - 4) % 8 != 0) {
          die("BLOCK_STATUS: bad");
        }
        if ((r.flags & nbd::kCmdFlagReqOne) && len != 12) die("REQ_ONE: more than one extent");
        contexts.push_back(nbd::get32(body));
        for (uint32_t i = 4; i < len; i += 8) {
          if (nbd::get32(body + i) == 0) die("BLOCK_STATUS: an empty descriptor");
        }
        break;
      }
      case nbd::kChunkError:
      case nbd::kChunkErrorOffset: {
        if (len < 6) die("error chunk: short");
        error = nbd::get32(body);
        if (!defined_error(error)) die("error chunk: an error NBD does not define");
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
  if (r.type == nbd::kCmdRead) {
    if ((r.flags & nbd::kCmdFlagDf) && content > 1) die("DF: more than one content chunk");
    if (error == 0 && covered != r.length) die("a read not covered by its data");
  }
  if (r.type == nbd::kCmdBlockStatus && error == 0) {
    std::vector<uint32_t> want;
    if (n.allocation) want.push_back(nbd::kContextAllocation);
    if (n.remapped) want.push_back(nbd::kContextRemapped);
    if (contexts != want) die("BLOCK_STATUS: not one chunk per selected context");
  }
  return error;
}

// What a request did to main, in the model.
void update_model(Model& m, const nbd::Request& r, const Buffer& payload, uint32_t error) {
  const bool changes = r.type == nbd::kCmdWrite || r.type == nbd::kCmdWriteZeroes ||
                       r.type == nbd::kCmdTrim;
  if (!changes || r.length == 0) return;
  if (error != 0 || r.type == nbd::kCmdTrim) {
    // A failed write may have changed part of the range; a trim may or may
    // not read back as zeros.
    if (!(r.type == nbd::kCmdWriteZeroes && error == nbd::kEnotsup)) m.forget(r.offset, r.length);
    return;
  }
  m.set(r.offset, r.length, r.type == nbd::kCmdWrite ? payload.bytes.get() : nullptr);
}

// The TLS rules of an option's answer (see the header). `hs` has answered.
void check_tls_rules(const ExportInfo& info, uint32_t option, const std::string& out,
                     Handshake::Outcome next, const Handshake& hs) {
  const uint32_t type = out.size() >= 20 ? nbd::get32(out.data() + 12) : 0;
  const bool tls_was_up = hs.tls_active() && next != Handshake::Outcome::kStartTls;
  if (type == nbd::kRepErrTlsReqd && (info.tls != TlsMode::kRequire || tls_was_up)) {
    die("TLS_REQD without FORCEDTLS, or once TLS is up");
  }
  if (info.tls == TlsMode::kRequire && !hs.tls_active()) {
    if (next == Handshake::Outcome::kTransmit) die("transmission without TLS under require");
    const bool may_serve = option == nbd::kOptStartTls || option == nbd::kOptAbort ||
                           option == nbd::kOptExportName;
    if (!may_serve && type != nbd::kRepErrTlsReqd && type != nbd::kRepErrShutdown) {
      die("an option served before TLS under require");
    }
  }
  if (next == Handshake::Outcome::kStartTls) {
    if (info.tls == TlsMode::kOff) die("STARTTLS acknowledged without TLS");
    if (out.size() != 20 || type != nbd::kRepAck) die("STARTTLS: not one ACK");
    const Negotiated& n = hs.negotiated();
    if (n.structured || n.allocation || n.remapped || n.copied) {
      die("STARTTLS kept what was negotiated in plaintext");
    }
  }
  if (option == nbd::kOptStartTls && tls_was_up && type != nbd::kRepErrInvalid &&
      type != nbd::kRepErrShutdown && type != nbd::kRepErrTooBig) {
    die("a second STARTTLS was not refused as invalid");
  }
}

// Serves `in` as one client's bytes, as a session would.
void serve(const ExportInfo& info, Input in, bool shutting_down, Model* model) {
  Handshake hs(info);
  uint8_t flags[4];
  if (!in.take(flags, 4)) return;
  const uint32_t client_flags = nbd::get32(reinterpret_cast<char*>(flags));
  if (!hs.client_flags(client_flags)) return;
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
    check_option_replies(option, out, next, client_flags & nbd::kClientNoZeroes);
    check_tls_rules(info, option, out, next, hs);
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
    const uint32_t error = check_reply(r, n, info, wire(reply), model);
    if (model && v.error == 0) update_model(*model, r, payload, error);
  }
}

// This input's fault on main (see the header), on a block the witness never
// uses.
void set_fault(FaultyDevice& main, uint8_t selector) {
  main.clear_faults();
  if (selector == 0) return;
  const uint64_t block = kFaultFirst + (selector * 37u) % (kBlocks - kFaultFirst);
  switch (selector % 3) {
    case 0: main.add_read_error(block); break;
    case 1: main.add_weak_block(block, 1); break;
    case 2: main.add_write_error(block); break;
  }
}

// An honest client: write, flush, read back, on a block that is never faulty.
void witness(uint64_t n) {
  World& w = world();
  const ExportInfo& info = w.rw->info;
  Negotiated neg;
  const uint64_t offset = (n % kFaultFirst) * kBlock;
  Buffer block(kBlock);
  for (size_t i = 0; i < kBlock; ++i) block.data()[i] = static_cast<char>(n * 31 + i * 7);
  const std::string want(block.data(), kBlock);
  nbd::Request r{0, nbd::kCmdWrite, 1, offset, kBlock};
  if (validate(r, neg, info).error != 0) die("the honest write was refused");
  std::string got = wire(execute(r, block, neg, info));
  if (nbd::get32(got.data() + 4) != 0) die("the honest write failed");
  w.model.set(offset, kBlock, want.data());
  Buffer none;
  r = {0, nbd::kCmdFlush, 2, 0, 0};
  got = wire(execute(r, none, neg, info));
  if (nbd::get32(got.data() + 4) != 0) die("the honest flush failed");
  r = {0, nbd::kCmdRead, 3, offset, kBlock};
  got = wire(execute(r, none, neg, info));
  if (got.size() != 16 + kBlock || nbd::get32(got.data() + 4) != 0 || got.substr(16) != want) {
    die("the honest client read other data");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static uint64_t runs = 0;
  World& w = world();
  const uint8_t mode = size > 0 ? data[0] : 0;
  const bool shutting_down = mode & 2;
  Input in{data + (size > 0), size - (size > 0)};
  constexpr TlsMode kTls[] = {TlsMode::kOff, TlsMode::kOn, TlsMode::kRequire};
  w.ro->info.tls = w.rw->info.tls = kTls[(mode >> 2) % 3];
  if (mode & 1) {
    const uint64_t main_before = w.ro->main_mem->changes();
    const uint64_t spare_before = w.ro->spare_mem->changes();
    serve(w.ro->info, in, shutting_down, nullptr);
    if (w.ro->main_mem->changes() != main_before || w.ro->spare_mem->changes() != spare_before) {
      die("a read-only export changed a disk");
    }
  } else {
    set_fault(*w.rw->main, static_cast<uint8_t>(mode >> 2));
    serve(w.rw->info, in, shutting_down, &w.model);
    w.rw->main->clear_faults();
  }
  witness(++runs);
  return 0;
}
