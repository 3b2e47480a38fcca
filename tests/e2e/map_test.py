"""`dmremap map` seen in a real browser: a set with known damage, made
through the CLI and the plugin's fault injection, drawn as an SVG by the
CLI, rendered to PNG by headless Chromium, and checked pixel by pixel where
the damaged blocks' cells must be. The PNG is decoded here (zlib and
struct); nothing beyond Debian's python3 and chromium.

Run alone, `map_test.py --write-docs-image FILE` makes the same set and
writes its picture to FILE (docs/images/damaged-disk.svg).
"""
import os
import re
import struct
import subprocess
import sys
import tempfile
import unittest
import zlib

import nbd

from nbd_harness import BLOCK, DemoSet, Tools, pattern

CHROMIUM = "/usr/bin/chromium"

# The damage, block by block (64 MiB main: 16384 blocks, 8 to a cell).
MANUAL = [2000, 2001]  # dmremap remap, offline: slots 0 and 1
FIRST_WRITE_ERROR = 4000  # its first slot (2) refuses the write: bad
WRITE_ERRORS = list(range(12000, 12064))  # 8 whole cells; slots 4-67
WEAK = 6000  # reads on the second try: rescue
SLOW = 7000  # reads correctly, in 400 ms: slow (slow=0.2)
PENDING = [8000, 14000]  # never read: pending
PENDING_THEN_WRITTEN = 10000  # unreadable, then written: pending-write
BAD_SLOT = 2
HEALTHY = [0, 7, 5000, 16383]

# The colours the legend gives (ddrescueview's where it has one).
RGB = {
    "healthy": (0x20, 0xE0, 0x20),
    "pending": (0xFF, 0x00, 0x00),
    "write-error": (0x20, 0x20, 0xFF),
    "rescue": (0xFF, 0xE0, 0x00),
    "slow": (0xFF, 0x90, 0x00),
    "pending-write": (0xE0, 0x20, 0xE0),
    "manual": (0x00, 0xA0, 0xA0),
    "slot-used": (0x80, 0xA0, 0xE0),
    "slot-bad": (0xFF, 0x00, 0x00),
    "slot-free": (0x40, 0x40, 0x40),
    "line": (0x00, 0x00, 0x00),
}


def make_damaged_set(tools):
    """A DemoSet whose metadata holds every cause, pending blocks and a bad
    slot. Returns it stopped, and the SVG its served frontend drew over
    the control socket."""
    s = DemoSet(tools)
    try:
        s.cli("remap", "--main", s.main, "--spare", s.spare, *map(str, MANUAL))
        layout = s.status()["layout"]
        unit = (layout["slot_offset"] + BAD_SLOT * BLOCK) // 512
        faults = [f"write:{FIRST_WRITE_ERROR}", f"write:{WRITE_ERRORS[0]}-{WRITE_ERRORS[-1]}",
                  f"weak:{WEAK}x1", f"slow:{SLOW}x400", f"read:{PENDING_THEN_WRITTEN}"]
        faults += [f"read:{b}" for b in PENDING]
        s.start("inject=" + ",".join(faults), f"inject-spare=write:{unit}-{unit + 7}",
                "slow=0.2", s.control_param())
        h = s.connect()
        h.pwrite(pattern(1), FIRST_WRITE_ERROR * BLOCK)  # slot 2 fails, slot 3 takes it
        h.pwrite(pattern(2, len(WRITE_ERRORS) * BLOCK), WRITE_ERRORS[0] * BLOCK)
        h.pread(BLOCK, WEAK * BLOCK)
        for b in HEALTHY * 5:  # main's usual read time, learnt before a read is slow
            h.pread(BLOCK, b * BLOCK)
        h.pread(BLOCK, SLOW * BLOCK)
        for b in PENDING + [PENDING_THEN_WRITTEN]:
            try:
                h.pread(BLOCK, b * BLOCK)
                raise AssertionError(f"block {b} read")
            except nbd.Error:
                pass
        h.pwrite(pattern(3), PENDING_THEN_WRITTEN * BLOCK)
        h.flush()
        h.shutdown()
        live = os.path.join(s.dir, "live.svg")
        s.cli("map", "--control", s.control, "--svg", live)
        with open(live, "rb") as f:
            live_svg = f.read()
        if s.stop() != 0:
            raise AssertionError(f"the frontend failed: {s.read_log()}")
        return s, live_svg
    except BaseException:
        s.close()
        raise


