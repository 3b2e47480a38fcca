// The log of a served set: a line when health changes, a summary at its
// interval (lib/health_log.h).
#include <catch2/catch.hpp>
#include <chrono>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "dmremap/health_log.h"
#include "dmremap/log.h"
#include "test_util.h"

using namespace dmremap;
using namespace std::chrono_literals;

namespace {

// Captures log lines while it lives.
struct Captured {
  std::mutex mu;
  std::vector<std::pair<LogLevel, std::string>> lines;
  Captured() {
    set_log_sink([this](LogLevel level, const std::string& line) {
      std::lock_guard lock(mu);
      lines.emplace_back(level, line);
    });
  }
  ~Captured() { set_log_sink([](LogLevel, const std::string&) {}); }
  // Waits up to 10 s for a line that starts with `prefix`.
  std::optional<std::pair<LogLevel, std::string>> wait_for(const std::string& prefix) {
    for (int i = 0; i < 1000; ++i) {
      {
        std::lock_guard lock(mu);
        for (const auto& l : lines) {
          if (l.second.rfind(prefix, 0) == 0) return l;
        }
      }
      std::this_thread::sleep_for(10ms);
    }
    return std::nullopt;
  }
};

}  // namespace

TEST_CASE("health log: a change of health at once, and a summary at its interval", "[health]") {
  auto s = test::make_set();
  Captured log;
  HealthLog health(*s.engine, 300ms, 10ms);
  s.main->add_read_error(5);
  std::vector<char> buf(4096);
  REQUIRE(s.engine->read(buf.data(), buf.size(), 5 * 4096).code() == EIO);
  const auto changed = log.wait_for("health: warning (was ok)");
  REQUIRE(changed);
  CHECK(changed->first == LogLevel::kWarning);
  CHECK(changed->second.find("pending") != std::string::npos);
  const auto summary = log.wait_for("summary: health warning; 0 remapped, 1 pending;");
  REQUIRE(summary);
  CHECK(summary->first == LogLevel::kInfo);
  CHECK(summary->second.find("main online") != std::string::npos);
  // Back to ok: the block is written, so it gets a slot and is no longer
  // pending.
  REQUIRE(s.engine->write(buf.data(), buf.size(), 5 * 4096, true).is_ok());
  const auto back = log.wait_for("health: ok (was warning)");
  REQUIRE(back);
  CHECK(back->first == LogLevel::kInfo);
}

TEST_CASE("health log: no summary when its interval is zero", "[health]") {
  auto s = test::make_set();
  Captured log;
  {
    HealthLog health(*s.engine, 0ms, 5ms);
    std::this_thread::sleep_for(100ms);
  }
  std::lock_guard lock(log.mu);
  for (const auto& l : log.lines) CHECK(l.second.rfind("summary:", 0) != 0);
}
