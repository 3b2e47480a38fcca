// What a served set says in its log without being asked: a line when its
// health changes (ok, warning, failing, with the reason), and a summary of
// its figures at a fixed interval. Both frontends run one, so that an admin
// who only reads the journal or syslog learns that the disk is getting worse.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "dmremap/engine.h"

namespace dmremap {

// The summary line (also used by tests and `dmremap status` readers): remaps
// by cause, pending, slots, requests and errors since open, main's state.
std::string summary_line(const EngineStats& s);

class HealthLog {
 public:
  // Looks at the engine every `poll`; a summary every `summary` (zero:
  // none). Starts its thread at once; the engine must outlive it.
  HealthLog(Engine& engine, std::chrono::milliseconds summary,
            std::chrono::milliseconds poll = std::chrono::seconds(1));
  // Stops the thread.
  ~HealthLog();
  HealthLog(const HealthLog&) = delete;
  HealthLog& operator=(const HealthLog&) = delete;

 private:
  void run();

  Engine& engine_;
  const std::chrono::milliseconds summary_, poll_;
  const EngineStats last_;  // at construction
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;  // under mu_
  std::thread thread_;
};

}  // namespace dmremap
