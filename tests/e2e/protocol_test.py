"""dmremap-server against clients that break the rules, and its ways of being
started: socket activation, --stdio, and a drain on SIGTERM.

The raw-socket client below speaks just enough NBD to send what no real client
would. Every case checks the answer the NBD specification names, and that a
well-behaved client connected to the same server keeps reading and writing
its data.
"""
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import unittest

import nbd

from nbd_harness import BLOCK, DemoSet, Tools, pattern

TOOLS = Tools()

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT_ABORT, OPT_GO, OPT_STRUCTURED = 2, 7, 8
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP, REP_ERR_INVALID = 0x80000001, 0x80000003
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_BLOCK_STATUS = 0, 1, 2, 3, 4, 7
FLAG_FUA = 1
NBD_EPERM, NBD_EINVAL, NBD_ENOSPC = 1, 22, 28


def recv_exact(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"server closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def closed_by_server(sock, timeout=10):
    """True when the server ends the connection within `timeout` seconds;
    whatever it sends first (a reply to an earlier request) is skipped."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


class RawClient:
    """A hand-driven NBD client on a Unix socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        magic, opt, flags = struct.unpack(">QQH", recv_exact(self.sock, 18))
        assert magic == NBDMAGIC and opt == IHAVEOPT, "not an NBD newstyle server"
        self.server_flags = flags
        self.sock.sendall(struct.pack(">I", 1 | 2))  # fixed newstyle, no zeroes

    def option(self, opt, data=b""):
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(self.sock, 20))
        assert magic == REPLY_MAGIC
        return opt, rtype, recv_exact(self.sock, length)

    def go(self, structured=False):
        if structured:
            self.option(OPT_STRUCTURED)
            assert self.option_reply()[1] == REP_ACK
        self.option(OPT_GO, struct.pack(">IH", 0, 0))
        size = None
        while True:
            _, rtype, data = self.option_reply()
            if rtype == REP_ACK:
                break
            assert rtype == REP_INFO, hex(rtype)
            if struct.unpack(">H", data[:2])[0] == 0:
                size, self.flags = struct.unpack(">QH", data[2:12])
        self.size = size
        self.structured = structured
        return size

    def request(self, cmd, offset, length, flags=0, cookie=1, magic=REQUEST_MAGIC, payload=b""):
        self.sock.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload)

    def simple_reply(self):
        magic, error, cookie = struct.unpack(">IIQ", recv_exact(self.sock, 16))
        assert magic == SIMPLE_MAGIC, hex(magic)
        return error, cookie

    def chunk(self):
        magic, flags, ctype, cookie, length = struct.unpack(">IHHQI", recv_exact(self.sock, 20))
        assert magic == STRUCTURED_MAGIC, hex(magic)
        return flags, ctype, cookie, recv_exact(self.sock, length)

    def close(self):
        self.sock.close()


class ServerCase(unittest.TestCase):
    """A server on a 64 MiB main, and a witness: a libnbd client that must
    keep working whatever the raw client does."""

    server_args = ("handshake-timeout=1",)

    def setUp(self):
        self.s = DemoSet(TOOLS)
        self.s.start(*self.server_args)
        self.witness = self.s.connect()
        self.witness_round = 0

    def tearDown(self):
        try:
            self.witness.shutdown()
        except nbd.Error:
            pass
        self.s.close()

    def check_witness(self):
        """The well-behaved client writes, flushes and reads back."""
        self.witness_round += 1
        data = pattern(100 + self.witness_round)
        self.witness.pwrite(data, 40 * BLOCK)
        self.witness.flush()
        self.assertEqual(self.witness.pread(BLOCK, 40 * BLOCK), data)

    def raw(self, structured=False):
        c = RawClient(self.s.sock)
        self.addCleanup(c.close)
        c.go(structured)
        return c

    def server_pid(self):
        return self.s.proc.pid


