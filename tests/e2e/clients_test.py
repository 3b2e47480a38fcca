"""End-to-end tests of dmremap.so with the NBD tools users run: nbdinfo,
nbdcopy, fio's nbd engine with verify=, and a process killed with SIGKILL.

DMREMAP_FIO_SECONDS sets the length of the fio verify run (default 60;
the issue asks for "a few minutes" locally: use 300).
"""
import json
import os
import signal
import subprocess
import time
import unittest

import nbd

from nbd_harness import BLOCK, DemoSet, Tools, pattern

TOOLS = Tools()
MiB = 1 << 20


def run(*args, timeout=120, check=True):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


class ClientsTest(unittest.TestCase):
    def setUp(self):
        self.s = DemoSet(TOOLS)
        self.addCleanup(self.s.close)

    def test_nbdinfo_can_and_map(self):
        # Data in blocks 10 and 20 of a sparse main; block 30 remapped by a
        # write error. The map shows holes around them.
        with open(self.s.main, "r+b") as f:
            for b in (10, 20):
                f.seek(b * BLOCK)
                f.write(pattern(b))
        self.s.start("inject=write:30,read:40")
        h = self.s.connect()
        h.pwrite(pattern(30), 30 * BLOCK)
        with self.assertRaises(nbd.Error):
            h.pread(BLOCK, 40 * BLOCK)  # block 40 becomes pending
        h.shutdown()
        for can in ("connect", "read", "write", "flush", "fua", "trim", "zero",
                    "fast-zero", "multi-conn", "cache", "structured-reply", "df"):
            r = run("nbdinfo", "--can", can, self.s.uri, check=False)
            self.assertEqual(r.returncode, 0, f"nbdinfo --can {can}: {r.stderr}")
        info = json.loads(run("nbdinfo", "--json", self.s.uri).stdout)
        export = info["exports"][0]
        self.assertEqual(export["export-size"], 64 * MiB)
        self.assertEqual(export["block_size_minimum"], BLOCK)
        self.assertIn("base:allocation", export["contexts"])
        mapping = json.loads(run("nbdinfo", "--map", "--json", self.s.uri).stdout)
        data = [(e["offset"], e["length"]) for e in mapping if e["type"] == 0]
        self.assertEqual(data, [(10 * BLOCK, BLOCK), (20 * BLOCK, BLOCK), (30 * BLOCK, BLOCK),
                                (40 * BLOCK, BLOCK)])
        holes = [e for e in mapping if e["type"] != 0]
        self.assertTrue(all(e["type"] == 3 for e in holes), holes)
        if TOOLS.frontend == "server":
            # x-dmremap:remapped: flag 1 for remapped blocks, 2 for pending.
            remapped = json.loads(run("nbdinfo", "--map=x-dmremap:remapped", "--json",
                                      self.s.uri).stdout)
            self.assertEqual([(e["offset"], e["length"], e["type"]) for e in remapped
                              if e["type"] != 0],
                             [(30 * BLOCK, BLOCK, 1), (40 * BLOCK, BLOCK, 2)])
        # --list: one export, the default one, with its description.
        listing = json.loads(run("nbdinfo", "--list", "--json", self.s.uri).stdout)
        self.assertEqual(len(listing["exports"]), 1)
        self.assertEqual(listing["exports"][0]["export-size"], 64 * MiB)

    def test_nbdcopy_both_ways_through_bad_blocks(self):
        src = os.path.join(self.s.dir, "src.img")
        back = os.path.join(self.s.dir, "back.img")
        with open(src, "wb") as f:
            for i in range(0, 64 * MiB, MiB):
                f.write(pattern(i, MiB) if (i // MiB) % 3 else bytes(MiB))
        # Every 97th block refuses writes: nbdcopy's writes there are remapped.
        self.s.start("inject=write:0-16383/97")
        run("nbdcopy", "--flush", src, self.s.uri, timeout=300)
        run("nbdcopy", self.s.uri, back, timeout=300)
        run("cmp", src, back)
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        # nbdcopy skips zeroes or writes them as zeroing requests, so not
        # every bad block is written; the ones in data chunks are.
        self.assertGreater(st["remaps_by_cause"]["write-error"], 50)
        self.assertTrue(st["clean"])

    def test_kill_9_loses_nothing_flushed_or_fua(self):
        self.s.start("inject=write:40-47")
        h = self.s.connect()
        flushed = {b: pattern(1000 + b) for b in range(36, 52)}
        for b, d in flushed.items():
            h.pwrite(d, b * BLOCK)
        h.flush()
        fua = pattern(7777)
        h.pwrite(fua, 60 * BLOCK, nbd.CMD_FLAG_FUA)
        # SIGKILL: no cleanup, no clean checkpoint.
        self.s.proc.send_signal(signal.SIGKILL)
        self.s.proc.wait(timeout=30)
        self.s.proc = None
        self.s.logf.close()
        st = self.s.status()
        self.assertFalse(st["clean"])
        self.assertEqual(st["remaps"], 8)
        self.s.start("inject=write:40-47")
        h = self.s.connect()
        for b, d in flushed.items():
            self.assertEqual(h.pread(BLOCK, b * BLOCK), d, f"block {b}")
        self.assertEqual(h.pread(BLOCK, 60 * BLOCK), fua)
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        self.assertTrue(self.s.status()["clean"])
        self.assertEqual(run(TOOLS.cli, "check", "--spare", self.s.spare).returncode, 0)

    def test_fio_verify_with_errors_injected(self):
        # Four fio jobs, each on its own NBD connection and its own 16 MiB,
        # write random 4k blocks and verify them with crc32c, while main
        # refuses writes to one block in 40 and some blocks are weak.
        seconds = int(os.environ.get("DMREMAP_FIO_SECONDS", "60"))
        self.s.start("inject=write:0-16383/40,weak:5-16383/101x2", "retries=3")
        fio = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={self.s.uri}",
               "--rw=randwrite", "--bs=4k", "--size=16M", "--numjobs=4",
               "--offset_increment=16M", "--iodepth=8", "--verify=crc32c",
               "--verify_fatal=1", "--do_verify=1", "--loops=1000", "--verify_state_save=0",
               f"--runtime={seconds}", "--time_based=0", "--group_reporting",
               "--output-format=json"]
        start = time.monotonic()
        r = run(*fio, timeout=seconds + 300, check=False)
        self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr[-2000:])
        out = json.loads(r.stdout[r.stdout.index("{"):])
        job = out["jobs"][0]
        self.assertEqual(job["error"], 0)
        self.assertGreater(job["write"]["io_bytes"], 64 * MiB)
        self.assertGreater(job["read"]["io_bytes"], 0)  # the verify pass
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        self.assertGreaterEqual(st["remaps_by_cause"]["write-error"], 16384 // 40 - 1)
        self.assertGreater(st["remaps_by_cause"]["rescue"], 0)
        self.assertEqual(st["pending"], 0)
        print(f"fio verify: {job['write']['io_bytes'] // MiB} MiB written, "
              f"{job['read']['io_bytes'] // MiB} MiB verified in "
              f"{time.monotonic() - start:.0f} s; remaps {st['remaps_by_cause']}")


if __name__ == "__main__":
    unittest.main(verbosity=2)
