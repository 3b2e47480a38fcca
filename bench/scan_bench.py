#!/usr/bin/python3
"""A surface scan's cost to a client (docs/benchmarks.md, "Surface scan").

A QD1 client reads random 4 KiB blocks for SECONDS, first with no scan, then
while `dmremap scan` runs at no rate limit; its p50, p99 and longest read are
printed, and the ratio of the p99s. Target: the p99 with a scan at most 2x
the p99 without. Two clients: one that reads back to back (the scan then
yields: while a request arrived in the last 50 ms it waits, at most 1 s per
256 KiB piece), and one that pauses 60 ms after each read, so that the scan
runs between its reads and each read may land on a scan's read. Also
printed: how far the scan got meanwhile, and its rate with the client gone.

Main is a file in /dev/shm (buffered), then a file on the real disk opened
with O_DIRECT (TMPDIR, /var/tmp by default), where a scan's 256 KiB read and
a client's 4 KiB read compete for the device. Each through dmremap.so and
dmremap-server.

  /usr/bin/python3 bench/scan_bench.py BUILD_DIR [SECONDS]
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import nbd

BLOCK = 4096
MAIN_BYTES = 512 << 20


def percentile(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def qd1_reads(sock, seconds, seed, pause=0.0):
    """Latencies (seconds) of random 4 KiB reads, one at a time, `pause`
    seconds apart."""
    h = nbd.NBD()
    h.connect_unix(sock)
    rng = random.Random(seed)
    blocks = MAIN_BYTES // BLOCK
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        off = rng.randrange(blocks) * BLOCK
        t = time.monotonic()
        h.pread(BLOCK, off)
        out.append(time.monotonic() - t)
        if pause:
            time.sleep(pause)
    h.shutdown()
    return sorted(out)


def wait_for(path, proc, log):
    for _ in range(400):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(log) as f:
        sys.exit(f"no server on {path}:\n{f.read()}")


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)


def main():
    build = os.path.realpath(sys.argv[1])
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10
    cli = os.path.join(build, "tools/dmremap")
    plugin = os.path.join(build, "plugin/dmremap.so")
    server = os.path.join(build, "server/dmremap-server")
    shm = tempfile.mkdtemp(prefix="dmremap-sbench-", dir="/dev/shm")
    disk = tempfile.mkdtemp(prefix="dmremap-sbench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    rows = []
    try:
        for kind, where, io in (("file in /dev/shm, buffered", shm, "buffered"),
                                ("file on disk, O_DIRECT", disk, "direct")):
            main_img = os.path.join(where, "main.img")
            with open(main_img, "wb") as f:
                for _ in range(MAIN_BYTES // (1 << 20)):
                    f.write(os.urandom(1 << 20))
                os.fsync(f.fileno())
            for frontend in ("plugin", "server"):
                spare = os.path.join(shm, "spare.img")
                with open(spare, "wb") as f:
                    f.truncate(64 << 20)
                run([cli, "format", "--main", main_img, "--spare", spare])
                sock = os.path.join(shm, "nbd.sock")
                ctl = os.path.join(shm, "ctl.sock")
                log = os.path.join(shm, f"{frontend}.log")
                if frontend == "plugin":
                    cmd = ["nbdkit", "-f", "-U", sock, plugin, f"main={main_img}",
                           f"spare={spare}", f"io={io}", f"control={ctl}"]
                else:
                    cmd = [server, "--main", main_img, "--spare", spare, "--io", io,
                           "--unix", sock, "--control", ctl]
                with open(log, "w") as lf:
                    proc = subprocess.Popen(cmd, stdout=lf, stderr=lf)
                try:
                    wait_for(sock, proc, log)
                    wait_for(ctl, proc, log)
                    qd1_reads(sock, 1, 0)  # warm up
                    status = lambda: json.loads(run(  # noqa: E731
                        [cli, "scan", "--control", ctl, "--status", "--json"]).stdout)
                    for pause in (0.0, 0.06):
                        # The paced client, three times as long: enough reads for a p99.
                        span = seconds * (3 if pause else 1)
                        alone = qd1_reads(sock, span, 1, pause)
                        run([cli, "scan", "--control", ctl, "--detach", "--from", "0"])
                        before = status()
                        with_scan = qd1_reads(sock, span, 2, pause)
                        during = status()
                        # The scan alone, for its rate with no client.
                        t0 = time.monotonic()
                        after = status()
                        while after["state"] == "running" and time.monotonic() - t0 < 3:
                            time.sleep(0.05)
                            after = status()
                        took = time.monotonic() - t0
                        subprocess.run([cli, "scan", "--control", ctl, "--cancel"],
                                       capture_output=True, check=False)  # done already, maybe
                        scanned = (during["next_block"] - before["next_block"]) * BLOCK
                        blocks = after["blocks"] if after["state"] == "done" else after["next_block"]
                        alone_rate = (blocks - during["next_block"]) * BLOCK / took
                        rows.append((kind, "dmremap.so" if frontend == "plugin"
                                     else "dmremap-server", pause, alone, with_scan,
                                     scanned / span, alone_rate))
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)

    ms = lambda v: f"{v * 1000:.3f}"  # noqa: E731
    mib = lambda v: f"{v / (1 << 20):.2f}"  # noqa: E731
    print(f"QD1 random 4 KiB reads for {seconds:g} s back to back, {3 * seconds:g} s paced, "
          f"without and with a scan (main {MAIN_BYTES >> 20} MiB)")
    print("| main | frontend | client | reads (no scan / scan) | p50 ms (no scan / scan) "
          "| p99 ms (no scan / scan) | longest ms (no scan / scan) | p99 ratio "
          "| scan MiB/s with the client | scan MiB/s alone | target met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, fe, pause, a, s, rate, alone_rate in rows:
        ratio = percentile(s, 0.99) / percentile(a, 0.99)
        client = "back to back" if pause == 0 else f"{pause * 1000:.0f} ms apart"
        print(f"| {kind} | {fe} | {client} | {len(a)} / {len(s)} "
              f"| {ms(percentile(a, 0.5))} / {ms(percentile(s, 0.5))} "
              f"| {ms(percentile(a, 0.99))} / {ms(percentile(s, 0.99))} "
              f"| {ms(a[-1])} / {ms(s[-1])} | {ratio:.2f}x | {mib(rate)} | {mib(alone_rate)} "
              f"| {'yes' if ratio <= 2 else 'no'} |")


if __name__ == "__main__":
    main()
