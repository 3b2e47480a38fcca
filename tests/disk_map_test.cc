// The picture of a set that `dmremap map` draws (lib/disk_map.h): where
// each block's cell falls and its colour, the title and legend figures, the
// scan marker, the slot strip, escaping, and that the same set gives the
// same bytes. tests/e2e/map_test.py renders it in a browser.
#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <string>
#include <thread>

#include "dmremap/disk_map.h"

using namespace dmremap;

namespace {

// 64 MiB of 4 KiB blocks: 16384 blocks, 8 to a cell of the 64 x 32 grid.
DiskMapInput damaged_set() {
  DiskMapInput in;
  in.uuid = "0d1e4c8a-0000-4000-8000-000000000001";
  in.main_size = 64 << 20;
  in.block_size = 4096;
  in.remaps = {
      {8, 0, "manual"},          // cell 1, with pending block 9: pending
      {16, 1, "write-error"},    // cell 2: write-error...
      {17, 2, "manual"},         // ...outranks manual
      {24, 4, "rescue"},         // cell 3: rescue is outranked...
      {25, 5, "pending-write"},  // ...by pending-write
      {40, 6, "manual"},         // cell 5: manual alone
      {48, 7, "write-error"},    // cell 6
  };
  in.pending = {9, 1000};  // cells 1 and 125
  in.bad_slots = {3};
  in.slots_total = 100;
  in.slots_used = 7;
  in.slots_bad = 1;
  in.slots_free = 92;
  in.health = "warning";
  in.health_reason = "2 blocks are pending (unreadable on main)";
  return in;
}

// The value of attribute `attr` of the element whose id is `id`.
uint64_t attr_of(const std::string& svg, const std::string& id, const std::string& attr) {
  const size_t at = svg.find("id=\"" + id + "\"");
  REQUIRE(at != std::string::npos);
  const size_t end = svg.find('>', at);
  const size_t a = svg.find(" " + attr + "=\"", at);
  REQUIRE(a < end);
  return std::stoull(svg.substr(a + attr.size() + 3));
}

// The <rect> drawn for a cell of main's grid at (x, y), with its fill.
std::string cell_rect(const std::string& svg, uint64_t cell) {
  const uint64_t x = attr_of(svg, "main-grid", "data-x") + cell % 64 * 10;
  const uint64_t y = attr_of(svg, "main-grid", "data-y") + cell / 64 * 10;
  const std::string start = "<rect x=\"" + std::to_string(x) + "\" y=\"" + std::to_string(y) + "\"";
  const size_t at = svg.find(start);
  if (at == std::string::npos) return {};
  return svg.substr(at, svg.find('\n', at) - at);
}

std::string fill(MapPaint p) { return std::string("fill=\"") + map_paint_colour(p) + "\""; }

}  // namespace

TEST_CASE("map: the same set gives the same bytes, whatever order its entries come in", "[map]") {
  const DiskMapInput in = damaged_set();
  const std::string a = disk_map_svg(in);
  CHECK(a == disk_map_svg(in));
  DiskMapInput shuffled = in;
  std::reverse(shuffled.remaps.begin(), shuffled.remaps.end());
  std::reverse(shuffled.pending.begin(), shuffled.pending.end());
  CHECK(disk_map_svg(shuffled) == a);
  // Nothing that changes with time: a second later, the same bytes.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  CHECK(disk_map_svg(in) == a);
  CHECK(a.rfind("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg ", 0) == 0);
  CHECK(a.size() > 1000);
  CHECK(a.substr(a.size() - 7) == "</svg>\n");
}

