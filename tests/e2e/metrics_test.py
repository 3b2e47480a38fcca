"""Prometheus metrics (docs/metrics.md): the control channel's `metrics` and
`dmremap status --format=prometheus`, served and offline, on both frontends;
dmremap-server's --metrics HTTP endpoint; promtool's checks of every one of
them, and of the example alert rules, whose own unit tests promtool runs."""
import os
import re
import subprocess
import time
import unittest
import urllib.error
import urllib.request

import nbd

from nbd_harness import BLOCK, DemoSet, Tools, pattern

TOOLS = Tools()
PROMTOOL = "/usr/bin/promtool"
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "prometheus")


def promtool(*args, text=None):
    return subprocess.run([PROMTOOL, *args], input=text, capture_output=True, text=True,
                          timeout=60)


def value(text, sample):
    """The value of the sample line that starts with `sample` (name and labels)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {sample} in:\n{text}")


class MetricsTest(unittest.TestCase):
    def damaged_set(self, *params):
        s = DemoSet(TOOLS)
        self.addCleanup(s.close)
        s.start("inject=read:20,write:30", s.control_param(), *params)
        h = s.connect()
        h.pread(BLOCK, 0)
        with self.assertRaises(nbd.Error):
            h.pread(BLOCK, 20 * BLOCK)  # unreadable: pending
        h.pwrite(pattern(1), 30 * BLOCK)  # main refuses it: remapped
        h.flush()
        return s, h

    def check_live(self, text):
        r = promtool("check", "metrics", text=text)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertEqual(value(text, "dmremap_pending_blocks"), 1)
        self.assertEqual(value(text, "dmremap_remapped_blocks"), 1)
        self.assertEqual(value(text, 'dmremap_remap_events_total{cause="write-error"}'), 1)
        self.assertEqual(value(text, 'dmremap_health{state="warning"}'), 1)
        self.assertEqual(value(text, 'dmremap_health_problem{problem="pending"}'), 1)
        self.assertEqual(value(text, 'dmremap_device_online{device="main"}'), 1)
        self.assertEqual(value(text, 'dmremap_spare_slots{state="used"}'), 1)
        reads = value(text, 'dmremap_requests_total{op="read"}')
        self.assertGreaterEqual(reads, 2)
        # Every read is in the histogram, up to the +Inf bucket.
        self.assertEqual(value(text, 'dmremap_request_duration_seconds_count{op="read"}'), reads)
        self.assertEqual(
            value(text, 'dmremap_request_duration_seconds_bucket{op="read",le="+Inf"}'), reads)
        self.assertGreaterEqual(value(text, 'dmremap_main_errors_total{op="read"}'), 1)
        self.assertIn('dmremap_build_info{version="', text)
        self.assertEqual(value(text, 'dmremap_scan_state{state="none"}'), 1)

    def test_status_format_prometheus_live_and_offline(self):
        s, h = self.damaged_set()
        r = s.cli("status", "--control", s.control, "--format", "prometheus", check=False)
        self.assertEqual(r.returncode, 1, r.stderr)  # health warning, as without --format
        self.check_live(r.stdout)
        self.assertEqual(value(r.stdout, "dmremap_up"), 1)
        h.shutdown()
        s.stop()
        # Nothing answers on the socket: dmremap_up 0, status unknown.
        r = s.cli("status", "--control", s.control, "--format", "prometheus", check=False)
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertEqual(value(r.stdout, "dmremap_up"), 0)
        self.assertEqual(promtool("check", "metrics", text=r.stdout).returncode, 0)
        # Not served: what the spare's metadata says, without the live part.
        r = s.cli("status", "--spare", s.spare, "--format", "prometheus", check=False)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(promtool("check", "metrics", text=r.stdout).returncode, 0)
        self.assertEqual(value(r.stdout, "dmremap_pending_blocks"), 1)
        self.assertNotIn("dmremap_requests_total", r.stdout)

    @unittest.skipIf(TOOLS.frontend != "server", "nbdkit has no HTTP side: the plugin's "
                     "metrics go through its control socket")
    def test_http_endpoint(self):
        s, _ = self.damaged_set("metrics=127.0.0.1:0")
        deadline = time.monotonic() + 10
        while not (found := re.search(r"metrics at (http://\S+/metrics)", s.read_log())):
            self.assertLess(time.monotonic(), deadline, s.read_log())
            time.sleep(0.05)
        url = found.group(1)
        with urllib.request.urlopen(url, timeout=10) as r:
            self.assertEqual(r.headers["Content-Type"],
                             "text/plain; version=0.0.4; charset=utf-8")
            text = r.read().decode()
        self.check_live(text)
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
            # The length GET sends (the counters may have moved by a digit).
            self.assertGreater(int(r.headers["Content-Length"]), len(text) // 2)
            self.assertEqual(r.read(), b"")
        with self.assertRaises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url.replace("/metrics", "/nothing"), timeout=10)
        self.assertEqual(e.exception.code, 404)
        with self.assertRaises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"),
                                   timeout=10)
        self.assertEqual(e.exception.code, 405)
        # A port in use stops start-up with a message, before any client.
        port = url.rsplit(":", 1)[1].split("/")[0]
        other = DemoSet(TOOLS)
        self.addCleanup(other.close)
        with self.assertRaises(AssertionError) as e:
            other.start(f"metrics=127.0.0.1:{port}")
        self.assertIn("--metrics 127.0.0.1:" + port, str(e.exception))

    @unittest.skipIf(TOOLS.frontend != "plugin", "run once")
    def test_example_alert_rules(self):
        r = promtool("check", "rules", os.path.join(EXAMPLES, "dmremap-alerts.yml"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("6 rules found", r.stdout)
        r = subprocess.run([PROMTOOL, "test", "rules", "dmremap-alerts.test.yml"], cwd=EXAMPLES,
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("SUCCESS", r.stdout)


if __name__ == "__main__":
    unittest.main(verbosity=2)
