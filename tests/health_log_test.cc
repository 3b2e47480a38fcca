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

TEST_CASE("health log: another reason at the same level is a line too; the summary says why",
          "[health]") {
  test::SetParams p;
  p.options.warn_percent = 1;  // one used slot is "nearly full"
  auto s = test::make_set(p);
  Captured log;
  HealthLog health(*s.engine, 200ms, 10ms);
  std::vector<char> buf(4096);
  s.main->add_read_error(5);
  REQUIRE(s.engine->read(buf.data(), buf.size(), 5 * 4096).code() == EIO);
  REQUIRE(log.wait_for("health: warning (was ok): 1 block(s) are unreadable"));
  // Still a warning, now for the pool: said at once.
  for (uint64_t b = 10; s.engine->stats().health_problems.front() == "pending"; ++b) {
    REQUIRE(b < 60);
    s.main->add_write_error(b);
    REQUIRE(s.engine->write(buf.data(), buf.size(), b * 4096, true).is_ok());
  }
  const auto other = log.wait_for("health: warning (problems now: pool_nearly_full, pending; were: pending): ");
  REQUIRE(other);
  CHECK(other->second.find("% of the spare pool is used") != std::string::npos);
  std::this_thread::sleep_for(400ms);  // two summaries' time
  {
    std::lock_guard lock(log.mu);
    bool said = false;
    for (const auto& l : log.lines) {
      said = said || (l.second.rfind("summary: ", 0) == 0 &&
                      l.second.find("; because ") != std::string::npos &&
                      l.second.find("; problems: pool_nearly_full, pending") != std::string::npos);
    }
    CHECK(said);
  }
  // A figure that moves within the same problem waits for the summary.
  s.main->add_read_error(6);
  REQUIRE(s.engine->read(buf.data(), buf.size(), 6 * 4096).code() == EIO);
  std::this_thread::sleep_for(100ms);
  std::lock_guard lock(log.mu);
  size_t health_lines = 0;
  for (const auto& l : log.lines) health_lines += l.second.rfind("health: ", 0) == 0;
  CHECK(health_lines == 2);
}
