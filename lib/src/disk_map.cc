#include "dmremap/disk_map.h"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string_view>

#include "dmremap/remap_table.h"

namespace dmremap {

namespace {

constexpr unsigned kMargin = 16;
constexpr unsigned kMinWidth = 752;  // room for a line of kWrap characters
constexpr size_t kWrap = 100;
constexpr unsigned kLine = 18;  // text lines, 13 px type
constexpr unsigned kSwatch = 12;
constexpr const char* kFont = "DejaVu Sans, Liberation Sans, Arial, sans-serif";

// The causes in the order the legend and the title give them.
constexpr Cause kCauses[] = {Cause::kWriteError, Cause::kRescue, Cause::kSlow,
                             Cause::kPendingWrite, Cause::kManual};

MapPaint paint_of_cause(const std::string& cause) {
  if (cause == cause_name(Cause::kWriteError)) return MapPaint::kWriteError;
  if (cause == cause_name(Cause::kRescue)) return MapPaint::kRescue;
  if (cause == cause_name(Cause::kPendingWrite)) return MapPaint::kPendingWrite;
  if (cause == cause_name(Cause::kManual)) return MapPaint::kManual;
  if (cause == cause_name(Cause::kSlow)) return MapPaint::kSlow;
  return MapPaint::kOtherCause;
}

size_t index(MapPaint p) { return static_cast<size_t>(p); }
size_t index(SlotPaint p) { return static_cast<size_t>(p); }

uint64_t div_up(uint64_t a, uint64_t b) { return b == 0 ? 0 : a / b + (a % b != 0); }

std::string num(uint64_t v) { return std::to_string(v); }

// 64.0 MiB, as `dmremap status` writes sizes.
std::string human(uint64_t bytes) {
  static const char* const kUnits[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return num(bytes) + " bytes";
  double v = static_cast<double>(bytes);
  size_t u = 0;
  while (v >= 1024 && u + 1 < std::size(kUnits)) {
    v /= 1024;
    ++u;
  }
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[u]);
  return buf;
}

std::string plural(uint64_t n, const char* one, const char* many) {
  return num(n) + " " + (n == 1 ? one : many);
}

// Breaks text at spaces into lines of at most `width` characters (a longer
// word has a line of its own).
std::vector<std::string> wrap(const std::string& text, size_t width) {
  std::vector<std::string> lines;
  std::string line;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find(' ', pos);
    if (end == std::string::npos) end = text.size();
    const std::string word = text.substr(pos, end - pos);
    pos = end + 1;
    if (word.empty()) continue;
    if (!line.empty() && line.size() + 1 + word.size() > width) {
      lines.push_back(line);
      line.clear();
    }
    line += (line.empty() ? "" : " ") + word;
  }
  if (!line.empty() || lines.empty()) lines.push_back(line);
  return lines;
}

// The SVG being written, top to bottom.
class Svg {
 public:
  void raw(std::string_view s) { body_ += s; }
  void text(unsigned x, unsigned y, const std::string& s, const char* extra = "") {
    body_ += "<text x=\"" + num(x) + "\" y=\"" + num(y) + "\"" + extra + ">" + xml_escape(s) +
             "</text>\n";
  }
  void rect(uint64_t x, uint64_t y, uint64_t w, uint64_t h, const char* fill,
            const std::string& title = {}) {
    body_ += "<rect x=\"" + num(x) + "\" y=\"" + num(y) + "\" width=\"" + num(w) + "\" height=\"" +
             num(h) + "\" fill=\"" + fill + "\"";
    if (title.empty()) {
      body_ += "/>\n";
    } else {
      body_ += "><title>" + xml_escape(title) + "</title></rect>\n";
    }
  }
  const std::string& body() const { return body_; }

