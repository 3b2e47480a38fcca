// What both frontends (the nbdkit plugin and dmremap-server) tell NBD clients
// about a set, and how they answer them: block sizes, fast zero, CACHE, and
// the errno a failed request carries. One copy, so that the two frontends
// give the same answer to the same request.
#pragma once

#include <cstdint>
#include <functional>

#include "dmremap/engine.h"

namespace dmremap {

// The largest request payload advertised to clients (NBD_INFO_BLOCK_SIZE's
// maximum). Requests up to kAcceptedPayload are still served, as nbdkit does,
// so that a client that ignores the advertisement is not failed.
inline constexpr uint32_t kMaxPayload = 32 << 20;
inline constexpr uint32_t kAcceptedPayload = 64 << 20;

struct BlockSizes {
  uint32_t minimum;    // the set's block size: smaller requests would be read-modify-write
  uint32_t preferred;  // at least 4 KiB
  uint32_t maximum;    // kMaxPayload
};
BlockSizes block_sizes(const Engine& engine);

// The fast-zero rule. FAST_ZERO is offered whenever zeroing is (writable
// sets); Engine::write_zeroes(..., fast) then fails at once with ENOTSUP
// when zeroing would not be faster than writing, so that a client such as
// qemu-img convert writes its zeros itself instead of waiting. Declining the
// flag instead is no option: nbdkit 1.32 aborts when a client sends it to a
// plugin that did not offer it.
bool offers_fast_zero(const Engine& engine);

// NBD_CMD_CACHE: reads the range through the engine, 1 MiB at a time, and
// drops the data, so weak blocks are found and rescued before a client needs
// them. The whole range is read even after a failure; the first failure is
// returned. Safe from many threads; any length.
Status cache(Engine& engine, uint64_t length, uint64_t offset);

// base:allocation for [offset, offset+len): Engine::extents() with holes
// cut to whole blocks of the set (NBD descriptors SHOULD be multiples of the
// minimum block size); the ends of a hole inside a block are reported as
// data. fn(offset, length, hole), in order, without gaps.
Status allocation(Engine& engine, uint64_t len, uint64_t offset,
                  const std::function<void(uint64_t, uint64_t, bool)>& fn);

// Which request failed, for client_errno(). kFastZero: a WRITE_ZEROES with
// FAST_ZERO, whose ENOTSUP goes to the client as it is.
enum class RequestKind { kRead, kWrite, kFastZero, kOther };

// The errno a client sees for a failed request: one of the values the NBD
// protocol defines, chosen by its rules (proto.md, "Error values"):
// - EDQUOT and EFBIG become ENOSPC, EROFS becomes EPERM;
// - ENOSPC is for writes only (past the end, or a full spare pool; see
//   docs/server.md on x-dmremap:remapped); a read never gets it;
// - EINVAL becomes EIO: the frontends check a request's range and flags
//   before the engine sees it, so an EINVAL from below is a device's
//   complaint (an NBD main's, an O_DIRECT one), not the client's fault;
// - ENOTSUP only for a fast zero that is not fast (kFastZero); EOVERFLOW and
//   ESHUTDOWN are never passed through from a device: a frontend sends them
//   itself, where the protocol documents them (DF, its own shutdown);
// - ENOMEM is avoided (SHOULD NOT): it becomes EIO;
// - anything else is EIO.
int client_errno(int err, RequestKind kind);

}  // namespace dmremap
