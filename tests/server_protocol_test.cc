// dmremap-server's protocol side on its own, without a socket: the handshake
// (Handshake), command validation and execution, reply encoding, and lib's
// errno table that both frontends answer with. Each case names the rule of
// the NBD protocol (NetworkBlockDevice/nbd doc/proto.md) it checks; the same
// rules are checked end to end, on both frontends, by e2e conformance_test.
#include <catch2/catch.hpp>
#include <cerrno>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "commands.h"
#include "dmremap/export.h"
#include "dmremap/memory_device.h"
#include "dmremap/metadata_store.h"
#include "handshake.h"
#include "protocol.h"
#include "replies.h"
#include "test_util.h"

using namespace dmremap;
using namespace dmremap::server;

namespace {

// The option replies in `out`: (type, data) in order.
std::vector<std::pair<uint32_t, std::string>> option_replies(const std::string& out,
                                                              uint32_t option) {
  std::vector<std::pair<uint32_t, std::string>> replies;
  for (size_t at = 0; at < out.size();) {
    REQUIRE(out.size() - at >= 20);
    REQUIRE(nbd::get64(out.data() + at) == nbd::kOptReplyMagic);
    REQUIRE(nbd::get32(out.data() + at + 8) == option);
    const uint32_t len = nbd::get32(out.data() + at + 16);
    REQUIRE(out.size() - at - 20 >= len);
    replies.emplace_back(nbd::get32(out.data() + at + 12), out.substr(at + 20, len));
    at += 20 + len;
  }
  return replies;
}

std::string be32(uint32_t v) {
  char b[4];
  nbd::put32(b, v);
  return std::string(b, 4);
}

std::string meta_request(const std::vector<std::string>& queries, const std::string& name = "") {
  std::string s = be32(static_cast<uint32_t>(name.size())) + name +
                  be32(static_cast<uint32_t>(queries.size()));
  for (const auto& q : queries) s += be32(static_cast<uint32_t>(q.size())) + q;
  return s;
}

std::string go_request(const std::string& name) {
  return be32(static_cast<uint32_t>(name.size())) + name + std::string(2, '\0');
}

struct Fixture {
  test::Set set = test::make_set({.main_size = 1 << 20, .spare_size = 1 << 20});
  ExportInfo info;
  Fixture() {
    info.engine = set.engine.get();
    info.name = "disk";
  }
};

// The wire bytes of a reply, as the session sends them.
std::string wire(const Reply& r) {
  if (r.pieces.empty()) return std::string(r.meta.begin(), r.meta.end());
  std::string out;
  for (const auto& p : r.pieces) {
    out.append((p.in_data ? r.data.bytes.get() : r.meta.data()) + p.offset, p.length);
  }
  return out;
}

// A device whose reads throw once armed: the worst a backend can do.
class ThrowingDevice final : public BlockDevice {
 public:
  explicit ThrowingDevice(std::shared_ptr<BlockDevice> inner)
      : BlockDevice("main"), inner_(std::move(inner)) {}
  uint64_t size() const override { return inner_->size(); }
  bool armed = false;

 protected:
  Status do_read(void* buf, size_t len, uint64_t offset) override {
    if (armed) throw std::runtime_error("the backend threw");
    return inner_->read(buf, len, offset);
  }
  Status do_write(const void* buf, size_t len, uint64_t offset) override {
    return inner_->write(buf, len, offset);
  }
  Status do_flush() override { return inner_->flush(); }

 private:
  std::shared_ptr<BlockDevice> inner_;
};

}  // namespace