@unittest.skipUnless(TOOLS.frontend == "server", "dmremap-server only")
class BadRequestsTest(ServerCase):
    def test_out_of_range_read_is_einval(self):
        c = self.raw()
        c.request(CMD_READ, c.size - BLOCK, 2 * BLOCK, cookie=7)
        self.assertEqual(c.simple_reply(), (NBD_EINVAL, 7))
        c.request(CMD_READ, 1 << 62, BLOCK, cookie=8)
        self.assertEqual(c.simple_reply(), (NBD_EINVAL, 8))
        self.check_witness()

    def test_out_of_range_structured_read_is_an_error_chunk(self):
        c = self.raw(structured=True)
        c.request(CMD_READ, c.size, BLOCK, cookie=9)
        flags, ctype, cookie, data = c.chunk()
        self.assertEqual((flags & 1, ctype, cookie), (1, 0x8001, 9))
        self.assertEqual(struct.unpack(">I", data[:4])[0], NBD_EINVAL)
        self.check_witness()

    def test_write_past_the_end_is_enospc(self):
        c = self.raw()
        c.request(CMD_WRITE, c.size - BLOCK, 2 * BLOCK, cookie=3, payload=bytes(2 * BLOCK))
        self.assertEqual(c.simple_reply(), (NBD_ENOSPC, 3))
        # The payload was taken off the wire: the next request is understood.
        c.request(CMD_READ, 0, BLOCK, cookie=4)
        self.assertEqual(c.simple_reply(), (0, 4))
        recv_exact(c.sock, BLOCK)
        self.check_witness()

    def test_unknown_command_and_unknown_flags_are_einval(self):
        c = self.raw()
        c.request(99, 0, BLOCK, cookie=1)
        self.assertEqual(c.simple_reply(), (NBD_EINVAL, 1))
        c.request(CMD_READ, 0, BLOCK, flags=0x80, cookie=2)
        self.assertEqual(c.simple_reply(), (NBD_EINVAL, 2))
        # REQ_ONE is for BLOCK_STATUS only (FUA, by contrast, is accepted on
        # every command: conformance_test checks it).
        c.request(CMD_READ, 0, BLOCK, flags=8, cookie=3)
        self.assertEqual(c.simple_reply(), (NBD_EINVAL, 3))
        # FLUSH takes no range; BLOCK_STATUS needs a negotiated context.
        c.request(CMD_FLUSH, 4096, 0, cookie=4)
        self.assertEqual(c.simple_reply(), (NBD_EINVAL, 4))
        c.request(CMD_BLOCK_STATUS, 0, BLOCK, cookie=5)
        self.assertEqual(c.simple_reply(), (NBD_EINVAL, 5))
        # Still in step with the client.
        c.request(CMD_READ, 0, BLOCK, cookie=6)
        self.assertEqual(c.simple_reply(), (0, 6))
        recv_exact(c.sock, BLOCK)
        self.check_witness()

    def test_read_bigger_than_accepted_is_einval(self):
        c = self.raw()
        c.request(CMD_READ, 0, (64 << 20) + BLOCK, cookie=5)
        self.assertEqual(c.simple_reply(), (NBD_EINVAL, 5))
        self.check_witness()

    def test_oversize_write_disconnects_only_that_client(self):
        c = self.raw()
        # 1 GiB announced: the server cannot skip it without reading it all,
        # and must not allocate it.
        c.request(CMD_WRITE, 0, 1 << 30, cookie=1)
        self.assertTrue(closed_by_server(c.sock))
        self.check_witness()

    def test_bad_request_magic_disconnects_only_that_client(self):
        c = self.raw()
        c.request(CMD_READ, 0, BLOCK, magic=0xDEADBEEF)
        self.assertTrue(closed_by_server(c.sock))
        self.check_witness()

    def test_replies_may_come_out_of_order_and_all_arrive(self):
        c = self.raw()
        for i in range(64):
            c.request(CMD_WRITE, i * BLOCK, BLOCK, cookie=1000 + i, payload=pattern(i))
        cookies = {c.simple_reply()[1] for _ in range(64)}
        self.assertEqual(cookies, set(range(1000, 1064)))
        for i in range(64):
            c.request(CMD_READ, i * BLOCK, BLOCK, cookie=i)
        seen = set()
        for _ in range(64):
            # Simple replies carry no length: this client reads one at a time
            # in the order they come, and checks each against its cookie.
            error, cookie = c.simple_reply()
            self.assertEqual(error, 0)
            self.assertEqual(recv_exact(c.sock, BLOCK), pattern(cookie))
            seen.add(cookie)
        self.assertEqual(seen, set(range(64)))
        self.check_witness()

    def test_flood_without_reading_replies_keeps_memory_bounded(self):
        c = self.raw()
        self.addCleanup(c.close)
        rss_before = rss_kib(self.server_pid())
        # 1 GiB of 32 MiB reads, and never a reply read. The server must stop
        # reading this client, not queue a gigabyte of replies.
        c.sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 20
        for i in range(32):
            msg = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i, 0, 32 << 20)
            while time.monotonic() < deadline:
                try:
                    c.sock.send(msg)
                    sent += 1
                    break
                except BlockingIOError:
                    time.sleep(0.05)
        time.sleep(2)
        peak = rss_kib(self.server_pid())
        grown_mib = (peak - rss_before) / 1024
        print(f"flood: {sent} x 32 MiB reads sent, server RSS grew {grown_mib:.0f} MiB",
              file=sys.stderr)
        # The cap is 256 MiB in flight per client, plus one request. Under
        # ThreadSanitizer (scripts/test sets DMREMAP_SANITIZED) every byte has
        # shadow bytes, so RSS says nothing about the cap there.
        if not os.environ.get("DMREMAP_SANITIZED"):
            self.assertLess(grown_mib, 256 + 64 + 32)
        self.check_witness()
        c.close()
        self.check_witness()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@unittest.skipUnless(TOOLS.frontend == "server", "dmremap-server only")
