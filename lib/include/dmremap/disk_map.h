// A picture of a set, for `dmremap map`: main's blocks as a grid of cells,
// coloured as ddrescueview colours a ddrescue mapfile, and the spare's slot
// pool as a strip below it, with a title and a legend that give the set's
// figures. Pure functions of their input: the same input gives the same
// bytes (no clock, no random ids), so pictures can be compared and kept.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dmremap/control.h"

namespace dmremap {

// One remapped block, as `dmremap list` gives it.
struct DiskMapRemap {
  uint64_t block = 0;
  uint64_t slot = 0;
  std::string cause;  // cause_name(): write-error, rescue, pending-write, manual
};

// What the picture shows. Blocks and slots may come in any order; entries
// past the end of main or of the pool are counted but not drawn.
struct DiskMapInput {
  std::string uuid;        // the set, named in the title ("" leaves it out)
  uint64_t main_size = 0;  // bytes
  uint32_t block_size = 4096;
  std::vector<DiskMapRemap> remaps;
  std::vector<uint64_t> pending;
  std::vector<uint64_t> bad_slots;
  // The pool as `dmremap status` counts it: slots below used + bad have
  // been handed out (the bad ones are in bad_slots), the rest are free.
  uint64_t slots_total = 0, slots_used = 0, slots_bad = 0, slots_free = 0;
  std::string health;  // ok, warning or failing
  std::string health_reason;
  // Where a scan of main has got to (a block number): a frame marks its
  // cell, as ddrescueview marks the current position. None: no marker.
  std::optional<uint64_t> scan_block;
};

// The input from `dmremap status --json` and the whole of `dmremap list
// --json` (every page put together), served or read from the spare.
DiskMapInput disk_map_input(const Json& status, const Json& list);

struct DiskMapOptions {
  unsigned columns = 64;     // cells per row, main's grid and the slot strip
  unsigned max_rows = 32;    // main's grid: a cell covers as many blocks as it takes
  unsigned slot_rows = 2;    // the slot strip, likewise
  unsigned cell_pitch = 10;  // pixels from one cell to the next; 1 of them is the line
};

// What a cell of main's grid shows, least bad first: a cell takes the worst
// state in its range. Remapped blocks are told apart by cause, from the
// most telling of a failing disk (a pending block then written) to the
// least (a block moved by hand); a cause this build does not know (a
// newer frontend's) ranks below them all.
enum class MapPaint : uint8_t {
  kHealthy,
  kOtherCause,
  kManual,
  kSlow,
  kRescue,
  kWriteError,
  kPendingWrite,
  kPending,
};
inline constexpr size_t kMapPaints = 8;
// "#rrggbb": ddrescueview's finished green, bad-sector red, non-trimmed
// yellow and non-split blue, and three more of our own.
const char* map_paint_colour(MapPaint p);

// What a cell of the slot strip shows, least bad first.
enum class SlotPaint : uint8_t { kFree, kUsed, kBad };
inline constexpr size_t kSlotPaints = 3;
const char* slot_paint_colour(SlotPaint p);
// ddrescueview's colour of the current position: the scan marker's frame.
inline constexpr const char* kScanColour = "#00ffff";

// Where the cells fall.
struct DiskMapGeometry {
  uint64_t blocks = 0;  // of main
  uint64_t blocks_per_cell = 1;
  uint64_t cells = 0;
  unsigned rows = 0;
  uint64_t slots_per_cell = 1;
  uint64_t slot_cells = 0;
  unsigned slot_rows = 0;
};
DiskMapGeometry disk_map_geometry(const DiskMapInput& in, const DiskMapOptions& o);

// A cell of main's grid: blocks [first, end), how many of them are in each
// state, and the state it is drawn in.
struct DiskMapCell {
  uint64_t first = 0, end = 0;
  std::array<uint64_t, kMapPaints> count{};  // indexed by MapPaint
  MapPaint paint() const;
};
std::vector<DiskMapCell> disk_map_cells(const DiskMapInput& in, const DiskMapGeometry& g);

// A cell of the slot strip: slots [first, end).
struct SlotMapCell {
  uint64_t first = 0, end = 0;
  std::array<uint64_t, kSlotPaints> count{};  // indexed by SlotPaint
  SlotPaint paint() const;
};
std::vector<SlotMapCell> slot_map_cells(const DiskMapInput& in, const DiskMapGeometry& g);

// The picture, a standalone SVG document. Each grid's <g> says where its
// cells are (data-x, data-y, data-pitch, data-columns, and data-per-cell:
// blocks or slots per cell), so that a test can find a block's cell.
std::string disk_map_svg(const DiskMapInput& in, const DiskMapOptions& o = {});

// Text made safe for SVG/XML character data and attribute values: & < > "
// ' escaped, and the control characters XML 1.0 forbids replaced by U+FFFD.
std::string xml_escape(const std::string& text);

}  // namespace dmremap