TEST_CASE("handshake: the greeting and a fixed-newstyle client", "[server][handshake]") {
  Fixture f;
  const std::string hello = Handshake::greeting();
  REQUIRE(hello.size() == 18);
  CHECK(nbd::get64(hello.data()) == nbd::kNbdMagic);
  CHECK(nbd::get64(hello.data() + 8) == nbd::kIHaveOpt);
  Handshake ok(f.info);
  CHECK(ok.client_flags(nbd::kClientFixedNewstyle | nbd::kClientNoZeroes));
  Handshake old(f.info);
  CHECK_FALSE(old.client_flags(0));  // oldstyle-compatible newstyle: refused
  Handshake unknown(f.info);
  CHECK_FALSE(unknown.client_flags(nbd::kClientFixedNewstyle | 0x80));
}

TEST_CASE("handshake: an unknown export is refused with a short, valid message",
          "[server][handshake]") {
  // Conventions: strings SHOULD be at most 256 bytes of UTF-8; the client's
  // name is not echoed back whole.
  Fixture f;
  Handshake h(f.info);
  REQUIRE(h.client_flags(nbd::kClientFixedNewstyle));
  std::string name;
  for (int i = 0; i < 30000; ++i) name += "\xc3\xa9";  // é
  name += '\xc3';                                        // cut in the middle
  std::string out;
  CHECK(h.option(nbd::kOptGo, go_request(name), out) == Handshake::Outcome::kMore);
  const auto replies = option_replies(out, nbd::kOptGo);
  REQUIRE(replies.size() == 1);
  CHECK(replies[0].first == nbd::kRepErrUnknown);
  CHECK(replies[0].second.size() <= 256);
  CHECK(wire_message(replies[0].second) == replies[0].second);  // already valid UTF-8
  // EXPORT_NAME has no error reply: the connection ends.
  out.clear();
  CHECK(h.option(nbd::kOptExportName, "other", out) == Handshake::Outcome::kEnd);
  CHECK(out.empty());
  // The export's own name, and "", are served.
  out.clear();
  CHECK(h.option(nbd::kOptGo, go_request("disk"), out) == Handshake::Outcome::kTransmit);
  CHECK(option_replies(out, nbd::kOptGo).back().first == nbd::kRepAck);
}

TEST_CASE("handshake: an oversize option gets TOO_BIG and the handshake goes on",
          "[server][handshake]") {
  Fixture f;
  Handshake h(f.info);
  REQUIRE(h.client_flags(nbd::kClientFixedNewstyle));
  std::string out;
  CHECK(h.oversized(nbd::kOptGo, 1 << 20, out) == Handshake::Outcome::kMore);
  CHECK(option_replies(out, nbd::kOptGo)[0].first == nbd::kRepErrTooBig);
  out.clear();
  CHECK(h.oversized(nbd::kOptExportName, 1 << 20, out) == Handshake::Outcome::kEnd);
}

TEST_CASE("handshake: meta contexts, their IDs and names", "[server][handshake]") {
  Fixture f;
  Handshake h(f.info);
  REQUIRE(h.client_flags(nbd::kClientFixedNewstyle));
  std::string out;
  SECTION("LIST replies carry context ID 0, and list x-dmremap:remapped") {
    h.option(nbd::kOptListMetaContext, meta_request({}), out);
    const auto replies = option_replies(out, nbd::kOptListMetaContext);
    REQUIRE(replies.size() == 3);
    CHECK(replies[0].second == be32(0) + "base:allocation");
    CHECK(replies[1].second == be32(0) + "x-dmremap:remapped");
    CHECK(replies[2].first == nbd::kRepAck);
  }
  SECTION("SET before structured replies is invalid") {
    h.option(nbd::kOptSetMetaContext, meta_request({"base:allocation"}), out);
    CHECK(option_replies(out, nbd::kOptSetMetaContext)[0].first == nbd::kRepErrInvalid);
    CHECK_FALSE(h.negotiated().allocation);
  }
  SECTION("a failed SET replaces the selection") {
    h.option(nbd::kOptStructuredReply, "", out);
    out.clear();
    h.option(nbd::kOptSetMetaContext, meta_request({"base:allocation", "dmremap:remapped"}), out);
    const auto replies = option_replies(out, nbd::kOptSetMetaContext);
    REQUIRE(replies.size() == 3);
    CHECK(replies[0].second == be32(nbd::kContextAllocation) + "base:allocation");
    CHECK(replies[1].second == be32(nbd::kContextRemapped) + "dmremap:remapped");  // old name
    CHECK(h.negotiated().allocation);
    CHECK(h.negotiated().remapped);
    out.clear();
    h.option(nbd::kOptSetMetaContext, meta_request({"base:allocation"}, "nosuch"), out);
    CHECK(option_replies(out, nbd::kOptSetMetaContext)[0].first == nbd::kRepErrUnknown);
    CHECK_FALSE(h.negotiated().allocation);
    CHECK_FALSE(h.negotiated().remapped);
  }
}

