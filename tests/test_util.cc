#include "test_util.h"

#include <catch2/catch.hpp>

#include "dmremap/log.h"

namespace dmremap::test {

namespace {
// Tests inject failures on purpose: keep the log quiet unless asked.
struct QuietLog {
  QuietLog() {
    if (!std::getenv("DMREMAP_TEST_LOG")) set_log_sink([](LogLevel, const std::string&) {});
  }
} quiet_log;
}  // namespace

Set make_set(const SetParams& p) {
  Set s;
  s.block = p.block;
  s.main_mem = std::make_shared<MemoryDevice>(p.main_size, "main");
  s.spare_mem = std::make_shared<MemoryDevice>(p.spare_size, "spare");
  s.main = std::make_shared<FaultyDevice>(s.main_mem, p.block, "main");
  s.spare = std::make_shared<FaultyDevice>(s.spare_mem, 512, "spare");
  if (p.spare_leased) s.spare->set_unlockable();
  LayoutParams lp;
  lp.main_size = p.main_size;
  lp.block_size = p.block;
  lp.journal_bytes = p.journal_bytes;
  lp.pending_capacity = p.pending_capacity;
  auto sb = MetadataStore::format(*s.spare, lp, "");
  REQUIRE(sb.is_ok());
  auto e = Engine::open(s.main, s.spare, p.options);
  INFO(e.status().to_string());
  REQUIRE(e.is_ok());
  s.engine = std::move(e.value());
  return s;
}

void reopen(Set& s, const EngineOptions& options) {
  s.engine.reset();
  auto e = Engine::open(s.main, s.spare, options);
  INFO(e.status().to_string());
  REQUIRE(e.is_ok());
  s.engine = std::move(e.value());
}

std::vector<char> pattern(size_t len, uint64_t seed) {
  std::vector<char> v(len);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < len; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    v[i] = static_cast<char>(x);
  }
  return v;
}

}  // namespace dmremap::test
