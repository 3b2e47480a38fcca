#!/usr/bin/python3
"""An evacuation's speed and its cost to a client (docs/benchmarks.md,
"Evacuation").

1. Throughput. On a healthy served set (main 1 GiB of random data), `dmremap
   evacuate --control SOCK --to NEW` (no rate limit, NEW a fresh sparse file
   beside main) against `nbdcopy --flush` of the same export to a fresh file
   beside main: what a user would run instead. Timed from the start to the
   first status that says in sync (the control socket polled every 10 ms),
   and the CLI's own wall time (it reports once a second). In each of ROUNDS
   rounds both run back to back, the order turning; the ratio of their
   throughputs is taken per round. Target: evacuate/nbdcopy >= 0.9.
2. A client's latency. A QD1 client alternates random 4 KiB reads and
   writes over the whole disk, first with no evacuation, then while one runs
   at --rate 100M (NEW a fresh file), and the p99 of its reads and of its
   writes are compared. Two clients, as in scan_bench.py: back to back for
   SECONDS (the copy then yields: while a request arrived in the last 50 ms
   it waits, at most 1 s per 1 MiB piece), and one that pauses 60 ms after
   each request for 3 x SECONDS, so that the copy runs between requests.
   Each is run in ROUNDS chunks, without and with an evacuation in turn (a
   new one each time, aborted after), and the copy is checked to be still
   running at the end of each chunk.

Main is a file in /dev/shm (buffered), then a file on the real disk opened
with O_DIRECT (TMPDIR, /var/tmp by default; NEW is then opened with O_DIRECT
too). Each through dmremap.so and dmremap-server; the spare is in /dev/shm.

  [ROUNDS=3] /usr/bin/python3 bench/evacuate_bench.py BUILD_DIR [SECONDS]
"""
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import nbd

BLOCK = 4096
MAIN_BYTES = 1 << 30
MiB = 1 << 20