TEST_CASE("handshake: while shutting down, options get ERR_SHUTDOWN", "[server][handshake]") {
  // Option haggling: a server shutting down SHOULD error further options
  // (other than ABORT) with NBD_REP_ERR_SHUTDOWN.
  Fixture f;
  Handshake h(f.info);
  REQUIRE(h.client_flags(nbd::kClientFixedNewstyle));
  h.shut_down();
  std::string out;
  CHECK(h.option(nbd::kOptGo, go_request(""), out) == Handshake::Outcome::kMore);
  CHECK(option_replies(out, nbd::kOptGo)[0].first == nbd::kRepErrShutdown);
  out.clear();
  CHECK(h.option(nbd::kOptAbort, "", out) == Handshake::Outcome::kEnd);
  CHECK(option_replies(out, nbd::kOptAbort)[0].first == nbd::kRepAck);
}

TEST_CASE("handshake: FORCEDTLS refuses every option but STARTTLS and ABORT until TLS is up",
          "[server][handshake][tls]") {
  // TLS support, FORCEDTLS mode: any option other than STARTTLS or ABORT,
  // INFO and unknown ones included, gets NBD_REP_ERR_TLS_REQD before TLS;
  // EXPORT_NAME cannot be refused, so the session ends. Never TLS_REQD
  // once TLS is up.
  Fixture f;
  f.info.tls = TlsMode::kRequire;
  Handshake h(f.info);
  REQUIRE(h.client_flags(nbd::kClientFixedNewstyle));
  const std::vector<std::pair<uint32_t, std::string>> options = {
      {nbd::kOptList, ""},
      {nbd::kOptInfo, go_request("")},
      {nbd::kOptGo, go_request("")},
      {nbd::kOptStructuredReply, ""},
      {nbd::kOptListMetaContext, meta_request({})},
      {nbd::kOptSetMetaContext, meta_request({"base:allocation"})},
      {99, "whatever"}};
  for (const auto& [option, data] : options) {
    std::string out;
    INFO("option " << option);
    CHECK(h.option(option, data, out) == Handshake::Outcome::kMore);
    const auto replies = option_replies(out, option);
    REQUIRE(replies.size() == 1);
    CHECK(replies[0].first == nbd::kRepErrTlsReqd);
  }
  CHECK_FALSE(h.negotiated().structured);  // the refused STRUCTURED_REPLY left no trace
  std::string out;
  CHECK(h.oversized(nbd::kOptGo, 1 << 20, out) == Handshake::Outcome::kMore);
  CHECK(option_replies(out, nbd::kOptGo)[0].first == nbd::kRepErrTlsReqd);
  out.clear();
  CHECK(h.option(nbd::kOptExportName, "", out) == Handshake::Outcome::kEnd);
  CHECK(out.empty());

  Handshake aborting(f.info);
  out.clear();
  CHECK(aborting.option(nbd::kOptAbort, "", out) == Handshake::Outcome::kEnd);
  CHECK(option_replies(out, nbd::kOptAbort)[0].first == nbd::kRepAck);

  // After STARTTLS: everything is served, and a second STARTTLS is invalid.
  Handshake secure(f.info);
  REQUIRE(secure.client_flags(nbd::kClientFixedNewstyle));
  out.clear();
  CHECK(secure.option(nbd::kOptStartTls, "", out) == Handshake::Outcome::kStartTls);
  CHECK(option_replies(out, nbd::kOptStartTls)[0].first == nbd::kRepAck);
  CHECK(secure.tls_active());
  out.clear();
  CHECK(secure.option(nbd::kOptStartTls, "", out) == Handshake::Outcome::kMore);
  CHECK(option_replies(out, nbd::kOptStartTls)[0].first == nbd::kRepErrInvalid);
  out.clear();
  CHECK(secure.option(nbd::kOptList, "", out) == Handshake::Outcome::kMore);
  CHECK(option_replies(out, nbd::kOptList).back().first == nbd::kRepAck);
  out.clear();
  CHECK(secure.option(nbd::kOptGo, go_request("disk"), out) == Handshake::Outcome::kTransmit);
}

