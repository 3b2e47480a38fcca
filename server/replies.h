// Reply encoding: how dmremap-server's answers look on the wire, simple or
// structured. Pure functions of what a request produced; no socket, no
// session state, so they are read and fuzzed on their own.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dmremap/status.h"
#include "protocol.h"

namespace dmremap::server {

// A byte buffer that is not zeroed when it is made: request payloads and read
// data are overwritten at once, so clearing them first would be wasted work.
struct Buffer {
  std::unique_ptr<char[]> bytes;
  size_t size = 0;
  Buffer() = default;
  explicit Buffer(size_t n) : bytes(std::make_unique_for_overwrite<char[]>(n)), size(n) {}
  char* data() { return bytes.get(); }
};

// A reply as it goes on the wire: headers in `meta`, read data in `data`,
// and the order in which slices of the two are sent. The data is never
// copied into the headers' buffer.
struct Reply {
  struct Piece {
    bool in_data;
    uint32_t offset;
    uint32_t length;
  };
  std::vector<char> meta;
  Buffer data;
  std::vector<Piece> pieces;  // empty: all of `meta`
};

// The longest error message sent (the protocol says a string SHOULD be no
// longer than 256 bytes).
inline constexpr size_t kMaxMessageBytes = 256;
// `text` made fit for the wire: cut to `max` bytes at a UTF-8 character
// boundary, with NULs and invalid bytes replaced by '?'. Also for echoing
// what a client sent (an export name) in a message or a log line.
std::string wire_message(std::string_view text, size_t max = kMaxMessageBytes);

Reply simple_reply(uint64_t cookie, uint32_t nbd_error);
// One ERROR chunk, with DONE: a structured failure with its message.
Reply structured_error(uint64_t cookie, uint32_t nbd_error, std::string_view message);

// A read's reply. `s` is the read's outcome with its errno already narrowed
// (dmremap::client_errno); `unreadable` lists the blocks (of `block_size`
// bytes) that could not be read, when that is why it failed.
// - Simple replies: the header, then the data unless the read failed.
// - Structured: OFFSET_DATA chunks of at most `max_chunk` bytes each. When
//   blocks are unreadable every good byte still goes out, and each
//   unreadable block gets an ERROR_OFFSET chunk naming its first byte. With
//   DF the client wants one content chunk: a longer read gets EOVERFLOW
//   without data, and an unreadable block only its first error.
struct ReadOutcome {
  Buffer data;  // request.length bytes
  Status status;
  std::vector<uint64_t> unreadable;
};
Reply read_reply(const nbd::Request& r, bool structured, uint32_t block_size, uint32_t max_chunk,
                 ReadOutcome outcome);

// BLOCK_STATUS: one chunk per context, the last one DONE. Each run is
// (length, flags).
using Runs = std::vector<std::pair<uint64_t, uint32_t>>;
Reply block_status_reply(uint64_t cookie, const std::vector<std::pair<uint32_t, Runs>>& contexts);

}  // namespace dmremap::server
