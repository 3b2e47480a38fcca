"""kill -9 of the frontend in the middle of writes, again and again.

Each round starts the frontend on the same main and spare (main refuses writes
to every 37th block, so writes keep being remapped), runs random 4 KiB writes
with up to 16 in flight, FLUSHes now and then, sends some writes with FUA,
and kills the frontend with SIGKILL at a random moment. After a restart:
- every block reads back either its last durable value (acknowledged before a
  completed FLUSH, or acknowledged with FUA) or a value written after it;
- the spare holds at least as many remaps as it did at the last completed
  FLUSH.

DMREMAP_KILLS sets the number of kills (default 50); DMREMAP_KILL_SEED the
random seed.
"""
import os
import random
import signal
import time
import unittest

import nbd

from nbd_harness import BLOCK, DemoSet, Tools, pattern

TOOLS = Tools()
KILLS = int(os.environ.get("DMREMAP_KILLS", "50"))
SEED = int(os.environ.get("DMREMAP_KILL_SEED", "1"))
BLOCKS = 4096          # the part of main the writes go to
IN_FLIGHT = 16


class BlockModel:
    """What each block may hold: its durable value, and any written since."""

    def __init__(self):
        self.durable = {}   # block -> seed (absent: never written, zeros)
        self.since = {}     # block -> seeds sent after the durable one
        self.acked = {}     # block -> last acknowledged seed
        self.in_flight = {}  # block -> seed being written

    def allowed(self, block):
        values = [self.durable.get(block)]
        values += self.since.get(block, [])
        return values

    def sent(self, block, seed):
        self.in_flight[block] = seed
        self.since.setdefault(block, []).append(seed)

    def acknowledged(self, block, seed, fua):
        del self.in_flight[block]
        self.acked[block] = seed
        if fua:
            self.make_durable(block, seed)

    def make_durable(self, block, seed):
        history = self.since.get(block, [])
        later = history[history.index(seed) + 1:] if seed in history else history
        self.durable[block] = seed
        self.since[block] = later

    def flushed(self, snapshot):
        """A FLUSH sent when `snapshot` (block -> acked seed) was true has completed."""
        for block, seed in snapshot.items():
            # Seeds grow, and a block never has two writes in flight: a newer
            # durable seed (a FUA write since) stays.
            if seed > (self.durable.get(block) or 0):
                self.make_durable(block, seed)

    def restarted(self, block, seed):
        """After a verified restart, what the block holds is durable."""
        self.durable[block] = seed
        self.since[block] = []
        self.acked.pop(block, None)
        self.in_flight.pop(block, None)


def block_data(seed):
    """4 KiB that name their seed in the first 8 bytes."""
    return seed.to_bytes(8, "little") + pattern(seed, BLOCK - 8)


def seed_of(data):
    """The seed a block holds (None: never written), or an AssertionError for
    bytes that no write sent (torn or foreign)."""
    if data == bytes(BLOCK):
        return None
    seed = int.from_bytes(data[:8], "little")
    if seed == 0 or data != block_data(seed):
        raise AssertionError(f"a block holds bytes no write sent: {data[:16].hex()}...")
    return seed


class KillTest(unittest.TestCase):
    def test_kill_9_during_writes_loses_nothing_flushed(self):
        rng = random.Random(SEED)
        s = DemoSet(TOOLS)
        self.addCleanup(s.close)
        params = (f"inject=write:0-{BLOCKS - 1}/37",)
        model = BlockModel()
        next_seed = 1
        remaps_at_flush = 0
        acknowledged = flushes = fua_writes = 0
        for kill in range(KILLS):
            s.start(*params)
            h = s.connect()
            # Verify what the previous round left, then take it as durable.
            if kill > 0:
                self.assertGreaterEqual(s.status()["remaps"], remaps_at_flush,
                                        f"round {kill}: a remap was lost")
                for block in set(model.since) | set(model.durable):
                    seed = seed_of(bytes(h.pread(BLOCK, block * BLOCK)))
                    allowed = model.allowed(block)
                    self.assertIn(seed, allowed,
                                  f"round {kill}: block {block} holds seed {seed}, "
                                  f"allowed {allowed}")
                    model.restarted(block, seed)
            deadline = time.monotonic() + rng.uniform(0.05, 0.4)
            pending = {}   # cookie -> (block, seed, fua)
            flush = None   # (cookie, snapshot)
            killed = False
            while not killed:
                if time.monotonic() >= deadline:
                    s.proc.send_signal(signal.SIGKILL)
                    s.proc.wait()
                    s.proc = None
                    s.logf.close()
                    killed = True
                    break
                while len(pending) < IN_FLIGHT:
                    free = [b for b in rng.sample(range(BLOCKS), 8) if b not in model.in_flight]
                    if not free:
                        break
                    block = free[0]
                    seed = next_seed
                    next_seed += 1
                    data = block_data(seed)
                    fua = rng.random() < 0.1
                    cookie = h.aio_pwrite(data, block * BLOCK,
                                          flags=nbd.CMD_FLAG_FUA if fua else 0)
                    model.sent(block, seed)
                    pending[cookie] = (block, seed, fua)
                if flush is None and rng.random() < 0.05:
                    remaps_before = s.status()["remaps"]
                    flush = (h.aio_flush(), dict(model.acked), remaps_before)
                h.poll(10)
                for cookie in [c for c in pending if h.aio_command_completed(c)]:
                    block, seed, fua = pending.pop(cookie)
                    model.acknowledged(block, seed, fua)
                    acknowledged += 1
                    fua_writes += fua
                if flush is not None and h.aio_command_completed(flush[0]):
                    model.flushed(flush[1])
                    # Remaps durable before the flush was sent stay durable.
                    remaps_at_flush = max(remaps_at_flush, flush[2])
                    flushes += 1
                    flush = None
            try:
                h.shutdown()
            except nbd.Error:
                pass
            del h
        # A last restart: verify, then stop cleanly.
        s.start(*params)
        h = s.connect()
        for block in set(model.since) | set(model.durable):
            seed = seed_of(bytes(h.pread(BLOCK, block * BLOCK)))
            self.assertIn(seed, model.allowed(block), f"final: block {block}")
        h.shutdown()
        self.assertEqual(s.stop(), 0)
        st = s.status()
        self.assertTrue(st["clean"])
        self.assertGreaterEqual(st["remaps"], remaps_at_flush)
        print(f"\n{KILLS} kills of {TOOLS.frontend}: {acknowledged} writes acknowledged "
              f"({fua_writes} FUA), {flushes} flushes completed, {st['remaps']} remaps; "
              f"nothing flushed was lost", flush=True)


if __name__ == "__main__":
    unittest.main()