 private:
  std::string body_;
};

// A grid of `cells` cells, `columns` a row, from (x, y), as ddrescueview
// draws one: each cell a square of pitch - 1 pixels, black lines between.
// Cells that `merge` says are plain are drawn as runs along a row (a large
// healthy disk is a few dozen rectangles, not thousands); the others one
// by one, with a tooltip.
void draw_grid(Svg& svg, uint64_t x, uint64_t y, unsigned pitch, unsigned columns, uint64_t cells,
               const std::function<const char*(uint64_t)>& colour,
               const std::function<bool(uint64_t)>& merge,
               const std::function<std::string(uint64_t)>& title) {
  if (cells == 0) return;
  const uint64_t full_rows = cells / columns;
  const uint64_t last = cells % columns;  // cells in a last, partial row
  if (full_rows > 0) svg.rect(x - 1, y - 1, columns * pitch + 1, full_rows * pitch + 1, "#000000");
  if (last > 0) svg.rect(x - 1, y + full_rows * pitch - 1, last * pitch + 1, pitch + 1, "#000000");
  for (uint64_t row = 0; row * columns < cells; ++row) {
    const uint64_t first = row * columns;
    const uint64_t end = std::min<uint64_t>(cells, first + columns);
    for (uint64_t c = first; c < end;) {
      const uint64_t cx = x + (c - first) * pitch, cy = y + row * pitch;
      if (!merge(c)) {
        svg.rect(cx, cy, pitch - 1, pitch - 1, colour(c), title(c));
        ++c;
        continue;
      }
      uint64_t run = c + 1;
      while (run < end && merge(run) && std::string_view(colour(run)) == colour(c)) ++run;
      svg.rect(cx, cy, (run - c) * pitch - 1, pitch - 1, colour(c));
      c = run;
    }
  }
  // The lines a run painted over, again: one down each column boundary.
  std::string path;
  auto lines = [&](uint64_t count, uint64_t top, uint64_t height) {
    for (uint64_t c = 1; c < count; ++c) {
      path += "M" + num(x + c * pitch - 1) + ".5 " + num(top) + "v" + num(height);
    }
  };
  if (full_rows > 0) lines(columns, y, full_rows * pitch - 1);
  if (last > 0) lines(last, y + full_rows * pitch, pitch - 1);
  if (!path.empty()) {
    svg.raw("<path d=\"" + path + "\" stroke=\"#000000\" stroke-width=\"1\" fill=\"none\"/>\n");
  }
}

}  // namespace

const char* map_paint_colour(MapPaint p) {
  switch (p) {
    case MapPaint::kHealthy: return "#20e020";       // ddrescueview: finished
    case MapPaint::kOtherCause: return "#808080";
    case MapPaint::kManual: return "#00a0a0";
    case MapPaint::kSlow: return "#ff9000";
    case MapPaint::kRescue: return "#ffe000";        // ddrescueview: non-trimmed
    case MapPaint::kWriteError: return "#2020ff";    // ddrescueview: non-split
    case MapPaint::kPendingWrite: return "#e020e0";
    case MapPaint::kPending: return "#ff0000";       // ddrescueview: bad sector
  }
  return "#808080";
}

const char* slot_paint_colour(SlotPaint p) {
  switch (p) {
    case SlotPaint::kFree: return "#404040";  // ddrescueview: non-tried
    case SlotPaint::kUsed: return "#80a0e0";
    case SlotPaint::kBad: return "#ff0000";
  }
  return "#808080";
}

MapPaint DiskMapCell::paint() const {
  for (size_t p = kMapPaints; p-- > 1;) {
    if (count[p] > 0) return static_cast<MapPaint>(p);
  }
  return MapPaint::kHealthy;
}

SlotPaint SlotMapCell::paint() const {
  for (size_t p = kSlotPaints; p-- > 1;) {
    if (count[p] > 0) return static_cast<SlotPaint>(p);
  }
  return SlotPaint::kFree;
}

std::string xml_escape(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (const char ch : text) {
    const auto u = static_cast<unsigned char>(ch);
    switch (ch) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:
        if ((u < 0x20 && ch != '\t' && ch != '\n' && ch != '\r') || u == 0x7f) {
          out += "\xef\xbf\xbd";  // U+FFFD: XML 1.0 has no way to say these
        } else {
          out += ch;
        }
    }
  }
  return out;
}