class HandshakeTest(ServerCase):
    def test_unknown_option_is_unsupported_and_the_handshake_goes_on(self):
        c = RawClient(self.s.sock)
        self.addCleanup(c.close)
        c.option(0x4242, b"whatever")
        opt, rtype, _ = c.option_reply()
        self.assertEqual((opt, rtype), (0x4242, REP_ERR_UNSUP))
        c.option(OPT_STRUCTURED, b"unexpected data")
        self.assertEqual(c.option_reply()[1], REP_ERR_INVALID)
        self.assertEqual(c.go(), 64 << 20)
        self.check_witness()

    def test_stalled_handshake_times_out(self):
        c = RawClient(self.s.sock)
        self.addCleanup(c.close)
        start = time.monotonic()
        # Send half an option header and nothing more.
        c.sock.sendall(struct.pack(">Q", IHAVEOPT))
        self.assertTrue(closed_by_server(c.sock, timeout=10))
        self.assertLess(time.monotonic() - start, 5)
        self.check_witness()

    def test_silent_client_times_out(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.connect(self.s.sock)
        self.assertTrue(closed_by_server(s, timeout=10))
        self.check_witness()

    def test_oversize_option_disconnects_only_that_client(self):
        c = RawClient(self.s.sock)
        self.addCleanup(c.close)
        c.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 1 << 31))
        self.assertTrue(closed_by_server(c.sock))
        self.check_witness()

    def test_bad_option_magic_disconnects(self):
        c = RawClient(self.s.sock)
        self.addCleanup(c.close)
        c.sock.sendall(struct.pack(">QII", 0x1122334455667788, OPT_GO, 0))
        self.assertTrue(closed_by_server(c.sock))
        self.check_witness()

    def test_garbage_go_request_is_invalid(self):
        c = RawClient(self.s.sock)
        self.addCleanup(c.close)
        # Name length pointing past the end of the option.
        c.option(OPT_GO, struct.pack(">I", 1000) + b"ab")
        self.assertEqual(c.option_reply()[1], REP_ERR_INVALID)
        c.option(OPT_ABORT)
        self.assertEqual(c.option_reply()[1], REP_ACK)
        self.check_witness()


@unittest.skipUnless(TOOLS.frontend == "server", "dmremap-server only")
class ReadOnlyTest(ServerCase):
    server_args = ("readonly=1",)

    def test_write_and_trim_on_a_read_only_export_are_eperm(self):
        c = self.raw()
        c.request(CMD_WRITE, 0, BLOCK, cookie=1, payload=bytes(BLOCK))
        self.assertEqual(c.simple_reply(), (NBD_EPERM, 1))
        c.request(CMD_TRIM, 0, BLOCK, cookie=2)
        self.assertEqual(c.simple_reply(), (NBD_EPERM, 2))
        self.assertEqual(len(self.witness.pread(BLOCK, 0)), BLOCK)


