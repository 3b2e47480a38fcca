#include "dmremap/bad_list.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <sstream>

namespace dmremap {

namespace {

// The words of a line, up to a '#' comment.
std::vector<std::string> words(const std::string& line) {
  std::istringstream in(line.substr(0, line.find('#')));
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

// A number as ddrescue and the kernel write them: decimal, or hex with 0x.
// (No octal: badblocks never writes a leading zero, and "010" is ten.)
bool number(const std::string& w, uint64_t& out) {
  if (w.empty() || w[0] == '-' || w[0] == '+') return false;
  const bool hex = w.size() > 2 && w[0] == '0' && (w[1] == 'x' || w[1] == 'X');
  errno = 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(w.c_str(), &end, hex ? 16 : 10);
  if (errno != 0 || end == w.c_str() || *end != '\0') return false;
  out = v;
  return true;
}

}  // namespace

Result<BadList> parse_bad_list(const std::string& text, const BadListOptions& o,
                               uint64_t main_size, uint32_t block_size) {
  const bool ddrescue = o.format == BadListFormat::kDdrescue;
  if (!ddrescue && o.unit == 0) {
    return Status::error(EINVAL, o.format == BadListFormat::kBadblocks
                                     ? "a badblocks list needs its block size (badblocks -b)"
                                     : "an LBA list needs its sector size");
  }
  BadList out;
  std::istringstream in(text);
  std::string line;
  uint64_t line_no = 0;
  bool status_line_seen = false;  // ddrescue: the first line is the current position
  auto fail = [&](const std::string& why) {
    return Status::error(EINVAL, "line " + std::to_string(line_no) + ": " + why);
  };
  while (std::getline(in, line)) {
    ++line_no;
    const std::vector<std::string> w = words(line);
    if (w.empty()) continue;
    uint64_t pos = 0, size = 0;
    if (ddrescue) {
      if (!status_line_seen) {
        // current_pos current_status [current_pass]
        uint64_t ignored = 0;
        if (w.size() < 2 || w.size() > 3 || !number(w[0], ignored) || w[1].size() != 1) {
          return fail("not a ddrescue mapfile's status line (current_pos current_status)");
        }
        status_line_seen = true;
        continue;
      }
      if (w.size() != 3 || !number(w[0], pos) || !number(w[1], size) || w[2].size() != 1 ||
          std::string("?*/-+").find(w[2][0]) == std::string::npos) {
        return fail("not a ddrescue block line (pos size status, status one of ?*/-+)");
      }
      if (pos <= UINT64_MAX - size) out.extent = std::max(out.extent, pos + size);
      if (pos > main_size || size > main_size - pos) {
        // Past main: an error only where it matters, a bad area.
        if (o.statuses.find(w[2][0]) != std::string::npos) {
          return fail("the bad area at byte " + std::to_string(pos) + " lies past main's end (" +
                      std::to_string(main_size) + " bytes): a map of another disk?");
        }
        continue;
      }
      if (o.statuses.find(w[2][0]) == std::string::npos) {
        if (w[2][0] != '+') out.unfinished_bytes += size;
        continue;
      }
    } else {
      uint64_t n = 0;
      if (w.size() != 1 || !number(w[0], n)) {
        return fail(o.format == BadListFormat::kBadblocks ? "not a block number"
                                                          : "not an LBA");
      }
      if (n > (main_size - 1) / o.unit) {
        return fail((o.format == BadListFormat::kBadblocks ? "block " : "LBA ") +
                    std::to_string(n) + " of " + std::to_string(o.unit) +
                    " bytes lies past main's end (" + std::to_string(main_size) + " bytes)");
      }
      pos = n * o.unit;
      size = std::min<uint64_t>(o.unit, main_size - pos);
    }
    ++out.entries;
    if (size == 0) continue;
    out.bad_bytes += size;
    const uint64_t first = pos / block_size;
    const uint64_t last = (pos + size - 1) / block_size;
    auto too_many = [&] {
      return Status::error(E2BIG, "line " + std::to_string(line_no) + ": the list names more than " +
                                      std::to_string(o.max_blocks) +
                                      " blocks, more than the set can record as pending");
    };
    if (last - first >= o.max_blocks) return too_many();
    for (uint64_t b = first; b <= last; ++b) out.blocks.push_back(b);
    if (out.blocks.size() > o.max_blocks) {
      std::sort(out.blocks.begin(), out.blocks.end());
      out.blocks.erase(std::unique(out.blocks.begin(), out.blocks.end()), out.blocks.end());
      if (out.blocks.size() > o.max_blocks) return too_many();
    }
  }
  if (ddrescue && !status_line_seen) return Status::error(EINVAL, "an empty ddrescue mapfile");
  std::sort(out.blocks.begin(), out.blocks.end());
  out.blocks.erase(std::unique(out.blocks.begin(), out.blocks.end()), out.blocks.end());
  return out;
}

}  // namespace dmremap
