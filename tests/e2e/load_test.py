"""dmremap-server under heavy and hostile load, with its memory measured.

- 1,000 connections opened and closed: half complete the handshake and
  disconnect properly, half hang up at a random point of the handshake.
- 64 honest clients at once, each on its own region of the disk, doing
  random 4 KiB writes (some with FUA), reads checked against their own model,
  and flushes, for DMREMAP_LOAD_SECONDS (default 60). Main refuses writes to
  every 53rd block, so remaps happen all along.
- Meanwhile hostile clients, over and over: stalled mid-handshake, stalled
  mid-request (a write header with half its payload), bad request magic,
  oversize lengths, out-of-range offsets.
The server's RSS is sampled every 0.2 s. At the end every honest client's
region must read back exactly as its model says, the hostile connections
must all have been answered or dropped, and SIGTERM must stop the server
cleanly.
"""
import os
import random
import struct
import threading
import time
import unittest

import nbd

from nbd_harness import BLOCK, DemoSet, Tools, pattern
from protocol_test import (CMD_READ, CMD_WRITE, NBD_EINVAL, NBD_ENOSPC, OPT_GO, RawClient,
                           closed_by_server)

TOOLS = Tools()
SECONDS = float(os.environ.get("DMREMAP_LOAD_SECONDS", "60"))
CLIENTS = 64
REGION = 256  # blocks per honest client
MAIN_BLOCKS = CLIENTS * REGION + 1024


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples, self.stop = pid, 0, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                kib = rss_kib(self.pid)
            except FileNotFoundError:
                return
            self.samples.append(kib)
            self.peak = max(self.peak, kib)
            time.sleep(0.2)


