// The NBD protocol's numbers (NetworkBlockDevice/nbd doc/proto.md), and
// big-endian helpers. Only what dmremap-server speaks.
#pragma once

#include <cstdint>
#include <cstring>

namespace dmremap::nbd {

// Handshake.
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943;  // "NBDMAGIC"
inline constexpr uint64_t kIHaveOpt = 0x49484156454f5054;  // "IHAVEOPT"
inline constexpr uint64_t kOptReplyMagic = 0x0003e889045565a9;
inline constexpr uint16_t kFlagFixedNewstyle = 1;
inline constexpr uint16_t kFlagNoZeroes = 2;
inline constexpr uint32_t kClientFixedNewstyle = 1;
inline constexpr uint32_t kClientNoZeroes = 2;

// Options.
inline constexpr uint32_t kOptExportName = 1;
inline constexpr uint32_t kOptAbort = 2;
inline constexpr uint32_t kOptList = 3;
inline constexpr uint32_t kOptStartTls = 5;
inline constexpr uint32_t kOptInfo = 6;
inline constexpr uint32_t kOptGo = 7;
inline constexpr uint32_t kOptStructuredReply = 8;
inline constexpr uint32_t kOptListMetaContext = 9;
inline constexpr uint32_t kOptSetMetaContext = 10;

// Option replies.
inline constexpr uint32_t kRepAck = 1;
inline constexpr uint32_t kRepServer = 2;
inline constexpr uint32_t kRepInfo = 3;
inline constexpr uint32_t kRepMetaContext = 4;
inline constexpr uint32_t kRepErrUnsup = 0x80000001;
inline constexpr uint32_t kRepErrInvalid = 0x80000003;
inline constexpr uint32_t kRepErrTlsReqd = 0x80000005;
inline constexpr uint32_t kRepErrUnknown = 0x80000006;
inline constexpr uint32_t kRepErrShutdown = 0x80000007;
inline constexpr uint32_t kRepErrTooBig = 0x80000009;

// NBD_INFO types.
inline constexpr uint16_t kInfoExport = 0;
inline constexpr uint16_t kInfoName = 1;
inline constexpr uint16_t kInfoDescription = 2;
inline constexpr uint16_t kInfoBlockSize = 3;

// Transmission flags.
inline constexpr uint16_t kHasFlags = 1 << 0;
inline constexpr uint16_t kReadOnly = 1 << 1;
inline constexpr uint16_t kSendFlush = 1 << 2;
inline constexpr uint16_t kSendFua = 1 << 3;
inline constexpr uint16_t kSendTrim = 1 << 5;
inline constexpr uint16_t kSendWriteZeroes = 1 << 6;
inline constexpr uint16_t kSendDf = 1 << 7;
inline constexpr uint16_t kCanMultiConn = 1 << 8;
inline constexpr uint16_t kSendCache = 1 << 10;
inline constexpr uint16_t kSendFastZero = 1 << 11;

// Requests and replies.
inline constexpr uint32_t kRequestMagic = 0x25609513;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;
inline constexpr size_t kRequestBytes = 28;

enum Command : uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdCache = 5,
  kCmdWriteZeroes = 6,
  kCmdBlockStatus = 7,
};
inline constexpr uint16_t kCmdFlagFua = 1 << 0;
inline constexpr uint16_t kCmdFlagNoHole = 1 << 1;
inline constexpr uint16_t kCmdFlagDf = 1 << 2;
inline constexpr uint16_t kCmdFlagReqOne = 1 << 3;
inline constexpr uint16_t kCmdFlagFastZero = 1 << 4;

// Meta contexts: ours are numbered by us. "x-dmremap:remapped" is ours
// (docs/server.md defines it); "dmremap:remapped" is its old name, still
// accepted by SET_META_CONTEXT for one release.
inline constexpr uint32_t kContextAllocation = 1;  // "base:allocation"
inline constexpr uint32_t kContextRemapped = 2;    // "x-dmremap:remapped"
inline constexpr uint32_t kContextCopied = 3;      // "x-dmremap:copied"
inline constexpr uint32_t kStateHole = 1;          // base:allocation
inline constexpr uint32_t kStateZero = 2;
inline constexpr uint32_t kStateRemapped = 1;      // x-dmremap:remapped
inline constexpr uint32_t kStatePending = 2;
inline constexpr uint32_t kStateNotCopied = 1;     // x-dmremap:copied: not on NEW (yet)
inline constexpr uint32_t kStateLost = 2;          // on NEW as zeros: the set cannot read it

// Structured reply chunks.
inline constexpr uint16_t kReplyFlagDone = 1;
inline constexpr uint16_t kChunkNone = 0;
inline constexpr uint16_t kChunkOffsetData = 1;
inline constexpr uint16_t kChunkBlockStatus = 5;
inline constexpr uint16_t kChunkError = 0x8001;
inline constexpr uint16_t kChunkErrorOffset = 0x8002;

// Errors on the wire. Their numbers are Linux's errno values.
inline constexpr uint32_t kEperm = 1;
inline constexpr uint32_t kEio = 5;
inline constexpr uint32_t kEnomem = 12;
inline constexpr uint32_t kEinval = 22;
inline constexpr uint32_t kEnospc = 28;
inline constexpr uint32_t kEoverflow = 75;
inline constexpr uint32_t kEnotsup = 95;
inline constexpr uint32_t kEshutdown = 108;

// The NBD error for an errno already narrowed by dmremap::client_errno()
// (or chosen by the frontend itself); anything else is EIO.
inline uint32_t wire_error(int err) {
  switch (err) {
    case 1: return kEperm;
    case 12: return kEnomem;
    case 22: return kEinval;
    case 28: return kEnospc;
    case 75: return kEoverflow;
    case 95: return kEnotsup;
    case 108: return kEshutdown;
    default: return kEio;
  }
}

inline void put16(char* p, uint16_t v) {
  p[0] = static_cast<char>(v >> 8);
  p[1] = static_cast<char>(v);
}
inline void put32(char* p, uint32_t v) {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = static_cast<char>(v);
}
inline void put64(char* p, uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = static_cast<char>(v);
}
inline uint16_t get16(const char* p) {
  return static_cast<uint16_t>((static_cast<uint8_t>(p[0]) << 8) | static_cast<uint8_t>(p[1]));
}
inline uint32_t get32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
inline uint64_t get64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

// A request's header, as it came.
struct Request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};
// `h` holds kRequestBytes bytes; the magic is checked by the caller.
inline Request parse_request(const char* h) {
  return Request{get16(h + 4), get16(h + 6), get64(h + 8), get64(h + 16), get32(h + 24)};
}

}  // namespace dmremap::nbd
