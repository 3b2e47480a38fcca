"""`dmremap scan` on a served set (docs/cli.md, "scan"), on both frontends:
it finds the weak and the dead blocks the frontend was given, shows its
progress, can be detached, paused, resumed and cancelled, and its place
survives a restart of the frontend."""
import json
import time
import unittest

from nbd_harness import BLOCK, DemoSet, Tools

TOOLS = Tools()
BLOCKS = (64 << 20) // BLOCK  # DemoSet's main


class ScanTest(unittest.TestCase):
    def setUp(self):
        self.s = DemoSet(TOOLS)
        self.addCleanup(self.s.close)

    def scan(self, *args, check=False):
        return self.s.cli("scan", "--control", self.s.control, *args, check=check)

    def status(self):
        r = self.scan("--status", "--json", check=True)
        return json.loads(r.stdout)

    def test_scan_while_served_finds_weak_and_dead_blocks(self):
        self.s.start("inject=read:16000,weak:300x2", self.s.control_param())
        r = self.scan()
        self.assertEqual(r.returncode, 1, r.stderr)  # a block was unreadable
        self.assertIn("scan done: 64.00 MiB of 64.00 MiB (100.0%)", r.stdout)
        self.assertIn("1 unreadable, 1 rescued", r.stdout)
        listed = json.loads(self.s.cli("list", "--control", self.s.control, "--json").stdout)
        self.assertEqual([e["block"] for e in listed["pending"]], [16000])
        self.assertEqual([(e["block"], e["cause"]) for e in listed["remaps"]], [(300, "rescue")])
        # Again: everything reads now but the dead block, still pending.
        r = self.scan("--json")
        last = json.loads(r.stdout.splitlines()[-1])
        self.assertEqual((last["state"], last["unreadable"], last["rescued"]), ("done", 1, 0))
        print(f"\n[{TOOLS.frontend}] scan: 64 MiB, 1 unreadable, 1 rescued")

    def test_a_block_that_reads_slowly_is_rescued(self):
        # Block 9000 answers correctly, after 400 ms: a sector the disk
        # read only after its own retries. slow=0.2 rescues it, cause slow.
        self.s.start("inject=slow:9000x400", "slow=0.2", self.s.control_param())
        r = self.scan()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("0 unreadable, 1 rescued", r.stdout)
        listed = json.loads(self.s.cli("list", "--control", self.s.control, "--json").stdout)
        self.assertEqual([(e["block"], e["cause"]) for e in listed["remaps"]], [(9000, "slow")])
        self.assertEqual(listed["pending"], [])
        status = json.loads(self.s.cli("status", "--control", self.s.control, "--json").stdout)
        self.assertGreaterEqual(status["errors"]["slow_reads"], 1)
        self.assertEqual(status["remaps_by_cause"]["slow"], 1)
        metrics = self.s.cli("status", "--control", self.s.control, "--format=prometheus").stdout
        self.assertIn('dmremap_remap_events_total{cause="slow"} 1', metrics)
        self.assertRegex(metrics, r"(?m)^dmremap_slow_reads_total [1-9]")
        print(f"\n[{TOOLS.frontend}] scan: a block 400 ms slow was rescued, cause slow")

    def test_detach_pause_resume_cancel_and_a_restart(self):
        self.s.start(self.s.control_param())
        r = self.scan("--detach", "--rate", "2M")  # 64 MiB at 2 MiB/s: 32 s
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("scan running", r.stdout)
        deadline = time.monotonic() + 30
        while self.status()["next_block"] == 0:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.1)
        self.assertEqual(self.status()["rate_limit"], 2 << 20)
        r = self.scan("--pause")
        self.assertEqual(r.returncode, 0, r.stderr)
        time.sleep(0.5)
        paused = self.status()
        self.assertEqual(paused["state"], "paused")
        # A restart of the frontend keeps it paused, at its place.
        self.s.stop()
        self.s.start(self.s.control_param())
        again = self.status()
        self.assertEqual((again["state"], again["next_block"]), ("paused", paused["next_block"]))
        # Going on: resumed, then no limit; a second `scan` follows it to the end.
        self.assertEqual(self.scan("--resume", "--rate", "0").returncode, 0)
        r = self.scan()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("a scan is running; following it", r.stderr)
        self.assertIn("scan done", r.stdout)
        # A new one, cancelled.
        self.assertEqual(self.scan("--detach", "--rate", "1M", "--from", "0").returncode, 0)
        self.assertEqual(self.scan("--cancel").returncode, 0)
        time.sleep(0.3)
        self.assertEqual(self.status()["state"], "cancelled")
        self.assertNotEqual(self.scan("--resume").returncode, 0)

    def test_a_running_scan_goes_on_after_a_restart(self):
        self.s.start(self.s.control_param())
        self.assertEqual(self.scan("--detach", "--rate", "4M").returncode, 0)
        deadline = time.monotonic() + 30
        while self.status()["next_block"] < 64:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.1)
        self.s.stop()  # SIGTERM: the place is saved, the scan still "running"
        offline = json.loads(self.s.cli("scan", "--main", self.s.main, "--spare", self.s.spare,
                                        "--status", "--json").stdout)
        self.assertEqual(offline["state"], "running")
        self.assertGreaterEqual(offline["next_block"], 64)
        self.s.start(self.s.control_param())
        st = self.status()
        self.assertEqual(st["state"], "running")
        self.assertGreaterEqual(st["next_block"], offline["next_block"])
        self.assertEqual(self.scan("--cancel").returncode, 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
