#include "dmremap/open_set.h"

#include "dmremap/evacuate.h"
#include "dmremap/fault_spec.h"
#include "dmremap/faulty_device.h"
#include "dmremap/log.h"
#include "dmremap/metadata_store.h"

namespace dmremap {

Result<std::unique_ptr<Engine>> open_set(const SetConfig& config) {
  OpenOptions o;
  o.read_only = config.read_only;
  o.io = config.io;
  o.request_timeout = config.io_timeout;
  auto spare = open_device(config.spare, "spare", o);
  if (!spare.is_ok()) return spare.take_status();
  auto main = open_device(config.main, "main", o);
  if (!main.is_ok()) return main.take_status();
  std::shared_ptr<BlockDevice> main_dev = main.value();
  if (!config.inject.empty()) {
    auto sb = read_superblock(*spare.value());
    if (!sb.is_ok()) return sb.take_status();
    auto faulty = std::make_shared<FaultyDevice>(main_dev, sb->sb.block_size, "main");
    if (auto s = apply_fault_spec(*faulty, config.inject); !s.is_ok()) return s;
    log(LogLevel::kWarning, "injecting faults into main: " + config.inject);
    main_dev = faulty;
  }
  std::shared_ptr<BlockDevice> spare_dev = spare.value();
  if (!config.inject_spare.empty()) {
    auto sb = read_superblock(*spare_dev);
    if (!sb.is_ok()) return sb.take_status();
    auto faulty = std::make_shared<FaultyDevice>(spare_dev, 512, "spare");
    if (auto s = apply_fault_spec(*faulty, config.inject_spare); !s.is_ok()) return s;
    log(LogLevel::kWarning, "injecting faults into the spare: " + config.inject_spare);
    spare_dev = faulty;
  }
  EngineOptions eo = config.engine;
  eo.read_only = config.read_only;
  return Engine::open(main_dev, spare_dev, eo);
}

std::string main_mismatch(const BlockDevice& main, uint64_t main_size,
                          const std::string& main_identity) {
  if (main.size() != main_size) {
    return main.name() + " is " + std::to_string(main.size()) +
           " bytes, but the set was formatted for a main of " + std::to_string(main_size) +
           " bytes";
  }
  const std::string id = main.identity();
  if (!id.empty() && !main_identity.empty() && id.substr(0, 63) != main_identity.substr(0, 63)) {
    return main.name() + " is \"" + id + "\", but the set was formatted for \"" + main_identity +
           "\"";
  }
  return {};
}

std::unique_ptr<Evacuator> make_evacuator(Engine& engine, const SetConfig& config) {
  OpenOptions o;
  o.io = config.io;
  o.request_timeout = config.io_timeout;
  return std::make_unique<Evacuator>(engine, o, std::vector<std::string>{config.main, config.spare});
}

}  // namespace dmremap