@unittest.skipUnless(TOOLS.frontend == "server", "dmremap-server only")
class StartAndStopTest(unittest.TestCase):
    def setUp(self):
        self.s = DemoSet(TOOLS)

    def tearDown(self):
        self.s.close()

    def server(self, *args):
        return [TOOLS.server, "--main", self.s.main, "--spare", self.s.spare, *args]

    def test_stdio_serves_one_client_then_exits_cleanly(self):
        h = nbd.NBD()
        h.connect_command(self.server("--stdio"))
        h.pwrite(pattern(1), 3 * BLOCK, nbd.CMD_FLAG_FUA)
        self.assertEqual(h.pread(BLOCK, 3 * BLOCK), pattern(1))
        h.shutdown()
        del h
        # The server saw its only client go and closed the spare.
        deadline = time.monotonic() + 20
        while not self.s.status()["clean"]:
            self.assertLess(time.monotonic(), deadline, "the spare was not closed cleanly")
            time.sleep(0.1)

    def test_socket_activation(self):
        h = nbd.NBD()
        h.connect_systemd_socket_activation(self.server())
        self.assertEqual(h.get_size(), 64 << 20)
        h.pwrite(pattern(2), 5 * BLOCK)
        h.flush()
        self.assertEqual(h.pread(BLOCK, 5 * BLOCK), pattern(2))
        h.shutdown()

    def test_nbdinfo_starts_it_by_socket_activation(self):
        r = subprocess.run(["nbdinfo", "--json", "--", "[", *self.server(), "]"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('"export-size": 67108864', r.stdout)

    def test_nbdcopy_rescue_copy_through_socket_activation(self):
        # The rescue line of examples/README.md: read-only, unreadable blocks
        # as zeros, the rest copied exactly.
        with open(self.s.main, "r+b") as f:
            f.write(pattern(7, 8 * BLOCK))
        out = os.path.join(self.s.dir, "rescued.img")
        r = subprocess.run(["nbdcopy", "--", "[", *self.server("--readonly", "--unreadable", "zero",
                                                              "--inject", "read:3"), "]", out],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("block 3", r.stderr)
        with open(out, "rb") as f:
            got = f.read(8 * BLOCK)
        want = bytearray(pattern(7, 8 * BLOCK))
        want[3 * BLOCK:4 * BLOCK] = bytes(BLOCK)
        self.assertEqual(got, bytes(want))
        self.assertEqual(os.path.getsize(out), 64 << 20)

    def test_stdio_refuses_a_terminal_or_pipe(self):
        r = subprocess.run(self.server("--stdio"), stdin=subprocess.PIPE,
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 1)
        self.assertIn("--stdio needs a connected socket", r.stderr)

    def test_sigterm_answers_requests_in_flight_before_exit(self):
        # Main behind nbdkit's delay filter: every write takes 1 s, so the
        # requests are surely in flight when SIGTERM comes.
        backing = os.path.join(self.s.dir, "main.img")
        sock = os.path.join(self.s.dir, "slow.sock")
        slow = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
                                 "--filter=delay", "file", backing, "wdelay=1"],
                                stderr=subprocess.DEVNULL)
        self.addCleanup(slow.wait)
        self.addCleanup(slow.terminate)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        server_sock = os.path.join(self.s.dir, "dmremap.sock")
        srv = subprocess.Popen([TOOLS.server, "--main", f"nbd+unix:///?socket={sock}",
                                "--spare", self.s.spare, "--unix", server_sock],
                               stderr=subprocess.PIPE, text=True)
        while not os.path.exists(server_sock):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={server_sock}")
        start = time.monotonic()
        cookies = [h.aio_pwrite(pattern(i), i * BLOCK) for i in range(8)]
        time.sleep(0.3)  # the server has read them; the disk is still busy
        srv.send_signal(signal.SIGTERM)
        pending = set(cookies)
        while pending:
            # aio_command_completed raises if the command failed.
            pending = {c for c in pending if not h.aio_command_completed(c)}
            if pending:
                h.poll(1000)
        # One slow request does not hold the others of its connection: the
        # 8 writes of 1 s each overlap (one after another would take 8 s).
        self.assertLess(time.monotonic() - start, 6)
        _, err = srv.communicate(timeout=30)
        self.assertEqual(srv.returncode, 0, err)
        self.assertIn("closed cleanly", err)
        self.assertTrue(self.s.status()["clean"])
        with open(backing, "rb") as f:
            for i in range(8):
                f.seek(i * BLOCK)
                self.assertEqual(f.read(BLOCK), pattern(i))


@unittest.skipUnless(TOOLS.frontend == "server", "dmremap-server only")
class ServerFlagsTest(unittest.TestCase):
    """dmremap-server's options refuse what would do harm or mean nothing, and
    say why; bad usage exits 2, as dmremap does."""

    def setUp(self):
        self.s = DemoSet(TOOLS)
        self.addCleanup(self.s.close)

    def run_server(self, *args, timeout=30):
        return subprocess.run([TOOLS.server, "--main", self.s.main, "--spare", self.s.spare, *args],
                              capture_output=True, text=True, timeout=timeout)

    def test_unix_refuses_to_replace_a_file(self):
        before = open(self.s.spare, "rb").read()
        r = self.run_server("--unix", self.s.spare)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("not a socket is in the way", r.stderr)
        self.assertEqual(open(self.s.spare, "rb").read(), before)
        self.assertTrue(self.s.status()["clean"])

    def test_unix_refuses_a_live_socket_and_replaces_a_stale_one(self):
        path = os.path.join(self.s.dir, "live.sock")
        live = socket.socket(socket.AF_UNIX)
        live.bind(path)
        live.listen()
        r = self.run_server("--unix", path)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("another running server answers on it", r.stderr)
        live.close()  # the socket file stays, with nobody behind it: stale
        self.assertTrue(os.path.exists(path))
        srv = subprocess.Popen([TOOLS.server, "--main", self.s.main, "--spare", self.s.spare,
                                "--unix", path], stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while True:
                h = nbd.NBD()
                try:
                    h.connect_unix(path)
                    break
                except nbd.Error:
                    self.assertLess(time.monotonic(), deadline)
                    time.sleep(0.05)
            self.assertEqual(h.get_size(), 64 << 20)
            h.shutdown()
        finally:
            srv.send_signal(signal.SIGTERM)
            _, err = srv.communicate(timeout=30)
        self.assertEqual(srv.returncode, 0, err)

    def test_bad_tcp_ports_are_usage_errors(self):
        for spec in ("70000", "abc", "127.0.0.1:", "nohost:10809"):
            r = self.run_server("--tcp", spec)
            self.assertEqual(r.returncode, 2, (spec, r.stderr))
            self.assertIn("--tcp", r.stderr)
        self.assertIn("from 0 to 65535", self.run_server("--tcp", "70000").stderr)

    def test_bad_usage_exits_2_and_help_says_so(self):
        r = self.run_server("--no-such-option")
        self.assertEqual(r.returncode, 2, r.stderr)
        r = self.run_server("--stdio", "--unix", "x.sock")
        self.assertEqual(r.returncode, 2, r.stderr)
        r = subprocess.run([TOOLS.server, "--help"], capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0)
        self.assertIn("Exit status: 0", r.stdout)
        self.assertIn("2 bad usage", r.stdout)

    def test_an_unknown_export_name_is_logged(self):
        self.s.start("name=disk")
        h = nbd.NBD()
        h.set_export_name("nosuch")
        with self.assertRaises(nbd.Error):
            h.connect_unix(self.s.sock)
        h = self.s.connect()  # "" is the default export
        h.shutdown()
        self.s.stop()
        self.assertIn("asked for export 'nosuch'", self.s.read_log())

    def test_verbose_means_debug_lines(self):
        self.s.start("verbose=1")
        c = RawClient(self.s.sock)
        c.go()
        c.request(99, 0, BLOCK, cookie=1)
        self.assertEqual(c.simple_reply(), (NBD_EINVAL, 1))
        c.close()
        self.s.stop()
        log = self.s.read_log()
        self.assertIn("debug: refused a request: unknown command", log)


if __name__ == "__main__":
    unittest.main()
