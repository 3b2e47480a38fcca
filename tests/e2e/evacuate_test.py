"""`dmremap evacuate` on a served set (docs/evacuate.md, docs/cli.md), on both
frontends: the virtual disk is copied onto NEW while a client writes, the
frontend is killed with SIGKILL in the middle and picks the copy up by
itself, and at the end NEW holds exactly what the set holds, but for the
blocks the mapfile lists as lost.

The main of test_online_evacuation_under_fio_survives_kill_9 (64 MiB of
random data, 16,384 blocks of 4 KiB) has, by design:
- a dead block outside every client's writes (DEAD_OUT): the only lost one;
- a dead block in fio's range that the copy reads before fio writes it
  (DEAD_COPIED, below the copy's place when fio starts): pending, then
  remapped by fio's write (fio writes every block of its range), so not
  lost. (Not a dead block that fio may write before the copy reads it: its
  write goes to main and "mends" it, but the injected fault comes back with
  the restart after the kill, as a disk's would not.)
- two weak blocks (WEAK), outside fio's range: rescued, NEW gets their data;
- blocks that refuse writes, every 64th of fio's range: remapped.
"""
import json
import os
import re
import signal
import subprocess
import time
import unittest

import nbd

from nbd_harness import BLOCK, DemoSet, Tools, pattern

TOOLS = Tools()
MiB = 1 << 20
BLOCKS = (64 << 20) // BLOCK  # DemoSet's main
FIO_FIRST, FIO_BLOCKS = 1024, 4096  # fio's range: [4 MiB, 20 MiB)
DEAD_COPIED = 1500                  # copied (and found dead) before fio starts
DEAD_OUT = 15000                    # nobody writes it: lost
WEAK = {12000: 2, 12500: 3}         # block -> failed reads before it reads
WRITER_FIRST, WRITER_BLOCKS = 5120, 6144  # the writes in flight at the kill
FAULTS = ",".join([f"read:{DEAD_COPIED},read:{DEAD_OUT}",
                   *(f"weak:{b}x{k}" for b, k in WEAK.items()),
                   f"write:{FIO_FIRST}-{FIO_FIRST + FIO_BLOCKS - 1}/64"])
RATE = "2M"  # about 9 MiB while fio runs: across its range, far from the end


