#include "dmremap/fault_spec.h"

#include <charconv>
#include <sstream>

namespace dmremap {
namespace {

bool parse_u64(const std::string& s, uint64_t& out) {
  const auto r = std::from_chars(s.data(), s.data() + s.size(), out);
  return r.ec == std::errc() && r.ptr == s.data() + s.size() && !s.empty();
}

}  // namespace

Status apply_fault_spec(FaultyDevice& dev, const std::string& spec) {
  std::stringstream items(spec);
  std::string item;
  const uint64_t blocks = dev.size() / dev.fault_block();
  while (std::getline(items, item, ',')) {
    if (item.empty()) continue;
    auto bad = [&](const std::string& why) {
      return Status::error(EINVAL, "fault \"" + item + "\": " + why +
                                       " (expected read:N[-M[/S]], write:N[-M[/S]], weak:N[-M[/S]]xK , "
                                       "slow:N[-M[/S]]xMS or flush:MS)");
    };
    const auto colon = item.find(':');
    if (colon == std::string::npos) return bad("no kind");
    const std::string kind = item.substr(0, colon);
    std::string range = item.substr(colon + 1);
    if (kind == "flush") {
      uint64_t ms = 0;
      if (!parse_u64(range, ms) || ms > 60000) return bad("flush:MS takes milliseconds");
      dev.set_flush_delay(std::chrono::milliseconds(ms));
      continue;
    }
    uint64_t times = 0;
    if (kind == "weak" || kind == "slow") {
      const auto x = range.find('x');
      if (x == std::string::npos || !parse_u64(range.substr(x + 1), times) || times == 0) {
        return bad(kind == "weak" ? "a weak block needs xK, K >= 1"
                                  : "a slow block needs xMS, the milliseconds per read");
      }
      range.resize(x);
    }
    uint64_t step = 1;
    if (const auto slash = range.find('/'); slash != std::string::npos) {
      if (!parse_u64(range.substr(slash + 1), step) || step == 0) return bad("bad /STEP");
      range.resize(slash);
    }
    uint64_t first = 0;
    uint64_t last = 0;
    const auto dash = range.find('-');
    if (!parse_u64(range.substr(0, dash), first) ||
        !parse_u64(dash == std::string::npos ? range : range.substr(dash + 1), last) ||
        last < first) {
      return bad("bad block range");
    }
    if (last >= blocks) return bad("block beyond the end (" + std::to_string(blocks) + " blocks)");
    for (uint64_t b = first; b <= last; b += step) {
      if (kind == "read") {
        dev.add_read_error(b);
      } else if (kind == "write") {
        dev.add_write_error(b);
      } else if (kind == "weak") {
        dev.add_weak_block(b, static_cast<unsigned>(times));
      } else if (kind == "slow") {
        dev.add_slow_block(b, std::chrono::milliseconds(times));
      } else {
        return bad("unknown kind");
      }
    }
  }
  return Status::ok();
}

}  // namespace dmremap