TEST_CASE("map: a cell covers a range of blocks and shows the worst state in it", "[map]") {
  const DiskMapInput in = damaged_set();
  const DiskMapGeometry g = disk_map_geometry(in, {});
  CHECK(g.blocks == 16384);
  CHECK(g.blocks_per_cell == 8);
  CHECK(g.cells == 2048);
  CHECK(g.rows == 32);
  const auto cells = disk_map_cells(in, g);
  REQUIRE(cells.size() == 2048);
  CHECK(cells[0].paint() == MapPaint::kHealthy);
  CHECK(cells[0].count[0] == 8);
  CHECK(cells[1].paint() == MapPaint::kPending);  // pending over a manual remap
  CHECK(cells[1].count[static_cast<size_t>(MapPaint::kManual)] == 1);
  CHECK(cells[1].count[static_cast<size_t>(MapPaint::kHealthy)] == 6);
  CHECK(cells[2].paint() == MapPaint::kWriteError);
  CHECK(cells[3].paint() == MapPaint::kPendingWrite);
  CHECK(cells[5].paint() == MapPaint::kManual);
  CHECK(cells[6].paint() == MapPaint::kWriteError);
  CHECK(cells[125].paint() == MapPaint::kPending);  // block 1000
  CHECK(cells[2047].first == 16376);
  CHECK(cells[2047].end == 16384);

  // In the SVG, at the cell's place, in its colour, with what it holds.
  const std::string svg = disk_map_svg(in);
  CHECK(attr_of(svg, "main-grid", "data-per-cell") == 8);
  CHECK(attr_of(svg, "main-grid", "data-pitch") == 10);
  const std::string c1 = cell_rect(svg, 1);
  CHECK_THAT(c1, Catch::Contains(fill(MapPaint::kPending)));
  CHECK_THAT(c1, Catch::Contains("<title>blocks 8-15 (from byte 32768): 1 pending, 1 manual"));
  CHECK_THAT(cell_rect(svg, 2), Catch::Contains(fill(MapPaint::kWriteError)));
  CHECK_THAT(cell_rect(svg, 3), Catch::Contains(fill(MapPaint::kPendingWrite)));
  CHECK_THAT(cell_rect(svg, 5), Catch::Contains(fill(MapPaint::kManual)));
  CHECK_THAT(cell_rect(svg, 125), Catch::Contains(fill(MapPaint::kPending)));
  // Cell 0 starts a healthy row's first run; cell 7 starts the run after
  // cell 6, to the end of the row (57 cells: 569 pixels).
  CHECK_THAT(cell_rect(svg, 0),
             Catch::Contains("width=\"9\" height=\"9\" " + fill(MapPaint::kHealthy)));
  CHECK_THAT(cell_rect(svg, 7),
             Catch::Contains("width=\"569\" height=\"9\" " + fill(MapPaint::kHealthy)));
  // ddrescueview's colours: finished green, bad-sector red.
  CHECK(std::string(map_paint_colour(MapPaint::kHealthy)) == "#20e020");
  CHECK(std::string(map_paint_colour(MapPaint::kPending)) == "#ff0000");
}

TEST_CASE("map: a small disk has a cell per block, a big one many blocks per cell", "[map]") {
  DiskMapInput in;
  in.block_size = 4096;
  in.main_size = 100 * 4096;
  DiskMapGeometry g = disk_map_geometry(in, {});
  CHECK((g.blocks_per_cell == 1 && g.cells == 100 && g.rows == 2));
  in.main_size = uint64_t{4} << 40;  // 4 TiB: 2^30 blocks over 2048 cells
  g = disk_map_geometry(in, {});
  CHECK((g.blocks_per_cell == (uint64_t{1} << 19) && g.cells == 2048 && g.rows == 32));
  in.main_size = (uint64_t{1} << 30) + 4096;  // one block more: the last cell holds it alone
  g = disk_map_geometry(in, DiskMapOptions{16, 8, 2, 10});
  CHECK(g.blocks_per_cell == 2049);
  CHECK(g.cells == 128);
  in.remaps = {{262144, 0, "write-error"}};  // the last block
  const auto cells = disk_map_cells(in, g);
  CHECK(cells.back().first == 127 * 2049);
  CHECK(cells.back().end == 262145);
  CHECK(cells.back().paint() == MapPaint::kWriteError);
  // An empty main draws no cell and does not fail.
  in.main_size = 0;
  in.remaps.clear();
  CHECK(disk_map_geometry(in, {}).cells == 0);
  CHECK_THAT(disk_map_svg(in), Catch::Contains("0 blocks of 4096 bytes"));
}