TEST_CASE("handshake: STARTTLS forgets what was negotiated in plaintext",
          "[server][handshake][tls]") {
  // NBD_OPT_STARTTLS: the server MUST NOT preserve negotiation state
  // (structured replies, meta contexts) from before it (CVE-2021-3716).
  Fixture f;
  f.info.tls = TlsMode::kOn;
  Handshake h(f.info);
  REQUIRE(h.client_flags(nbd::kClientFixedNewstyle | nbd::kClientNoZeroes));
  std::string out;
  h.option(nbd::kOptStructuredReply, "", out);
  h.option(nbd::kOptSetMetaContext, meta_request({"base:allocation"}), out);
  REQUIRE(h.negotiated().structured);
  REQUIRE(h.negotiated().allocation);
  out.clear();
  CHECK(h.option(nbd::kOptStartTls, "", out) == Handshake::Outcome::kStartTls);
  CHECK_FALSE(h.negotiated().structured);
  CHECK_FALSE(h.negotiated().allocation);
  CHECK(h.negotiated().no_zeroes);  // the client's flags came before any option

  // STARTTLS with data is invalid, and starts nothing.
  Handshake data(f.info);
  out.clear();
  CHECK(data.option(nbd::kOptStartTls, "x", out) == Handshake::Outcome::kMore);
  CHECK(option_replies(out, nbd::kOptStartTls)[0].first == nbd::kRepErrInvalid);
  CHECK_FALSE(data.tls_active());
  // --tls=on: plaintext clients are served.
  out.clear();
  CHECK(data.option(nbd::kOptGo, go_request(""), out) == Handshake::Outcome::kTransmit);
}

TEST_CASE("handshake: without TLS, STARTTLS is unsupported and nothing needs TLS",
          "[server][handshake][tls]") {
  // NOTLS mode: STARTTLS gets ERR_UNSUP (or POLICY); TLS_REQD is never sent.
  Fixture f;
  Handshake h(f.info);
  REQUIRE(h.client_flags(nbd::kClientFixedNewstyle));
  std::string out;
  CHECK(h.option(nbd::kOptStartTls, "", out) == Handshake::Outcome::kMore);
  CHECK(option_replies(out, nbd::kOptStartTls)[0].first == nbd::kRepErrUnsup);
  CHECK_FALSE(h.tls_active());
  out.clear();
  CHECK(h.option(nbd::kOptGo, go_request(""), out) == Handshake::Outcome::kTransmit);
}

TEST_CASE("replies: messages are cut at a character boundary, NULs replaced",
          "[server][replies]") {
  CHECK(wire_message("plain") == "plain");
  CHECK(wire_message(std::string("a\0b", 3)) == "a?b");
  CHECK(wire_message("\xff\xfe") == "??");
  std::string long_text(300, 'x');
  CHECK(wire_message(long_text).size() == 256);
  std::string accents;
  for (int i = 0; i < 200; ++i) accents += "\xc3\xa9";
  const std::string cut = wire_message(accents);
  CHECK(cut.size() == 256);  // 128 whole characters
  CHECK(wire_message(cut) == cut);
  CHECK(wire_message(accents, 5) == "\xc3\xa9\xc3\xa9");
}

