#include "handshake.h"

#include <vector>

#include "dmremap/export.h"
#include "dmremap/log.h"
#include "protocol.h"
#include "replies.h"

namespace dmremap::server {

namespace {

void append16(std::string& s, uint16_t v) {
  char b[2];
  nbd::put16(b, v);
  s.append(b, 2);
}
void append32(std::string& s, uint32_t v) {
  char b[4];
  nbd::put32(b, v);
  s.append(b, 4);
}
void append64(std::string& s, uint64_t v) {
  char b[8];
  nbd::put64(b, v);
  s.append(b, 8);
}

void reply(std::string& out, uint32_t option, uint32_t type, std::string_view data = {}) {
  append64(out, nbd::kOptReplyMagic);
  append32(out, option);
  append32(out, type);
  append32(out, static_cast<uint32_t>(data.size()));
  out.append(data);
}

// An error reply; its message is bounded like every string we send.
void refuse(std::string& out, uint32_t option, uint32_t type, std::string_view why) {
  reply(out, option, type, wire_message(why));
}

// An export name as shown in a message: short, and printable.
std::string shown(std::string_view name) { return "'" + wire_message(name, 64) + "'"; }

// Reads big-endian fields off an option's data.
struct Reader {
  std::string_view data;
  size_t pos = 0;
  bool u32(uint32_t& v) {
    if (data.size() - pos < 4) return false;
    v = nbd::get32(data.data() + pos);
    pos += 4;
    return true;
  }
  bool u16(uint16_t& v) {
    if (data.size() - pos < 2) return false;
    v = nbd::get16(data.data() + pos);
    pos += 2;
    return true;
  }
  bool str(uint32_t n, std::string_view& s) {
    if (data.size() - pos < n) return false;
    s = data.substr(pos, n);
    pos += n;
    return true;
  }
  bool done() const { return pos == data.size(); }
};

constexpr std::string_view kAllocation = "base:allocation";
constexpr std::string_view kRemapped = "x-dmremap:remapped";
constexpr std::string_view kRemappedOld = "dmremap:remapped";  // until the next release
constexpr std::string_view kCopied = "x-dmremap:copied";

}  // namespace

std::string Handshake::greeting() {
  std::string s;
  append64(s, nbd::kNbdMagic);
  append64(s, nbd::kIHaveOpt);
  append16(s, nbd::kFlagFixedNewstyle | nbd::kFlagNoZeroes);
  return s;
}

bool Handshake::client_flags(uint32_t flags) {
  if (!(flags & nbd::kClientFixedNewstyle) ||
      (flags & ~(nbd::kClientFixedNewstyle | nbd::kClientNoZeroes))) {
    log(LogLevel::kInfo, "a client that is not fixed-newstyle, or sent unknown flags: "
                         "disconnecting it");
    return false;
  }
  n_.no_zeroes = flags & nbd::kClientNoZeroes;
  return true;
}

bool Handshake::known_export(std::string_view name) const {
  if (name.empty() || name == info_.name) return true;
  log(LogLevel::kInfo, "a client asked for export " + shown(name) + ", which is not served here " +
                           (info_.name.empty() ? std::string("(the export is \"\")")
                                               : "(the export is " + shown(info_.name) + ")"));
  return false;
}

bool Handshake::tls_required(uint32_t option, std::string& out, bool& end) const {
  if (info_.tls != TlsMode::kRequire || tls_active_ || option == nbd::kOptStartTls ||
      option == nbd::kOptAbort) {
    return false;
  }
  if (option == nbd::kOptExportName) {
    log(LogLevel::kInfo, "a client asked for the export without TLS, which this server "
                         "requires: disconnecting it");
    end = true;
    return true;
  }
  refuse(out, option, nbd::kRepErrTlsReqd, "this server requires TLS: send NBD_OPT_STARTTLS");
  return true;
}

Handshake::Outcome Handshake::start_tls(std::string_view data, std::string& out) {
  if (info_.tls == TlsMode::kOff) {
    refuse(out, nbd::kOptStartTls, nbd::kRepErrUnsup,
           "TLS is not configured on this server (see dmremap-server --tls)");
    return Outcome::kMore;
  }
  if (tls_active_) {
    refuse(out, nbd::kOptStartTls, nbd::kRepErrInvalid, "TLS is already on");
    return Outcome::kMore;
  }
  if (!data.empty()) {
    refuse(out, nbd::kOptStartTls, nbd::kRepErrInvalid, "STARTTLS takes no data");
    return Outcome::kMore;
  }
  reply(out, nbd::kOptStartTls, nbd::kRepAck);
  // Nothing negotiated in plaintext survives (structured replies, meta
  // contexts): a man in the middle may have chosen it.
  Negotiated fresh;
  fresh.no_zeroes = n_.no_zeroes;  // the client's flags, from before any option
  n_ = fresh;
  tls_active_ = true;
  return Outcome::kStartTls;
}

Handshake::Outcome Handshake::oversized(uint32_t option, uint32_t length, std::string& out) {
  log(LogLevel::kInfo, "a client sent an option of " + std::to_string(length) +
                           " bytes, over the limit of " + std::to_string(kMaxOptionBytes));
  // EXPORT_NAME has no error reply: the connection ends.
  if (option == nbd::kOptExportName) return Outcome::kEnd;
  bool end = false;
  if (!shutting_down_ && tls_required(option, out, end)) return Outcome::kMore;
  if (option == nbd::kOptSetMetaContext) n_.allocation = n_.remapped = n_.copied = false;
  if (shutting_down_) {
    refuse(out, option, nbd::kRepErrShutdown, "the server is shutting down");
  } else {
    refuse(out, option, nbd::kRepErrTooBig, "option data too long");
  }
  return Outcome::kMore;
}

Handshake::Outcome Handshake::option(uint32_t option, std::string_view data, std::string& out) {
  if (shutting_down_ && option != nbd::kOptAbort) {
    if (option == nbd::kOptExportName) return Outcome::kEnd;
    refuse(out, option, nbd::kRepErrShutdown, "the server is shutting down");
    return Outcome::kMore;
  }
  bool end = false;
  if (tls_required(option, out, end)) return end ? Outcome::kEnd : Outcome::kMore;
  switch (option) {
    case nbd::kOptExportName: {
      // No error reply is possible here: an unknown name ends it.
      if (!known_export(data)) return Outcome::kEnd;
      append64(out, info_.engine->size());
      append16(out, transmission_flags(info_, n_.structured));
      if (!n_.no_zeroes) out.append(124, '\0');
      return Outcome::kTransmit;
    }
    case nbd::kOptAbort:
      reply(out, option, nbd::kRepAck);
      return Outcome::kEnd;
    case nbd::kOptList: {
      if (!data.empty()) {
        refuse(out, option, nbd::kRepErrInvalid, "LIST takes no data");
        break;
      }
      std::string server;
      append32(server, static_cast<uint32_t>(info_.name.size()));
      server += info_.name;
      server += info_.description;
      reply(out, option, nbd::kRepServer, server);
      reply(out, option, nbd::kRepAck);
      break;
    }
    case nbd::kOptStructuredReply:
      if (!data.empty()) {
        refuse(out, option, nbd::kRepErrInvalid, "STRUCTURED_REPLY takes no data");
        break;
      }
      n_.structured = true;
      reply(out, option, nbd::kRepAck);
      break;
    case nbd::kOptStartTls:
      return start_tls(data, out);
    case nbd::kOptInfo:
    case nbd::kOptGo:
      return info_or_go(option, data, out);
    case nbd::kOptListMetaContext:
    case nbd::kOptSetMetaContext:
      meta_context(option, data, out);
      break;
    default:
      refuse(out, option, nbd::kRepErrUnsup, "option not supported");
      break;
  }
  return Outcome::kMore;
}

// u32 name length, name, u16 count, count x u16 info types.
Handshake::Outcome Handshake::info_or_go(uint32_t option, std::string_view data,
                                         std::string& out) {
  Reader in{data};
  uint32_t name_len = 0;
  std::string_view name;
  uint16_t count = 0;
  if (!in.u32(name_len) || !in.str(name_len, name) || !in.u16(count) ||
      data.size() - in.pos != 2ull * count) {
    refuse(out, option, nbd::kRepErrInvalid, "malformed INFO/GO request");
    return Outcome::kMore;
  }
  if (!known_export(name)) {
    refuse(out, option, nbd::kRepErrUnknown, "no export named " + shown(name));
    return Outcome::kMore;
  }
  auto info = [&](uint16_t type, std::string_view body) {
    std::string s;
    append16(s, type);
    s += body;
    reply(out, option, nbd::kRepInfo, s);
  };
  bool sent_name = false, sent_description = false;
  for (uint16_t i = 0; i < count; ++i) {
    uint16_t type = 0;
    (void)in.u16(type);
    if (type == nbd::kInfoName && !sent_name) {
      info(type, info_.name);
      sent_name = true;
    } else if (type == nbd::kInfoDescription && !sent_description) {
      info(type, info_.description);
      sent_description = true;
    }
  }
  // Block sizes always: the client learns the minimum it must honour.
  const BlockSizes b = block_sizes(*info_.engine);
  std::string sizes;
  append32(sizes, b.minimum);
  append32(sizes, b.preferred);
  append32(sizes, b.maximum);
  info(nbd::kInfoBlockSize, sizes);
  std::string exp;
  append64(exp, info_.engine->size());
  append16(exp, transmission_flags(info_, n_.structured));
  info(nbd::kInfoExport, exp);
  reply(out, option, nbd::kRepAck);
  return option == nbd::kOptGo ? Outcome::kTransmit : Outcome::kMore;
}

// u32 export name length, name, u32 query count, then u32 length + query.
void Handshake::meta_context(uint32_t option, std::string_view data, std::string& out) {
  const bool set = option == nbd::kOptSetMetaContext;
  // SET replaces the selection, also when it fails.
  if (set) n_.allocation = n_.remapped = n_.copied = false;
  if (set && !n_.structured) {
    refuse(out, option, nbd::kRepErrInvalid, "negotiate structured replies first");
    return;
  }
  Reader in{data};
  uint32_t name_len = 0, count = 0;
  std::string_view name;
  if (!in.u32(name_len) || !in.str(name_len, name) || !in.u32(count)) {
    refuse(out, option, nbd::kRepErrInvalid, "malformed meta context request");
    return;
  }
  std::vector<std::string_view> queries;
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t len = 0;
    std::string_view q;
    if (!in.u32(len) || !in.str(len, q)) {
      refuse(out, option, nbd::kRepErrInvalid, "malformed meta context query");
      return;
    }
    queries.push_back(q);
  }
  if (!in.done()) {
    refuse(out, option, nbd::kRepErrInvalid, "meta context request longer than its queries");
    return;
  }
  if (!known_export(name)) {
    refuse(out, option, nbd::kRepErrUnknown, "no export named " + shown(name));
    return;
  }
  // LIST with no query lists everything; "ns:" lists a whole namespace.
  // SET selects exact names only. Context IDs in LIST replies are 0.
  bool allocation = false, remapped = false, remapped_old = false, copied = false;
  // x-dmremap:copied only where an evacuation can run (writable sets).
  const bool can_copy = info_.evacuator != nullptr;
  if (!set && queries.empty()) allocation = remapped = true;
  if (!set && queries.empty()) copied = can_copy;
  for (const auto q : queries) {
    if (q == kAllocation || (!set && q == "base:")) allocation = true;
    if (q == kRemapped || (!set && q == "x-dmremap:")) remapped = true;
    if (q == kRemappedOld || (!set && q == "dmremap:")) remapped_old = true;
    if (can_copy && (q == kCopied || (!set && q == "x-dmremap:"))) copied = true;
  }
  auto context = [&](uint32_t id, std::string_view context_name) {
    std::string s;
    append32(s, set ? id : 0);
    s += context_name;
    reply(out, option, nbd::kRepMetaContext, s);
  };
  if (allocation) context(nbd::kContextAllocation, kAllocation);
  if (remapped) {
    context(nbd::kContextRemapped, kRemapped);
  } else if (remapped_old) {
    context(nbd::kContextRemapped, kRemappedOld);
  }
  if (!set && remapped && remapped_old) context(0, kRemappedOld);
  if (copied) context(nbd::kContextCopied, kCopied);
  if (set) {
    n_.allocation = allocation;
    n_.remapped = remapped || remapped_old;
    n_.copied = copied;
  }
  reply(out, option, nbd::kRepAck);
}

}  // namespace dmremap::server
