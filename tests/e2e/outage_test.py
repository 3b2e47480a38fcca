"""Main's and the spare's NBD servers killed and restarted under fio verify.

A server that dies and comes back (a restart, a network blip, a disk behind
it that dropped off the bus) is not a bad block (reads rule 7 in
docs/behaviour.md):
during the outage requests that need it fail with EIO, nothing is marked or
remapped, and afterwards dmremap carries on without a restart and every
block fio wrote verifies.

fio's nbd engine writes the first 32 MiB with crc32c verify headers and
fsyncs; the server is killed; a libnbd client reads and writes through the
outage; the server is started again on the same socket; fio verifies the
32 MiB and then runs a short randwrite+verify on the rest.
"""
import errno
import json
import subprocess
import time
import unittest

import nbd

from nbd_harness import BLOCK, DemoSet, NbdkitBackend, Tools, pattern

TOOLS = Tools()
MiB = 1 << 20
REGION = 32 * MiB


def fio(uri, *args, timeout=300):
    cmd = ["fio", "--name=outage", "--ioengine=nbd", f"--uri={uri}", "--bs=4k",
           "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
           "--output-format=json", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"fio {' '.join(args)} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]


def write_region(uri):
    fio(uri, "--rw=write", f"--size={REGION}", "--iodepth=8", "--do_verify=0", "--end_fsync=1")


def verify_region(uri):
    job = fio(uri, "--rw=write", f"--size={REGION}", "--iodepth=8", "--verify_only")
    assert job["error"] == 0, job
    return job["read"]["io_bytes"]


def wait_for_read(h, offset, seconds=30):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return h.pread(BLOCK, offset)
        except nbd.Error:
            if time.monotonic() > deadline:
                raise AssertionError(f"offset {offset} still fails {seconds} s after the restart")
            time.sleep(0.2)


class OutageTest(unittest.TestCase):
    def setUp(self):
        self.s = DemoSet(TOOLS, main_size=64 << 20, spare_size=16 << 20)
        self.addCleanup(self.s.close)

    def backend(self, name, path):
        b = NbdkitBackend(self.s.dir, name, ["file", path])
        self.addCleanup(b.kill)
        return b

    def expect_eio(self, op, *args):
        with self.assertRaises(nbd.Error) as cm:
            op(*args)
        self.assertEqual(cm.exception.errnum, errno.EIO)

    def test_main_server_killed_and_restarted(self):
        server = self.backend("main", self.s.main)
        self.s.main = server.uri
        self.s.start(self.s.control_param())
        write_region(self.s.uri)
        h = self.s.connect()
        self.assertEqual(self.s.live_status()["main"], {"state": "online"})
        server.kill()
        for b in range(0, 100, 10):
            self.expect_eio(h.pread, BLOCK, b * BLOCK)
        for b in range(20):
            self.expect_eio(h.pwrite, pattern(b), REGION + b * BLOCK)
        # Health and `dmremap status` say so, while it lasts.
        live = self.s.live_status()
        self.assertEqual((live["main"]["state"], live["health"], live["pending"], live["remaps"]),
                         ("offline", "failing", 0, 0), live)
        self.assertTrue(live["health_reason"].startswith(
            "main offline since " + live["main"]["offline_since"]), live)
        r = self.s.cli("status", "--control", self.s.control, check=False)
        self.assertEqual(r.returncode, 2, r.stderr)  # failing, as monitoring plugins say
        self.assertIn("offline since " + live["main"]["offline_since"], r.stdout)
        server.start()
        wait_for_read(h, 0)
        live = self.s.live_status()
        self.assertEqual((live["main"], live["health"]), ({"state": "online"}, "ok"), live)
        verified = verify_region(self.s.uri)
        self.assertEqual(verified, REGION)
        job = fio(self.s.uri, "--rw=randwrite", f"--offset={REGION}", f"--size={REGION}",
                  "--do_verify=1", "--iodepth=8", "--end_fsync=1")
        self.assertEqual(job["error"], 0)
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        self.assertEqual((st["remaps"], st["pending"], st["slots_bad"], st["health"], st["clean"]),
                         (0, 0, 0, "ok", True), st)
        print(f"\n[{TOOLS.frontend}] main's server killed and back: {verified // MiB} MiB verified")

    def test_main_server_restarted_under_unflushed_writes(self):
        # The new connection cannot vouch for what the old one acknowledged
        # and nobody flushed: FLUSH fails from then on (writes rule 5).
        server = self.backend("main", self.s.main)
        self.s.main = server.uri
        self.s.start()
        h = self.s.connect()
        h.pwrite(pattern(1), 0)
        server.kill()
        server.start()
        self.assertEqual(wait_for_read(h, 0), pattern(1))
        self.expect_eio(h.flush)
        self.expect_eio(h.pwrite, pattern(2), BLOCK, nbd.CMD_FLAG_FUA)
        self.expect_eio(h.flush)
        h.shutdown()
        self.s.stop()  # the set cannot be closed cleanly: its last flush fails
        st = self.s.status()
        self.assertEqual((st["remaps"], st["pending"]), (0, 0), st)

    def test_spare_server_killed_and_restarted(self):
        spare_file = self.s.spare
        server = self.backend("spare", spare_file)
        self.s.spare = server.uri
        # Main refuses writes to every 50th block: fio's writes there live
        # on the spare. Blocks 8292 and 8342 need a slot when written later.
        self.s.start("inject=write:0-8191/50,write:8292,write:8342")
        write_region(self.s.uri)
        h = self.s.connect()
        server.kill()
        self.expect_eio(h.pread, BLOCK, 0)  # block 0 lives in a slot
        self.assertEqual(len(h.pread(BLOCK, BLOCK)), BLOCK)  # main still serves the rest
        self.expect_eio(h.pwrite, pattern(1), 50 * BLOCK)  # needs its slot
        self.expect_eio(h.pwrite, pattern(2), REGION + 100 * BLOCK)  # needs a new slot
        server.start()
        wait_for_read(h, 0)
        verified = verify_region(self.s.uri)
        self.assertEqual(verified, REGION)
        h.pwrite(pattern(3), REGION + 150 * BLOCK)  # a new remap works again
        h.flush()
        self.assertEqual(h.pread(BLOCK, REGION + 150 * BLOCK), pattern(3))
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        self.s.spare = spare_file
        st = self.s.status()
        # No slot was judged bad because the spare was away, nothing pending.
        self.assertEqual((st["slots_bad"], st["pending"], st["health"], st["clean"]),
                         (0, 0, "ok", True), st)
        self.assertEqual(st["remaps_by_cause"]["write-error"], 8192 // 50 + 1 + 1)
        print(f"\n[{TOOLS.frontend}] spare's server killed and back: {verified // MiB} MiB "
              f"verified, {st['remaps']} remaps")


if __name__ == "__main__":
    unittest.main(verbosity=2)