TEST_CASE("commands: FUA is accepted on every command; unknown flags are not",
          "[server][commands]") {
  Fixture f;
  Negotiated n{.structured = true, .allocation = true};
  for (uint16_t type : {nbd::kCmdRead, nbd::kCmdWrite, nbd::kCmdFlush, nbd::kCmdTrim,
                        nbd::kCmdCache, nbd::kCmdWriteZeroes, nbd::kCmdBlockStatus}) {
    const uint32_t len = type == nbd::kCmdFlush ? 0 : 4096;
    CHECK(validate({nbd::kCmdFlagFua, type, 1, 0, len}, n, f.info).error == 0);
    CHECK(validate({0x40, type, 1, 0, len}, n, f.info).error == nbd::kEinval);
  }
  // Read-only: FUA is not offered, so it is an unknown flag there.
  f.info.read_only = true;
  CHECK(validate({nbd::kCmdFlagFua, nbd::kCmdRead, 1, 0, 4096}, n, f.info).error == nbd::kEinval);
  CHECK((transmission_flags(f.info, true) &
         (nbd::kSendFua | nbd::kSendTrim | nbd::kSendWriteZeroes | nbd::kSendFastZero)) == 0);
}

TEST_CASE("commands: ranges give EINVAL, but ENOSPC for writes", "[server][commands]") {
  Fixture f;
  Negotiated n;
  const uint64_t end = f.info.engine->size();
  CHECK(validate({0, nbd::kCmdTrim, 1, end - 4096, 8192}, n, f.info).error == nbd::kEinval);
  CHECK(validate({0, nbd::kCmdRead, 1, end, 4096}, n, f.info).error == nbd::kEinval);
  CHECK(validate({0, nbd::kCmdWrite, 1, end, 4096}, n, f.info).error == nbd::kEnospc);
  CHECK(validate({0, nbd::kCmdWriteZeroes, 1, end, 4096}, n, f.info).error == nbd::kEnospc);
  f.info.read_only = true;  // checked first, as nbdkit does
  CHECK(validate({0, nbd::kCmdWrite, 1, end, 4096}, n, f.info).error == nbd::kEperm);
}

TEST_CASE("commands: a structured read over the maximum payload is split; DF gets EOVERFLOW",
          "[server][commands][replies]") {
  nbd::Request r{0, nbd::kCmdRead, 7, 0, 10000};
  ReadOutcome big;
  big.data = Buffer(10000);
  const std::string w = wire(read_reply(r, true, 4096, 4096, std::move(big)));
  // Three OFFSET_DATA chunks of 4096, 4096 and 1808 bytes, DONE on the last.
  size_t at = 0;
  std::vector<uint32_t> sizes;
  uint16_t last_flags = 0;
  while (at < w.size()) {
    CHECK(nbd::get16(w.data() + at + 6) == nbd::kChunkOffsetData);
    const uint32_t len = nbd::get32(w.data() + at + 16);
    sizes.push_back(len - 8);
    last_flags = nbd::get16(w.data() + at + 4);
    at += 20 + len;
  }
  CHECK(sizes == std::vector<uint32_t>{4096, 4096, 1808});
  CHECK(last_flags == nbd::kReplyFlagDone);
  r.flags = nbd::kCmdFlagDf;
  ReadOutcome df;
  df.data = Buffer(10000);
  const std::string e = wire(read_reply(r, true, 4096, 4096, std::move(df)));
  CHECK(nbd::get16(e.data() + 6) == nbd::kChunkError);
  CHECK(nbd::get32(e.data() + 20) == nbd::kEoverflow);
  CHECK(e.size() == 20 + nbd::get32(e.data() + 16));  // no content chunk
}