def percentile(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def control(ctl, request, timeout=60):
    """One request on the frontend's control socket (a JSON line each way)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(ctl)
        s.sendall((json.dumps(request) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if reply.get("ok") is not True:
        raise RuntimeError(f"control {request}: {reply}")
    return reply


def evac(ctl, action, **kw):
    return control(ctl, {"command": "evacuate", "action": action, **kw})


def fresh_file(path, size=MAIN_BYTES):
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)


def qd1(sock, seconds, seed, pause=0.0, running=None):
    """Latencies (seconds) of random 4 KiB reads and writes, alternately,
    one at a time, `pause` seconds apart. `running()`, asked between
    requests every 0.25 s, ends the run early when it says False."""
    h = nbd.NBD()
    h.connect_unix(sock)
    rng = random.Random(seed)
    data = os.urandom(BLOCK)
    blocks = MAIN_BYTES // BLOCK
    reads, writes = [], []
    end = time.monotonic() + seconds
    next_check = time.monotonic() + 0.25
    write = False
    while time.monotonic() < end:
        off = rng.randrange(blocks) * BLOCK
        t = time.monotonic()
        if write:
            h.pwrite(data, off)
            writes.append(time.monotonic() - t)
        else:
            h.pread(BLOCK, off)
            reads.append(time.monotonic() - t)
        write = not write
        if pause:
            time.sleep(pause)
        if running and time.monotonic() >= next_check:
            if not running():
                break
            next_check = time.monotonic() + 0.25
    h.shutdown()
    return sorted(reads), sorted(writes)


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


def time_nbdcopy(uri, dest):
    fresh_file(dest, 0)
    t = time.monotonic()
    run(["nbdcopy", "--flush", uri, dest], timeout=600)
    took = time.monotonic() - t
    os.unlink(dest)
    return took


def time_evacuate(cli, ctl, new, work):
    """(seconds to in sync, polled; the CLI's wall time)."""
    fresh_file(new)
    synced = {"errors": []}

    def poll(t0):
        deadline = t0 + 600
        while time.monotonic() < deadline:
            try:
                st = evac(ctl, "status")
            except (OSError, RuntimeError, ValueError) as e:
                synced["errors"].append(repr(e))
                st = {}
            if st.get("state") == "in-sync" and st.get("target") == new:
                synced["at"] = time.monotonic() - t0
                return
            time.sleep(0.01)

    t0 = time.monotonic()
    poller = threading.Thread(target=poll, args=(t0,))
    poller.start()
    r = subprocess.run([cli, "evacuate", "--control", ctl, "--to", new,
                        "--report", os.path.join(work, "evac.txt"),
                        "--mapfile", os.path.join(work, "evac.map")],
                       capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    poller.join()  # in sync by now: its next status says so
    if synced["errors"]:
        print(f"status polls failed: {synced['errors'][:3]}", file=sys.stderr)
    if r.returncode != 0 or "at" not in synced:
        sys.exit(f"dmremap evacuate failed ({r.returncode}): {r.stderr}")
    if synced["at"] > wall:
        print(f"the status poll saw in-sync {synced['at'] - wall:.3f} s after the CLI did",
              file=sys.stderr)
    st = evac(ctl, "status")
    assert st["lost"] == 0 and st["next_block"] == st["blocks"], st
    evac(ctl, "abort")  # for the next one; NEW stays as it is
    os.unlink(new)
    return synced["at"], wall


def main():
    build = os.path.realpath(sys.argv[1])
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10
    rounds = int(os.environ.get("ROUNDS", "3"))
    cli = os.path.join(build, "tools/dmremap")
    plugin = os.path.join(build, "plugin/dmremap.so")
    server = os.path.join(build, "server/dmremap-server")
    shm = tempfile.mkdtemp(prefix="dmremap-ebench-", dir="/dev/shm")
    disk = tempfile.mkdtemp(prefix="dmremap-ebench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    speed, latency = [], []
    try:
        for kind, where, io in (("/dev/shm, buffered", shm, "buffered"),
                                ("disk, O_DIRECT", disk, "direct")):
            main_img = os.path.join(where, "main.img")
            with open(main_img, "wb") as f:
                for _ in range(MAIN_BYTES // MiB):
                    f.write(os.urandom(MiB))
                os.fsync(f.fileno())
            for frontend in ("plugin", "server"):
                fe = "dmremap.so" if frontend == "plugin" else "dmremap-server"
                spare = os.path.join(shm, "spare.img")
                fresh_file(spare, 64 << 20)
                run([cli, "format", "--main", main_img, "--spare", spare])
                sock = os.path.join(shm, "nbd.sock")
                ctl = os.path.join(shm, "ctl.sock")
                log = os.path.join(shm, f"{frontend}.log")
                uri = f"nbd+unix:///?socket={sock}"
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
                    qd1(sock, 1, 0)  # warm up
                    print(f"{kind}, {fe}: throughput", file=sys.stderr, flush=True)
                    copy_s, evac_s, cli_s = [], [], []
                    for r in range(rounds):
                        new = os.path.join(where, f"new-{r}.img")
                        dest = os.path.join(where, "nbdcopy.img")
                        if r % 2 == 0:
                            copy_s.append(time_nbdcopy(uri, dest))
                            e, w = time_evacuate(cli, ctl, new, shm)
                        else:
                            e, w = time_evacuate(cli, ctl, new, shm)
                            copy_s.append(time_nbdcopy(uri, dest))
                        evac_s.append(e)
                        cli_s.append(w)
                    speed.append((kind, fe, copy_s, evac_s, cli_s))
                    for pause in (0.0, 0.06):
                        print(f"{kind}, {fe}: latency, pause {pause}", file=sys.stderr,
                              flush=True)
                        # In ROUNDS chunks, with and without in turn, so that
                        # a noisy neighbour hurts both alike.
                        chunk = seconds * (3 if pause else 1) / rounds
                        alone, during = ([], []), ([], [])
                        copied = took = mirrored = 0
                        for r in range(rounds):
                            for with_evac in ((False, True) if r % 2 == 0 else (True, False)):
                                seed = 1 + 2 * r + with_evac
                                if not with_evac:
                                    rd, wr = qd1(sock, chunk, seed, pause)
                                    alone[0].extend(rd)
                                    alone[1].extend(wr)
                                    continue
                                new = os.path.join(where, f"new-lat-{r}.img")
                                fresh_file(new)
                                evac(ctl, "start", to=new, rate=100 * MiB)
                                t0 = time.monotonic()
                                rd, wr = qd1(sock, chunk, seed, pause,
                                             lambda: evac(ctl, "status")["state"] == "running")
                                t = time.monotonic() - t0
                                st = evac(ctl, "status")
                                evac(ctl, "abort")
                                os.unlink(new)
                                if st["state"] != "running" or t < chunk * 0.95:
                                    sys.exit(f"the evacuation did not last the client's run: {st}")
                                during[0].extend(rd)
                                during[1].extend(wr)
                                copied += st["next_block"] * BLOCK
                                took += t
                                mirrored += st["mirrored"]
                        for side in alone + during:
                            side.sort()
                        latency.append((kind, fe, pause, alone, during, copied / took, mirrored))
                finally:
                    proc.terminate()
                    proc.wait(timeout=120)
            os.unlink(main_img)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)

    ms = lambda v: f"{v * 1000:.3f}"  # noqa: E731
    print(f"Evacuation of a healthy {MAIN_BYTES >> 30} GiB set against nbdcopy of its export, "
          f"{rounds} rounds (median, and the range of the per-round ratios)")
    print("| main | frontend | nbdcopy MiB/s | evacuate MiB/s (to in sync) "
          "| ratio evacuate/nbdcopy | evacuate MiB/s (CLI wall time) | target met |")
    print("|---|---|---|---|---|---|---|")
    for kind, fe, copy_s, evac_s, cli_s in speed:
        ratios = sorted(c / e for c, e in zip(copy_s, evac_s))
        rate = lambda s: f"{MAIN_BYTES / MiB / statistics.median(s):.0f}"  # noqa: E731
        med = statistics.median(ratios)
        print(f"| {kind} | {fe} | {rate(copy_s)} | {rate(evac_s)} "
              f"| {med:.2f}× ({ratios[0]:.2f}–{ratios[-1]:.2f}) | {rate(cli_s)} "
              f"| {'yes' if med >= 0.9 else 'no'} |")
    print()
    print(f"QD1 random 4 KiB reads and writes, alternately, {seconds:g} s back to back, "
          f"{3 * seconds:g} s paced, without and with an evacuation at --rate 100M")
    print("| main | frontend | client | requests (none / evac) | read p99 ms (none / evac) "
          "| write p99 ms (none / evac) | read p99 ratio | write p99 ratio "
          "| longest ms (none / evac) | copy MiB/s meanwhile | writes mirrored |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, fe, pause, (ar, aw), (dr, dw), copied, mirrored in latency:
        client = "back to back" if pause == 0 else f"{pause * 1000:.0f} ms apart"
        rr = percentile(dr, 0.99) / percentile(ar, 0.99)
        wr = percentile(dw, 0.99) / percentile(aw, 0.99)
        print(f"| {kind} | {fe} | {client} | {len(ar) + len(aw)} / {len(dr) + len(dw)} "
              f"| {ms(percentile(ar, 0.99))} / {ms(percentile(dr, 0.99))} "
              f"| {ms(percentile(aw, 0.99))} / {ms(percentile(dw, 0.99))} "
              f"| {rr:.2f}× | {wr:.2f}× "
              f"| {ms(max(ar[-1], aw[-1]))} / {ms(max(dr[-1], dw[-1]))} "
              f"| {copied / MiB:.1f} | {mirrored} |")


if __name__ == "__main__":
    main()
