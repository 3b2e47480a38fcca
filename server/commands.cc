#include "commands.h"

#include "dmremap/evacuate.h"

#include <algorithm>
#include <cerrno>
#include <new>

#include "dmremap/export.h"
#include "dmremap/log.h"

namespace dmremap::server {

namespace {

// A BLOCK_STATUS reply describes at most this many runs per context (the
// protocol lets a server describe less than was asked).
constexpr size_t kMaxStatusRuns = 8192;

RequestKind kind_of(const nbd::Request& r) {
  switch (r.type) {
    case nbd::kCmdRead: case nbd::kCmdCache: return RequestKind::kRead;
    case nbd::kCmdWriteZeroes:
      return (r.flags & nbd::kCmdFlagFastZero) ? RequestKind::kFastZero : RequestKind::kWrite;
    case nbd::kCmdWrite: case nbd::kCmdTrim: return RequestKind::kWrite;
    default: return RequestKind::kOther;
  }
}

// `s` with its errno narrowed to what a client may see.
Status for_client(const Status& s, const nbd::Request& r) {
  if (s.is_ok()) return s;
  Status out = Status::error(client_errno(s.code(), kind_of(r)), s.message());
  if (auto at = s.error_offset()) out = std::move(out).with_offset(*at);
  return out;
}

// BLOCK_STATUS for the selected contexts; runs clipped to the request and
// merged when their flags agree.
Reply block_status(const nbd::Request& r, const Negotiated& n, Engine& e, Evacuator* ev,
                   Status& s) {
  const uint64_t end = r.offset + r.length;
  auto add = [&](Runs& runs, uint64_t off, uint64_t len, uint32_t flags) {
    const uint64_t lo = std::max(off, r.offset);
    const uint64_t hi = std::min(off + len, end);
    if (lo >= hi) return;
    if (!runs.empty() && runs.back().second == flags) {
      runs.back().first += hi - lo;
    } else {
      runs.emplace_back(hi - lo, flags);
    }
  };
  std::vector<std::pair<uint32_t, Runs>> contexts;
  if (n.allocation) {
    Runs runs;
    s = allocation(e, r.length, r.offset, [&](uint64_t off, uint64_t len, bool hole) {
      add(runs, off, len, hole ? (nbd::kStateHole | nbd::kStateZero) : 0);
    });
    if (!s.is_ok()) return {};
    contexts.emplace_back(nbd::kContextAllocation, std::move(runs));
  }
  if (n.remapped) {
    Runs runs;
    const uint32_t bs = e.block_size();
    uint64_t pos = r.offset;
    e.for_each_entry(r.offset / bs, (end + bs - 1) / bs, [&](const RemapTable::Entry& en) {
      const uint64_t at = en.block * bs;
      if (at > pos) add(runs, pos, at - pos, 0);
      add(runs, at, bs, RemapTable::is_pending(en.value) ? nbd::kStatePending : nbd::kStateRemapped);
      pos = std::max(pos, at + bs);
    });
    if (pos < end) add(runs, pos, end - pos, 0);
    contexts.emplace_back(nbd::kContextRemapped, std::move(runs));
  }
  if (n.copied && ev != nullptr) {
    // Below the copy's place (or everywhere once NEW holds the whole
    // disk): copied, but the lost blocks; the rest not yet.
    Runs runs;
    const uint32_t bs = e.block_size();
    const EvacProgress p = ev->progress();
    const bool whole = (p.state == EvacState::kSynced && !p.target_away && p.resync_regions == 0) ||
                       p.state == EvacState::kFinished;
    const bool live = whole || p.state == EvacState::kRunning || p.state == EvacState::kPaused;
    const uint64_t copied_end = !live ? 0 : whole ? end : std::min(end, p.next_block * bs);
    uint64_t pos = r.offset;
    if (copied_end > pos) {
      for (uint64_t b : ev->lost_blocks(r.offset / bs, (copied_end + bs - 1) / bs)) {
        const uint64_t at = b * bs;
        if (at > pos) add(runs, pos, at - pos, 0);
        add(runs, at, bs, nbd::kStateLost);
        pos = std::max(pos, at + bs);
      }
      if (copied_end > pos) add(runs, pos, copied_end - pos, 0);
      pos = std::max(pos, copied_end);
    }
    if (pos < end) add(runs, pos, end - pos, nbd::kStateNotCopied);
    contexts.emplace_back(nbd::kContextCopied, std::move(runs));
  }
  const size_t keep = (r.flags & nbd::kCmdFlagReqOne) ? 1 : kMaxStatusRuns;
  for (auto& [id, runs] : contexts) {
    if (runs.size() > keep) runs.resize(keep);
  }
  return block_status_reply(r.cookie, contexts);
}

Reply failure(const nbd::Request& r, const Negotiated& n, uint32_t nbd_error,
              const std::string& message) {
  if (n.structured) return structured_error(r.cookie, nbd_error, message);
  return simple_reply(r.cookie, nbd_error);
}

}  // namespace

uint16_t transmission_flags(const ExportInfo& info, bool structured) {
  uint16_t f = nbd::kHasFlags | nbd::kSendFlush | nbd::kCanMultiConn | nbd::kSendCache;
  if (info.read_only) {
    f |= nbd::kReadOnly;
  } else {
    f |= nbd::kSendFua | nbd::kSendTrim | nbd::kSendWriteZeroes;
    if (offers_fast_zero(*info.engine)) f |= nbd::kSendFastZero;
  }
  if (structured) f |= nbd::kSendDf;
  return f;
}

Verdict validate(const nbd::Request& r, const Negotiated& n, const ExportInfo& info) {
  const bool writes = r.type == nbd::kCmdWrite || r.type == nbd::kCmdTrim ||
                      r.type == nbd::kCmdWriteZeroes;
  if (writes && info.read_only) return {nbd::kEperm, "the export is read-only"};
  const uint64_t size = info.engine->size();
  const bool past_end = r.offset > size || r.length > size - r.offset;
  switch (r.type) {
    case nbd::kCmdWrite:
    case nbd::kCmdWriteZeroes:
      if (past_end) return {nbd::kEnospc, "the request goes past the end of the export"};
      break;
    case nbd::kCmdRead:
    case nbd::kCmdTrim:
    case nbd::kCmdCache:
    case nbd::kCmdBlockStatus:
      if (past_end) return {nbd::kEinval, "the request goes past the end of the export"};
      break;
    case nbd::kCmdFlush:
      if (r.offset != 0 || r.length != 0) return {nbd::kEinval, "FLUSH takes no offset or length"};
      break;
    case nbd::kCmdDisc: break;
    default: return {nbd::kEinval, "unknown command"};
  }
  // Flags. FUA is accepted on every command once it is advertised (the
  // protocol says so, even where it means nothing).
  const uint16_t flags = transmission_flags(info, n.structured);
  uint16_t allowed = (flags & nbd::kSendFua) ? nbd::kCmdFlagFua : 0;
  switch (r.type) {
    case nbd::kCmdRead:
      if (n.structured) allowed |= nbd::kCmdFlagDf;
      break;
    case nbd::kCmdWriteZeroes:
      allowed |= nbd::kCmdFlagNoHole;
      if (flags & nbd::kSendFastZero) allowed |= nbd::kCmdFlagFastZero;
      break;
    case nbd::kCmdBlockStatus: allowed |= nbd::kCmdFlagReqOne; break;
  }
  if (r.flags & ~allowed) return {nbd::kEinval, "a flag this command does not take here"};
  // CACHE of any length is read in pieces (as nbdkit allows it too).
  if ((r.type == nbd::kCmdRead || r.type == nbd::kCmdWrite) && r.length > info.accept_request) {
    return {nbd::kEinval, "the request is larger than the server accepts"};
  }
  if (r.type == nbd::kCmdBlockStatus) {
    if (!n.structured) return {nbd::kEinval, "BLOCK_STATUS needs structured replies"};
    if (!n.allocation && !n.remapped && !n.copied) {
      return {nbd::kEinval, "BLOCK_STATUS needs a meta context selected"};
    }
    if (r.length == 0) return {nbd::kEinval, "BLOCK_STATUS of no bytes"};
  }
  return {};
}

Reply refuse(const nbd::Request& r, const Verdict& v, const Negotiated& n) {
  return failure(r, n, v.error, v.why);
}

Reply execute(const nbd::Request& r, Buffer& payload, const Negotiated& n,
              const ExportInfo& info) {
  Engine& e = *info.engine;
  try {
    const bool fua = r.flags & nbd::kCmdFlagFua;
    Status s;
    switch (r.type) {
      case nbd::kCmdRead: {
        ReadOutcome out;
        out.data = Buffer(r.length);
        s = e.read(out.data.data(), r.length, r.offset, &out.unreadable);
        if (!s.is_ok()) log(LogLevel::kWarning, "request failed: " + s.to_string());
        out.status = for_client(s, r);
        return read_reply(r, n.structured, e.block_size(), info.max_reply_chunk, std::move(out));
      }
      case nbd::kCmdWrite: s = e.write(payload.data(), r.length, r.offset, fua); break;
      case nbd::kCmdFlush: s = e.flush(); break;
      case nbd::kCmdTrim: s = e.trim(r.length, r.offset, fua); break;
      case nbd::kCmdWriteZeroes:
        s = e.write_zeroes(r.length, r.offset, fua, r.flags & nbd::kCmdFlagFastZero);
        break;
      case nbd::kCmdCache: s = cache(e, r.length, r.offset); break;
      case nbd::kCmdBlockStatus: {
        Reply reply = block_status(r, n, e, info.evacuator, s);
        if (s.is_ok()) return reply;
        break;
      }
    }
    if (s.is_ok()) return simple_reply(r.cookie, 0);
    log(LogLevel::kWarning, "request failed: " + s.to_string());
    return failure(r, n, nbd::wire_error(client_errno(s.code(), kind_of(r))), s.message());
  } catch (const std::bad_alloc&) {
    log(LogLevel::kError, "request failed: out of memory");
    return failure(r, n, nbd::kEio, "the server is out of memory");
  } catch (const std::exception& ex) {
    log(LogLevel::kError, std::string("request failed: ") + ex.what());
    return failure(r, n, nbd::kEio, "the server failed to run the request");
  }
}

}  // namespace dmremap::server
