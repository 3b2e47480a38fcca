"""End-to-end tests of a dmremap frontend (nbdkit with dmremap.so, or
dmremap-server: see nbd_harness), driven by real NBD clients
(libnbd, nbdinfo, qemu-io, qemu-img) over a main that really fails (faults
injected by the plugin's inject= parameter, i.e. lib's FaultyDevice).
"""
import errno
import json
import os
import subprocess
import time
import unittest

import nbd

from nbd_harness import BLOCK, KEEP_LOG, DemoSet, Tools, pattern, run_frontend

TOOLS = Tools()


class PluginTest(unittest.TestCase):
    def setUp(self):
        self.s = DemoSet(TOOLS)
        self.addCleanup(self.s.close)

    def test_capabilities(self):
        self.s.start()
        h = self.s.connect()
        self.assertEqual(h.get_size(), 64 << 20)
        for can in ("flush", "fua", "trim", "zero", "fast_zero", "multi_conn", "cache"):
            self.assertTrue(getattr(h, "can_" + can)(), can)
        self.assertEqual(h.get_block_size(nbd.SIZE_MINIMUM), BLOCK)
        self.assertEqual(h.get_block_size(nbd.SIZE_PREFERRED), BLOCK)
        h.shutdown()
        for can in ("flush", "fua", "trim", "zero", "multi-conn", "cache"):
            r = subprocess.run(["nbdinfo", "--can", can, self.s.uri])
            self.assertEqual(r.returncode, 0, f"nbdinfo --can {can}")

    def test_write_to_bad_block_succeeds_and_reads_back(self):
        self.s.start("inject=write:100-101")
        h = self.s.connect()
        data = pattern(1, 4 * BLOCK)
        h.pwrite(data, 99 * BLOCK)
        self.assertEqual(h.pread(4 * BLOCK, 99 * BLOCK), data)
        h.flush()
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        self.assertEqual(st["remaps"], 2)
        self.assertEqual(st["remaps_by_cause"]["write-error"], 2)
        blocks = sorted(e["block"] for e in self.s.listing()["remaps"])
        self.assertEqual(blocks, [100, 101])
        # Survives a restart with the faults still there.
        self.s.start("inject=write:100-101")
        h = self.s.connect()
        self.assertEqual(h.pread(4 * BLOCK, 99 * BLOCK), data)

    def test_unreadable_block_is_eio_and_the_rest_reads(self):
        with open(self.s.main, "r+b") as f:
            f.seek(10 * BLOCK)
            f.write(pattern(2, 3 * BLOCK))
        self.s.start("inject=read:11")
        h = self.s.connect()
        with self.assertRaises(nbd.Error) as cm:
            h.pread(3 * BLOCK, 10 * BLOCK)
        self.assertEqual(cm.exception.errnum, errno.EIO)
        whole = pattern(2, 3 * BLOCK)
        self.assertEqual(h.pread(BLOCK, 10 * BLOCK), whole[:BLOCK])
        self.assertEqual(h.pread(BLOCK, 12 * BLOCK), whole[2 * BLOCK:])
        self.assertEqual(h.pread(BLOCK, 50 * BLOCK), bytes(BLOCK))
        if TOOLS.frontend == "server":
            # Structured replies: every good byte, on both sides of the bad
            # block, and an error chunk naming the bad block's exact offset.
            chunks = []

            def chunk(subbuf, offset, status, error):
                chunks.append((offset, status, bytes(subbuf)))
                return 0
            with self.assertRaises(nbd.Error) as cm:
                h.pread_structured(3 * BLOCK, 10 * BLOCK, chunk)
            self.assertEqual(cm.exception.errnum, errno.EIO)
            self.assertEqual(chunks, [(10 * BLOCK, nbd.READ_DATA, whole[:BLOCK]),
                                      (11 * BLOCK, nbd.READ_ERROR, b""),
                                      (12 * BLOCK, nbd.READ_DATA, whole[2 * BLOCK:])])
            # With DF (no fragments) only the error comes back.
            chunks.clear()
            with self.assertRaises(nbd.Error):
                h.pread_structured(3 * BLOCK, 10 * BLOCK, chunk, nbd.CMD_FLAG_DF)
            self.assertEqual(chunks, [(11 * BLOCK, nbd.READ_ERROR, b"")])
        h.shutdown()
        self.s.stop()
        self.assertEqual(self.s.status()["pending"], 1)
        if not TOOLS.background:  # there, the log goes to syslog
            self.assertIn("block 11", self.s.read_log())

    def test_weak_block_is_rescued_with_its_data(self):
        data = pattern(3, BLOCK)
        with open(self.s.main, "r+b") as f:
            f.seek(20 * BLOCK)
            f.write(data)
        self.s.start("inject=weak:20x2")
        h = self.s.connect()
        self.assertEqual(h.pread(BLOCK, 20 * BLOCK), data)
        h.shutdown()
        self.s.stop()
        self.assertEqual(self.s.status()["remaps_by_cause"]["rescue"], 1)
        # The rescued copy serves even when main loses the block for good.
        self.s.start("inject=read:20")
        self.assertEqual(self.s.connect().pread(BLOCK, 20 * BLOCK), data)

    def test_pending_block_is_remapped_by_the_next_write(self):
        self.s.start("inject=read:30")
        h = self.s.connect()
        with self.assertRaises(nbd.Error):
            h.pread(BLOCK, 30 * BLOCK)
        data = pattern(4, BLOCK)
        h.pwrite(data, 30 * BLOCK, nbd.CMD_FLAG_FUA)
        self.assertEqual(h.pread(BLOCK, 30 * BLOCK), data)
        h.shutdown()
        self.s.stop()
        st = self.s.status()
        self.assertEqual(st["pending"], 0)
        self.assertEqual(st["remaps_by_cause"]["pending-write"], 1)

    def test_multi_conn_flush_on_one_makes_writes_on_another_visible(self):
        self.s.start("inject=write:7")
        a = self.s.connect()
        b = self.s.connect()
        data = pattern(5, 8 * BLOCK)
        a.pwrite(data, 0)
        a.flush()
        self.assertEqual(b.pread(8 * BLOCK, 0), data)
        b.flush()
        a.shutdown()
        b.shutdown()

    def test_pool_exhaustion_gives_enospc(self):
        small = DemoSet(TOOLS, main_size=4 << 20, spare_size=1 << 20,
                        extra_format=("--journal-size", "64K"))
        self.addCleanup(small.close)
        slots = small.status()["slots_total"]
        small.start(f"inject=write:0-{slots + 2}")
        h = small.connect()
        for b in range(slots):
            h.pwrite(pattern(b, BLOCK), b * BLOCK)
        with self.assertRaises(nbd.Error) as cm:
            h.pwrite(pattern(99, BLOCK), slots * BLOCK)
        self.assertEqual(cm.exception.errnum, errno.ENOSPC)
        # Reads of everything written still work.
        for b in range(0, slots, max(1, slots // 8)):
            self.assertEqual(h.pread(BLOCK, b * BLOCK), pattern(b, BLOCK))
        h.shutdown()
        small.stop()
        st = small.status()
        self.assertEqual(st["health"], "failing")
        self.assertEqual(st["slots_free"], 0)

    def test_bad_requests_get_the_nbd_errors(self):
        self.s.start()
        h = self.s.connect(strict=False)
        size = h.get_size()
        with self.assertRaises(nbd.Error) as cm:
            h.pread(BLOCK, size)
        self.assertEqual(cm.exception.errnum, errno.EINVAL)
        with self.assertRaises(nbd.Error) as cm:
            h.pwrite(bytes(BLOCK), size - 100)
        self.assertEqual(cm.exception.errnum, errno.ENOSPC)
        # The connection and the server keep serving.
        self.assertEqual(h.pread(BLOCK, 0), bytes(BLOCK))

    def test_read_only_export_refuses_writes(self):
        self.s.start("readonly=true")
        h = self.s.connect(strict=False)
        self.assertTrue(h.is_read_only())
        with self.assertRaises(nbd.Error) as cm:
            h.pwrite(bytes(BLOCK), 0)
        self.assertEqual(cm.exception.errnum, errno.EPERM)

    def test_unformatted_spare_stops_startup_with_one_line(self):
        blank = os.path.join(self.s.dir, "blank.img")
        with open(blank, "wb") as f:
            f.truncate(16 << 20)
        r = run_frontend(TOOLS, self.s.sock + "2", self.s.main, blank)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("dmremap format --main", r.stderr)

    def test_wrong_main_is_refused(self):
        other = os.path.join(self.s.dir, "other.img")
        with open(other, "wb") as f:
            f.truncate(32 << 20)
        r = run_frontend(TOOLS, self.s.sock + "2", other, self.s.spare)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(str(32 << 20), r.stderr)
        self.assertIn(str(64 << 20), r.stderr)

    def test_second_server_on_the_same_pair_is_refused(self):
        self.s.start()
        r = run_frontend(TOOLS, self.s.sock + "2", self.s.main, self.s.spare)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("locked", r.stderr)

    def test_qemu_io_and_qemu_img_round_trip(self):
        self.s.start("inject=write:256-259")
        uri = self.s.uri
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k",
                            "-c", "read -P 0x5a 1M 64k", "-c", "flush", uri],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertNotIn("Pattern verification failed", r.stdout)
        copy = os.path.join(self.s.dir, "copy.img")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, copy],
                       check=True, timeout=120)
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, copy],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.s.stop()
        self.assertEqual(self.s.status()["remaps"], 4)

    def test_sigterm_leaves_clean_metadata(self):
        self.s.start("inject=write:5")
        h = self.s.connect()
        h.pwrite(pattern(6, BLOCK), 5 * BLOCK)
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        self.assertTrue(st["clean"])
        self.assertEqual(st["remaps"], 1)