TEST_CASE("commands: an exception during a structured read is an error chunk, EIO",
          "[server][commands]") {
  // Structured replies: a READ MUST NOT get a simple reply; ENOMEM SHOULD
  // NOT be sent.
  auto main_mem = std::make_shared<MemoryDevice>(1 << 20, "main");
  auto spare = std::make_shared<MemoryDevice>(1 << 20, "spare");
  auto main = std::make_shared<ThrowingDevice>(main_mem);
  LayoutParams lp;
  lp.main_size = 1 << 20;
  lp.block_size = 4096;
  REQUIRE(MetadataStore::format(*spare, lp, "").is_ok());
  auto engine = Engine::open(main, spare, {});
  REQUIRE(engine.is_ok());
  ExportInfo info;
  info.engine = engine.value().get();
  main->armed = true;
  Buffer none;
  const std::string w =
      wire(execute({0, nbd::kCmdRead, 9, 0, 4096}, none, {.structured = true}, info));
  REQUIRE(w.size() >= 26);
  CHECK(nbd::get32(w.data()) == nbd::kStructuredReplyMagic);
  CHECK(nbd::get16(w.data() + 4) == nbd::kReplyFlagDone);
  CHECK(nbd::get16(w.data() + 6) == nbd::kChunkError);
  CHECK(nbd::get64(w.data() + 8) == 9);
  CHECK(nbd::get32(w.data() + 20) == nbd::kEio);
  main->armed = false;
  CHECK(engine.value()->close().is_ok());
}

TEST_CASE("errno table: clients see only the errors NBD defines, by its rules",
          "[server][errno]") {
  // Error values: EDQUOT/EFBIG are ENOSPC; ENOTSUP (but for a fast zero),
  // EOVERFLOW and ESHUTDOWN are not passed through from a device; ENOMEM is
  // avoided.
  using K = RequestKind;
  CHECK(client_errno(EPERM, K::kWrite) == EPERM);
  CHECK(client_errno(EROFS, K::kWrite) == EPERM);
  // EINVAL from below is a device's complaint: the frontends check ranges
  // and flags before the engine sees a request.
  CHECK(client_errno(EINVAL, K::kRead) == EIO);
  CHECK(client_errno(ENOTSUP, K::kFastZero) == ENOTSUP);
  CHECK(client_errno(ENOSPC, K::kFastZero) == ENOSPC);
  CHECK(client_errno(ENOSPC, K::kWrite) == ENOSPC);
  CHECK(client_errno(EDQUOT, K::kWrite) == ENOSPC);
  CHECK(client_errno(EFBIG, K::kWrite) == ENOSPC);
  CHECK(client_errno(ENOSPC, K::kRead) == EIO);
  for (int err : {ENOTSUP, EOVERFLOW, ESHUTDOWN, ENOMEM, ETIMEDOUT, ENODEV, ENXIO, EBUSY, EIO}) {
    CAPTURE(err);
    CHECK(client_errno(err, K::kRead) == EIO);
    CHECK(client_errno(err, K::kWrite) == EIO);
  }
  // The server's wire numbers are Linux's errno values.
  for (int err : {EPERM, EIO, EINVAL, ENOSPC}) CHECK(nbd::wire_error(err) == static_cast<uint32_t>(err));
}

