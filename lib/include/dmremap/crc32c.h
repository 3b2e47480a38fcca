// CRC32C (Castagnoli), the checksum of every metadata structure on the spare.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dmremap {

// Extends `crc` (0 to start) over `len` bytes. Uses the SSE4.2 instruction
// when the CPU has it. crc32c("123456789") == 0xE3069283.
uint32_t crc32c(const void* data, size_t len, uint32_t crc = 0);

}  // namespace dmremap
