"""Both frontends against the rules of the NBD protocol (NetworkBlockDevice/nbd
doc/proto.md), over a raw socket. Each test names the rule it checks, quoted
or paraphrased from the section named in its docstring.

The plugin answers through nbdkit, which decides some things itself; where the
two frontends must differ the test says so, and docs/server.md lists each
difference ("Where the two frontends differ").
"""
import ctypes
import errno
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import unittest

import nbd

from nbd_harness import BLOCK, DemoSet, NbdkitBackend, Tools, pattern
from protocol_test import (CMD_BLOCK_STATUS, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, FLAG_FUA,
                           IHAVEOPT, NBD_EINVAL, NBD_ENOSPC, NBD_EPERM, OPT_ABORT, OPT_GO,
                           OPT_STRUCTURED, REP_ACK, REP_ERR_INVALID, REP_ERR_UNSUP, RawClient,
                           recv_exact)

TOOLS = Tools()
SERVER = TOOLS.frontend == "server"

CMD_CACHE, CMD_WRITE_ZEROES = 5, 6
FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 4, 8, 16
OPT_INFO, OPT_LIST_META, OPT_SET_META = 6, 9, 10
REP_META_CONTEXT = 4
REP_ERR_UNKNOWN, REP_ERR_SHUTDOWN, REP_ERR_TOO_BIG = 0x80000006, 0x80000007, 0x80000009
NBD_EIO, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN = 5, 75, 95, 108
SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, SEND_DF, SEND_FAST_ZERO = 8, 32, 64, 128, 2048
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_BLOCK_STATUS = 0, 1, 5
CHUNK_ERROR, CHUNK_ERROR_OFFSET = 0x8001, 0x8002


def meta_request(names, export=b""):
    data = struct.pack(">I", len(export)) + export + struct.pack(">I", len(names))
    for n in names:
        data += struct.pack(">I", len(n)) + n
    return data


def read_structured(c, cookie):
    """Every chunk of one structured reply, up to the one flagged DONE."""
    chunks = []
    while True:
        flags, ctype, got, data = c.chunk()
        assert got == cookie, (got, cookie)
        chunks.append((ctype, data))
        if flags & 1:
            return chunks


def error_of(chunks):
    """The NBD error of a structured reply, 0 when it has none."""
    for ctype, data in chunks:
        if ctype & 0x8000:
            return struct.unpack(">I", data[:4])[0]
    return 0


class Conformance(unittest.TestCase):
    """A set on a 64 MiB main served by the frontend under test."""

    params = ()
    main_size = 64 << 20

    def setUp(self):
        self.s = DemoSet(TOOLS, main_size=self.main_size)
        self.addCleanup(self.s.close)
        self.s.start(*self.params)

    def client(self):
        c = RawClient(self.s.sock)
        self.addCleanup(c.close)
        return c

    def raw(self, structured=False):
        c = self.client()
        c.go(structured)
        return c

    def meta(self, c, opt, names, export=b""):
        """Sends a LIST or SET_META_CONTEXT; returns ([(id, name)], final reply type)."""
        c.option(opt, meta_request(names, export))
        contexts = []
        while True:
            _, rtype, data = c.option_reply()
            if rtype != REP_META_CONTEXT:
                return contexts, rtype
            contexts.append((struct.unpack(">I", data[:4])[0], data[4:].decode()))


