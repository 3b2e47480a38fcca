"""When the spare itself fails, through a frontend and a real NBD client.

The spare is reached over NBD (an nbd+unix:// URI), served by nbdkit:
- its sh plugin, scripted to refuse writes, or reads, of chosen byte ranges
  of the spare file (the ranges are read again on every request, so a test
  can change them while the frontend runs), for failing slot writes, failing
  journal writes and unreadable metadata;
- its file plugin, killed with SIGKILL, for a spare that disappears.
Main is a plain file whose listed blocks refuse writes (inject=), so the
client's writes to them need a slot.
"""
import errno
import os
import shutil
import time
import unittest

import nbd

from nbd_harness import BLOCK, DemoSet, NbdkitBackend, Tools, pattern, read_pid, run_frontend

TOOLS = Tools()

SPARE_SCRIPT = r"""#!/usr/bin/env bash
# The spare, as an nbdkit sh plugin. $dir/wfail holds "FIRST END" byte
# ranges (END exclusive) whose writes fail with EIO; $dir/rfail, ranges
# whose reads do (bad sectors that a write does not heal).
dir=@DIR@
img=$dir/spare-backing.img
case "$1" in
  get_size) stat -c %s "$img" ;;
  can_write|can_flush) exit 0 ;;
  thread_model) echo serialize_requests ;;
  pread)
    if [ -f "$dir/rfail" ]; then
      while read -r lo hi; do
        if [ "$4" -lt "$hi" ] && [ $(($4 + $3)) -gt "$lo" ]; then
          echo "EIO spare: read of $3 bytes at $4: unreadable sector" >&2
          exit 1
        fi
      done < "$dir/rfail"
    fi
    dd if="$img" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
  pwrite)
    if [ -f "$dir/wfail" ]; then
      while read -r lo hi; do
        if [ "$4" -lt "$hi" ] && [ $(($4 + $3)) -gt "$lo" ]; then
          echo "EIO spare: write of $3 bytes at $4 refused" >&2
          exit 1
        fi
      done < "$dir/wfail"
    fi
    dd of="$img" seek="$4" oflag=seek_bytes conv=notrunc status=none ;;
  flush) sync "$img" ;;
  *) exit 2 ;;
esac
"""