def decode_png(data):
    """(width, height, rows of (r, g, b) tuples) of an 8-bit RGB or RGBA,
    non-interlaced PNG, as Chromium writes its screenshots."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in (2, 6) or interlace != 0:
        raise ValueError(f"unexpected PNG: depth {depth}, colour type {colour}, "
                         f"interlace {interlace}")
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append([tuple(line[x * bpp:x * bpp + 3]) for x in range(width)])
        prev = line
    return width, height, rows


def grid_of(svg, gid):
    """(x, y, pitch, columns, per_cell) that the SVG gives for a grid."""
    m = re.search(rb'<g id="' + gid.encode() + rb'" data-x="(\d+)" data-y="(\d+)" '
                  rb'data-pitch="(\d+)" data-columns="(\d+)" data-per-cell="(\d+)"', svg)
    if not m:
        raise AssertionError(f"no grid {gid} in the SVG")
    return tuple(int(v) for v in m.groups())


def svg_size(svg):
    m = re.search(rb'<svg [^>]*width="(\d+)" height="(\d+)"', svg)
    return int(m.group(1)), int(m.group(2))


def render(svg_path, png_path, width, height, workdir):
    """Headless Chromium's screenshot of the SVG, at its own size."""
    profile = tempfile.mkdtemp(prefix="chromium-", dir=workdir)
    r = subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
         "--hide-scrollbars", "--force-device-scale-factor=1", "--no-first-run",
         f"--screenshot={png_path}", f"--window-size={width},{height}",
         "file://" + os.path.abspath(svg_path)],
        capture_output=True, text=True, timeout=180)
    if r.returncode != 0 or not os.path.exists(png_path):
        raise AssertionError(f"chromium failed ({r.returncode}): {r.stderr[-2000:]}")


class MapTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.access(CHROMIUM, os.X_OK):
            raise AssertionError(f"no {CHROMIUM}: install it with scripts/setup-deps test")
        cls.s, cls.live_svg = make_damaged_set(Tools())
        cls.svg_path = os.path.join(cls.s.dir, "map.svg")
        r = cls.s.cli("map", "--spare", cls.s.spare, "--svg", cls.svg_path)
        cls.wrote = r.stdout
        with open(cls.svg_path, "rb") as f:
            cls.svg = f.read()
        width, height = svg_size(cls.svg)
        png = os.path.join(cls.s.dir, "map.png")
        render(cls.svg_path, png, width, height, cls.s.dir)
        with open(png, "rb") as f:
            cls.width, cls.height, cls.rows = decode_png(f.read())

    @classmethod
    def tearDownClass(cls):
        cls.s.close()

    def pixel(self, x, y):
        return self.rows[y][x]

    def assertColour(self, x, y, name, what):
        got = self.pixel(x, y)
        want = RGB[name]
        self.assertTrue(all(abs(g - w) <= 6 for g, w in zip(got, want)),
                        f"{what}: pixel ({x}, {y}) is #{bytes(got).hex()}, "
                        f"wanted {name} #{bytes(want).hex()}")

    def assertCell(self, gid, index, name, what):
        """Every pixel inside the cell (its edge apart) has the colour."""
        x0, y0, pitch, columns, _ = grid_of(self.svg, gid)
        cx, cy = x0 + index % columns * pitch, y0 + index // columns * pitch
        for y in range(cy + 1, cy + pitch - 2):
            for x in range(cx + 1, cx + pitch - 2):
                self.assertColour(x, y, name, f"{what} (cell {index})")

    def block_cell(self, block):
        per_cell = grid_of(self.svg, "main-grid")[4]
        return block // per_cell

    def test_the_set_is_what_the_picture_is_of(self):
        st = self.s.status()
        self.assertEqual(st["remaps_by_cause"], {"write-error": 1 + len(WRITE_ERRORS),
                                                 "rescue": 1, "pending-write": 1,
                                                 "manual": len(MANUAL), "slow": 1}, st)
        self.assertEqual((st["pending"], st["slots_bad"]), (len(PENDING), 1), st)
        self.assertEqual(self.s.listing()["bad_slots"], [BAD_SLOT])
        self.assertIn("main's 16384 blocks in 2048 cells", self.wrote)

    def test_the_screenshot_is_the_svg_size(self):
        self.assertEqual((self.width, self.height), svg_size(self.svg))
        self.assertEqual(grid_of(self.svg, "main-grid")[2:], (10, 64, 8))

    def test_remapped_cells_have_their_cause_colour(self):
        self.assertCell("main-grid", self.block_cell(MANUAL[0]), "manual", "manual remap")
        self.assertCell("main-grid", self.block_cell(FIRST_WRITE_ERROR), "write-error",
                        "write error")
        for b in WRITE_ERRORS[::8]:
            self.assertCell("main-grid", self.block_cell(b), "write-error", f"write error {b}")
        self.assertCell("main-grid", self.block_cell(WEAK), "rescue", "weak block")
        self.assertCell("main-grid", self.block_cell(SLOW), "slow", "slow block")
        self.assertCell("main-grid", self.block_cell(PENDING_THEN_WRITTEN), "pending-write",
                        "pending block written")

    def test_pending_cells_are_red(self):
        for b in PENDING:
            self.assertCell("main-grid", self.block_cell(b), "pending", f"pending block {b}")

    def test_healthy_cells_are_green_with_black_lines_between(self):
        for b in HEALTHY:
            self.assertCell("main-grid", self.block_cell(b), "healthy", f"block {b}")
        x0, y0, pitch, _, _ = grid_of(self.svg, "main-grid")
        # Cells 0 and 1 are one healthy run: the line between them is drawn again.
        self.assertColour(x0 + pitch - 1, y0 + 4, "line", "line between cells 0 and 1")
        self.assertColour(x0 + 4, y0 + pitch - 1, "line", "line between rows 0 and 1")
        self.assertColour(x0 - 1, y0 + 4, "line", "the grid's left edge")

    def test_the_slot_strip_shows_the_bad_slot_used_and_free_slots(self):
        _, _, _, _, per_cell = grid_of(self.svg, "slot-strip")
        # Slots go out in order: the manual remaps', the first write error's
        # (the bad one, then the next), the long write's, the rescue's and
        # the slow block's and the pending write's.
        handed_out = len(MANUAL) + 2 + len(WRITE_ERRORS) + 1 + 1 + 1
        self.assertCell("slot-strip", BAD_SLOT // per_cell, "slot-bad", "bad slot")
        self.assertCell("slot-strip", (handed_out - 1) // per_cell, "slot-used", "used slots")
        self.assertCell("slot-strip", handed_out // per_cell + 1, "slot-free", "free slots")

    def test_the_served_set_draws_the_same_picture(self):
        self.assertEqual(self.live_svg, self.svg)

    def test_standard_output_gets_the_same_bytes(self):
        r = subprocess.run([Tools().cli, "map", "--spare", self.s.spare, "--svg", "-"],
                           capture_output=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, self.svg)


def write_docs_image(path):
    s, _ = make_damaged_set(Tools())
    try:
        s.cli("map", "--spare", s.spare, "--svg", os.path.abspath(path))
    finally:
        s.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write-docs-image":
        write_docs_image(sys.argv[2])
    else:
        unittest.main()
