"""dmremap-server's TLS (--tls, --tls-certificates, --tls-psk, --tls-verify-peer,
--tls-priority), end to end. What the suite proves:

- Interoperability: over TLS 1.2 and TLS 1.3 (forced with --tls-priority), with
  X.509 certificates and with pre-shared keys, nbdinfo, libnbd (many requests
  in flight, requests of 1 MiB and more, flush, block status), qemu-img,
  qemu-io and qemu-nbd --list are served, over Unix sockets and TCP, and the
  server's log shows that each session ran the intended TLS version with the
  intended credentials.
- FORCEDTLS (NBD proto.md, "TLS support"): a client that does not start TLS
  gets NBD_REP_ERR_TLS_REQD for every option but STARTTLS and ABORT
  (ABORT is acknowledged; NBD_OPT_EXPORT_NAME ends the connection), on Unix
  sockets and TCP, and no data.
- --tls-verify-peer serves a client whose certificate the CA issued and
  refuses one from another CA and one with no certificate, in the TLS
  handshake, with a warning in the log.
- Hostile clients on a raw socket (Python's ssl module for TLS): plaintext
  sent after NBD_OPT_STARTTLS, before the server's ACK, is discarded and
  logged, never read as an option (CVE-2021-3716); a second STARTTLS, and
  STARTTLS with data, are NBD_REP_ERR_INVALID; with --tls=on what was
  negotiated in plaintext (structured replies, meta contexts) is forgotten
  at STARTTLS; --handshake-timeout bounds a stalled TLS handshake; garbage
  instead of a ClientHello ends that connection only; with --tls=off
  STARTTLS is NBD_REP_ERR_UNSUP.
- examples/dmremap-server-tls@.service's command line serves a client with
  a certificate under socket activation, and refuses one without.
- Start-up: a missing key, a bad PSK file or a bad priority string stop the
  server with status 1 and a message naming it; --tls=off with credentials is
  bad usage (status 2).

Every key is made at test time (tls_creds.py). dmremap-server only.
"""
import os
import random
import re
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import time
import unittest

import nbd

from nbd_harness import BLOCK, DemoSet, Tools
from protocol_test import (IHAVEOPT, NBDMAGIC, REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_MAGIC,
                           STRUCTURED_MAGIC, closed_by_server, recv_exact)
from tls_creds import PSK_USER, Credentials

TOOLS = Tools()
SERVER = TOOLS.frontend == "server"

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META = 6, 7, 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_TLS_REQD = 0x80000001, 0x80000003, 0x80000005
CMD_READ, CMD_BLOCK_STATUS = 0, 7
SEND_DF = 1 << 7
NBD_EINVAL = 22
STATE_HOLE_ZERO = 3

PRIORITY = {"TLS1.2": "NORMAL:-VERS-ALL:+VERS-TLS1.2",
            "TLS1.3": "NORMAL:-VERS-ALL:+VERS-TLS1.3"}

TLS_LINE = re.compile(r"debug: a client is on TLS: (.*)")
HANDSHAKE_FAILED = "warning: a client's TLS handshake failed: "
STALLED = "warning: a client stalled in the handshake: disconnecting it"

# Made once for the module (setUpModule).
CREDS = None
WORK = None


def setUpModule():
    global CREDS, WORK
    if not SERVER:
        raise unittest.SkipTest("dmremap-server only")
    WORK = tempfile.mkdtemp(prefix="dmremap-tls-")
    CREDS = Credentials(WORK)
    # A client that trusts the CA but has no certificate of its own.
    CREDS.no_cert = os.path.join(WORK, "no-cert")
    os.makedirs(CREDS.no_cert)
    shutil.copy(os.path.join(CREDS.dir, "ca-cert.pem"), CREDS.no_cert)


