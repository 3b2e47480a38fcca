// Opening a set (main + spare) from what a user typed: what both frontends
// do at start-up.
#pragma once

#include <memory>
#include <string>

#include "dmremap/engine.h"

namespace dmremap {

struct SetConfig {
  std::string main;   // path or NBD URI
  std::string spare;  // path or NBD URI
  bool read_only = false;
  IoMode io = IoMode::kAuto;
  // NBD backends: a request with no answer after this long fails (0: never).
  std::chrono::milliseconds io_timeout{30000};
  // Testing and demos: faults injected into main (see fault_spec.h).
  std::string inject;
  // The same for the spare (benchmarks: a spare whose flush takes 5 ms).
  std::string inject_spare;
  EngineOptions engine;
};

// Opens both devices (locked, unless read-only), wraps main in a
// FaultyDevice when `inject` is set (logging a warning), and opens the
// engine. Errors say what to do.
Result<std::unique_ptr<Engine>> open_set(const SetConfig& config);

// The evacuator a frontend runs beside the set (lib/evacuate.h): NEW is
// opened as main is (the same I/O mode and timeout), and may be neither
// main nor the spare.
class Evacuator;
std::unique_ptr<Evacuator> make_evacuator(Engine& engine, const SetConfig& config);

// Says why `main` is not the disk a set was formatted for (its size, or its
// identity: a block device's serial number, stored cut to 63 bytes), or ""
// when it is. The engine refuses to open on it; `dmremap check` and `status`
// report it.
std::string main_mismatch(const BlockDevice& main, uint64_t main_size,
                          const std::string& main_identity);

}  // namespace dmremap
