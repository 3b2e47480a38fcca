// Shared fixtures: a main and a spare in memory, wrapped for fault injection.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "dmremap/engine.h"
#include "dmremap/faulty_device.h"
#include "dmremap/memory_device.h"

namespace dmremap::test {

struct Set {
  std::shared_ptr<MemoryDevice> main_mem;
  std::shared_ptr<MemoryDevice> spare_mem;
  std::shared_ptr<FaultyDevice> main;   // faults are set per `block` bytes
  std::shared_ptr<FaultyDevice> spare;  // faults are set per 512 bytes
  std::unique_ptr<Engine> engine;
  uint32_t block = 4096;
};

struct SetParams {
  uint64_t main_size = 1 << 20;
  uint64_t spare_size = 1 << 20;
  uint32_t block = 4096;
  uint64_t journal_bytes = 0;
  uint64_t pending_capacity = 0;
  bool spare_leased = false;  // as an NBD spare: nothing locks it
  EngineOptions options{};
};

// Formats the spare and opens the engine; REQUIREs success.
Set make_set(const SetParams& p = {});
// Drops the engine without closing it (as a crash would) and opens it again
// on the same devices, keeping main's faults.
void reopen(Set& s, const EngineOptions& options = {});

// Deterministic bytes that differ per seed and per position.
std::vector<char> pattern(size_t len, uint64_t seed);

}  // namespace dmremap::test