class CommandFlagsTest(Conformance):
    def test_fua_is_accepted_on_every_command(self):
        """Request flags: a server that advertises NBD_FLAG_SEND_FUA "MUST accept
        all commands with this bit set (even by ignoring the bit)"."""
        c = self.client()
        c.option(OPT_STRUCTURED)
        self.assertEqual(c.option_reply()[1], REP_ACK)
        self.assertEqual(self.meta(c, OPT_SET_META, [b"base:allocation"])[1], REP_ACK)
        c.go(structured=False)
        c.structured = True
        self.assertTrue(c.flags & SEND_FUA)
        c.request(CMD_READ, 0, BLOCK, flags=FLAG_FUA, cookie=1)
        chunks = read_structured(c, 1)
        self.assertEqual((error_of(chunks), chunks[-1][0]), (0, CHUNK_OFFSET_DATA))
        for cookie, cmd in ((2, CMD_FLUSH), (3, CMD_CACHE)):
            c.request(cmd, 0, 0 if cmd == CMD_FLUSH else BLOCK, flags=FLAG_FUA, cookie=cookie)
            self.assertEqual(c.simple_reply(), (0, cookie))
        c.request(CMD_BLOCK_STATUS, 0, BLOCK, flags=FLAG_FUA, cookie=4)
        chunks = read_structured(c, 4)
        self.assertEqual((error_of(chunks), chunks[0][0]), (0, CHUNK_BLOCK_STATUS))

    def test_trim_past_the_end_is_einval(self):
        """Error values: the server "SHOULD return NBD_EINVAL if it receives a read
        or trim request including one or more sectors beyond the size of the
        device", and NBD_ENOSPC for a write."""
        c = self.raw()
        c.request(CMD_TRIM, c.size - BLOCK, 2 * BLOCK, cookie=1)
        self.assertEqual(c.simple_reply(), (NBD_EINVAL, 1))
        c.request(CMD_WRITE_ZEROES, c.size - BLOCK, 2 * BLOCK, cookie=2)
        self.assertEqual(c.simple_reply(), (NBD_ENOSPC, 2))
        c.request(CMD_WRITE, c.size, BLOCK, cookie=3, payload=bytes(BLOCK))
        self.assertEqual(c.simple_reply(), (NBD_ENOSPC, 3))

    def test_unadvertised_flags_are_einval(self):
        """Error values: "SHOULD return NBD_EINVAL if it receives a request with a
        flag not explicitly documented as applicable to the given request"; DF
        needs structured replies, REQ_ONE is for BLOCK_STATUS, NO_HOLE for
        WRITE_ZEROES."""
        c = self.raw()
        self.assertFalse(c.flags & SEND_DF)
        for cookie, (cmd, flags) in enumerate(((CMD_READ, FLAG_DF), (CMD_READ, FLAG_REQ_ONE),
                                               (CMD_WRITE, 2), (CMD_READ, 0x80)), 1):
            payload = bytes(BLOCK) if cmd == CMD_WRITE else b""
            c.request(cmd, 0, BLOCK, flags=flags, cookie=cookie, payload=payload)
            self.assertEqual(c.simple_reply(), (NBD_EINVAL, cookie))


class ReadOnlyExportTest(Conformance):
    params = ("readonly=1",)

    def test_read_only_export_offers_no_write_commands(self):
        """Transmission flags: TRIM, WRITE_ZEROES and FUA mean nothing on a
        read-only export, and a write or trim there "SHOULD return NBD_EPERM"."""
        c = self.raw()
        self.assertEqual(c.flags & (SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | SEND_FAST_ZERO), 0)
        self.assertTrue(c.flags & 2)  # NBD_FLAG_READ_ONLY
        c.request(CMD_WRITE_ZEROES, 0, BLOCK, cookie=1)
        self.assertEqual(c.simple_reply(), (NBD_EPERM, 1))
        # FUA was not offered, so it is an unknown flag here.
        c.request(CMD_READ, 0, BLOCK, flags=FLAG_FUA, cookie=2)
        self.assertEqual(c.simple_reply(), (NBD_EINVAL, 2))