DiskMapInput disk_map_input(const Json& status, const Json& list) {
  DiskMapInput in;
  in.uuid = status.value("uuid", std::string());
  in.main_size = list.value("main_size", status.value("main_size", uint64_t{0}));
  in.block_size = list.value("block_size", status.value("block_size", 4096u));
  for (const Json& e : list.value("remaps", Json::array())) {
    in.remaps.push_back({e.value("block", uint64_t{0}), e.value("slot", uint64_t{0}),
                         e.value("cause", std::string())});
  }
  for (const Json& e : list.value("pending", Json::array())) {
    in.pending.push_back(e.value("block", uint64_t{0}));
  }
  for (const Json& s : list.value("bad_slots", Json::array())) {
    if (s.is_number_unsigned() || (s.is_number_integer() && s.get<int64_t>() >= 0)) {
      in.bad_slots.push_back(s.get<uint64_t>());
    }
  }
  in.slots_total = status.value("slots_total", uint64_t{0});
  in.slots_used = status.value("slots_used", uint64_t{0});
  in.slots_bad = status.value("slots_bad", uint64_t{0});
  in.slots_free = status.value("slots_free", uint64_t{0});
  in.health = status.value("health", std::string());
  in.health_reason = status.value("health_reason", std::string());
  return in;
}

DiskMapGeometry disk_map_geometry(const DiskMapInput& in, const DiskMapOptions& o) {
  DiskMapGeometry g;
  const uint64_t columns = std::max(1u, o.columns);
  g.blocks = div_up(in.main_size, std::max<uint32_t>(1, in.block_size));
  g.blocks_per_cell = std::max<uint64_t>(1, div_up(g.blocks, columns * std::max(1u, o.max_rows)));
  g.cells = div_up(g.blocks, g.blocks_per_cell);
  g.rows = static_cast<unsigned>(div_up(g.cells, columns));
  g.slots_per_cell =
      std::max<uint64_t>(1, div_up(in.slots_total, columns * std::max(1u, o.slot_rows)));
  g.slot_cells = div_up(in.slots_total, g.slots_per_cell);
  g.slot_rows = static_cast<unsigned>(div_up(g.slot_cells, columns));
  return g;
}

std::vector<DiskMapCell> disk_map_cells(const DiskMapInput& in, const DiskMapGeometry& g) {
  std::vector<DiskMapCell> cells(g.cells);
  for (uint64_t i = 0; i < g.cells; ++i) {
    cells[i].first = i * g.blocks_per_cell;
    cells[i].end = std::min(g.blocks, cells[i].first + g.blocks_per_cell);
    cells[i].count[index(MapPaint::kHealthy)] = cells[i].end - cells[i].first;
  }
  auto add = [&](uint64_t block, MapPaint p) {
    if (block >= g.blocks) return;
    DiskMapCell& c = cells[block / g.blocks_per_cell];
    if (c.count[index(MapPaint::kHealthy)] > 0) --c.count[index(MapPaint::kHealthy)];
    ++c.count[index(p)];
  };
  for (const DiskMapRemap& r : in.remaps) add(r.block, paint_of_cause(r.cause));
  for (const uint64_t b : in.pending) add(b, MapPaint::kPending);
  return cells;
}

