#include "replies.h"

#include <algorithm>
#include <cstring>

namespace dmremap::server {

namespace {

// Appends a structured chunk's header to `meta`.
void chunk_head(std::vector<char>& meta, uint64_t cookie, uint16_t flags, uint16_t type,
                uint32_t length) {
  const size_t at = meta.size();
  meta.resize(at + 20);
  nbd::put32(meta.data() + at, nbd::kStructuredReplyMagic);
  nbd::put16(meta.data() + at + 4, flags);
  nbd::put16(meta.data() + at + 6, type);
  nbd::put64(meta.data() + at + 8, cookie);
  nbd::put32(meta.data() + at + 16, length);
}

// The length of the UTF-8 sequence that starts at s[i], or 0 when it is not
// a valid one (overlong forms and surrogates are not checked: a message is
// for humans, and this only keeps clients' decoders from choking).
size_t utf8_length(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return 0;
  }
  return n;
}

// Appends an ERROR or ERROR_OFFSET chunk, and its piece.
void error_chunk(Reply& out, uint64_t cookie, uint16_t flags, uint32_t nbd_error,
                 std::string_view message, std::optional<uint64_t> offset) {
  const std::string msg = wire_message(message);
  const uint32_t len = static_cast<uint32_t>(6 + msg.size() + (offset ? 8 : 0));
  const size_t at = out.meta.size();
  chunk_head(out.meta, cookie, flags, offset ? nbd::kChunkErrorOffset : nbd::kChunkError, len);
  out.meta.resize(at + 20 + len);
  char* p = out.meta.data() + at + 20;
  nbd::put32(p, nbd_error);
  nbd::put16(p + 4, static_cast<uint16_t>(msg.size()));
  std::memcpy(p + 6, msg.data(), msg.size());
  if (offset) nbd::put64(p + 6 + msg.size(), *offset);
  out.pieces.push_back({false, static_cast<uint32_t>(at), static_cast<uint32_t>(20 + len)});
}

}  // namespace

std::string wire_message(std::string_view text, size_t max) {
  std::string out;
  out.reserve(std::min(text.size(), max));
  for (size_t i = 0; i < text.size();) {
    size_t n = utf8_length(text, i);
    const bool valid = n > 0 && text[i] != '\0';
    if (!valid) n = 1;
    if (out.size() + (valid ? n : 1) > max) break;
    if (valid) {
      out.append(text, i, n);
    } else {
      out.push_back('?');
    }
    i += n;
  }
  return out;
}

Reply simple_reply(uint64_t cookie, uint32_t nbd_error) {
  Reply out;
  out.meta.resize(16);
  nbd::put32(out.meta.data(), nbd::kSimpleReplyMagic);
  nbd::put32(out.meta.data() + 4, nbd_error);
  nbd::put64(out.meta.data() + 8, cookie);
  return out;
}

Reply structured_error(uint64_t cookie, uint32_t nbd_error, std::string_view message) {
  Reply out;
  error_chunk(out, cookie, nbd::kReplyFlagDone, nbd_error, message, std::nullopt);
  return out;
}

Reply read_reply(const nbd::Request& r, bool structured, uint32_t block_size, uint32_t max_chunk,
                 ReadOutcome outcome) {
  const Status& s = outcome.status;
  const uint32_t error = s.is_ok() ? 0 : nbd::wire_error(s.code());
  if (!structured) {
    Reply out = simple_reply(r.cookie, error);
    if (s.is_ok() && r.length > 0) {
      out.pieces = {{false, 0, 16}, {true, 0, r.length}};
      out.data = std::move(outcome.data);
    }
    return out;
  }
  Reply out;
  const bool df = r.flags & nbd::kCmdFlagDf;
  const uint64_t end = r.offset + r.length;
  // [lo, hi) of the request as OFFSET_DATA chunks of at most max_chunk bytes;
  // DONE on the last one when `done`.
  auto data_chunks = [&](uint64_t lo, uint64_t hi, bool done) {
    while (lo < hi) {
      const uint64_t n = std::min<uint64_t>(hi - lo, max_chunk);
      const size_t at = out.meta.size();
      const bool last = lo + n == hi;
      chunk_head(out.meta, r.cookie, done && last ? nbd::kReplyFlagDone : 0,
                 nbd::kChunkOffsetData, static_cast<uint32_t>(8 + n));
      out.meta.resize(at + 28);
      nbd::put64(out.meta.data() + at + 20, lo);
      out.pieces.push_back({false, static_cast<uint32_t>(at), 28});
      out.pieces.push_back(
          {true, static_cast<uint32_t>(lo - r.offset), static_cast<uint32_t>(n)});
      lo += n;
    }
  };
  if (s.is_ok()) {
    if (r.length == 0) {
      chunk_head(out.meta, r.cookie, nbd::kReplyFlagDone, nbd::kChunkNone, 0);
      return out;
    }
    if (df && r.length > max_chunk) {
      error_chunk(out, r.cookie, nbd::kReplyFlagDone, nbd::kEoverflow,
                  "a read of " + std::to_string(r.length) + " bytes does not fit one chunk of " +
                      std::to_string(max_chunk),
                  std::nullopt);
      return out;
    }
    data_chunks(r.offset, end, true);
    out.data = std::move(outcome.data);
    return out;
  }
  const auto& unreadable = outcome.unreadable;
  if (unreadable.empty() || df) {
    // One failure: the good bytes before it (not under DF), then the error.
    const auto at = s.error_offset();
    const uint64_t good = at && !df && *at > r.offset ? std::min<uint64_t>(*at - r.offset, r.length) : 0;
    data_chunks(r.offset, r.offset + good, false);
    error_chunk(out, r.cookie, nbd::kReplyFlagDone, error, s.message(), at);
    if (good > 0) out.data = std::move(outcome.data);
    return out;
  }
  uint64_t pos = r.offset;
  for (size_t i = 0; i < unreadable.size(); ++i) {
    const uint64_t lo = std::max(r.offset, unreadable[i] * block_size);
    const uint64_t hi = std::min(end, (unreadable[i] + 1) * block_size);
    if (lo > pos) data_chunks(pos, lo, false);
    const bool last = i + 1 == unreadable.size() && hi >= end;
    const std::string message =
        i == 0 ? s.message() : "block " + std::to_string(unreadable[i]) + " cannot be read";
    error_chunk(out, r.cookie, last ? nbd::kReplyFlagDone : 0, error, message, lo);
    pos = hi;
  }
  if (pos < end) data_chunks(pos, end, true);
  out.data = std::move(outcome.data);
  return out;
}

Reply block_status_reply(uint64_t cookie, const std::vector<std::pair<uint32_t, Runs>>& contexts) {
  Reply out;
  for (size_t c = 0; c < contexts.size(); ++c) {
    const auto& [id, runs] = contexts[c];
    const uint32_t len = static_cast<uint32_t>(4 + 8 * runs.size());
    const size_t at = out.meta.size();
    chunk_head(out.meta, cookie, c + 1 == contexts.size() ? nbd::kReplyFlagDone : 0,
               nbd::kChunkBlockStatus, len);
    out.meta.resize(at + 20 + len);
    char* p = out.meta.data() + at + 20;
    nbd::put32(p, id);
    for (size_t i = 0; i < runs.size(); ++i) {
      nbd::put32(p + 4 + 8 * i, static_cast<uint32_t>(runs[i].first));
      nbd::put32(p + 8 + 8 * i, runs[i].second);
    }
  }
  return out;
}

}  // namespace dmremap::server