class FastZeroTest(Conformance):
    """Main over NBD from an nbdkit that cannot zero quickly: the set cannot."""

    def setUp(self):
        self.s = DemoSet(TOOLS)
        self.addCleanup(self.s.close)
        backend = NbdkitBackend(self.s.dir, "slowzero",
                                ["--filter=nozero", "file", self.s.main, "fastzeromode=none"])
        backend.start()
        self.addCleanup(backend.kill)
        self.s.main = backend.uri
        self.s.start()

    def test_fast_zero_fails_at_once_when_zeroing_is_not_fast(self):
        """NBD_CMD_WRITE_ZEROES: with NBD_CMD_FLAG_FAST_ZERO, a server that cannot
        zero faster than it writes "MUST fail quickly with NBD_ENOTSUP". Both
        frontends offer the flag on every writable set (nbdkit 1.32 aborts when
        a client sends it to a plugin that declined it), so it is never an
        unoffered flag there; on a read-only export it is not offered."""
        c = self.raw()
        self.assertTrue(c.flags & SEND_WRITE_ZEROES)
        self.assertTrue(c.flags & SEND_FAST_ZERO)
        c.request(CMD_WRITE_ZEROES, 0, BLOCK, flags=FLAG_FAST_ZERO, cookie=1)
        self.assertEqual(c.simple_reply(), (NBD_ENOTSUP, 1))
        # Without the flag, zeroing works; on any other command the flag is
        # not applicable (NBD_EINVAL).
        c.request(CMD_WRITE_ZEROES, 0, BLOCK, cookie=2)
        self.assertEqual(c.simple_reply(), (0, 2))
        c.request(CMD_READ, 0, BLOCK, flags=FLAG_FAST_ZERO, cookie=3)
        self.assertEqual(c.simple_reply(), (NBD_EINVAL, 3))


class MetaContextTest(Conformance):
    def test_list_replies_carry_context_id_zero(self):
        """NBD_OPT_LIST_META_CONTEXT: "The metadata context ID in these replies is
        reserved and SHOULD be set to zero"."""
        c = self.client()
        contexts, final = self.meta(c, OPT_LIST_META, [])
        self.assertEqual(final, REP_ACK)
        self.assertIn("base:allocation", [name for _, name in contexts])
        self.assertEqual({cid for cid, _ in contexts}, {0})

    def test_failed_set_replaces_the_selection(self):
        """NBD_OPT_SET_META_CONTEXT "replaces all previously-set metadata contexts
        (including when this command fails)": BLOCK_STATUS then has no context
        and gets NBD_EINVAL."""
        c = self.client()
        c.option(OPT_STRUCTURED)
        self.assertEqual(c.option_reply()[1], REP_ACK)
        contexts, final = self.meta(c, OPT_SET_META, [b"base:allocation"])
        self.assertEqual((len(contexts), final), (1, REP_ACK))
        self.assertNotEqual(contexts[0][0], 0)
        # A query whose length runs past the option's end.
        c.option(OPT_SET_META, struct.pack(">II", 0, 1) + struct.pack(">I", 500) + b"base:")
        self.assertEqual(c.option_reply()[1], REP_ERR_INVALID)
        c.go()
        c.structured = True
        c.request(CMD_BLOCK_STATUS, 0, BLOCK, cookie=1)
        self.assertEqual(error_of(read_structured(c, 1)), NBD_EINVAL)

    @unittest.skipUnless(SERVER, "the plugin has no dmremap context: nbdkit offers base: only")
    def test_our_namespace_is_x_prefixed(self):
        """Metadata querying: a namespace MUST be "base", "nbd-server", "x-*" or a
        registered one. Ours is x-dmremap:; the old "dmremap:remapped" still
        selects it for one release."""
        c = self.client()
        contexts, _ = self.meta(c, OPT_LIST_META, [])
        self.assertEqual(sorted(n for _, n in contexts),
                         ["base:allocation", "x-dmremap:copied", "x-dmremap:remapped"])
        contexts, _ = self.meta(c, OPT_LIST_META, [b"x-dmremap:"])
        self.assertEqual(contexts, [(0, "x-dmremap:remapped"), (0, "x-dmremap:copied")])
        c.option(OPT_STRUCTURED)
        self.assertEqual(c.option_reply()[1], REP_ACK)
        contexts, final = self.meta(c, OPT_SET_META, [b"dmremap:remapped"])
        self.assertEqual((len(contexts), contexts[0][1], final), (1, "dmremap:remapped", REP_ACK))
        contexts, final = self.meta(c, OPT_SET_META, [b"x-dmremap:remapped"])
        self.assertEqual((len(contexts), contexts[0][1], final), (1, "x-dmremap:remapped", REP_ACK))
        remapped_id = contexts[0][0]
        c.go()
        c.structured = True
        c.request(CMD_BLOCK_STATUS, 0, 4 * BLOCK, cookie=1)
        chunks = read_structured(c, 1)
        self.assertEqual(chunks[0][0], CHUNK_BLOCK_STATUS)
        self.assertEqual(struct.unpack(">III", chunks[0][1][:12]), (remapped_id, 4 * BLOCK, 0))

    @unittest.skipUnless(SERVER, "the plugin has no dmremap context: nbdkit offers base: only")
    def test_copied_context_before_any_evacuation(self):
        """x-dmremap:copied (docs/server.md): with no evacuation, nothing is on
        a new disk: one descriptor, state 1 (not copied), for the whole range."""
        c = self.client()
        c.option(OPT_STRUCTURED)
        self.assertEqual(c.option_reply()[1], REP_ACK)
        contexts, final = self.meta(c, OPT_SET_META, [b"x-dmremap:copied"])
        self.assertEqual((len(contexts), contexts[0][1], final), (1, "x-dmremap:copied", REP_ACK))
        copied_id = contexts[0][0]
        c.go()
        c.structured = True
        c.request(CMD_BLOCK_STATUS, 0, 4 * BLOCK, cookie=1)
        chunks = read_structured(c, 1)
        self.assertEqual(chunks[0][0], CHUNK_BLOCK_STATUS)
        self.assertEqual(struct.unpack(">III", chunks[0][1][:12]), (copied_id, 4 * BLOCK, 1))


