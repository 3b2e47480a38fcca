#include "dmremap/block_device.h"
#include "dmremap/file_device.h"
#include "dmremap/nbd_device.h"

namespace dmremap {

bool is_nbd_uri(const std::string& spec) {
  return spec.rfind("nbd://", 0) == 0 || spec.rfind("nbd+unix://", 0) == 0 ||
         spec.rfind("nbds://", 0) == 0 || spec.rfind("nbds+unix://", 0) == 0;
}

Result<std::shared_ptr<BlockDevice>> open_device(const std::string& spec, const std::string& role,
                                                 const OpenOptions& options) {
  if (spec.empty()) return Status::error(EINVAL, role + ": no path given");
  if (is_nbd_uri(spec)) {
    auto n = NbdDevice::open(spec, role, options);
    if (!n.is_ok()) return n.take_status();
    return std::shared_ptr<BlockDevice>(n.value());
  }
  auto f = FileDevice::open(spec, role, options);
  if (!f.is_ok()) return f.take_status();
  return std::shared_ptr<BlockDevice>(f.value());
}

}  // namespace dmremap
