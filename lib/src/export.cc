#include "dmremap/export.h"

#include <algorithm>
#include <cerrno>
#include <vector>

namespace dmremap {

BlockSizes block_sizes(const Engine& engine) {
  return {engine.block_size(), std::max<uint32_t>(engine.block_size(), 4096), kMaxPayload};
}

bool offers_fast_zero(const Engine& engine) { return !engine.read_only(); }

Status cache(Engine& engine, uint64_t length, uint64_t offset) {
  constexpr uint64_t kPiece = 1 << 20;
  // Per thread: CACHE requests on many connections do not share a buffer.
  thread_local std::vector<char> scratch(kPiece);
  Status first;
  for (uint64_t done = 0; done < length;) {
    const uint64_t n = std::min(kPiece, length - done);
    Status s = engine.read(scratch.data(), n, offset + done);
    if (!s.is_ok() && first.is_ok()) first = std::move(s);
    done += n;
  }
  return first;
}

Status allocation(Engine& engine, uint64_t len, uint64_t offset,
                  const std::function<void(uint64_t, uint64_t, bool)>& fn) {
  const uint64_t bs = engine.block_size();
  return engine.extents(len, offset, [&](uint64_t off, uint64_t n, bool hole) {
    const uint64_t lo = (off + bs - 1) / bs * bs;
    const uint64_t hi = (off + n) / bs * bs;
    if (!hole || lo >= hi) {
      fn(off, n, false);
      return;
    }
    if (lo > off) fn(off, lo - off, false);
    fn(lo, hi - lo, true);
    if (off + n > hi) fn(hi, off + n - hi, false);
  });
}

int client_errno(int err, RequestKind kind) {
  switch (err) {
    case EPERM: case EROFS: return EPERM;
    case ENOSPC: case EDQUOT: case EFBIG:
      return kind == RequestKind::kWrite || kind == RequestKind::kFastZero ? ENOSPC : EIO;
    case ENOTSUP: return kind == RequestKind::kFastZero ? ENOTSUP : EIO;
    default: return EIO;
  }
}

}  // namespace dmremap