class BigBlockTest(Conformance):
    """A set of 64 KiB blocks on a sparse main."""

    def setUp(self):
        self.s = DemoSet(TOOLS, extra_format=("--block-size", "65536"))
        self.addCleanup(self.s.close)
        with open(self.s.main, "r+b") as f:  # data in the middle of block 1 only
            f.seek(65536 + 4096)
            f.write(pattern(1))
        self.s.start()

    def test_block_status_descriptors_are_whole_blocks(self):
        """NBD_REPLY_TYPE_BLOCK_STATUS: the server "SHOULD use descriptor lengths
        that are an integer multiple of any advertised minimum block size"."""
        c = self.client()
        c.option(OPT_STRUCTURED)
        self.assertEqual(c.option_reply()[1], REP_ACK)
        self.assertEqual(self.meta(c, OPT_SET_META, [b"base:allocation"])[1], REP_ACK)
        c.go()
        c.structured = True
        c.request(CMD_BLOCK_STATUS, 0, 4 * 65536, cookie=1)
        chunks = read_structured(c, 1)
        self.assertEqual(error_of(chunks), 0)
        body = chunks[0][1][4:]
        runs = [struct.unpack(">II", body[i:i + 8]) for i in range(0, len(body), 8)]
        self.assertTrue(all(length % 65536 == 0 for length, _ in runs), runs)
        self.assertEqual(runs[0], (65536, 3))  # block 0: a hole that reads as zeros
        self.assertEqual(runs[1][1], 0)         # block 1: data


class HandshakeLimitsTest(Conformance):
    def test_oversize_option_is_too_big_and_the_handshake_goes_on(self):
        """Option reply types: NBD_REP_ERR_TOO_BIG, "The request or the reply is
        too large to process"; the server MUST otherwise "error inbound options"
        rather than disconnect."""
        c = self.client()
        c.option(0x4242, bytes(1 << 20))
        # nbdkit reads it whole and answers what it thinks of the option.
        self.assertEqual(c.option_reply()[1], REP_ERR_TOO_BIG if SERVER else REP_ERR_UNSUP)
        self.assertEqual(c.go(), 64 << 20)

    @unittest.skipUnless(SERVER, "nbdkit serves any export name to a plugin without a list")
    def test_error_messages_are_short_and_valid_utf8(self):
        """Conventions: a string "SHOULD be no longer than 256 bytes" and is UTF-8;
        an unknown export name is not echoed back whole."""
        c = self.client()
        name = ("é" * 20000).encode()[:-1]  # 39999 bytes, the last character cut
        c.option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        _, rtype, data = c.option_reply()
        self.assertEqual(rtype, REP_ERR_UNKNOWN)
        self.assertLessEqual(len(data), 256)
        data.decode("utf-8")  # raises if cut inside a character
        self.assertEqual(c.go(), 64 << 20)