TEST_CASE("map: the title and the legend give the set's figures", "[map]") {
  const std::string svg = disk_map_svg(damaged_set());
  using Catch::Contains;
  CHECK_THAT(svg, Contains(">dmremap set 0d1e4c8a-0000-4000-8000-000000000001</text>"));
  CHECK_THAT(svg, Contains(">main 64.0 MiB: 16384 blocks of 4096 bytes; a cell is 8 blocks "
                           "(32.0 KiB) and shows the worst of them</text>"));
  CHECK_THAT(svg, Contains(">health warning: 2 blocks are pending (unreadable on main)</text>"));
  CHECK_THAT(svg, Contains(">remapped 7 (2 write-error, 1 rescue, 1 pending-write, 3 manual); "
                           "pending 2</text>"));
  CHECK_THAT(svg, Contains(">spare slots 100: 7 used, 1 bad, 92 free (8.0% taken)</text>"));
  CHECK_THAT(svg, Contains(">healthy: 16375 blocks on main, neither remapped nor pending</text>"));
  CHECK_THAT(svg, Contains(">remapped, write-error: 2 blocks: main refused a write"));
  CHECK_THAT(svg, Contains(">remapped, rescue: 1 block: "));
  CHECK_THAT(svg, Contains(">remapped, pending-write: 1 block: "));
  CHECK_THAT(svg, Contains(">remapped, manual: 3 blocks: "));
  CHECK_THAT(svg, Contains(">pending: 2 blocks: unreadable on main"));
  CHECK_THAT(svg, Contains(">used: 7 slots, each holding a remapped block</text>"));
  CHECK_THAT(svg, Contains(">bad: 1 slot: the spare failed a write there"));
  CHECK_THAT(svg, Contains(">free: 92 slots</text>"));
  // Each legend entry has a swatch of its colour.
  for (const MapPaint p : {MapPaint::kHealthy, MapPaint::kWriteError, MapPaint::kRescue,
                           MapPaint::kPendingWrite, MapPaint::kManual, MapPaint::kPending}) {
    CHECK_THAT(svg, Contains("width=\"12\" height=\"12\" " + fill(p)));
  }
  // A cause this build does not know is drawn and counted as another cause.
  DiskMapInput newer = damaged_set();
  newer.remaps.push_back({2000, 9, "from-the-future"});
  const std::string other = disk_map_svg(newer);
  CHECK_THAT(other, Contains("3 manual, 1 other); pending 2"));
  CHECK_THAT(other, Contains(">remapped, another cause: 1 block</text>"));
  CHECK_THAT(cell_rect(other, 250), Contains(fill(MapPaint::kOtherCause)));
  CHECK_THAT(svg, !Contains("another cause"));
}

TEST_CASE("map: the scan marker is drawn only for a position on the disk", "[map]") {
  DiskMapInput in = damaged_set();
  const std::string none = disk_map_svg(in);
  CHECK_THAT(none, !Catch::Contains("id=\"scan\""));
  CHECK_THAT(none, !Catch::Contains("scan position"));
  CHECK_THAT(none, !Catch::Contains(kScanColour));

  in.scan_block = 8000;  // cell 1000: row 15, column 40
  const std::string at = disk_map_svg(in);
  CHECK(attr_of(at, "scan", "x") == attr_of(at, "main-grid", "data-x") + 40 * 10 - 1);
  CHECK(attr_of(at, "scan", "y") == attr_of(at, "main-grid", "data-y") + 15 * 10 - 1);
  CHECK_THAT(at, Catch::Contains("stroke=\"#00ffff\""));
  CHECK_THAT(at, Catch::Contains(">scan position: block 8000</text>"));
  // The grid is the same with the marker as without, the marker apart.
  auto grid = [](const std::string& svg) {
    const size_t from = svg.find("id=\"main-grid\"");
    std::string g = svg.substr(from, svg.find("</g>", from) - from);
    const size_t scan = g.find("<rect id=\"scan\"");
    if (scan != std::string::npos) g.erase(scan, g.find("</rect>\n", scan) + 8 - scan);
    return g;
  };
  CHECK(grid(at) == grid(none));
  CHECK(grid(at).size() > 1000);

  in.scan_block = 16384;  // one past the last block
  CHECK(disk_map_svg(in) == none);
}

TEST_CASE("map: the slot strip shows the pool used, bad and free", "[map]") {
  DiskMapInput in = damaged_set();
  DiskMapGeometry g = disk_map_geometry(in, {});
  CHECK((g.slots_per_cell == 1 && g.slot_cells == 100 && g.slot_rows == 2));
  auto cells = slot_map_cells(in, g);
  CHECK(cells[0].paint() == SlotPaint::kUsed);
  CHECK(cells[3].paint() == SlotPaint::kBad);
  CHECK(cells[7].paint() == SlotPaint::kUsed);  // handed out: 7 used + 1 bad
  CHECK(cells[8].paint() == SlotPaint::kFree);
  CHECK(cells[99].paint() == SlotPaint::kFree);
  const std::string svg = disk_map_svg(in);
  CHECK_THAT(svg, Catch::Contains("<title>slot 3: 1 bad</title>"));
  CHECK(attr_of(svg, "slot-strip", "data-y") > attr_of(svg, "main-grid", "data-y") + 32 * 10);

  // A big pool: 1000 slots over 128 cells, 8 slots each; a bad slot among
  // free ones still shows.
  in.slots_total = 1000;
  in.bad_slots = {500, 3};
  in.slots_bad = 2;
  in.slots_used = 505;  // slots 0-506 handed out
  in.slots_free = 493;
  g = disk_map_geometry(in, {});
  CHECK((g.slots_per_cell == 8 && g.slot_cells == 125 && g.slot_rows == 2));
  cells = slot_map_cells(in, g);
  CHECK(cells[0].paint() == SlotPaint::kBad);
  CHECK(cells[0].count[static_cast<size_t>(SlotPaint::kUsed)] == 7);
  CHECK(cells[1].paint() == SlotPaint::kUsed);
  CHECK(cells[62].paint() == SlotPaint::kBad);   // slots 496-503
  CHECK(cells[63].paint() == SlotPaint::kUsed);  // 504-506 used, 507-511 free
  CHECK(cells[63].count[static_cast<size_t>(SlotPaint::kFree)] == 5);
  CHECK(cells[64].paint() == SlotPaint::kFree);
  CHECK(cells[124].end == 1000);
  CHECK_THAT(disk_map_svg(in), Catch::Contains("<title>slots 496-503: 1 bad</title>"));
}

