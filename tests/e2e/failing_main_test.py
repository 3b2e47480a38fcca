"""dmremap.so over mains that really fail, reached through the NBD-URI
backend: nbdkit's error filter (random EIO), its ddrescue filter (exact bad
ranges from a mapfile), and its sh plugin scripted like dm-dust.
"""
import errno
import os
import random
import time
import unittest

import nbd

from nbd_harness import BLOCK, DemoSet, NbdkitBackend, Tools, pattern

TOOLS = Tools()

DUST_SCRIPT = r"""#!/usr/bin/env bash
# dm-dust as an nbdkit sh plugin, on 4096-byte blocks:
#   $dir/bad      reads of these blocks fail until the block is written
#   $dir/wbad     writes to these blocks fail
#   $dir/weak.N   holds a count: the next that many reads of block N fail
dir=@DIR@
img=$dir/backing.img
blocks() { seq $(($2 / 4096)) $((($2 + $1 - 1) / 4096)); }
case "$1" in
  get_size) stat -c %s "$img" ;;
  can_write|can_flush) exit 0 ;;
  thread_model) echo serialize_requests ;;
  pread)
    for b in $(blocks "$3" "$4"); do
      if grep -qx "$b" "$dir/bad"; then echo "EIO dust: block $b is bad" >&2; exit 1; fi
      if [ -f "$dir/weak.$b" ]; then
        n=$(cat "$dir/weak.$b")
        if [ "$n" -gt 0 ]; then
          echo $((n - 1)) >"$dir/weak.$b"
          echo "EIO dust: block $b is weak" >&2
          exit 1
        fi
      fi
    done
    dd if="$img" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
  pwrite)
    for b in $(blocks "$3" "$4"); do
      if grep -qx "$b" "$dir/wbad"; then echo "EIO dust: block $b refuses writes" >&2; exit 1; fi
    done
    dd of="$img" seek="$4" oflag=seek_bytes conv=notrunc status=none
    for b in $(blocks "$3" "$4"); do sed -i "/^$b\$/d" "$dir/bad"; done ;;
  flush) exit 0 ;;
  *) exit 2 ;;
esac
"""