@unittest.skipUnless(SERVER, "nbdkit sends a 48 MiB read as one chunk (its own choice)")
class LargeReadTest(Conformance):
    def test_structured_read_over_the_maximum_payload_is_split(self):
        """Block size constraints: a reply larger than the advertised maximum
        payload MUST NOT be one chunk (beyond its header); under DF the server
        answers NBD_EOVERFLOW and sends no content chunk."""
        with open(self.s.main, "r+b") as f:
            f.seek(40 << 20)
            f.write(pattern(5))
        c = self.raw(structured=True)
        c.request(CMD_READ, 0, 48 << 20, cookie=1)
        chunks = read_structured(c, 1)
        self.assertEqual(error_of(chunks), 0)
        sizes = [len(d) - 8 for t, d in chunks if t == CHUNK_OFFSET_DATA]
        self.assertEqual(sum(sizes), 48 << 20)
        self.assertLessEqual(max(sizes), 32 << 20)
        data = {struct.unpack(">Q", d[:8])[0]: d[8:] for t, d in chunks if t == CHUNK_OFFSET_DATA}
        base = max(o for o in data if o <= 40 << 20)
        self.assertEqual(data[base][(40 << 20) - base:(40 << 20) - base + BLOCK], pattern(5))
        c.request(CMD_READ, 0, 48 << 20, flags=FLAG_DF, cookie=2)
        chunks = read_structured(c, 2)
        self.assertEqual([t for t, _ in chunks], [CHUNK_ERROR])
        self.assertEqual(error_of(chunks), NBD_EOVERFLOW)


class SlowBlockTest(Conformance):
    params = ("inject=slow:9-10x2000",)

    def test_a_finished_reply_does_not_wait_behind_a_slow_request(self):
        """Transmission: replies "MAY be sent out of order"; a read of a healthy
        block pipelined ahead of a 2 s read is answered at once, not at 2 s."""
        c = self.raw()
        start = time.monotonic()
        c.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 1, 0, BLOCK) +
                       struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 2, 9 * BLOCK, BLOCK))
        first = c.simple_reply()
        fast = time.monotonic() - start
        self.assertEqual(first, (0, 1))
        recv_exact(c.sock, BLOCK)
        self.assertEqual(c.simple_reply(), (0, 2))
        recv_exact(c.sock, BLOCK)
        slow = time.monotonic() - start
        self.assertGreater(slow, 1.5)
        self.assertLess(fast, 0.5, f"the fast reply came after {fast:.3f} s")

    @unittest.skipUnless(SERVER, "--threads is dmremap-server's")
    def test_replies_go_out_when_every_thread_is_busy(self):
        """The same with --threads 2 and both threads held by slow blocks: the
        replies that are ready do not wait for a free thread."""
        self.s.stop()
        self.s.start("inject=slow:9-10x2000", "threads=2")
        c = self.raw()
        start = time.monotonic()
        c.sock.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, cookie, off, BLOCK)
                                for cookie, off in ((1, 9 * BLOCK), (2, 0), (3, 10 * BLOCK))))
        first = c.simple_reply()
        fast = time.monotonic() - start
        self.assertEqual(first, (0, 2))
        self.assertLess(fast, 0.5, f"the fast reply came after {fast:.3f} s")