TEST_CASE("commands: unreadable blocks get ERROR_OFFSET chunks; every good byte is sent",
          "[server][replies]") {
  nbd::Request r{0, nbd::kCmdRead, 5, 4096, 5 * 4096};  // blocks 1..5
  ReadOutcome out;
  out.data = Buffer(r.length);
  for (uint32_t i = 0; i < r.length; ++i) out.data.data()[i] = static_cast<char>(i % 251);
  out.status = Status::error(EIO, "block 2 cannot be read").with_offset(2 * 4096);
  out.unreadable = {2, 4};
  const std::string w = wire(read_reply(r, true, 4096, kMaxPayload, std::move(out)));
  // data [1], error 2, data [3], error 4, data [5] (DONE)
  std::vector<std::pair<uint16_t, uint64_t>> chunks;  // type, offset
  size_t at = 0;
  uint16_t flags = 0;
  while (at < w.size()) {
    const uint16_t type = nbd::get16(w.data() + at + 6);
    const uint32_t len = nbd::get32(w.data() + at + 16);
    const char* body = w.data() + at + 20;
    flags = nbd::get16(w.data() + at + 4);
    if (type == nbd::kChunkOffsetData) {
      const uint64_t off = nbd::get64(body);
      for (uint32_t i = 0; i < len - 8; ++i) {
        REQUIRE(body[8 + i] == static_cast<char>((off - r.offset + i) % 251));
      }
      chunks.emplace_back(type, off);
    } else {
      REQUIRE(type == nbd::kChunkErrorOffset);
      CHECK(nbd::get32(body) == nbd::kEio);
      chunks.emplace_back(type, nbd::get64(body + 6 + nbd::get16(body + 4)));
    }
    at += 20 + len;
  }
  CHECK(chunks == std::vector<std::pair<uint16_t, uint64_t>>{{nbd::kChunkOffsetData, 4096},
                                                             {nbd::kChunkErrorOffset, 8192},
                                                             {nbd::kChunkOffsetData, 12288},
                                                             {nbd::kChunkErrorOffset, 16384},
                                                             {nbd::kChunkOffsetData, 20480}});
  CHECK(flags == nbd::kReplyFlagDone);
}

TEST_CASE("commands: a refused request with structured replies carries its reason",
          "[server][replies]") {
  const std::string w = wire(refuse({0, nbd::kCmdWrite, 3, 0, 4096},
                                    {nbd::kEshutdown, "the server is shutting down"},
                                    {.structured = true}));
  CHECK(nbd::get16(w.data() + 6) == nbd::kChunkError);
  CHECK(nbd::get32(w.data() + 20) == nbd::kEshutdown);
  CHECK(w.substr(26) == "the server is shutting down");
  const std::string simple =
      wire(refuse({0, nbd::kCmdWrite, 3, 0, 4096}, {nbd::kEshutdown, "x"}, {}));
  CHECK(simple.size() == 16);
  CHECK(nbd::get32(simple.data() + 4) == nbd::kEshutdown);
}

TEST_CASE("commands: FAST_ZERO fails at once where zeroing would write", "[server][commands]") {
  // NBD_CMD_WRITE_ZEROES: with FAST_ZERO the server MUST fail quickly with
  // ENOTSUP when it cannot zero faster than it writes. Zeros for a remapped
  // block are written to its slot: not fast.
  Fixture f;
  REQUIRE(f.set.engine->remap_block(3).is_ok());
  Buffer none;
  const Negotiated n;
  std::string w = wire(execute({nbd::kCmdFlagFastZero, nbd::kCmdWriteZeroes, 1, 2 * 4096, 2 * 4096},
                               none, n, f.info));
  CHECK(nbd::get32(w.data() + 4) == nbd::kEnotsup);
  w = wire(execute({nbd::kCmdFlagFastZero, nbd::kCmdWriteZeroes, 2, 8 * 4096, 2 * 4096}, none, n,
                   f.info));
  CHECK(nbd::get32(w.data() + 4) == 0);
  w = wire(execute({0, nbd::kCmdWriteZeroes, 3, 2 * 4096, 2 * 4096}, none, n, f.info));
  CHECK(nbd::get32(w.data() + 4) == 0);
}

TEST_CASE("commands: CACHE of any length reads in pieces", "[server][commands]") {
  Fixture f;
  const Negotiated n;
  const nbd::Request r{0, nbd::kCmdCache, 1, 0, 1 << 20};
  f.info.accept_request = 4096;  // CACHE is not bound by it
  CHECK(validate(r, n, f.info).error == 0);
  Buffer none;
  CHECK(nbd::get32(wire(execute(r, none, n, f.info)).data() + 4) == 0);
}
