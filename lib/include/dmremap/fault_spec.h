// A text form of FaultyDevice faults, for demos and end-to-end tests.
#pragma once

#include <string>

#include "dmremap/faulty_device.h"

namespace dmremap {

// Applies a comma-separated list of faults, block numbers in units of the
// device's fault block:
//   read:N[-M]      reads fail until the block is written (dm-dust)
//   write:N[-M]     writes fail, forever
//   weak:N[-M]xK    the next K reads fail, then reads work
//   slow:N[-M]xMS   each read touching the block first waits MS milliseconds
//                   (a disk's internal retries on a bad sector)
//   flush:MS        every flush first waits MS milliseconds (a disk's cache)
// A range may take a step: write:0-9999/100 is every 100th block.
// EINVAL with the offending item when the text does not parse.
Status apply_fault_spec(FaultyDevice& dev, const std::string& spec);

}  // namespace dmremap
