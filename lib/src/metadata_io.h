// What the metadata store and its repairs (upgrade, rebuild) share:
// aligned buffers and the writing of checkpoints. Internal to lib/.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

#include "dmremap/block_device.h"
#include "dmremap/metadata.h"
#include "dmremap/remap_table.h"

namespace dmremap::detail {

inline constexpr size_t kIoChunk = 1 << 20;  // a multiple of kMetaUnit and kCheckpointEntryBytes

// The I/O buffer for a checkpoint of `entries`: big enough for one chunk of
// them (and at least one unit, for the header), no bigger.
size_t checkpoint_chunk(uint64_t entries);

// A heap buffer aligned for O_DIRECT devices, zeroed.
struct MetaBuffer {
  explicit MetaBuffer(size_t n) : data(static_cast<char*>(std::aligned_alloc(kMetaUnit, n))) {
    std::memset(data, 0, n);
  }
  ~MetaBuffer() { std::free(data); }
  MetaBuffer(const MetaBuffer&) = delete;
  MetaBuffer& operator=(const MetaBuffer&) = delete;
  char* data;
};

// Streams the checkpoint entries of `table`, then its header (of `epoch`),
// to the checkpoint copy at `offset`.
Status write_checkpoint(BlockDevice& spare, const Superblock& sb, uint64_t offset,
                        const RemapTable& table, uint64_t epoch);

// Unit 0 of the slot header area: the superblock as formatted (generation
// 0, clean), never rewritten.
Status write_geometry_backup(BlockDevice& spare, const Superblock& sb);

}  // namespace dmremap::detail