def fio(*args, timeout=150):
    cmd = ["fio", "--name=evacuate", "--bs=4k", "--verify=crc32c", "--verify_fatal=1",
           "--verify_state_save=0", "--output-format=json", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"fio {' '.join(args)} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    return job


def fio_range():
    return [f"--offset={FIO_FIRST * BLOCK}", f"--size={FIO_BLOCKS * BLOCK}", "--rw=randwrite"]


def lost_in_mapfile(path, block_size=BLOCK):
    """The blocks a GNU ddrescue mapfile marks '-', and the '+' ranges as
    (offset, length)."""
    lost, good = [], []
    with open(path) as f:
        lines = [ln.split() for ln in f if ln.strip() and not ln.startswith("#")]
    # The first line is the current position and status; then pos size status.
    for pos, size, status in (ln[:3] for ln in lines[1:]):
        pos, size = int(pos, 16), int(size, 16)
        if status == "-":
            lost += range(pos // block_size, (pos + size) // block_size)
        else:
            assert status == "+", f"status {status!r} in {path}"
            good.append((pos, size))
    return lost, good


def read_blocks(path, first, count=1):
    with open(path, "rb") as f:
        f.seek(first * BLOCK)
        return f.read(count * BLOCK)


class EvacuateTest(unittest.TestCase):
    def setUp(self):
        self.s = DemoSet(TOOLS)
        self.addCleanup(self.s.close)
        self.new = os.path.join(self.s.dir, "new.img")
        self.report = os.path.join(self.s.dir, "evacuate.txt")
        self.mapfile = os.path.join(self.s.dir, "evacuate.map")
        self.followers = []
        self.addCleanup(self.stop_followers)

    def stop_followers(self):
        for p in self.followers:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=30)

    def make_new(self, size=64 << 20):
        with open(self.new, "wb") as f:
            f.truncate(size)

    # --- the CLI --------------------------------------------------------

    def evacuate(self, *args, timeout=60):
        """`dmremap evacuate --control ...`, its report and mapfile in the
        test's directory."""
        return subprocess.run([TOOLS.cli, "evacuate", "--control", self.s.control,
                               "--report", self.report, "--mapfile", self.mapfile, *args],
                              capture_output=True, text=True, timeout=timeout)

    def follow(self, *args):
        """A `dmremap evacuate` that follows the copy, in the background."""
        p = subprocess.Popen([TOOLS.cli, "evacuate", "--control", self.s.control,
                              "--report", self.report, "--mapfile", self.mapfile, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.followers.append(p)
        return p

    def status(self):
        r = self.evacuate("--status", "--json")
        self.assertIn(r.returncode, (0, 1), r.stderr)
        st = json.loads(r.stdout)
        # Exit 0 exactly when NEW holds the whole disk.
        self.assertEqual(r.returncode == 0, st["state"] in ("in-sync", "finished"), st)
        return st

    def wait_for(self, what, until, seconds=60):
        deadline = time.monotonic() + seconds
        while True:
            st = self.status()
            if until(st):
                return st
            self.assertLess(time.monotonic(), deadline, f"{what}: {st}")
            time.sleep(0.05)

    def holds_new(self):
        """Whether the process that serves has NEW open."""
        pid = getattr(self.s, "daemon_pid", None) or self.s.proc.pid
        fds = f"/proc/{pid}/fd"
        for fd in os.listdir(fds):
            try:
                if os.readlink(os.path.join(fds, fd)) == self.new:
                    return True
            except FileNotFoundError:
                pass  # closed meanwhile
        return False

    def kill_9(self):
        """SIGKILL to the process that serves (a crash, a power cut for the
        frontend; the page cache survives it)."""
        s = self.s
        if getattr(s, "daemon_pid", None):
            pid, s.daemon_pid = s.daemon_pid, None
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while True:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                            break  # dead; its parent reaps it
                except FileNotFoundError:
                    break
                self.assertLess(time.monotonic(), deadline, "nbdkit outlived SIGKILL")
                time.sleep(0.02)
        else:
            s.proc.send_signal(signal.SIGKILL)
            s.proc.wait(timeout=30)
            s.proc = None
        s.logf.close()

    # --- the tests --------------------------------------------------------

    def test_online_evacuation_under_fio_survives_kill_9(self):
        # Data everywhere: the copy reads every block (a hole in main's file
        # is copied as zeros, unread).
        original = os.urandom(64 << 20)
        with open(self.s.main, "r+b") as f:
            f.write(original)
        self.make_new()
        params = (f"inject={FAULTS}", self.s.control_param())
        self.s.start(*params)
        t0 = time.monotonic()

        # The copy starts, followed by the CLI as a user would; fio writes
        # and verifies a range that straddles the copy's place meanwhile.
        first_cli = self.follow("--to", self.new, "--rate", RATE)
        st = self.wait_for("the copy passes fio's first blocks", lambda st: (
            st["state"] == "running" and st["next_block"] > DEAD_COPIED))
        self.assertEqual((st["target"], st["rate_limit"]), (self.new, 2 * MiB))
        before_fio = st["next_block"]
        self.assertGreater(before_fio, DEAD_COPIED)
        # fio pauses 60 ms after every 32 writes: the copy, which yields to
        # a client busy in the last 50 ms, then goes on between.
        job = fio("--ioengine=nbd", f"--uri={self.s.uri}", *fio_range(), "--iodepth=8",
                  "--thinktime=60000", "--thinktime_blocks=32", "--do_verify=1",
                  "--end_fsync=1")
        self.assertEqual(job["write"]["io_bytes"], FIO_BLOCKS * BLOCK)
        after_fio = self.status()
        # The copy moved across fio's range while fio wrote, and is not over.
        self.assertEqual(after_fio["state"], "running", after_fio)
        self.assertGreater(after_fio["next_block"], before_fio + 1024)
        self.assertLess(after_fio["next_block"], BLOCKS - 2048)
        self.assertGreater(after_fio["mirrored"], 0)

        # A save point: a pause saves the place (and the CLI that followed
        # stops, since the copy no longer runs); the next `dmremap evacuate`
        # resumes it and follows it.
        self.wait_for("the copy reaches the writer's range", lambda st: (
            st["next_block"] >= WRITER_FIRST + 1024))
        r = self.evacuate("--pause")
        self.assertEqual(r.returncode, 0, r.stderr)
        saved = self.status()
        self.assertEqual(saved["state"], "paused")
        first_cli.communicate(timeout=30)
        self.assertEqual(first_cli.returncode, 1)  # paused: not in sync
        resumed_cli = self.follow()
        st = self.wait_for("the copy goes on", lambda st: (
            st["state"] == "running" and st["next_block"] >= saved["next_block"] + 256))

        # Writes in flight when the frontend dies: below the saved place
        # (their write-intent bits make the restart copy them again) and
        # above it.
        h = self.s.connect()
        rng_seed = 1
        in_flight = []
        kill_at = time.monotonic() + 1.0
        while time.monotonic() < kill_at:
            while len(in_flight) < 16:
                block = WRITER_FIRST + (rng_seed * 2654435761) % WRITER_BLOCKS
                in_flight.append(h.aio_pwrite(pattern(rng_seed), block * BLOCK))
                rng_seed += 1
            h.poll(10)
            in_flight = [c for c in in_flight if not h.aio_command_completed(c)]
        before_kill = self.status()
        self.assertEqual(before_kill["state"], "running", before_kill)
        self.kill_9()
        try:
            h.shutdown()
        except nbd.Error:
            pass
        del h
        resumed_cli.communicate(timeout=30)
        self.assertNotEqual(resumed_cli.returncode, 0)  # its frontend went away

        # What the kill left on the spare: the place saved at the pause, and
        # write-intent bits for the regions below it that the writer wrote.
        left = self.s.status()["evacuation"]
        self.assertEqual((left["state"], left["next_block"]), ("running", saved["next_block"]))
        self.assertGreater(left["resync_regions"], 0, left)

        # The same set, the same parameters: the copy goes on by itself,
        # from its saved place, not from 0, those regions first.
        self.s.start(*params)
        again = self.status()
        self.assertIn(again["state"], ("running", "in-sync"), again)
        self.assertGreater(saved["next_block"], 0)
        self.assertGreaterEqual(again["next_block"], saved["next_block"], again)
        self.assertEqual((again["target"], again["rate_limit"]), (self.new, 2 * MiB))
        if not TOOLS.background:  # a daemon logs to syslog
            self.assertRegex(self.s.read_log(), (
                f"evacuation to {re.escape(self.new)} picked up \\(running, block "
                f"{saved['next_block']}, .*; {left['resync_regions']} region\\(s\\) written "
                "before a crash are copied again"))
        r = self.evacuate("--rate", "0")  # no limit now; follows it to in-sync
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("holds the whole disk; 1 block(s) lost", r.stderr)
        synced = self.status()
        self.assertEqual((synced["state"], synced["next_block"], synced["resync_regions"]),
                         ("in-sync", BLOCKS, 0), synced)

        # The mapfile lists the dead block nobody wrote, and it alone.
        lost, good = lost_in_mapfile(self.mapfile)
        self.assertEqual(lost, [DEAD_OUT])
        with open(self.report) as f:
            report = f.read()
        self.assertIn(f"lost blocks:    1 ({BLOCK} bytes)", report)
        self.assertIn(f"\n{DEAD_OUT} {DEAD_OUT * BLOCK} {DEAD_OUT * BLOCK // 512}\n", report)
        self.assertEqual(read_blocks(self.new, DEAD_OUT), bytes(BLOCK))
        # The weak blocks were rescued, with their data, and NEW has it.
        for b in WEAK:
            self.assertEqual(read_blocks(self.new, b), original[b * BLOCK:(b + 1) * BLOCK], b)
        listing = json.loads(self.s.cli("list", "--control", self.s.control, "--json").stdout)
        self.assertEqual([e["block"] for e in listing["pending"]], [DEAD_OUT])
        causes = {}
        for e in listing["remaps"]:
            causes.setdefault(e["cause"], set()).add(e["block"])
        self.assertEqual(causes.get("rescue"), set(WEAK))
        self.assertEqual(causes.get("write-error"),
                         set(range(FIO_FIRST, FIO_FIRST + FIO_BLOCKS, 64)))
        self.assertIn(DEAD_COPIED, causes.get("pending-write", set()))

        # fio's data verifies through the export and on NEW itself.
        fio("--ioengine=nbd", f"--uri={self.s.uri}", *fio_range(), "--iodepth=8",
            "--verify_only")
        fio("--ioengine=psync", f"--filename={self.new}", *fio_range(), "--verify_only")
        # And dmremap compares NEW with the set, block by block.
        r = self.evacuate("--verify")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"verified: {BLOCKS - 1} block(s) equal, 1 lost block(s) skipped",
                      r.stderr)
        # In sync, a write still reaches NEW before its reply.
        h = self.s.connect()
        h.pwrite(pattern(999999), 100 * BLOCK)
        self.assertEqual(read_blocks(self.new, 100), pattern(999999))
        h.shutdown()

        # A clean stop ends it: finished, NEW no longer written.
        self.assertEqual(self.s.stop(), 0)
        offline = self.s.cli("evacuate", "--main", self.s.main, "--spare", self.s.spare,
                             "--status", "--json")
        self.assertEqual(json.loads(offline.stdout)["state"], "finished")

        # The export, copied by nbdcopy (as salvage: unreadable blocks read
        # as zeros), equals NEW everywhere but the lost blocks.
        self.s.start(*params, "unreadable=zero")
        copy = os.path.join(self.s.dir, "copy.img")
        subprocess.run(["nbdcopy", self.s.uri, copy], check=True, timeout=120)
        for offset, length in good:
            r = subprocess.run(["cmp", f"--ignore-initial={offset}:{offset}",
                                f"--bytes={length}", copy, self.new],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 0, f"{offset:#x}+{length:#x}: {r.stdout}{r.stderr}")
        self.assertEqual(sum(length for _, length in good) + BLOCK, 64 << 20)
        # A finished evacuation still verifies (NEW opened read-only).
        r = self.evacuate("--verify")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("1 lost block(s) skipped", r.stderr)
        self.assertEqual(self.s.stop(), 0)
        print(f"\n[{TOOLS.frontend}] evacuate: the copy went from block {before_fio} to "
              f"{after_fio['next_block']} while fio wrote; killed at block "
              f"{before_kill['next_block']} (saved {saved['next_block']}), picked up at "
              f"{again['next_block']} with {left['resync_regions']} region(s) to copy again first; "
              f"in sync, 1 block lost; {time.monotonic() - t0:.1f} s", flush=True)

    def test_pause_resume_abort(self):
        self.make_new()
        self.s.start(self.s.control_param())
        r = self.evacuate("--to", self.new, "--rate", "1M", "--detach")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"evacuate running to {self.new}", r.stdout)
        self.wait_for("the copy starts", lambda st: st["next_block"] > 0)
        # Another start while one is under way is refused.
        other = os.path.join(self.s.dir, "other.img")
        with open(other, "wb") as f:
            f.truncate(64 << 20)
        r = self.evacuate("--to", other, "--detach")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn(f"an evacuation to {self.new} is running: abort it first", r.stderr)
        # Paused: the place stays, writes still reach NEW.
        r = self.evacuate("--pause")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("evacuate paused", r.stdout)
        paused = self.status()
        self.assertEqual(paused["state"], "paused")
        time.sleep(1.5)
        self.assertEqual(self.status()["next_block"], paused["next_block"])
        above = paused["next_block"] + 1000
        h = self.s.connect()
        h.pwrite(pattern(1), above * BLOCK)
        self.assertEqual(read_blocks(self.new, above), pattern(1))
        h.shutdown()
        if TOOLS.frontend == "server":
            # x-dmremap:copied: copied below the place, not yet above it.
            got = json.loads(subprocess.run(
                ["nbdinfo", "--map=x-dmremap:copied", "--json", self.s.uri],
                capture_output=True, text=True, check=True).stdout)
            place = paused["next_block"] * BLOCK
            self.assertEqual([(e["offset"], e["type"]) for e in got],
                             [(0, 0), (place, 1)], got)
        self.assertNotEqual(self.evacuate("--pause").returncode, 0)  # not copying
        # A restart keeps it paused at its place.
        self.assertEqual(self.s.stop(), 0)
        self.s.start(self.s.control_param())
        st = self.status()
        self.assertEqual((st["state"], st["next_block"]), ("paused", paused["next_block"]))
        # Resumed, it moves again.
        r = self.evacuate("--resume")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.wait_for("the copy goes on", lambda st: (
            st["state"] == "running" and st["next_block"] > paused["next_block"]))
        self.assertNotEqual(self.evacuate("--resume").returncode, 0)  # not paused
        # Aborted: NEW is no longer written, and nothing resumes it.
        r = self.evacuate("--abort")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("evacuate aborted", r.stdout)
        aborted = self.status()
        self.assertEqual(aborted["state"], "aborted")
        self.assertGreater(aborted["next_block"], paused["next_block"])
        h = self.s.connect()
        h.pwrite(pattern(2), above * BLOCK)
        h.flush()
        self.assertEqual(read_blocks(self.new, above), pattern(1))
        h.shutdown()
        for action in ("--resume", "--pause", "--abort"):
            r = self.evacuate(action)
            self.assertEqual(r.returncode, 1, action)
        r = self.evacuate()  # follow what? nothing is under way
        self.assertEqual(r.returncode, 1)
        self.assertIn("no evacuation is under way: name NEW with --to", r.stderr)
        # A new one (to another disk) starts from the beginning.
        r = self.evacuate("--to", other, "--rate", "1M", "--detach")
        self.assertEqual(r.returncode, 0, r.stderr)
        st = self.status()
        self.assertEqual((st["state"], st["target"]), ("running", other))
        self.assertLess(st["next_block"], aborted["next_block"])
        self.assertEqual(self.evacuate("--abort").returncode, 0)
        self.assertEqual(self.s.stop(), 0)
        offline = self.s.cli("evacuate", "--main", self.s.main, "--spare", self.s.spare,
                             "--status", "--json", check=False)
        self.assertEqual(offline.returncode, 1)
        self.assertEqual(json.loads(offline.stdout)["state"], "aborted")

    def test_an_aborted_new_can_be_used_again(self):
        # NEW, aborted, is no longer written: the frontend lets go of it
        # (closes it, and its lock), so that the evacuation can be started
        # again on it (it holds data now: --force), or NEW used elsewhere,
        # without a restart.
        with open(self.s.main, "r+b") as f:
            f.write(pattern(3, MiB))  # what the copy puts on NEW first
        self.make_new()
        self.s.start(self.s.control_param())
        r = self.evacuate("--to", self.new, "--rate", "1M", "--detach")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.wait_for("the copy starts", lambda st: st["next_block"] > 0)
        self.assertTrue(self.holds_new())
        self.assertEqual(self.evacuate("--abort").returncode, 0)
        self.assertFalse(self.holds_new())
        r = self.evacuate("--to", self.new, "--detach")
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"{self.new} holds data (a non-zero byte at offset ", r.stderr)
        r = self.evacuate("--to", self.new, "--rate", "1M", "--force", "--detach")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.status()["state"], "running")
        self.assertEqual(self.evacuate("--abort").returncode, 0)
        self.assertEqual(self.s.stop(), 0)

    def test_refusals(self):
        self.s.start(self.s.control_param())
        small = os.path.join(self.s.dir, "small.img")
        with open(small, "wb") as f:
            f.truncate((64 << 20) - BLOCK)
        r = self.evacuate("--to", small, "--detach")
        self.assertEqual(r.returncode, 1)
        self.assertRegex(r.stderr, "is 67104768 bytes \\([^)]*\\): smaller than the set's "
                                   "67108864 bytes \\(64.00 MiB\\)")
        for disk in (self.s.main, self.s.spare):
            r = self.evacuate("--to", disk, "--detach")
            self.assertEqual(r.returncode, 1)
            self.assertIn(f"{disk} is {disk}, a disk of this set: NEW must be another disk",
                          r.stderr)
        # The same file by another name is still main.
        link = os.path.join(self.s.dir, "main-link.img")
        os.symlink(self.s.main, link)
        r = self.evacuate("--to", link, "--detach")
        self.assertEqual(r.returncode, 1)
        self.assertIn("a disk of this set: NEW must be another disk", r.stderr)
        # NEW with data, anywhere dmremap looks (here its last MiB).
        self.make_new()
        with open(self.new, "r+b") as f:
            f.seek((64 << 20) - 100)
            f.write(b"x")
        r = self.evacuate("--to", self.new, "--detach")
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"{self.new} holds data (a non-zero byte at offset {(64 << 20) - 100}): "
                      "give --force to overwrite it", r.stderr)
        r = self.evacuate("--to", self.new, "--rate", "1K", "--detach")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("too slow", r.stderr)
        r = self.evacuate("--to", os.path.join(self.s.dir, "missing.img"), "--detach")
        self.assertEqual(r.returncode, 1)
        self.assertIn("missing.img", r.stderr)
        # Nothing of that started anything.
        self.assertEqual(self.status()["state"], "none")
        # A read-only frontend cannot evacuate.
        self.assertEqual(self.s.stop(), 0)
        self.s.start(self.s.control_param(), "readonly=true")
        r = self.evacuate("--to", self.new, "--force", "--detach")
        self.assertEqual(r.returncode, 1)
        self.assertIn("served read-only", r.stderr)
        self.assertEqual(self.s.stop(), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
