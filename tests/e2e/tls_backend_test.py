"""Main and spare behind TLS: nbds+unix:// URIs to nbdkit --tls=require.

The spare on a networked store (qemu-nbd in front of Ceph RBD, nbdkit's
curl or S3 plugins) crosses a network; the URIs name their credentials as
libnbd reads them: tls-psk-file= (and the user before '@'), or
tls-certificates=. Run against both frontends, and nbdkit forked into the
background, where the backends connect after the fork.

- Data written through the set reaches main and the spare over TLS and
  reads back; remapped blocks live on a TLS spare.
- Main's server killed and started again (a network blip): requests fail
  with EIO meanwhile, then the set reconnects over TLS by itself, the same
  credentials, without a restart (reads rule 7 in docs/behaviour.md).
- A backend whose key does not match is refused at start, and the error
  names the device.
"""
import errno
import os
import subprocess
import unittest

import nbd

from nbd_harness import BLOCK, DemoSet, NbdkitBackend, Tools, pattern
from outage_test import wait_for_read
from tls_creds import PSK_USER, Credentials

TOOLS = Tools()


class TlsBackend(NbdkitBackend):
    """nbdkit --tls=require serving `path`, with PSK or X.509."""

    def __init__(self, workdir, name, path, creds, kind):
        self.creds, self.kind = creds, kind
        if kind == "psk":
            tls = [f"--tls-psk={creds.psk_file}"]
        else:
            tls = [f"--tls-certificates={creds.dir}"]
        super().__init__(workdir, name, ["--tls=require", *tls, "file", path])

    @property
    def uri(self):
        if self.kind == "psk":
            return (f"nbds+unix://{PSK_USER}@/?socket={self.sock}"
                    f"&tls-psk-file={self.creds.psk_file}")
        return f"nbds+unix:///?socket={self.sock}&tls-certificates={self.creds.dir}"


class TlsBackendTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import tempfile
        cls.tmp = tempfile.mkdtemp(prefix="dmremap-tls-")
        cls.creds = Credentials(cls.tmp)

    @classmethod
    def tearDownClass(cls):
        import shutil
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self):
        self.s = DemoSet(TOOLS, main_size=32 << 20, spare_size=16 << 20)
        self.addCleanup(self.s.close)

    def backend(self, name, path, kind):
        b = TlsBackend(self.s.dir, name, path, self.creds, kind)
        self.addCleanup(b.kill)
        return b

    def test_main_and_spare_over_tls_and_main_back_after_an_outage(self):
        main = self.backend("main", self.s.main, "psk")
        spare = self.backend("spare", self.s.spare, "x509")
        self.s.main, self.s.spare = main.uri, spare.uri
        # Writes to blocks 100-103 fail on main: they are remapped to the
        # spare, over TLS too.
        self.s.start("inject=write:100-103")
        h = self.s.connect()
        for b in range(0, 200, 3):
            h.pwrite(pattern(b), b * BLOCK)
        for b in range(100, 104):
            h.pwrite(pattern(1000 + b), b * BLOCK)
        h.flush()
        main.kill()
        with self.assertRaises(nbd.Error) as cm:
            h.pread(BLOCK, 0)
        self.assertEqual(cm.exception.errnum, errno.EIO)
        # Remapped blocks are on the spare, which is still there.
        self.assertEqual(h.pread(BLOCK, 101 * BLOCK), pattern(1101))
        main.start()
        self.assertEqual(wait_for_read(h, 0), pattern(0))
        for b in range(0, 200, 3):
            want = pattern(1000 + b) if 100 <= b < 104 else pattern(b)
            self.assertEqual(h.pread(BLOCK, b * BLOCK), want, f"block {b}")
        h.pwrite(pattern(7), 7 * BLOCK)
        h.flush()
        h.shutdown()
        self.assertEqual(self.s.stop(), 0)
        st = self.s.status()
        self.assertEqual((st["remaps"], st["pending"], st["clean"]), (4, 0, True), st)
        # What reached main's file went over TLS: it is there, byte for byte.
        with open(main.args[-1], "rb") as f:
            f.seek(7 * BLOCK)
            self.assertEqual(f.read(BLOCK), pattern(7))

    def test_a_backend_with_another_key_is_refused_by_name(self):
        wrong = os.path.join(self.s.dir, "wrong.psk")
        subprocess.run(["psktool", "-u", PSK_USER, "-p", wrong], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        main = self.backend("main", self.s.main, "psk")
        uri = main.uri.replace(self.creds.psk_file, wrong)
        r = self.s.cli("status", "--main", uri, "--spare", self.s.spare, check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("main (nbds+unix://", r.stderr)
        self.assertIn("gnutls", r.stderr.lower())


if __name__ == "__main__":
    unittest.main()