class ServedSetTest(unittest.TestCase):
    """dmremap list, remap and forget-pending while the set is served: through
    the frontend's control socket, with the answers they give offline."""

    def test_import_of_a_ddrescue_map_while_served(self):
        """Blocks a ddrescue map names bad become pending without a read:
        a client's read of one fails at once, even where main would
        answer only after seconds; its neighbours read from main."""
        s = DemoSet(TOOLS)
        self.addCleanup(s.close)
        s.start("inject=slow:30x3000", s.control_param())
        mapfile = os.path.join(s.dir, "rescue.map")
        with open(mapfile, "w") as f:
            f.write("# made by hand, as ddrescue writes it\n0x0 +\n"
                    f"0x0 {30 * BLOCK:#x} +\n{30 * BLOCK:#x} 0x200 -\n"
                    f"{30 * BLOCK + 0x200:#x} {(64 << 20) - 30 * BLOCK - 0x200:#x} +\n")
        r = s.cli("import", "--control", s.control, "--ddrescue", mapfile, check=False)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("marked 1 block(s) pending", r.stdout)
        h = s.connect()
        start = time.monotonic()
        with self.assertRaises(nbd.Error):
            h.pread(BLOCK, 30 * BLOCK)
        self.assertLess(time.monotonic() - start, 2.5)  # main's 3 s were never waited for
        self.assertEqual(h.pread(BLOCK, 31 * BLOCK), bytes(BLOCK))
        listed = json.loads(s.cli("list", "--control", s.control, "--json").stdout)
        self.assertEqual([e["block"] for e in listed["pending"]], [30])
        self.assertIsInstance(listed["pending"][0]["time"], int)
        # The next write gives it a slot.
        h.pwrite(pattern(7), 30 * BLOCK)
        self.assertEqual(h.pread(BLOCK, 30 * BLOCK), pattern(7))
        h.shutdown()

    def test_a_served_import_with_no_room_for_all_marks_nothing(self):
        s = DemoSet(TOOLS, extra_format=("--pending-capacity", "16"))
        self.addCleanup(s.close)
        s.start(s.control_param())
        lba = os.path.join(s.dir, "lba.txt")
        with open(lba, "w") as f:
            f.write("".join(f"{b}\n" for b in range(100, 120)))  # 20 blocks of 4 KiB
        r = s.cli("import", "--control", s.control, "--lba-list", lba, "--sector-size", "4096",
                  check=False)
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn("room for 16 more pending blocks; this names 20 new ones", r.stderr)
        listed = json.loads(s.cli("list", "--control", s.control, "--json").stdout)
        self.assertEqual(listed["pending"], [])

    def test_list_remap_and_forget_pending_through_the_control_socket(self):
        s = DemoSet(TOOLS)
        self.addCleanup(s.close)
        s.start("inject=read:20", s.control_param())
        h = s.connect()
        h.pwrite(pattern(5), 5 * BLOCK)
        h.flush()

        def cli(*args):
            return subprocess.run([TOOLS.cli, *args, "--control", s.control],
                                  capture_output=True, text=True, timeout=120)

        r = cli("remap", "5", "20", "--lba", str(9 * BLOCK // 512))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("block 5: remapped, data copied", r.stdout)
        self.assertIn("block 20: unreadable on main; marked pending", r.stdout)
        self.assertIn("block 9: remapped, data copied", r.stdout)
        listed = json.loads(cli("list", "--json").stdout)
        self.assertEqual([e["block"] for e in listed["remaps"]], [5, 9])
        self.assertEqual([e["block"] for e in listed["pending"]], [20])
        self.assertEqual(h.pread(BLOCK, 5 * BLOCK), pattern(5))  # data came along
        r = cli("forget-pending", "--all")
        self.assertEqual(r.returncode, 1, r.stderr)  # block 20 still fails
        self.assertIn("block 20: still unreadable; kept pending", r.stdout)
        r = cli("list", "--pending")
        self.assertIn("pending", r.stdout)
        h.shutdown()
        s.stop()
        # Offline, the spare says the same.
        offline = json.loads(s.cli("list", "--spare", s.spare, "--json").stdout)
        self.assertEqual(offline, listed)

    def test_health_changes_and_summaries_are_logged(self):
        s = DemoSet(TOOLS)
        self.addCleanup(s.close)
        # Also in the background: the thread that logs must run in the
        # process nbdkit forked, not in the parent that exited.
        s.start("inject=read:20", "log-interval=1", nbdkit_args=KEEP_LOG if TOOLS.background else ())
        h = s.connect()
        with self.assertRaises(nbd.Error):
            h.pread(BLOCK, 20 * BLOCK)  # unreadable: pending, health warning
        deadline = time.monotonic() + 30
        while "summary: health warning" not in s.read_log():
            self.assertLess(time.monotonic(), deadline, s.read_log())
            time.sleep(0.2)
        h.shutdown()
        s.stop()
        log = s.read_log()
        self.assertIn("health: warning (was ok)", log)
        self.assertIn("1 pending", log)

    # In the background the daemon, as nobody, could not write its pid file
    # into the test's directory, which the harness waits for.
    @unittest.skipIf(TOOLS.frontend != "plugin" or TOOLS.background or os.geteuid() != 0,
                     "nbdkit -u needs root and the plugin in the foreground")
    def test_control_socket_under_nbdkit_u(self):
        # nbdkit binds its sockets as root, then changes user: the control
        # socket, like nbdkit's own, belongs to root, who can still use it.
        # The socket is left behind at the end (the user may not remove it
        # from root's directory), and the next start replaces it.
        s = DemoSet(TOOLS)
        self.addCleanup(s.close)
        for _ in range(2):
            s.start(s.control_param(), nbdkit_args=("-u", "nobody"))
            st = os.stat(s.control)
            self.assertEqual((st.st_uid, st.st_mode & 0o777), (0, 0o600))
            r = s.cli("remap", "3", "--control", s.control, check=False)
            self.assertEqual(r.returncode, 0, r.stderr)
            live = s.live_status()
            self.assertEqual(live["remaps"], 1, live)
            s.stop()

    def test_naming_the_set_both_ways_is_bad_usage(self):
        s = DemoSet(TOOLS)
        self.addCleanup(s.close)
        r = s.cli("list", "--spare", s.spare, "--control", s.control, check=False)
        self.assertEqual(r.returncode, 2, r.stderr)
        r = s.cli("remap", "5", check=False)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--control SOCKET", r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