std::vector<SlotMapCell> slot_map_cells(const DiskMapInput& in, const DiskMapGeometry& g) {
  // Slots are handed out in order: those below the cursor are used or bad.
  const uint64_t handed_out = std::min(in.slots_total, in.slots_used + in.slots_bad);
  std::vector<SlotMapCell> cells(g.slot_cells);
  for (uint64_t i = 0; i < g.slot_cells; ++i) {
    SlotMapCell& c = cells[i];
    c.first = i * g.slots_per_cell;
    c.end = std::min(in.slots_total, c.first + g.slots_per_cell);
    const uint64_t used_end = std::clamp(handed_out, c.first, c.end);
    c.count[index(SlotPaint::kUsed)] = used_end - c.first;
    c.count[index(SlotPaint::kFree)] = c.end - used_end;
  }
  std::vector<uint64_t> bad = in.bad_slots;
  std::sort(bad.begin(), bad.end());
  bad.erase(std::unique(bad.begin(), bad.end()), bad.end());
  for (const uint64_t s : bad) {
    if (s >= in.slots_total) continue;
    SlotMapCell& c = cells[s / g.slots_per_cell];
    auto& from = c.count[index(s < handed_out ? SlotPaint::kUsed : SlotPaint::kFree)];
    if (from > 0) --from;
    ++c.count[index(SlotPaint::kBad)];
  }
  return cells;
}