@unittest.skipUnless(TOOLS.frontend == "server", "the server's own limits")
class LoadTest(unittest.TestCase):
    def setUp(self):
        self.s = DemoSet(TOOLS, main_size=MAIN_BLOCKS * BLOCK, spare_size=64 << 20)
        self.addCleanup(self.s.close)
        self.s.start(f"inject=write:0-{MAIN_BLOCKS - 1}/53")
        self.errors = []

    def fail_later(self, what):
        self.errors.append(what)

    def test_thousand_connections_then_sixty_four_clients_and_hostile_ones(self):
        pid = self.s.proc.pid
        base = rss_kib(pid)
        sampler = Sampler(pid)
        sampler.start()

        # 1,000 connections, 50 at a time.
        rng = random.Random(11)
        started = time.monotonic()
        for batch in range(20):
            socks = []
            for i in range(50):
                if (batch + i) % 2 == 0:
                    h = nbd.NBD()
                    h.connect_uri(self.s.uri)
                    socks.append(h)
                else:
                    c = RawClient(self.s.sock)
                    if rng.random() < 0.5:
                        c.option(OPT_GO, struct.pack(">IH", 0, 0)[: rng.randrange(1, 6)])
                    socks.append(c)
            for x in socks:
                if isinstance(x, nbd.NBD):
                    x.shutdown()
                else:
                    x.close()
        connect_seconds = time.monotonic() - started
        after_connections = rss_kib(pid)

        # 64 honest clients and the hostile ones, at once.
        stop = threading.Event()
        stats = {"writes": 0, "reads": 0, "flushes": 0, "hostile": 0}
        lock = threading.Lock()
        models = [dict() for _ in range(CLIENTS)]

        def honest(n):
            try:
                run_honest(n)
            except Exception as e:  # a dead thread must fail the test
                self.fail_later(f"client {n}: {e!r}")

        def run_honest(n):
            h = nbd.NBD()
            h.connect_uri(self.s.uri)
            r = random.Random(1000 + n)
            model = models[n]
            first = n * REGION
            seq = 0
            counts = [0, 0, 0]
            while not stop.is_set():
                block = first + r.randrange(REGION)
                op = r.random()
                if op < 0.5:
                    seq += 1
                    seed = (n << 32) | seq
                    h.pwrite(pattern(seed), block * BLOCK, nbd.CMD_FLAG_FUA if r.random() < 0.1 else 0)
                    model[block] = seed
                    counts[0] += 1
                elif op < 0.95:
                    got = h.pread(BLOCK, block * BLOCK)
                    want = pattern(model[block]) if block in model else bytes(BLOCK)
                    if got != want:
                        self.fail_later(f"client {n}: block {block} read wrong data")
                        return
                    counts[1] += 1
                else:
                    h.flush()
                    counts[2] += 1
            h.flush()
            h.shutdown()
            with lock:
                stats["writes"] += counts[0]
                stats["reads"] += counts[1]
                stats["flushes"] += counts[2]

        def hostile():
            r = random.Random(99)
            while not stop.is_set():
                kind = r.randrange(5)
                try:
                    c = RawClient(self.s.sock)
                    if kind == 0:  # stalls in the handshake, then goes away
                        c.option(OPT_GO, b"\0\0")
                        time.sleep(0.3)
                        c.close()
                    else:
                        c.go()
                        if kind == 1:  # stalls mid-request: header and half a payload
                            c.request(CMD_WRITE, 0, BLOCK, payload=b"\0" * (BLOCK // 2))
                            time.sleep(0.3)
                            c.close()
                        elif kind == 2:  # bad magic: dropped
                            c.request(CMD_READ, 0, BLOCK, magic=0x12345678)
                            if not closed_by_server(c.sock):
                                self.fail_later("bad magic did not drop the client")
                            c.close()
                        elif kind == 3:  # a read past the end: EINVAL
                            c.request(CMD_READ, c.size, BLOCK)
                            if c.simple_reply()[0] != NBD_EINVAL:
                                self.fail_later("out-of-range read not EINVAL")
                            c.close()
                        else:  # a write past the end: ENOSPC; then 1 GiB: dropped
                            c.request(CMD_WRITE, c.size, BLOCK, payload=b"\0" * BLOCK)
                            if c.simple_reply()[0] != NBD_ENOSPC:
                                self.fail_later("write past the end not ENOSPC")
                            c.request(CMD_WRITE, 0, 1 << 30)
                            if not closed_by_server(c.sock):
                                self.fail_later("1 GiB write did not drop the client")
                            c.close()
                except (OSError, EOFError, AssertionError) as e:
                    self.fail_later(f"hostile client {kind}: {e!r}")
                with lock:
                    stats["hostile"] += 1

        threads = [threading.Thread(target=honest, args=(n,)) for n in range(CLIENTS)]
        threads += [threading.Thread(target=hostile) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        for t in threads:
            t.join(120)
            self.assertFalse(t.is_alive(), "a client thread hung")
        sampler.stop.set()
        self.assertEqual(self.errors, [])

        # Every honest client's region, read back on a fresh connection.
        h = self.s.connect()
        for n, model in enumerate(models):
            data = h.pread(REGION * BLOCK, n * REGION * BLOCK)
            for i in range(REGION):
                block = n * REGION + i
                want = pattern(model[block]) if block in model else bytes(BLOCK)
                self.assertEqual(data[i * BLOCK:(i + 1) * BLOCK], want, f"block {block}")
        h.shutdown()
        final = rss_kib(pid)
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        print(f"\n1,000 connections in {connect_seconds:.1f} s; then {CLIENTS} clients for "
              f"{SECONDS:.0f} s: {stats['writes']} writes, {stats['reads']} verified reads, "
              f"{stats['flushes']} flushes; {stats['hostile']} hostile connections; "
              f"{st['remaps']} remaps")
        print(f"server RSS: {base // 1024} MiB at start, {after_connections // 1024} MiB after "
              f"the 1,000 connections, peak {sampler.peak // 1024} MiB, "
              f"{final // 1024} MiB at the end")
        self.assertGreater(st["remaps"], 0)
        # No request here is over 4 KiB: the server's memory must stay far
        # below its per-connection cap (256 MiB).
        self.assertLess(sampler.peak, 512 * 1024)
        self.assertLess(after_connections - base, 64 * 1024, "memory kept per closed connection")


if __name__ == "__main__":
    unittest.main(verbosity=2)
