#include "dmremap/health_log.h"

#include <iterator>

#include "dmremap/log.h"

namespace dmremap {

namespace {
std::string join(const std::vector<std::string>& parts, const char* sep) {
  std::string out;
  for (const std::string& p : parts) out += (out.empty() ? "" : sep) + p;
  return out;
}
}  // namespace

std::string summary_line(const EngineStats& s) {
  auto n = [](uint64_t v) { return std::to_string(v); };
  std::string causes;
  for (size_t c = 1; c < std::size(s.remaps_by_cause); ++c) {
    if (s.remaps_by_cause[c] == 0) continue;
    causes += (causes.empty() ? "" : ", ") + n(s.remaps_by_cause[c]) + " " +
              cause_name(static_cast<Cause>(c));
  }
  return "summary: health " + std::string(health_name(s.health)) + "; " + n(s.remaps) +
         " remapped" + (causes.empty() ? "" : " (" + causes + ")") + ", " + n(s.pending) +
         " pending; slots " + n(s.slots_used) + " used, " + n(s.slots_bad) + " bad, " +
         n(s.slots_free) + " free of " + n(s.slots_total) + "; since start " + n(s.reads) +
         " reads, " + n(s.writes) + " writes, " + n(s.main_read_errors) + " read errors and " +
         n(s.main_write_errors) + " write errors on main, " + n(s.retry_successes) +
         " reads saved by a retry, " + n(s.unreadable_reads) + " unreadable, " + n(s.slow_reads) +
         " slow; main " +
         (s.main_offline_since != 0 ? "offline since " + utc_time(s.main_offline_since)
                                    : std::string("online")) +
         (s.health_reason.empty() ? "" : "; because " + s.health_reason) +
         (s.health_problems.size() > 1 ? "; problems: " + join(s.health_problems, ", ") : "");
}

HealthLog::HealthLog(Engine& engine, std::chrono::milliseconds summary,
                     std::chrono::milliseconds poll)
    : engine_(engine), summary_(summary), poll_(poll), last_(engine.stats()) {
  // The health when it was made is the one changes are told against.
  thread_ = std::thread([this] { run(); });
}

HealthLog::~HealthLog() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void HealthLog::run() {
  using Clock = std::chrono::steady_clock;
  Health last = last_.health;
  std::vector<std::string> last_problems = last_.health_problems;
  auto next_summary = Clock::now() + summary_;
  std::unique_lock lock(mu_);
  while (!cv_.wait_for(lock, poll_, [this] { return stop_; })) {
    lock.unlock();
    const EngineStats s = engine_.stats();
    // A new level, or the same level with problems added or gone (main
    // came back but the journal broke): a line. A figure that moves within
    // one problem (more pending blocks) waits for the summary.
    if (s.health != last || s.health_problems != last_problems) {
      const std::string was =
          s.health != last ? std::string(" (was ") + health_name(last) + ")"
                           : " (problems now: " + join(s.health_problems, ", ") +
                                 "; were: " + join(last_problems, ", ") + ")";
      const std::string line = std::string("health: ") + health_name(s.health) + was +
                               (s.health_reason.empty() ? "" : ": " + s.health_reason);
      log(s.health == Health::kFailing   ? LogLevel::kError
          : s.health == Health::kWarning ? LogLevel::kWarning
                                         : LogLevel::kInfo,
          line);
      last = s.health;
      last_problems = s.health_problems;
    }
    if (summary_.count() > 0 && Clock::now() >= next_summary) {
      log(LogLevel::kInfo, summary_line(s));
      next_summary = Clock::now() + summary_;
    }
    lock.lock();
  }
}

}  // namespace dmremap
