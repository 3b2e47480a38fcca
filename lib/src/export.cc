#include "dmremap/export.h"

#include <algorithm>
#include <cerrno>
#include <vector>

namespace dmremap {

BlockSizes block_sizes(const Engine& engine) {
  return {engine.block_size(), std::max<uint32_t>(engine.block_size(), 4096), kMaxPayload};
}

bool offers_fast_zero(const Engine& engine) { return !engine.read_only(); }

Status fast_zero_check(const Engine& engine) {
  if (engine.can_fast_zero()) return Status::ok();
  return Status::error(ENOTSUP, "zeroing is not fast here: it would write zeros");
}

Status cache(Engine& engine, uint64_t length, uint64_t offset) {
  // Per thread: CACHE requests on many connections do not share a buffer.
  thread_local std::vector<char> scratch;
  scratch.resize(length);
  return engine.read(scratch.data(), length, offset);
}

int client_errno(int err, RequestKind kind) {
  switch (err) {
    case EPERM: case EROFS: return EPERM;
    case EINVAL: return EINVAL;
    case ENOSPC: case EDQUOT: case EFBIG: return kind == RequestKind::kWrite ? ENOSPC : EIO;
    default: return EIO;
  }
}

}  // namespace dmremap