class FailingMainTest(unittest.TestCase):
    def setUp(self):
        self.s = DemoSet(TOOLS, main_size=16 << 20, spare_size=8 << 20)
        self.addCleanup(self.s.close)
        self.backing = self.s.main  # the file the backend serves

    def serve_main(self, name, args):
        backend = NbdkitBackend(self.s.dir, name, args)
        self.addCleanup(backend.kill)
        self.s.main = backend.uri  # dmremap now reaches main over NBD
        return backend

    def test_error_filter_random_eio_loses_no_written_data(self):
        # Every write and read of main fails at random. A failed write is
        # narrowed to its blocks, each written again on its own, and a block
        # that fails again is remapped (about 0.3 * 0.3 of the writes here).
        # Reads are retried. Nothing the client wrote may be lost.
        self.serve_main("err", ["--filter=error", "file", self.backing,
                                "error-pwrite-rate=30%", "error-pread-rate=3%", "error=EIO"])
        self.s.start("retries=8")
        h = self.s.connect()
        rng = random.Random(7)
        blocks = rng.sample(range(16 << 20 >> 12), 300)
        for b in blocks:
            h.pwrite(pattern(b), b * BLOCK)
        h.flush()
        for b in blocks:
            self.assertEqual(h.pread(BLOCK, b * BLOCK), pattern(b), f"block {b}")
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        self.assertGreater(st["remaps_by_cause"]["write-error"], 5)
        self.assertEqual(st["pending"], 0)
        self.assertEqual(st["health"], "ok")

    def test_ddrescue_mapfile_gives_exact_eio(self):
        with open(self.backing, "r+b") as f:
            f.write(pattern(1, 64 * BLOCK))
        mapfile = os.path.join(self.s.dir, "main.map")
        with open(mapfile, "w") as f:
            f.write("# Mapfile. Created by hand for dmremap's tests\n"
                    "0x00000000     +               1\n"
                    "#      pos        size  status\n"
                    "0x00000000  0x00005000  +\n"     # blocks 0-4 fine
                    "0x00005000  0x00001000  -\n"     # block 5 bad
                    "0x00006000  0x00FFA000  +\n")
        self.serve_main("ddrescue", ["--filter=ddrescue", "file", self.backing,
                                     f"ddrescue-mapfile={mapfile}"])
        self.s.start("readonly=true")
        h = self.s.connect()
        data = pattern(1, 64 * BLOCK)
        with self.assertRaises(nbd.Error) as cm:
            h.pread(8 * BLOCK, 0)
        self.assertEqual(cm.exception.errnum, errno.EIO)
        self.assertEqual(h.pread(5 * BLOCK, 0), data[:5 * BLOCK])
        self.assertEqual(h.pread(2 * BLOCK, 6 * BLOCK), data[6 * BLOCK:8 * BLOCK])
        with self.assertRaises(nbd.Error):
            h.pread(1, 5 * BLOCK + 4095)

    def test_dm_dust_scripted_main(self):
        dust = os.path.join(self.s.dir, "dust")
        os.mkdir(dust)
        os.rename(self.backing, os.path.join(dust, "backing.img"))
        with open(os.path.join(dust, "backing.img"), "r+b") as f:
            f.write(pattern(2, 32 * BLOCK))
        for name, text in (("bad", "3\n"), ("wbad", "9\n"), ("weak.12", "2\n")):
            with open(os.path.join(dust, name), "w") as f:
                f.write(text)
        script = os.path.join(dust, "dust.sh")
        with open(script, "w") as f:
            f.write(DUST_SCRIPT.replace("@DIR@", dust))
        os.chmod(script, 0o755)
        self.serve_main("dust", ["sh", script])
        self.s.start()
        h = self.s.connect()
        data = pattern(2, 32 * BLOCK)
        # Unreadable block 3: EIO, neighbours fine.
        with self.assertRaises(nbd.Error) as cm:
            h.pread(BLOCK, 3 * BLOCK)
        self.assertEqual(cm.exception.errnum, errno.EIO)
        self.assertEqual(h.pread(BLOCK, 4 * BLOCK), data[4 * BLOCK:5 * BLOCK])
        # Weak block 12: rescued with its data.
        self.assertEqual(h.pread(BLOCK, 12 * BLOCK), data[12 * BLOCK:13 * BLOCK])
        # Block 9 refuses writes: remapped, the write succeeds.
        h.pwrite(pattern(9), 9 * BLOCK)
        self.assertEqual(h.pread(BLOCK, 9 * BLOCK), pattern(9))
        # The pending block 3 takes a slot on its next write.
        h.pwrite(pattern(3), 3 * BLOCK)
        self.assertEqual(h.pread(BLOCK, 3 * BLOCK), pattern(3))
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        causes = self.s.status()["remaps_by_cause"]
        self.assertEqual((causes["rescue"], causes["write-error"], causes["pending-write"]),
                         (1, 1, 1))

    def test_main_server_that_dies_gives_eio_not_a_hang(self):
        backend = self.serve_main("mem", ["file", self.backing])
        self.s.start()
        h = self.s.connect()
        h.pwrite(pattern(1), 0)
        backend.kill()
        start = time.monotonic()
        with self.assertRaises(nbd.Error) as cm:
            h.pread(BLOCK, 0)
        self.assertEqual(cm.exception.errnum, errno.EIO)
        self.assertLess(time.monotonic() - start, 30)

    def test_main_server_gone_and_back_marks_nothing(self):
        # reads rule 7: a main that goes away is not media damage. The
        # client goes on reading and writing through the outage, as a
        # rescue copy or a VM would.
        backend = self.serve_main("mem", ["file", self.backing])
        self.s.start()
        h = self.s.connect()
        for b in range(40):
            h.pwrite(pattern(b), b * BLOCK)
        h.flush()
        backend.kill()
        for b in range(10):
            with self.assertRaises(nbd.Error) as cm:
                h.pread(BLOCK, b * BLOCK)
            self.assertEqual(cm.exception.errnum, errno.EIO)
        for b in range(20, 40):
            with self.assertRaises(nbd.Error) as cm:
                h.pwrite(pattern(1000 + b), b * BLOCK)
            self.assertEqual(cm.exception.errnum, errno.EIO)
        backend.start()
        # Back without a restart, after the reconnect backoff.
        deadline = time.monotonic() + 30
        while True:
            try:
                first = h.pread(BLOCK, 0)
                break
            except nbd.Error:
                self.assertLess(time.monotonic(), deadline, "main never came back")
                time.sleep(0.2)
        self.assertEqual(first, pattern(0))
        for b in range(40):
            self.assertEqual(h.pread(BLOCK, b * BLOCK), pattern(b), f"block {b}")
        h.pwrite(pattern(77), 25 * BLOCK)
        h.flush()
        self.assertEqual(h.pread(BLOCK, 25 * BLOCK), pattern(77))
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        self.assertEqual((st["remaps"], st["pending"], st["health"], st["clean"]),
                         (0, 0, "ok", True), st)
        if not TOOLS.background:
            log = self.s.read_log()
            self.assertIn("offline since", log)
            self.assertIn("back online", log)


if __name__ == "__main__":
    unittest.main(verbosity=2)
