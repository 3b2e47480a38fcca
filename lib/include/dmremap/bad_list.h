// Lists of bad areas made by other tools, read for `dmremap import`: a GNU
// ddrescue mapfile, the output of badblocks(8), or a list of LBAs (a SMART
// self-test log, a kernel log). Each names areas of main in its own unit;
// they come out as main's blocks (docs/cli.md, "import").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dmremap/status.h"

namespace dmremap {

enum class BadListFormat { kDdrescue, kBadblocks, kLba };

struct BadListOptions {
  BadListFormat format = BadListFormat::kDdrescue;
  // badblocks: its -b block size in bytes; LBA list: the sector size. Not
  // guessed: a list read in the wrong unit names the wrong blocks.
  uint64_t unit = 0;
  // ddrescue: the status characters taken as bad. '-' (bad sector) by
  // default; '*' (non-trimmed) and '/' (non-scraped) may be added: areas
  // that failed a read and were not yet narrowed down.
  std::string statuses = "-";
  // More distinct blocks than this is E2BIG (the set's room for pending
  // blocks): a whole-disk '-' area is not expanded into memory.
  uint64_t max_blocks = ~uint64_t{0};
};

// What a list names, as main's blocks.
struct BadList {
  std::vector<uint64_t> blocks;  // sorted, each once
  uint64_t entries = 0;          // bad areas or numbers read
  uint64_t bad_bytes = 0;        // bytes they cover
  // ddrescue: bytes in areas of other statuses that are not finished
  // ('?', and '*' and '/' when not taken): not imported, but worth saying.
  uint64_t unfinished_bytes = 0;
  // ddrescue: the end of its last area, the size of the disk it was made
  // of; a map of a whole disk used for a partition (or another disk) shows
  // here. 0 for the other lists.
  uint64_t extent = 0;
};

// Parses `text` (the whole file) for a main of `main_size` bytes in blocks
// of `block_size`. A block is named when any byte of it lies in a bad area.
// EINVAL, naming the line, for a malformed line, a number that does not fit
// 64 bits, or an area that lies past main's end; E2BIG past max_blocks.
Result<BadList> parse_bad_list(const std::string& text, const BadListOptions& o,
                               uint64_t main_size, uint32_t block_size);

}  // namespace dmremap