def tearDownModule():
    if WORK:
        shutil.rmtree(WORK, ignore_errors=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def option_bytes(opt, data=b""):
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def meta_request(names):
    data = struct.pack(">II", 0, len(names))  # export "", then the queries
    for n in names:
        data += struct.pack(">I", len(n)) + n
    return data


def session_kind(line, version, kind):
    """Whether a server's "a client is on TLS: ..." description is `version`
    (TLS1.2, TLS1.3) with `kind` (x509, psk) credentials, as GnuTLS describes
    sessions: "(TLS1.3)-(ECDHE-SECP256R1)-(ECDSA-SECP256R1-SHA256)-(AES-256-GCM)",
    "(TLS1.2)-(ECDHE-SECP256R1)-(CHACHA20-POLY1305), PSK user alice"."""
    if not re.match(r"\(" + re.escape(version) + r"[)-]", line):
        return False
    if kind == "psk":
        return line.endswith(f", PSK user {PSK_USER}")
    return "-(ECDSA-" in line and "PSK" not in line


class Raw:
    """A hand-driven NBD client on a Unix socket (a path) or TCP (host, port),
    that can start TLS with Python's ssl (OpenSSL) on X.509."""

    def __init__(self, address):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(address)
        magic, opt, _ = struct.unpack(">QQH", recv_exact(self.sock, 18))
        assert magic == NBDMAGIC and opt == IHAVEOPT, "not an NBD newstyle server"
        self.sock.sendall(struct.pack(">I", 1 | 2))  # fixed newstyle, no zeroes

    def option(self, opt, data=b""):
        self.sock.sendall(option_bytes(opt, data))

    def option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(self.sock, 20))
        assert magic == REPLY_MAGIC, hex(magic)
        return opt, rtype, recv_exact(self.sock, length)

    def replies(self, opt):
        """Every reply to `opt` up to its final one (ACK or an error):
        [(type, data)]. A reply to another option fails."""
        out = []
        while True:
            got, rtype, data = self.option_reply()
            assert got == opt, f"a reply to option {got} where {opt} was sent"
            out.append((rtype, data))
            if rtype == REP_ACK or rtype & 0x80000000:
                return out

    def tls(self):
        """The TLS handshake, once the server has acknowledged STARTTLS."""
        ctx = ssl.create_default_context(cafile=os.path.join(CREDS.dir, "ca-cert.pem"))
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def start_tls(self):
        self.option(OPT_STARTTLS)
        assert self.option_reply() == (OPT_STARTTLS, REP_ACK, b"")
        self.tls()

    def go(self):
        """NBD_OPT_GO for the default export: (size, transmission flags)."""
        self.option(OPT_GO, struct.pack(">IH", 0, 0))
        size = flags = None
        for rtype, data in self.replies(OPT_GO):
            if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
                size, flags = struct.unpack(">QH", data[2:12])
            else:
                assert rtype in (REP_INFO, REP_ACK), hex(rtype)
        return size, flags

    def request(self, cmd, offset, length, cookie):
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, cookie, offset, length))

    def reply_magic(self):
        return struct.unpack(">I", recv_exact(self.sock, 4))[0]

    def close(self):
        self.sock.close()