std::string disk_map_svg(const DiskMapInput& in, const DiskMapOptions& o) {
  const unsigned columns = std::max(1u, o.columns);
  const unsigned pitch = std::max(2u, o.cell_pitch);
  const DiskMapGeometry g = disk_map_geometry(in, o);
  const std::vector<DiskMapCell> cells = disk_map_cells(in, g);
  const std::vector<SlotMapCell> slot_cells = slot_map_cells(in, g);
  const unsigned width = std::max(kMinWidth, 2 * kMargin + columns * pitch);

  // Blocks in each state, over the whole disk.
  std::array<uint64_t, kMapPaints> total{};
  for (const DiskMapCell& c : cells) {
    for (size_t p = 0; p < kMapPaints; ++p) total[p] += c.count[p];
  }
  uint64_t remapped = 0;
  for (size_t p = index(MapPaint::kOtherCause); p < index(MapPaint::kPending); ++p) {
    remapped += total[p];
  }
  const bool scan = in.scan_block && *in.scan_block < g.blocks;

  Svg svg;
  unsigned y = kMargin + 16;
  svg.text(kMargin, y, in.uuid.empty() ? "dmremap set" : "dmremap set " + in.uuid,
           " font-size=\"16\" font-weight=\"bold\"");
  auto line = [&](const std::string& s, const char* extra = "") {
    for (const std::string& l : wrap(s, kWrap)) {
      y += kLine;
      svg.text(kMargin, y, l, extra);
    }
  };
  line("main " + human(in.main_size) + ": " + plural(g.blocks, "block", "blocks") + " of " +
       num(in.block_size) + " bytes; a cell is " +
       plural(g.blocks_per_cell, "block", "blocks") +
       (g.blocks_per_cell > 1 ? " (" + human(g.blocks_per_cell * in.block_size) + ")" : "") +
       " and shows the worst of them");
  const char* health_colour = in.health == "ok"        ? "#107010"
                              : in.health == "warning" ? "#a06000"
                              : in.health == "failing" ? "#c00000"
                                                       : "#000000";
  const std::string health_attr = std::string(" fill=\"") + health_colour + "\"";
  line("health " + (in.health.empty() ? std::string("unknown") : in.health) +
           (in.health_reason.empty() ? "" : ": " + in.health_reason),
       health_attr.c_str());
  std::string causes;
  for (const Cause c : kCauses) {
    const uint64_t n = total[index(paint_of_cause(cause_name(c)))];
    if (c == Cause::kSlow && n == 0) continue;  // slow= is off unless asked for
    causes += (causes.empty() ? "" : ", ") + num(n) + " " + cause_name(c);
  }
  if (total[index(MapPaint::kOtherCause)] > 0) {
    causes += ", " + num(total[index(MapPaint::kOtherCause)]) + " other";
  }
  line("remapped " + num(remapped) + " (" + causes + "); pending " +
       num(total[index(MapPaint::kPending)]));
  const uint64_t taken = in.slots_used + in.slots_bad;
  char used_pct[32] = "0.0";
  if (in.slots_total > 0) {
    std::snprintf(used_pct, sizeof used_pct, "%.1f",
                  100.0 * static_cast<double>(taken) / static_cast<double>(in.slots_total));
  }
  line("spare slots " + num(in.slots_total) + ": " + num(in.slots_used) + " used, " +
       num(in.slots_bad) + " bad, " + num(in.slots_free) + " free (" + used_pct + "% taken)");

  // Main's grid.
  y += 14;
  const unsigned grid_y = y + 1;
  svg.raw("<g id=\"main-grid\" data-x=\"" + num(kMargin + 1) + "\" data-y=\"" + num(grid_y) +
          "\" data-pitch=\"" + num(pitch) + "\" data-columns=\"" + num(columns) +
          "\" data-per-cell=\"" + num(g.blocks_per_cell) + "\" shape-rendering=\"crispEdges\">\n");
  draw_grid(
      svg, kMargin + 1, grid_y, pitch, columns, g.cells,
      [&](uint64_t i) { return map_paint_colour(cells[i].paint()); },
      [&](uint64_t i) { return cells[i].paint() == MapPaint::kHealthy; },
      [&](uint64_t i) {
        const DiskMapCell& c = cells[i];
        std::string t = c.end - c.first == 1
                            ? "block " + num(c.first)
                            : "blocks " + num(c.first) + "-" + num(c.end - 1);
        t += " (from byte " + num(c.first * in.block_size) + "):";
        const char* sep = " ";
        for (size_t p = kMapPaints; p-- > 1;) {
          if (c.count[p] == 0) continue;
          const auto mp = static_cast<MapPaint>(p);
          const char* what = mp == MapPaint::kPending      ? "pending"
                             : mp == MapPaint::kOtherCause ? "remapped (other cause)"
                             : mp == MapPaint::kWriteError ? "write-error"
                             : mp == MapPaint::kRescue     ? "rescue"
                             : mp == MapPaint::kManual     ? "manual"
                             : mp == MapPaint::kSlow       ? "slow"
                                                           : "pending-write";
          t += sep + num(c.count[p]) + " " + what;
          sep = ", ";
        }
        return t;
      });
  if (scan) {
    // ddrescueview's frame round the current position's cell.
    const uint64_t cell = *in.scan_block / g.blocks_per_cell;
    const uint64_t cx = kMargin + 1 + (cell % columns) * pitch;
    const uint64_t cy = grid_y + (cell / columns) * pitch;
    svg.raw("<rect id=\"scan\" x=\"" + num(cx - 1) + "\" y=\"" + num(cy - 1) + "\" width=\"" +
            num(pitch) + "\" height=\"" + num(pitch) + "\" fill=\"none\" stroke=\"" +
            kScanColour + "\" stroke-width=\"2\"><title>scan position: block " +
            num(*in.scan_block) + "</title></rect>\n");
  }
  svg.raw("</g>\n");
  y = grid_y + g.rows * pitch + 8;

  // The legend of main's grid: each state, its colour, how many blocks.
  auto item = [&](const char* fill, const std::string& label, const char* stroke = nullptr) {
    y += kLine;
    if (stroke) {
      svg.raw("<rect x=\"" + num(kMargin + 1) + "\" y=\"" + num(y - kSwatch + 1) +
              "\" width=\"" + num(kSwatch - 2) + "\" height=\"" + num(kSwatch - 2) +
              "\" fill=\"none\" stroke=\"" + stroke + "\" stroke-width=\"2\"/>\n");
    } else {
      svg.rect(kMargin, y - kSwatch + 2, kSwatch, kSwatch, fill);
    }
    svg.text(kMargin + kSwatch + 8, y, label);
  };
  auto blocks = [](uint64_t n) { return plural(n, "block", "blocks"); };
  item(map_paint_colour(MapPaint::kHealthy),
       "healthy: " + blocks(total[index(MapPaint::kHealthy)]) +
           " on main, neither remapped nor pending");
  item(map_paint_colour(MapPaint::kWriteError),
       "remapped, write-error: " + blocks(total[index(MapPaint::kWriteError)]) +
           ": main refused a write; the data went to a slot");
  item(map_paint_colour(MapPaint::kRescue),
       "remapped, rescue: " + blocks(total[index(MapPaint::kRescue)]) +
           ": read only on a retry (weak) and copied to a slot");
  item(map_paint_colour(MapPaint::kSlow),
       "remapped, slow: " + blocks(total[index(MapPaint::kSlow)]) +
           ": read correctly but slowly, copied before it fails");
  item(map_paint_colour(MapPaint::kPendingWrite),
       "remapped, pending-write: " + blocks(total[index(MapPaint::kPendingWrite)]) +
           ": unreadable, then written to a slot");
  item(map_paint_colour(MapPaint::kManual),
       "remapped, manual: " + blocks(total[index(MapPaint::kManual)]) +
           ": moved by dmremap remap");
  if (total[index(MapPaint::kOtherCause)] > 0) {
    item(map_paint_colour(MapPaint::kOtherCause),
         "remapped, another cause: " + blocks(total[index(MapPaint::kOtherCause)]));
  }
  item(map_paint_colour(MapPaint::kPending),
       "pending: " + blocks(total[index(MapPaint::kPending)]) +
           ": unreadable on main, data lost; the next write gives each a slot");
  if (scan) item(nullptr, "scan position: block " + num(*in.scan_block), kScanColour);

  // The spare's slot pool: a strip of its own, on its own scale.
  y += kLine + 8;
  svg.text(kMargin, y,
           "spare slot pool: " + plural(in.slots_total, "slot", "slots") +
               (g.slots_per_cell > 1 ? "; a cell is " + num(g.slots_per_cell) + " slots" : ""),
           " font-weight=\"bold\"");
  y += 8;
  const unsigned strip_y = y + 1;
  svg.raw("<g id=\"slot-strip\" data-x=\"" + num(kMargin + 1) + "\" data-y=\"" + num(strip_y) +
          "\" data-pitch=\"" + num(pitch) + "\" data-columns=\"" + num(columns) +
          "\" data-per-cell=\"" + num(g.slots_per_cell) + "\" shape-rendering=\"crispEdges\">\n");
  draw_grid(
      svg, kMargin + 1, strip_y, pitch, columns, g.slot_cells,
      [&](uint64_t i) { return slot_paint_colour(slot_cells[i].paint()); },
      [&](uint64_t i) { return slot_cells[i].paint() != SlotPaint::kBad; },
      [&](uint64_t i) {
        const SlotMapCell& c = slot_cells[i];
        return (c.end - c.first == 1 ? "slot " + num(c.first)
                                     : "slots " + num(c.first) + "-" + num(c.end - 1)) +
               ": " + num(c.count[index(SlotPaint::kBad)]) + " bad";
      });
  svg.raw("</g>\n");
  y = strip_y + g.slot_rows * pitch + 8;
  auto slots = [](uint64_t n) { return plural(n, "slot", "slots"); };
  item(slot_paint_colour(SlotPaint::kUsed),
       "used: " + slots(in.slots_used) + ", each holding a remapped block");
  item(slot_paint_colour(SlotPaint::kBad),
       "bad: " + slots(in.slots_bad) + ": the spare failed a write there; never used again");
  item(slot_paint_colour(SlotPaint::kFree), "free: " + slots(in.slots_free));
  y += kMargin;

  std::string out;
  out.reserve(svg.body().size() + 512);
  out += "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  out += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + num(width) + "\" height=\"" +
         num(y) + "\" viewBox=\"0 0 " + num(width) + " " + num(y) + "\" font-family=\"" + kFont +
         "\" font-size=\"13\">\n";
  out += "<title>" + xml_escape("dmremap map" + (in.uuid.empty() ? "" : " of set " + in.uuid)) +
         "</title>\n";
  out += "<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n";
  out += svg.body();
  out += "</svg>\n";
  return out;
}

}  // namespace dmremap