class ShutdownTest(Conformance):
    params = ("inject=slow:9x2000",)

    def sigterm(self):
        pid = self.s.daemon_pid if getattr(self.s, "daemon_pid", None) else self.s.proc.pid
        os.kill(pid, signal.SIGTERM)

    def replies(self, c, count):
        """The next `count` simple replies, by cookie (data of good reads skipped)."""
        got = {}
        for _ in range(count):
            err, cookie = c.simple_reply()
            self.assertNotIn(cookie, got, "a request answered twice")
            got[cookie] = err
            if err == 0 and cookie < 100:
                recv_exact(c.sock, BLOCK)
        return got

    def test_requests_after_a_shutdown_began_get_eshutdown(self):
        """Terminating the transmission phase: on a server shutdown, requests in
        flight are served, and "any subsequently received requests SHOULD be
        NBD_ESHUTDOWN" (nbdkit does the same for the plugin)."""
        busy = self.raw()
        busy.request(CMD_READ, 9 * BLOCK, BLOCK, cookie=1)  # takes 2 s
        time.sleep(0.3)
        self.sigterm()
        time.sleep(0.3)
        for cookie in (2, 3, 4):
            busy.request(CMD_READ, 0, BLOCK, cookie=cookie)
        self.assertEqual(self.replies(busy, 4), {1: 0, 2: NBD_ESHUTDOWN, 3: NBD_ESHUTDOWN,
                                                 4: NBD_ESHUTDOWN})

    @unittest.skipUnless(SERVER, "nbdkit 1.32 answers options normally while it shuts down")
    def test_options_after_a_shutdown_began_get_err_shutdown(self):
        """Option haggling: a server being shut down "SHOULD error further options
        received (other than an NBD_OPT_ABORT) with NBD_REP_ERR_SHUTDOWN"."""
        waiting = self.client()  # still in the handshake
        busy = self.raw()
        busy.request(CMD_READ, 9 * BLOCK, BLOCK, cookie=1)
        time.sleep(0.3)
        self.sigterm()
        time.sleep(0.3)
        waiting.option(OPT_GO, struct.pack(">IH", 0, 0))
        self.assertEqual(waiting.option_reply()[1], REP_ERR_SHUTDOWN)
        waiting.option(0x4242, bytes(1 << 17))  # oversize too
        self.assertEqual(waiting.option_reply()[1], REP_ERR_SHUTDOWN)
        self.assertEqual(self.replies(busy, 1), {1: 0})

    @unittest.skipUnless(SERVER, "the plugin's reading of requests is nbdkit's")
    def test_no_request_already_sent_goes_unanswered(self):
        """Every request the server received before or after the signal gets a
        reply, as many as fit in its read-ahead and one whose payload was still
        arriving; none is dropped with the connection."""
        self.s.stop()
        self.s.start("inject=slow:9x2000", "threads=1")
        c = self.raw()
        msgs = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, cookie,
                                    (9 if cookie == 1 else 0) * BLOCK, BLOCK)
                        for cookie in range(1, 41))
        c.sock.sendall(msgs)
        payload = pattern(3)
        c.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 100, 3 * BLOCK, BLOCK) +
                       payload[:BLOCK // 2])
        time.sleep(0.3)
        self.sigterm()
        time.sleep(0.3)
        c.sock.sendall(payload[BLOCK // 2:])
        got = self.replies(c, 41)
        self.assertEqual(set(got), set(range(1, 41)) | {100})
        self.assertEqual(got[1], 0)
        self.assertEqual(set(got.values()) - {0, NBD_ESHUTDOWN}, set())


@unittest.skipUnless(SERVER, "how nbdkit reads during its shutdown is its own")
class ShutdownReadingTest(unittest.TestCase):
    def setUp(self):
        self.s = DemoSet(TOOLS)
        self.addCleanup(self.s.close)

    def test_a_write_still_arriving_gets_eshutdown_through_libnbd(self):
        """A client's 8 MiB write, still being sent when the signal comes (the
        only thread is busy on a 2-second read), is read to its end and
        answered ESHUTDOWN; libnbd sees that error, not a broken connection."""
        self.s.start("inject=slow:9x2000", "threads=1")
        h = self.s.connect()
        slow = h.aio_pread(nbd.Buffer(BLOCK), 9 * BLOCK)
        big = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(8 << 20)), 16 * BLOCK)
        time.sleep(0.3)
        os.kill(self.s.proc.pid, signal.SIGTERM)
        errors = {}
        deadline = time.monotonic() + 30
        for cookie in (slow, big):
            while True:
                try:
                    if h.aio_command_completed(cookie):
                        errors[cookie] = 0
                        break
                except nbd.Error as e:
                    errors[cookie] = e.errnum
                    break
                self.assertLess(time.monotonic(), deadline)
                h.poll(1000)
        self.assertEqual(errors, {slow: 0, big: errno.ESHUTDOWN})

    def test_a_client_that_keeps_sending_does_not_hold_the_shutdown_up(self):
        """Over TCP, data sent after the signal keeps arriving: the server reads
        only what had arrived once nothing runs, and ends at once, not at
        --shutdown-timeout."""
        port = free_port()
        srv = subprocess.Popen([TOOLS.server, "--main", self.s.main, "--spare", self.s.spare,
                                "--tcp", f"127.0.0.1:{port}", "--shutdown-timeout", "20"],
                               stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: srv.poll() is None and srv.kill())
        c = RawClient.__new__(RawClient)
        c.sock = connect_tcp(port)
        self.addCleanup(c.sock.close)
        recv_exact(c.sock, 18)
        c.sock.sendall(struct.pack(">I", 3))
        c.go()
        stop = threading.Event()

        def flood():
            msg = struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 7, 0, BLOCK) * 64
            try:
                while not stop.is_set():
                    c.sock.sendall(msg)
            except OSError:
                pass

        def drain_replies():
            try:
                while c.sock.recv(1 << 20):
                    pass
            except OSError:
                pass

        threads = [threading.Thread(target=flood), threading.Thread(target=drain_replies)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        start = time.monotonic()
        srv.send_signal(signal.SIGTERM)
        try:
            _, err = srv.communicate(timeout=15)
        finally:
            stop.set()
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the server has closed it already
            for t in threads:
                t.join()
        self.assertLess(time.monotonic() - start, 10, err)
        self.assertEqual(srv.returncode, 0, err)
        self.assertIn("closed cleanly", err)


class PoolFullTest(unittest.TestCase):
    def test_a_write_that_needs_a_slot_when_none_is_left_is_enospc(self):
        """docs/server.md, x-dmremap:remapped: a block main refuses needs a spare
        slot; with none left its write fails with NBD_ENOSPC, although
        base:allocation calls the block allocated (proto.md allows ENOSPC there
        "for reasons specified in the definition of another context")."""
        small = DemoSet(TOOLS, main_size=4 << 20, spare_size=1 << 20,
                        extra_format=("--journal-size", "64K"))
        self.addCleanup(small.close)
        slots = small.status()["slots_total"]
        small.start(f"inject=write:0-{slots + 2}")
        c = RawClient(small.sock)
        self.addCleanup(c.close)
        c.go()
        for b in range(slots):
            c.request(CMD_WRITE, b * BLOCK, BLOCK, cookie=b, payload=pattern(b))
            self.assertEqual(c.simple_reply(), (0, b))
        c.request(CMD_WRITE, slots * BLOCK, BLOCK, cookie=99, payload=pattern(99))
        self.assertEqual(c.simple_reply(), (NBD_ENOSPC, 99))


class TcpNoDelayTest(unittest.TestCase):
    """Protocol phases: "the server SHOULD set TCP_NODELAY" (and so should the
    client); read off the server's own accepted socket with pidfd_getfd(2)."""

    def test_accepted_tcp_sockets_have_nodelay(self):
        s = DemoSet(TOOLS)
        self.addCleanup(s.close)
        port = free_port()
        if SERVER:
            cmd = [TOOLS.server, "--main", s.main, "--spare", s.spare, "--tcp", f"127.0.0.1:{port}"]
        else:
            cmd = ["nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p",
                   str(port), TOOLS.plugin, f"main={s.main}", f"spare={s.spare}"]
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.terminate)
        sock = connect_tcp(port)
        self.addCleanup(sock.close)
        magic = recv_exact(sock, 18)
        self.assertEqual(magic[:8], b"NBDMAGIC")
        found = server_tcp_sockets(proc.pid, sock.getsockname()[1])
        for fd in found:
            self.addCleanup(fd.close)
        self.assertTrue(found, "the server's end of the connection was not found")
        for fd in found:
            self.assertEqual(fd.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_tcp(port, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            return sock
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def server_tcp_sockets(pid, client_port):
    """Sockets of process `pid` connected to our `client_port`, duplicated into
    this process with pidfd_getfd(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    found = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(438, pidfd, int(name), 0)  # SYS_pidfd_getfd
            if fd < 0:
                continue
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            try:
                if s.family in (socket.AF_INET, socket.AF_INET6) and s.getpeername()[1] == client_port:
                    found.append(s)
                    continue
            except OSError:
                pass
            s.close()
    finally:
        os.close(pidfd)
    return found


if __name__ == "__main__":
    unittest.main()