class TlsServerCase(unittest.TestCase):
    """One dmremap-server (-v) for the whole class, on a 64 MiB main; tests
    run many clients against it and read its log."""

    tcp = False

    @classmethod
    def server_params(cls):
        return ()

    @classmethod
    def setUpClass(cls):
        cls.s = DemoSet(TOOLS)
        params = ["verbose=1", *cls.server_params()]
        if cls.tcp:
            cls.port = free_port()
            params.append(f"tcp=127.0.0.1:{cls.port}")
        try:
            cls.s.start(*params)
        except BaseException:
            cls.s.close()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            code = cls.s.stop()
            log = cls.s.read_log()
        finally:
            cls.s.close()
        # After all the class's sessions, good and hostile, the server stops cleanly.
        if code != 0 or "the spare is closed cleanly" not in log:
            raise AssertionError(f"the server exited {code}:\n{log}")

    # --- the log
    def mark(self):
        return len(self.s.read_log())

    def log_since(self, mark):
        return self.s.read_log()[mark:]

    def tls_sessions(self, mark):
        return TLS_LINE.findall(self.log_since(mark))

    def wait_for_log(self, mark, needle, timeout=10):
        """The log from `mark` once it holds `needle` (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_since(mark)
            if needle in text:
                return text
            if time.monotonic() > deadline:
                self.fail(f"the server did not log {needle!r}; it logged:\n{text}")
            time.sleep(0.05)

    # --- clients
    def tls_handle(self, certificates=None, psk=False):
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        if psk:
            h.set_tls_psk_file(CREDS.psk_file)
            h.set_tls_username(PSK_USER)
        else:
            h.set_tls_certificates(certificates or CREDS.dir)
        return h

    def raw(self, address=None):
        c = Raw(address or self.s.sock)
        self.addCleanup(c.close)
        return c

    def check_served(self, seed, psk=False):
        """A well-behaved TLS client (libnbd) writes, flushes and reads back."""
        h = self.tls_handle(psk=psk)
        h.connect_unix(self.s.sock)
        self.assertTrue(h.get_tls_negotiated())
        data = random.Random(seed).randbytes(4 * BLOCK)
        h.pwrite(data, 30 << 20)
        h.flush()
        self.assertEqual(h.pread(len(data), 30 << 20), data)
        h.shutdown()


# ---------------------------------------------------------------- interop


class Interop:
    """Real clients over `version` with `kind` credentials; the servers are
    require-mode by default (credentials and no --tls), on Unix and TCP."""

    version = kind = None
    tcp = True

    @classmethod
    def server_params(cls):
        creds = (f"tls-psk={CREDS.psk_file}" if cls.kind == "psk"
                 else f"tls-certificates={CREDS.dir}")
        return (creds, f"tls-priority={PRIORITY[cls.version]}")

    def assert_sessions(self, mark, count=1):
        lines = self.tls_sessions(mark)
        self.assertEqual(len(lines), count, self.log_since(mark))
        for line in lines:
            self.assertTrue(session_kind(line, self.version, self.kind),
                            f"wanted {self.version} {self.kind}, the server logged: {line}")

    def run_tool(self, *argv):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, f"{argv[0]}: {r.stdout}{r.stderr}")
        return r.stdout

    def qemu_object(self):
        if self.kind == "psk":
            return f"tls-creds-psk,id=tls0,endpoint=client,dir={CREDS.qemu_psk},username={PSK_USER}"
        return f"tls-creds-x509,id=tls0,endpoint=client,dir={CREDS.qemu_x509}"

    def qemu_unix(self):
        # On a Unix socket qemu has no host name to check the certificate
        # against: the server's certificate is for localhost.
        opts = f"driver=nbd,server.type=unix,server.path={self.s.sock},tls-creds=tls0"
        return opts + (",tls-hostname=localhost" if self.kind == "x509" else "")

    def test_nbdinfo_over_tcp(self):
        if self.kind == "psk":
            uri = f"nbds://{PSK_USER}@127.0.0.1:{self.port}/?tls-psk-file={CREDS.psk_file}"
        else:
            # The certificate names 127.0.0.1 too: libnbd checks it.
            uri = f"nbds://127.0.0.1:{self.port}/?tls-certificates={CREDS.dir}"
        mark = self.mark()
        out = self.run_tool("nbdinfo", uri)
        self.assertIn("protocol: newstyle-fixed with TLS, using structured packets", out)
        self.assertIn("export-size: 67108864", out)
        self.assert_sessions(mark)

    def test_libnbd_many_requests_in_flight(self):
        rnd = random.Random(self.version + self.kind)
        # 128 requests of 4 to 64 KiB spread over 8 MiB (about 4 MiB), and
        # three of 1 MiB and more: all in flight at once.
        spread = [(i * (64 << 10), BLOCK * (1 + (i * 7) % 16)) for i in range(128)]
        big = [(9 << 20, 1 << 20), (11 << 20, (3 << 20) + BLOCK), (16 << 20, 8 << 20)]
        writes = [(off, rnd.randbytes(n)) for off, n in spread + big]
        mark = self.mark()
        h = self.tls_handle(psk=self.kind == "psk")
        h.add_meta_context("base:allocation")
        h.add_meta_context("x-dmremap:remapped")
        h.connect_unix(self.s.sock)
        self.assertTrue(h.get_tls_negotiated())
        self.assertTrue(h.get_structured_replies_negotiated())
        bufs = [nbd.Buffer.from_bytearray(bytearray(d)) for _, d in writes]
        # Issued before any is waited for: the requests are pipelined.
        cookies = [h.aio_pwrite(b, off) for b, (off, _) in zip(bufs, writes)]
        self.wait_all(h, cookies)
        h.flush()
        reads = [nbd.Buffer(len(d)) for _, d in writes]
        cookies = [h.aio_pread(b, off) for b, (off, _) in zip(reads, writes)]
        self.wait_all(h, cookies)
        for buf, (off, data) in zip(reads, writes):
            self.assertEqual(buf.to_bytearray(), data, f"at offset {off}")
        # The whole spread in one 8 MiB read: the gaps between requests
        # hold zeros.
        want = bytearray(8 << 20)
        for off, data in writes[:len(spread)]:
            want[off:off + len(data)] = data
        self.assertEqual(h.pread(8 << 20, 0), want)
        # Block status: data where written, a hole where nothing was ever
        # written, and nothing remapped.
        self.assertEqual(self.extents(h, "base:allocation", 0, BLOCK), [(BLOCK, 0)])
        self.assertEqual(self.extents(h, "base:allocation", 56 << 20, 1 << 20),
                         [(1 << 20, STATE_HOLE_ZERO)])
        remapped = self.extents(h, "x-dmremap:remapped", 0, 24 << 20)
        self.assertEqual({flags for _, flags in remapped}, {0})
        self.assertEqual(sum(n for n, _ in remapped), 24 << 20)
        h.shutdown()
        self.assert_sessions(mark)

    @staticmethod
    def wait_all(h, cookies):
        pending = set(cookies)
        deadline = time.monotonic() + 60
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} requests never completed"
            # aio_command_completed raises if the request failed.
            pending = {c for c in pending if not h.aio_command_completed(c)}
            if pending:
                h.poll(1000)

    @staticmethod
    def extents(h, context, offset, length):
        """[(length, flags)] of `context` over the range, merged by flags."""
        runs = []

        def seen(metacontext, at, entries, err):
            if metacontext == context:
                for i in range(0, len(entries), 2):
                    if runs and runs[-1][1] == entries[i + 1]:
                        runs[-1] = (runs[-1][0] + entries[i], entries[i + 1])
                    else:
                        runs.append((entries[i], entries[i + 1]))
            return 0

        h.block_status(length, offset, seen)
        return runs

    def test_qemu_img_and_qemu_io(self):
        mark = self.mark()
        out = self.run_tool("qemu-img", "info", "--object", self.qemu_object(), "--image-opts",
                            f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
                            f"server.port={self.port},tls-creds=tls0")
        self.assertIn("virtual size: 64 MiB (67108864 bytes)", out)
        self.assert_sessions(mark)
        byte = 0x5A
        mark = self.mark()
        out = self.run_tool("qemu-io", "--object", self.qemu_object(), "--image-opts",
                            self.qemu_unix(), "-c", f"write -P {byte} 40M 2M",
                            "-c", f"read -P {byte} 40M 2M")
        self.assertIn("wrote 2097152/2097152 bytes at offset 41943040", out)
        self.assertIn("read 2097152/2097152 bytes at offset 41943040", out)
        self.assertNotIn("Pattern verification failed", out)
        self.assert_sessions(mark)
        # What qemu wrote, read by another client.
        h = self.tls_handle(psk=self.kind == "psk")
        h.connect_unix(self.s.sock)
        self.assertEqual(h.pread(2 << 20, 40 << 20), bytes([byte]) * (2 << 20))
        h.shutdown()

    def test_qemu_nbd_list(self):
        mark = self.mark()
        argv = ["qemu-nbd", "--list", "--object", self.qemu_object(), "--tls-creds", "tls0",
                "-k", self.s.sock]
        if self.kind == "x509":
            argv += ["--tls-hostname", "localhost"]
        out = self.run_tool(*argv)
        self.assertIn("exports available: 1", out)
        self.assertIn("size:  67108864", out)
        self.assertIn("base:allocation", out)
        self.assert_sessions(mark)


@unittest.skipUnless(SERVER, "dmremap-server only")
class Tls12X509Test(Interop, TlsServerCase):
    version, kind = "TLS1.2", "x509"


@unittest.skipUnless(SERVER, "dmremap-server only")
class Tls13X509Test(Interop, TlsServerCase):
    version, kind = "TLS1.3", "x509"


@unittest.skipUnless(SERVER, "dmremap-server only")
class Tls12PskTest(Interop, TlsServerCase):
    version, kind = "TLS1.2", "psk"


@unittest.skipUnless(SERVER, "dmremap-server only")
class Tls13PskTest(Interop, TlsServerCase):
    version, kind = "TLS1.3", "psk"


# ----------------------------------------------------- plaintext refused


@unittest.skipUnless(SERVER, "dmremap-server only")
class RequireTest(TlsServerCase):
    """--tls=require with certificates, on a Unix socket and TCP."""

    tcp = True

    @classmethod
    def server_params(cls):
        return ("tls=require", f"tls-certificates={CREDS.dir}")

    def addresses(self):
        return (("unix", self.s.sock), ("tcp", ("127.0.0.1", self.port)))

    def test_libnbd_without_tls_is_refused(self):
        for name, uri in (("unix", f"nbd+unix:///?socket={self.s.sock}"),
                          ("tcp", f"nbd://127.0.0.1:{self.port}/")):
            with self.subTest(name):
                mark = self.mark()
                h = nbd.NBD()
                with self.assertRaises(nbd.Error) as e:
                    h.connect_uri(uri)
                # libnbd names NBD_REP_ERR_TLS_REQD.
                self.assertIn("server requires TLS encryption first", str(e.exception))
                self.assertEqual(self.tls_sessions(mark), [])
        self.check_served(1)

    def test_every_option_before_starttls_is_tls_reqd(self):
        options = ((OPT_INFO, struct.pack(">IH", 0, 0)), (OPT_GO, struct.pack(">IH", 0, 0)),
                   (OPT_LIST, b""), (OPT_STRUCTURED, b""),
                   (OPT_LIST_META, meta_request([b"base:allocation"])),
                   (OPT_SET_META, meta_request([b"base:allocation"])),
                   (0x4242, b"unknown option"))
        for name, address in self.addresses():
            with self.subTest(name):
                c = self.raw(address)
                for opt, data in options:
                    c.option(opt, data)
                    got, rtype, _ = c.option_reply()
                    self.assertEqual((got, rtype), (opt, REP_ERR_TLS_REQD), hex(opt))
                # The same connection may still start TLS, and is then served.
                c.start_tls()
                size, _ = c.go()
                self.assertEqual(size, 64 << 20)
                c.request(CMD_READ, 0, BLOCK, cookie=5)
                self.assertEqual(struct.unpack(">IIQ", recv_exact(c.sock, 16)),
                                 (SIMPLE_MAGIC, 0, 5))
                self.assertEqual(len(recv_exact(c.sock, BLOCK)), BLOCK)

    def test_abort_before_starttls_is_acknowledged(self):
        for name, address in self.addresses():
            with self.subTest(name):
                c = self.raw(address)
                c.option(OPT_ABORT)
                self.assertEqual(c.option_reply(), (OPT_ABORT, REP_ACK, b""))
                self.assertTrue(closed_by_server(c.sock))

    def test_export_name_before_starttls_closes_the_connection(self):
        for name, address in self.addresses():
            with self.subTest(name):
                mark = self.mark()
                c = self.raw(address)
                c.option(OPT_EXPORT_NAME)
                # No reply at all: EXPORT_NAME has no error reply, and the
                # export's size must not leak.
                self.assertEqual(c.sock.recv(100), b"")
                self.wait_for_log(mark, "a client asked for the export without TLS, which this "
                                        "server requires: disconnecting it")
        self.check_served(2)


# --------------------------------------------------------- verify peer


@unittest.skipUnless(SERVER, "dmremap-server only")
class VerifyPeerTest(TlsServerCase):
    @classmethod
    def server_params(cls):
        return (f"tls-certificates={CREDS.dir}", "tls-verify-peer=1")

    def openssl_client(self, certificates, version):
        """A raw client that starts TLS with OpenSSL, which presents the
        certificate in `certificates` whoever issued it (GnuTLS clients offer
        only one the server's CA list names). True when it is served."""
        c = self.raw()
        c.option(OPT_STARTTLS)
        self.assertEqual(c.option_reply(), (OPT_STARTTLS, REP_ACK, b""))
        ctx = ssl.create_default_context(cafile=os.path.join(CREDS.dir, "ca-cert.pem"))
        ctx.minimum_version = ctx.maximum_version = version
        ctx.load_cert_chain(os.path.join(certificates, "client-cert.pem"),
                            os.path.join(certificates, "client-key.pem"))
        try:
            # In TLS 1.3 the client's side of the handshake ends before the
            # server has checked the client's certificate: the refusal comes
            # at the first read.
            c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
            c.option(OPT_LIST)
            return [t for t, _ in c.replies(OPT_LIST)] == [REP_SERVER, REP_ACK]
        except (ssl.SSLError, OSError, EOFError):
            return False

    def test_client_with_a_certificate_from_the_ca_is_served(self):
        mark = self.mark()
        self.check_served(3)
        out = subprocess.run(
            ["qemu-img", "info", "--object",
             f"tls-creds-x509,id=tls0,endpoint=client,dir={CREDS.qemu_x509}", "--image-opts",
             f"driver=nbd,server.type=unix,server.path={self.s.sock},tls-creds=tls0,"
             "tls-hostname=localhost"], capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            self.assertTrue(self.openssl_client(CREDS.dir, version), version)
        lines = self.tls_sessions(mark)
        self.assertEqual(len(lines), 4, self.log_since(mark))
        for line in lines:
            self.assertTrue(line.endswith(", client certificate verified"), line)
        self.assertTrue(session_kind(lines[2], "TLS1.2", "x509"), lines[2])
        self.assertTrue(session_kind(lines[3], "TLS1.3", "x509"), lines[3])

    def refused_libnbd(self, certificates):
        """libnbd with `certificates` is refused in the TLS handshake; what
        the server logged."""
        mark = self.mark()
        h = self.tls_handle(certificates)
        with self.assertRaises(nbd.Error):
            h.connect_unix(self.s.sock)
        text = self.wait_for_log(mark, HANDSHAKE_FAILED)
        self.assertEqual(TLS_LINE.findall(text), [])
        return text.split(HANDSHAKE_FAILED, 1)[1].splitlines()[0]

    def test_client_certificate_from_another_ca_is_refused(self):
        # libnbd does not offer it (the server asks for its CA's): refused
        # for want of a certificate.
        self.assertEqual(self.refused_libnbd(CREDS.rogue), "Certificate is required.")
        # OpenSSL offers it: refused by the verification.
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            with self.subTest(version):
                mark = self.mark()
                self.assertFalse(self.openssl_client(CREDS.rogue, version))
                text = self.wait_for_log(mark, HANDSHAKE_FAILED)
                self.assertIn(HANDSHAKE_FAILED + "Error in the certificate verification.", text)
                self.assertIn("The certificate issuer is unknown.", text)
                self.assertEqual(TLS_LINE.findall(text), [])
        self.check_served(4)

    def test_client_without_a_certificate_is_refused(self):
        self.assertEqual(self.refused_libnbd(CREDS.no_cert), "Certificate is required.")
        self.check_served(5)

    def test_tls_1_1_and_older_are_not_offered(self):
        # The NBD protocol: versions before 1.2 SHOULD NOT be on by default.
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            with self.subTest(version):
                c = self.raw()
                c.option(OPT_STARTTLS)
                self.assertEqual(c.option_reply(), (OPT_STARTTLS, REP_ACK, b""))
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL try
                ctx.minimum_version = ctx.maximum_version = version
                with self.assertRaises((ssl.SSLError, OSError)):
                    ctx.wrap_socket(c.sock, server_hostname="localhost")


class RevokedTest(TlsServerCase):
    """--tls-verify-peer with ca-crl.pem: a revoked client certificate is
    refused; a certificate the list does not name is served."""

    @classmethod
    def server_params(cls):
        d = os.path.join(WORK, "with-crl")
        os.makedirs(d, exist_ok=True)
        for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
            shutil.copy(os.path.join(CREDS.dir, name), d)
        # The revoked client: another certificate from the same CA.
        cls.revoked = os.path.join(WORK, "revoked")
        os.makedirs(cls.revoked, exist_ok=True)
        shutil.copy(os.path.join(CREDS.dir, "ca-cert.pem"), cls.revoked)
        CREDS._issue(CREDS.ca_dir, cls.revoked, "client", "revoked client", ["tls_www_client"])
        info = os.path.join(d, "crl.info")
        with open(info, "w") as f:
            f.write("crl_next_update = 30\ncrl_number = 1\n")
        subprocess.run(["certtool", "--generate-crl", "--load-ca-privkey",
                        os.path.join(CREDS.ca_dir, "ca-key.pem"), "--load-ca-certificate",
                        os.path.join(CREDS.dir, "ca-cert.pem"), "--load-certificate",
                        os.path.join(cls.revoked, "client-cert.pem"), "--template", info,
                        "--outfile", os.path.join(d, "ca-crl.pem")],
                       check=True, capture_output=True)
        return (f"tls-certificates={d}", "tls-verify-peer=1")

    def test_a_revoked_certificate_is_refused(self):
        mark = self.mark()
        h = self.tls_handle(self.revoked)
        with self.assertRaises(nbd.Error):
            h.connect_unix(self.s.sock)
            h.pread(BLOCK, 0)  # TLS 1.3: the refusal may come at the first read
        text = self.wait_for_log(mark, HANDSHAKE_FAILED)
        self.assertIn("revoked", text)
        self.assertEqual(TLS_LINE.findall(text), [])
        self.check_served(7)  # the CA's other client, not revoked


# ------------------------------------------------------ hostile clients


@unittest.skipUnless(SERVER, "dmremap-server only")
class HostileTest(TlsServerCase):
    """Raw clients against --tls=require with certificates."""

    tcp = True

    @classmethod
    def server_params(cls):
        return (f"tls-certificates={CREDS.dir}",)

    def test_plaintext_injected_after_starttls_is_discarded(self):
        # The attack of CVE-2021-3716: a man in the middle appends options to
        # the client's STARTTLS; a server that read them after the handshake
        # would answer them as if the client had sent them over TLS.
        injected = option_bytes(OPT_LIST) + option_bytes(OPT_GO, struct.pack(">IH", 0, 0))
        for name, address in (("unix", self.s.sock), ("tcp", ("127.0.0.1", self.port))):
            with self.subTest(name):
                mark = self.mark()
                c = self.raw(address)
                c.sock.sendall(option_bytes(OPT_STARTTLS) + injected)  # one write
                self.assertEqual(c.option_reply(), (OPT_STARTTLS, REP_ACK, b""))
                c.tls()
                c.option(OPT_INFO, struct.pack(">IH", 0, 0))
                # The very first reply is INFO's: neither LIST's nor GO's.
                replies = c.replies(OPT_INFO)
                self.assertEqual(replies[-1], (REP_ACK, b""))
                self.assertEqual({t for t, _ in replies[:-1]}, {REP_INFO})
                self.assertEqual(c.go()[0], 64 << 20)
                c.request(CMD_READ, 0, BLOCK, cookie=9)
                self.assertEqual(struct.unpack(">IIQ", recv_exact(c.sock, 16)),
                                 (SIMPLE_MAGIC, 0, 9))
                recv_exact(c.sock, BLOCK)
                text = self.wait_for_log(
                    mark, f"warning: a client sent {len(injected)} bytes after NBD_OPT_STARTTLS, "
                          "before the TLS handshake: discarded them")
                self.assertEqual(len(TLS_LINE.findall(text)), 1)

    def test_second_starttls_over_tls_is_invalid(self):
        c = self.raw()
        c.start_tls()
        c.option(OPT_STARTTLS)
        self.assertEqual(c.option_reply()[:2], (OPT_STARTTLS, REP_ERR_INVALID))
        # Still in step: served over the TLS it has.
        c.option(OPT_LIST)
        replies = c.replies(OPT_LIST)
        self.assertEqual([t for t, _ in replies], [REP_SERVER, REP_ACK])
        self.assertEqual(c.go()[0], 64 << 20)

    def test_starttls_with_data_is_invalid(self):
        c = self.raw()
        c.option(OPT_STARTTLS, b"x")
        self.assertEqual(c.option_reply()[:2], (OPT_STARTTLS, REP_ERR_INVALID))
        # TLS is still required, and a proper STARTTLS is still accepted.
        c.option(OPT_LIST)
        self.assertEqual(c.option_reply()[:2], (OPT_LIST, REP_ERR_TLS_REQD))
        c.start_tls()
        self.assertEqual(c.go()[0], 64 << 20)

    def test_garbage_instead_of_a_client_hello(self):
        garbage = {"zeros": bytes(64), "http": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
                   "bad record length": b"\x16\x03\x01\xff\xff" + b"\x01" * 100}
        for name, junk in garbage.items():
            with self.subTest(name):
                mark = self.mark()
                c = self.raw()
                c.option(OPT_STARTTLS)
                self.assertEqual(c.option_reply(), (OPT_STARTTLS, REP_ACK, b""))
                c.sock.sendall(junk)
                self.assertTrue(closed_by_server(c.sock))
                self.wait_for_log(mark, HANDSHAKE_FAILED)
                self.assertEqual(self.tls_sessions(mark), [])
        self.check_served(6)


@unittest.skipUnless(SERVER, "dmremap-server only")
class HandshakeTimeoutTest(TlsServerCase):
    """--handshake-timeout 1 covers the TLS handshake."""

    @classmethod
    def server_params(cls):
        return (f"tls-certificates={CREDS.dir}", "handshake-timeout=1")

    def stalls(self, send):
        mark = self.mark()
        start = time.monotonic()
        c = self.raw()
        c.option(OPT_STARTTLS)
        self.assertEqual(c.option_reply(), (OPT_STARTTLS, REP_ACK, b""))
        send(c.sock)
        self.assertTrue(closed_by_server(c.sock, timeout=10))
        self.assertLess(time.monotonic() - start, 5)
        text = self.wait_for_log(mark, STALLED)
        self.assertEqual(text.count(STALLED), 1)
        self.assertEqual(self.tls_sessions(mark), [])
        self.check_served(7)

    def test_half_a_client_hello_is_dropped(self):
        # A real ClientHello, from OpenSSL, cut in half.
        ctx = ssl.create_default_context(cafile=os.path.join(CREDS.dir, "ca-cert.pem"))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with self.assertRaises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        self.assertGreater(len(hello), 100)
        self.stalls(lambda sock: sock.sendall(hello[:len(hello) // 2]))

    def test_silence_after_the_starttls_ack_is_dropped(self):
        self.stalls(lambda sock: None)


@unittest.skipUnless(SERVER, "dmremap-server only")
class TlsOnTest(TlsServerCase):
    """--tls=on: TLS if the client asks."""

    @classmethod
    def server_params(cls):
        return ("tls=on", f"tls-certificates={CREDS.dir}")

    def test_plaintext_negotiation_is_forgotten_at_starttls(self):
        c = self.raw()
        c.option(OPT_STRUCTURED)
        self.assertEqual(c.option_reply(), (OPT_STRUCTURED, REP_ACK, b""))
        c.option(OPT_SET_META, meta_request([b"base:allocation"]))
        self.assertEqual([t for t, _ in c.replies(OPT_SET_META)], [REP_META_CONTEXT, REP_ACK])
        c.start_tls()
        _, flags = c.go()
        self.assertFalse(flags & SEND_DF, "DF is offered only with structured replies")
        c.request(CMD_READ, 0, BLOCK, cookie=11)
        self.assertEqual(struct.unpack(">IIQ", recv_exact(c.sock, 16)), (SIMPLE_MAGIC, 0, 11))
        recv_exact(c.sock, BLOCK)
        # No meta context either.
        c.request(CMD_BLOCK_STATUS, 0, BLOCK, cookie=12)
        self.assertEqual(struct.unpack(">IIQ", recv_exact(c.sock, 16)),
                         (SIMPLE_MAGIC, NBD_EINVAL, 12))
        # The same, negotiated after STARTTLS, holds.
        c = self.raw()
        c.start_tls()
        c.option(OPT_STRUCTURED)
        self.assertEqual(c.option_reply(), (OPT_STRUCTURED, REP_ACK, b""))
        _, flags = c.go()
        self.assertTrue(flags & SEND_DF)
        c.request(CMD_READ, 0, BLOCK, cookie=13)
        self.assertEqual(c.reply_magic(), STRUCTURED_MAGIC)

    def test_plaintext_and_tls_clients_are_both_served(self):
        mark = self.mark()
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={self.s.sock}")
        self.assertFalse(h.get_tls_negotiated())
        data = random.Random(8).randbytes(2 * BLOCK)
        h.pwrite(data, 5 << 20)
        h.flush()
        self.assertEqual(h.pread(len(data), 5 << 20), data)
        h.shutdown()
        self.assertEqual(self.tls_sessions(mark), [])
        self.check_served(9)
        self.assertEqual(len(self.tls_sessions(mark)), 1)


@unittest.skipUnless(SERVER, "dmremap-server only")
class TlsOffTest(TlsServerCase):
    """No TLS option: --tls=off."""

    def test_starttls_is_unsupported(self):
        c = self.raw()
        c.option(OPT_STARTTLS)
        self.assertEqual(c.option_reply()[:2], (OPT_STARTTLS, REP_ERR_UNSUP))
        self.assertEqual(c.go()[0], 64 << 20)
        # libnbd insisting on TLS is refused too.
        h = self.tls_handle()
        with self.assertRaises(nbd.Error):
            h.connect_unix(self.s.sock)


# ------------------------------------------------------------ start-up


@unittest.skipUnless(SERVER, "dmremap-server only")
class SocketActivationExampleTest(unittest.TestCase):
    """examples/dmremap-server-tls@.service's command line, as systemd runs
    it on the first connection to dmremap-server-tls@.socket: libnbd passes
    the listening socket (LISTEN_FDS) and connects over TLS with a client
    certificate; the server's --tls-verify-peer checks it."""

    def exec_start(self, main, spare):
        example = os.path.join(os.path.dirname(__file__), "..", "..", "examples",
                               "dmremap-server-tls@.service")
        with open(example) as f:
            line = next(l for l in f if l.startswith("ExecStart="))
        argv = line.split("=", 1)[1].split()
        self.assertEqual(argv[0], "/usr/local/bin/dmremap-server")
        subst = {"${MAIN}": main, "${SPARE}": spare, "/etc/pki/dmremap": CREDS.dir}
        return [TOOLS.server] + [subst.get(a, a) for a in argv[1:]]

    def test_the_example_serves_tls_clients_with_certificates_only(self):
        s = DemoSet(TOOLS)
        self.addCleanup(s.close)
        argv = self.exec_start(s.main, s.spare)
        self.assertIn("--tls-verify-peer", argv)
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(CREDS.dir)
        h.connect_systemd_socket_activation(argv)
        self.assertTrue(h.get_tls_negotiated())
        data = random.Random(5).randbytes(2 * BLOCK)
        h.pwrite(data, 8 * BLOCK)
        h.flush()
        self.assertEqual(h.pread(len(data), 8 * BLOCK), data)
        h.shutdown()
        # A client without a certificate is refused by the same command line.
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(CREDS.no_cert)
        # In TLS 1.3 the client is done with its handshake first: it reads the
        # server's fatal alert, or finds the connection closed when it sends.
        with self.assertRaisesRegex(nbd.Error, "TLS fatal alert|Error in the push function"):
            h.connect_systemd_socket_activation(argv)


class StartupErrorsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.s = DemoSet(TOOLS)

    @classmethod
    def tearDownClass(cls):
        cls.s.close()

    def run_server(self, *args):
        sock = os.path.join(self.s.dir, "startup.sock")
        r = subprocess.run([TOOLS.server, "--main", self.s.main, "--spare", self.s.spare,
                            "--unix", sock, *args], capture_output=True, text=True, timeout=30)
        # It stopped before listening, and left the set closed cleanly.
        self.assertFalse(os.path.exists(sock))
        self.assertTrue(self.s.status()["clean"])
        return r

    def test_missing_server_key(self):
        d = os.path.join(self.s.dir, "no-key")
        os.makedirs(d, exist_ok=True)
        for name in ("ca-cert.pem", "server-cert.pem"):
            shutil.copy(os.path.join(CREDS.dir, name), d)
        r = self.run_server("--tls-certificates", d)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn(f"cannot read the server's key {d}/server-key.pem", r.stderr)

    def test_psk_file_with_a_bad_line(self):
        path = os.path.join(self.s.dir, "bad.psk")
        with open(CREDS.psk_file) as f, open(path, "w") as out:
            out.write(f.read().rstrip("\n") + "\nbob:not-hex\n")
        r = self.run_server("--tls-psk", path)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn(f"{path} line 2 is not 'username:hexkey'", r.stderr)

    def test_bad_priority_string(self):
        r = self.run_server("--tls-certificates", CREDS.dir, "--tls-priority", "NORMAL:+BOGUS")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("--tls-priority 'NORMAL:+BOGUS'", r.stderr)

    def test_credentials_with_tls_off_are_bad_usage(self):
        for args in (("--tls=off", "--tls-psk", CREDS.psk_file),
                     ("--tls", "off", "--tls-certificates", CREDS.dir),
                     ("--tls-psk", CREDS.psk_file, "--tls-verify-peer"),
                     ("--tls-psk", CREDS.psk_file, "--tls-certificates", CREDS.dir),
                     # plaintext clients would still be served
                     ("--tls=on", "--tls-certificates", CREDS.dir, "--tls-verify-peer")):
            with self.subTest(args):
                r = self.run_server(*args)
                self.assertEqual(r.returncode, 2, r.stderr)


if __name__ == "__main__":
    unittest.main()