class SpareFaultsTest(unittest.TestCase):
    def setUp(self):
        self.s = DemoSet(TOOLS, main_size=16 << 20, spare_size=8 << 20)
        self.addCleanup(self.s.close)
        self.spare_file = os.path.join(self.s.dir, "spare-backing.img")
        os.rename(self.s.spare, self.spare_file)
        self.s.spare = self.spare_file
        self.layout = self.s.status()["layout"]
        self.wfail = os.path.join(self.s.dir, "wfail")

    def serve_spare(self, args):
        server = NbdkitBackend(self.s.dir, "spare", args)
        self.addCleanup(server.kill)
        return server

    def scripted_spare(self):
        script = os.path.join(self.s.dir, "spare.sh")
        with open(script, "w") as f:
            f.write(SPARE_SCRIPT.replace("@DIR@", self.s.dir))
        os.chmod(script, 0o755)
        return self.serve_spare(["sh", script])

    def refuse_writes(self, ranges, name="wfail"):
        with open(os.path.join(self.s.dir, name), "w") as f:
            for lo, hi in ranges:
                f.write(f"{lo} {hi}\n")

    def refuse_reads(self, ranges):
        self.refuse_writes(ranges, "rfail")

    def test_one_journal_copy_refusing_writes_degrades_the_set_but_it_serves(self):
        spare = self.scripted_spare()
        self.start_on(spare, "inject=write:10,write:11", self.s.control_param())
        j = self.layout["journals"]
        self.refuse_writes([(j[0], j[0] + self.layout["journal_bytes"])])
        h = self.s.connect()
        h.pwrite(pattern(10), 10 * BLOCK)
        h.pwrite(pattern(11), 11 * BLOCK)
        h.flush()
        live = self.s.live_status()
        self.assertEqual(live["health"], "warning", live)
        self.assertIn("journal copy 0 refuses writes", live["health_reason"])
        self.assertEqual(live["remaps"], 2)
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        os.unlink(self.wfail)
        self.start_on(spare)
        h = self.s.connect()
        self.assertEqual(h.pread(BLOCK, 10 * BLOCK), pattern(10))
        self.assertEqual(h.pread(BLOCK, 11 * BLOCK), pattern(11))
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        self.assertEqual(self.s.status()["remaps"], 2)

    def test_unreadable_metadata_sectors_lose_nothing(self):
        # Remaps in the checkpoint first, on a healthy spare.
        spare = self.scripted_spare()
        self.start_on(spare, "inject=write:10,write:11,write:12")
        h = self.s.connect()
        h.pwrite(pattern(10), 10 * BLOCK)
        h.pwrite(pattern(11), 11 * BLOCK)
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        # Then superblock copy 0 and the first copy of the active checkpoint
        # go bad: every read of them fails, writes or not.
        layout = self.s.status()["layout"]
        cp = layout["checkpoints"][layout["active_checkpoint"]]
        self.refuse_reads([(0, 4096), (cp, cp + 4096)])
        self.start_on(spare, "inject=write:10,write:11,write:12")
        h = self.s.connect()
        self.assertEqual(h.pread(BLOCK, 10 * BLOCK), pattern(10))
        self.assertEqual(h.pread(BLOCK, 11 * BLOCK), pattern(11))
        h.pwrite(pattern(12), 12 * BLOCK)
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        # check, through the same failing spare, says what is wrong and
        # still finds everything; the file itself is whole.
        r = self.s.cli("check", "--spare", spare.uri, check=False)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("superblock copy 0", r.stdout)
        st = self.s.status()
        self.assertEqual((st["remaps"], st["clean"]), (3, True), st)
        os.unlink(os.path.join(self.s.dir, "rfail"))
        self.assertEqual(self.s.cli("check", "--spare", self.spare_file).returncode, 0)

    def start_on(self, spare, *params):
        self.s.spare = spare.uri
        self.s.start(*params)
        self.s.spare = self.spare_file  # status and list read the file

    def test_slot_write_failure_marks_the_slot_bad_and_uses_the_next(self):
        slot0 = self.layout["slot_offset"]
        self.refuse_writes([(slot0, slot0 + 2 * BLOCK)])  # slots 0 and 1
        spare = self.scripted_spare()
        self.start_on(spare, "inject=write:10")
        h = self.s.connect()
        h.pwrite(pattern(10), 10 * BLOCK)  # main refuses; slots 0, 1 refuse
        self.assertEqual(h.pread(BLOCK, 10 * BLOCK), pattern(10))
        h.flush()
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        self.assertEqual((st["remaps"], st["slots_bad"], st["health"]), (1, 2, "ok"), st)
        remap = self.s.listing()["remaps"][0]
        self.assertEqual((remap["block"], remap["slot"]), (10, 2))
        # Restarted on a healthy spare: the data is in slot 2, slots 0-1 stay unused.
        os.unlink(self.wfail)
        self.start_on(spare, "inject=write:10,write:11")
        h = self.s.connect()
        self.assertEqual(h.pread(BLOCK, 10 * BLOCK), pattern(10))
        h.pwrite(pattern(11), 11 * BLOCK)
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        slots = {r["block"]: r["slot"] for r in self.s.listing()["remaps"]}
        self.assertEqual(slots, {10: 2, 11: 3})

    def test_journal_write_failure_refuses_writes_and_reads_go_on(self):
        spare = self.scripted_spare()
        self.start_on(spare, "inject=write:10")
        h = self.s.connect()
        h.pwrite(pattern(3), 3 * BLOCK)
        h.flush()  # block 3 is durable on main
        j = self.layout["journals"]
        jb = self.layout["journal_bytes"]
        self.refuse_writes([(j[0], j[0] + jb), (j[1], j[1] + jb)])
        # The remap cannot be recorded: the write fails, clearly.
        with self.assertRaises(nbd.Error) as cm:
            h.pwrite(pattern(10), 10 * BLOCK)
        self.assertEqual(cm.exception.errnum, errno.EIO)
        # From now on every write is refused, even to a healthy block...
        with self.assertRaises(nbd.Error) as cm:
            h.pwrite(pattern(4), 4 * BLOCK)
        self.assertEqual(cm.exception.errnum, errno.EIO)
        # ...and reads go on.
        self.assertEqual(h.pread(BLOCK, 3 * BLOCK), pattern(3))
        self.assertNotEqual(h.pread(BLOCK, 10 * BLOCK), pattern(10))
        h.shutdown()
        self.s.stop()  # the exit code may say the spare failed; it must not hang
        if not TOOLS.background:  # there, the log goes to syslog
            self.assertRegex(self.s.read_log(), r"(?i)journal")
        # The spare heals; nothing unacknowledged was recorded.
        os.unlink(self.wfail)
        self.start_on(spare)
        h = self.s.connect()
        self.assertEqual(h.pread(BLOCK, 3 * BLOCK), pattern(3))
        self.assertEqual(h.pread(BLOCK, 4 * BLOCK), bytes(BLOCK))
        self.assertEqual(h.pread(BLOCK, 10 * BLOCK), bytes(BLOCK))
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        self.assertEqual((st["remaps"], st["pending"], st["health"]), (0, 0, "ok"), st)

    def test_spare_that_disappears_gives_eio_not_a_hang(self):
        spare = self.serve_spare(["file", self.spare_file])
        self.start_on(spare, "inject=write:10,write:11")
        h = self.s.connect()
        h.pwrite(pattern(10), 10 * BLOCK)
        h.pwrite(pattern(3), 3 * BLOCK)
        h.flush()
        spare.kill()
        started = time.monotonic()
        with self.assertRaises(nbd.Error) as cm:
            h.pread(BLOCK, 10 * BLOCK)  # lives in a slot
        self.assertEqual(cm.exception.errnum, errno.EIO)
        with self.assertRaises(nbd.Error) as cm:
            h.pwrite(pattern(11), 11 * BLOCK)  # needs a slot
        self.assertEqual(cm.exception.errnum, errno.EIO)
        # Nothing was written since the last flush, so nothing can be lost:
        # a flush succeeds without the spare (writes rule 5).
        h.flush()
        self.assertEqual(h.pread(BLOCK, 3 * BLOCK), pattern(3))  # main still reads
        self.assertLess(time.monotonic() - started, 30)
        h.shutdown()
        self.s.stop()
        # The spare comes back: what was flushed before it went is all there.
        spare.start()
        self.start_on(spare)
        h = self.s.connect()
        self.assertEqual(h.pread(BLOCK, 10 * BLOCK), pattern(10))
        self.assertEqual(h.pread(BLOCK, 3 * BLOCK), pattern(3))
        self.assertEqual(h.pread(BLOCK, 11 * BLOCK), bytes(BLOCK))
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        self.assertEqual((st["remaps"], st["pending"]), (1, 0), st)

    def test_two_servers_cannot_share_a_spare(self):
        # safety 3: an NBD export has no flock, so the set holds a lease in
        # its superblock. A second frontend on the same spare (and on a copy
        # of main, which it can lock) watches the lease, sees it renewed and
        # stops with a message.
        spare = self.serve_spare(["file", self.spare_file])
        self.start_on(spare)
        h = self.s.connect()
        h.pwrite(pattern(5), 5 * BLOCK)
        other_main = os.path.join(self.s.dir, "main-copy.img")
        shutil.copyfile(self.s.main, other_main)
        other_sock = os.path.join(self.s.dir, "other.sock")
        r = run_frontend(TOOLS, other_sock, other_main, spare.uri)
        if TOOLS.background:
            # The daemon fails after the fork; it must be gone, not serving.
            deadline = time.monotonic() + 20
            while True:
                pid = read_pid(other_sock + ".pid")
                if pid is not None and not os.path.exists(f"/proc/{pid}"):
                    break
                self.assertLess(time.monotonic(), deadline, "the second nbdkit is still running")
                time.sleep(0.1)
        else:
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("in use by another dmremap", r.stdout + r.stderr)
        # The first one was not disturbed.
        self.assertEqual(h.pread(BLOCK, 5 * BLOCK), pattern(5))
        h.pwrite(pattern(6), 6 * BLOCK)
        h.flush()
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        self.assertEqual((st["health"], st["clean"]), ("ok", True), st)


if __name__ == "__main__":
    unittest.main(verbosity=2)