TEST_CASE("map: text from the set is escaped for SVG", "[map]") {
  CHECK(xml_escape("a<b>&\"c'") == "a&lt;b&gt;&amp;&quot;c&apos;");
  CHECK(xml_escape("x\x01y\x7fz\tw") == "x\xef\xbf\xbdy\xef\xbf\xbdz\tw");
  CHECK(xml_escape("blocks 8-15 \xc3\xa9") == "blocks 8-15 \xc3\xa9");  // UTF-8 is kept

  DiskMapInput in = damaged_set();
  in.uuid = "</text><script>alert(1)</script>";
  in.health_reason = "main offline (nbd://h/x?a=1&b=2 said \"no\")\x07";
  in.remaps.push_back({2000, 9, "<b>odd</b>"});
  const std::string svg = disk_map_svg(in);
  CHECK_THAT(svg, !Catch::Contains("<script>"));
  CHECK_THAT(svg, !Catch::Contains("<b>"));
  CHECK_THAT(svg,
             Catch::Contains("dmremap set &lt;/text&gt;&lt;script&gt;alert(1)&lt;/script&gt;"));
  CHECK_THAT(svg, Catch::Contains("a=1&amp;b=2 said &quot;no&quot;)\xef\xbf\xbd"));
  CHECK(svg.find('\x07') == std::string::npos);
  // Every & starts an entity.
  for (size_t at = svg.find('&'); at != std::string::npos; at = svg.find('&', at + 1)) {
    const std::string rest = svg.substr(at, 6);
    CHECK((rest.rfind("&amp;", 0) == 0 || rest.rfind("&lt;", 0) == 0 ||
           rest.rfind("&gt;", 0) == 0 || rest.rfind("&quot;", 0) == 0 ||
           rest.rfind("&apos;", 0) == 0));
  }
}

TEST_CASE("map: the input comes from status and list JSON", "[map]") {
  const Json status = {{"uuid", "u-1"},       {"main_size", 1 << 20}, {"block_size", 4096},
                       {"health", "warning"}, {"health_reason", "r"}, {"slots_total", 50},
                       {"slots_used", 2},     {"slots_bad", 1},       {"slots_free", 47}};
  const Json list = {
      {"main_size", 1 << 20},
      {"block_size", 4096},
      {"remaps",
       {{{"block", 5}, {"offset", 20480}, {"slot", 0}, {"spare_offset", 1}, {"cause", "manual"}},
        {{"block", 7}, {"offset", 28672}, {"slot", 2}, {"spare_offset", 2}, {"cause", "rescue"}}}},
      {"pending", {{{"block", 20}, {"offset", 81920}}}},
      {"bad_slots", {1}},
      {"next", nullptr}};
  const DiskMapInput in = disk_map_input(status, list);
  CHECK(in.uuid == "u-1");
  CHECK(in.main_size == uint64_t{1} << 20);
  CHECK(in.block_size == 4096);
  REQUIRE(in.remaps.size() == 2);
  CHECK((in.remaps[1].block == 7 && in.remaps[1].slot == 2 && in.remaps[1].cause == "rescue"));
  CHECK(in.pending == std::vector<uint64_t>{20});
  CHECK(in.bad_slots == std::vector<uint64_t>{1});
  CHECK((in.slots_total == 50 && in.slots_used == 2 && in.slots_bad == 1 && in.slots_free == 47));
  CHECK((in.health == "warning" && in.health_reason == "r"));
  CHECK_FALSE(in.scan_block.has_value());
}
