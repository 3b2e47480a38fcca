"""A real Linux kernel on top of dmremap, with an ext4 filesystem on a
failing main.

The guest (see guest.py) is a Debian kernel in qemu. Main refuses writes to
every 97th block and fails the first two reads of every 211th, so mkfs and the
file writes are remapped as they go. Two ways in, as users run it:
- qemu -drive file=nbd:unix:...: the guest sees a virtio disk;
- nbd-client inside the guest with two connections (multi-conn), reaching the
  host's socket through qemu's restricted user network; and the same over
  TLS, with a client certificate.
The evacuation case copies the disk onto NEW (`dmremap evacuate`) while the
guest makes and fills its filesystem, then serves NEW alone and checks it.
Each other case: boot 1 makes ext4, writes a tree of files with known SHA-256 sums,
syncs, unmounts, checks with e2fsck -f, remounts and verifies every sum. Then
the frontend is stopped, `dmremap status` must show the remaps with nothing
pending, and the frontend is started again. Boot 2 (a fresh kernel, so no
page cache) checks the filesystem and every sum again.
"""
import hashlib
import json
import os
import random
import subprocess
import time
import unittest

from guest import FORWARD_ADDR, FORWARD_PORT, Guest, tools_present
from nbd_harness import DemoSet, Tools
from tls_creds import Credentials

TOOLS = Tools()
MAIN_SIZE = 128 << 20
FAULTS = "inject=write:64-32767/97,weak:70-32767/211x2"

# Shell functions shared by both boots and both ways in; $DEV is the disk.
FS_CHECKS = r"""
check_fs() {
  echo 3 > /proc/sys/vm/drop_caches
  /sbin/e2fsck -f -n "$DEV"
  mount -t ext4 "$DEV" /mnt
  (cd /mnt/tree && sha256sum -c -s /manifest.sha256)
  echo "guest: $(wc -l < /manifest.sha256) files verify on $DEV"
  umount /mnt
}
"""

WRITE_FS = r"""
/sbin/mke2fs -q -F -t ext4 -b 4096 -E nodiscard "$DEV"
mount -t ext4 "$DEV" /mnt
mkdir /mnt/tree
cp -a /payload/. /mnt/tree/
sync
umount /mnt
echo "guest: tree written to $DEV"
check_fs
"""

NBD_CLIENT_UP = rf"""
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
/sbin/nbd-client {FORWARD_ADDR} {FORWARD_PORT} /dev/nbd0 -N '' -b 4096 -C 2
DEV=/dev/nbd0
echo "guest: $DEV attached, $(cat /sys/block/nbd0/size) sectors"
"""

# The same over TLS (Debian's nbd-client has it: -x, GnuTLS), with a client
# certificate the server checks: nbd-client stays in the guest as the
# kernel's encrypting proxy. (Its -F is not parsed in 3.24: -certfile is.)
NBD_CLIENT_TLS_UP = NBD_CLIENT_UP.replace(
    "-b 4096 -C 2",
    "-b 4096 -C 2 -x -A /ca-cert.pem -certfile /client-cert.pem -K /client-key.pem "
    "-H localhost")

NBD_CLIENT_DOWN = r"""
/sbin/nbd-client -d /dev/nbd0
echo "guest: $DEV detached"
"""


def make_payload(directory, seed=6):
    """A tree of files of mixed sizes (empty to 3 MiB, some compressible);
    returns the sha256sum manifest."""
    rng = random.Random(seed)
    lines = []
    sizes = [0, 1, 511, 4096, 4097, 65536, 3 << 20] + [rng.randrange(1, 1 << 20) for _ in range(40)]
    for i, size in enumerate(sizes):
        rel = os.path.join(f"d{i % 5}", f"sub{i % 3}", f"f{i:03d}.bin")
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        body = rng.randbytes(size) if i % 4 else bytes([i & 0xFF]) * size
        with open(path, "wb") as f:
            f.write(body)
        lines.append(f"{hashlib.sha256(body).hexdigest()}  ./{rel}\n")
    return "".join(lines).encode()


class GuestKernelTest(unittest.TestCase):
    def setUp(self):
        # Not a skip: scripts/setup-deps installs all of it, and a test that
        # skips itself in CI proves nothing.
        why_not = tools_present()
        if why_not:
            self.fail(f"cannot build the guest: {why_not} (run scripts/setup-deps)")
        self.s = DemoSet(TOOLS, main_size=MAIN_SIZE, spare_size=32 << 20)
        self.addCleanup(self.s.close)
        payload = os.path.join(self.s.dir, "payload")
        self.manifest = make_payload(payload)
        self.trees = {"payload": payload}
        self.guest = Guest(self.s.dir, programs=["mke2fs", "e2fsck", "nbd-client"])

    def boot(self, name, body, **where):
        log = self.guest.boot(FS_CHECKS + body, name, files={"manifest.sha256": self.manifest},
                              trees=self.trees, **where)
        # The guest's kernel logs errors (loglevel 4): none may come from the disk or ext4.
        self.assertNotRegex(log, r"I/O error|EXT4-fs error|blk_update_request|Buffer I/O")
        conns = self.guest.last_connections
        print(f"\n[{TOOLS.frontend}] {name}: guest passed in {self.guest.last_seconds:.1f} s"
              + (f", {conns} NBD connection(s) from the guest" if conns is not None else ""))
        for line in log.splitlines():
            if line.startswith("guest:"):
                print("  " + line)
        return log

    def restart_and_check_status(self):
        self.assertEqual(self.s.stop(), 0, self.s.read_log())
        st = self.s.status()
        causes = st["remaps_by_cause"]
        print(f"  dmremap status: {st['remaps']} remaps {causes}, pending {st['pending']}, "
              f"health {st['health']}")
        self.assertGreater(causes["write-error"], 10)
        self.assertGreater(causes["rescue"], 0)
        self.assertEqual(st["pending"], 0)
        self.assertEqual(st["health"], "ok")
        self.s.start(FAULTS)
        return st

    def test_qemu_drive_nbd(self):
        self.s.start(FAULTS)
        where = {"drive_socket": self.s.sock}
        self.boot("drive-write", "DEV=/dev/vda\n" + WRITE_FS, **where)
        first = self.restart_and_check_status()
        self.boot("drive-verify", "DEV=/dev/vda\ncheck_fs\n", **where)
        second = self.restart_and_check_status()
        self.assertGreaterEqual(second["remaps"], first["remaps"])

    def test_nbd_client_in_guest(self):
        self.s.start(FAULTS)
        where = {"forward_socket": self.s.sock}
        self.boot("nbd-client-write", NBD_CLIENT_UP + WRITE_FS + NBD_CLIENT_DOWN, **where)
        # -C 2 really opened two connections: multi-conn is in use.
        self.assertEqual(self.guest.last_connections, 2)
        first = self.restart_and_check_status()
        self.boot("nbd-client-verify", NBD_CLIENT_UP + "check_fs\n" + NBD_CLIENT_DOWN, **where)
        second = self.restart_and_check_status()
        self.assertGreaterEqual(second["remaps"], first["remaps"])

    def test_nbd_client_over_tls_in_guest(self):
        """nbd-client in the guest over TLS, its certificate checked by the
        server (dmremap-server's --tls-verify-peer, or nbdkit's for the
        plugin): ext4 is made, filled and verified through the guest's
        encrypting proxy while main fails under it."""
        creds = Credentials(self.s.dir)
        if TOOLS.frontend == "server":
            self.s.start(FAULTS, f"tls-certificates={creds.dir}", "tls-verify-peer=1", "verbose=1")
        else:
            self.s.start(FAULTS, nbdkit_args=["--tls=require", f"--tls-certificates={creds.dir}",
                                              "--tls-verify-peer"])
        files = {"manifest.sha256": self.manifest}
        for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
            with open(os.path.join(creds.dir, name), "rb") as f:
                files[name] = f.read()
        log = self.guest.boot(FS_CHECKS + NBD_CLIENT_TLS_UP + WRITE_FS + NBD_CLIENT_DOWN,
                              "nbd-client-tls", files=files, trees=self.trees,
                              forward_socket=self.s.sock)
        self.assertNotRegex(log, r"I/O error|EXT4-fs error|blk_update_request|Buffer I/O")
        self.assertIn("files verify on /dev/nbd0", log)
        self.assertEqual(self.guest.last_connections, 2)
        print(f"\n[{TOOLS.frontend}] nbd-client over TLS: guest passed in "
              f"{self.guest.last_seconds:.1f} s")
        if TOOLS.frontend == "server":
            sessions = [line for line in self.s.read_log().splitlines()
                        if "a client is on TLS" in line]
            self.assertEqual(len(sessions), 2, self.s.read_log()[-3000:])
            self.assertTrue(all("client certificate verified" in line for line in sessions))
        self.assertEqual(self.s.stop(), 0, self.s.read_log())
        st = self.s.status()
        self.assertGreater(st["remaps_by_cause"]["write-error"], 10)
        self.assertEqual((st["pending"], st["health"]), (0, "ok"), st)

    def test_evacuate_ext4_in_use(self):
        """The disk is evacuated while the guest makes ext4 on it and writes
        its files (every write then goes to NEW too); once NEW is in sync the
        frontend stops, the evacuation ends as finished, and NEW alone, served
        by nbdkit's file plugin, passes e2fsck and holds every file."""
        self.s.start(FAULTS, self.s.control_param())
        new = os.path.join(self.s.dir, "new.img")
        with open(new, "wb") as f:
            f.truncate(MAIN_SIZE)
        # Slow enough that the copy is under way while the guest writes
        # (128 MiB at 2 MiB/s: about a minute); once the guest is done, the
        # rest goes at full speed (--rate 0 below).
        r = self.s.cli("evacuate", "--control", self.s.control, "--to", new, "--rate", "2M",
                       "--detach")
        self.assertIn("evacuate running", r.stdout)
        where = {"drive_socket": self.s.sock}
        busy = WRITE_FS + r"""
mount -t ext4 "$DEV" /mnt
mkdir /mnt/tree2
cp -a /payload/. /mnt/tree2/
rm -rf /mnt/tree2/d1
sync
umount /mnt
check_fs
"""
        self.boot("evacuate-write", "DEV=/dev/vda\n" + busy, **where)
        mid = json.loads(self.s.cli("evacuate", "--control", self.s.control, "--status",
                                    "--json", check=False).stdout)
        self.assertGreater(mid["mirrored"], 0, "no guest write reached NEW")
        follow = subprocess.run(
            [TOOLS.cli, "evacuate", "--control", self.s.control, "--rate", "0",
             "--report", os.path.join(self.s.dir, "report.txt"),
             "--mapfile", os.path.join(self.s.dir, "lost.map"), "--verify"],
            capture_output=True, text=True, timeout=600, cwd=self.s.dir)
        self.assertEqual(follow.returncode, 0, follow.stdout + follow.stderr)
        self.assertIn("0 block(s) lost", follow.stderr)
        self.assertIn("verified:", follow.stderr)
        self.assertEqual(self.s.stop(), 0, self.s.read_log())
        done = json.loads(self.s.cli("evacuate", "--main", self.s.main, "--spare", self.s.spare,
                                     "--status", "--json", check=False).stdout)
        self.assertEqual(done["state"], "finished")
        # NEW alone: e2fsck on the host, then the guest reads every file.
        fsck = subprocess.run(["/sbin/e2fsck", "-f", "-n", new], capture_output=True, text=True)
        self.assertEqual(fsck.returncode, 0, fsck.stdout + fsck.stderr)
        sock = os.path.join(self.s.dir, "new.sock")
        nbdkit = subprocess.Popen(["nbdkit", "-f", "-U", sock, "file", new],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(nbdkit.wait, 10)
        self.addCleanup(nbdkit.terminate)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.boot("evacuate-new", "DEV=/dev/vda\n"
                  "/sbin/e2fsck -f -n $DEV\nmount -t ext4 -o ro $DEV /mnt\n"
                  "(cd /mnt/tree && sha256sum -c -s /manifest.sha256)\n"
                  "(cd /mnt/tree2 && grep -v ' ./d1/' /manifest.sha256 | sha256sum -c -s)\n"
                  "echo \"guest: every file verifies on NEW\"\numount /mnt\n",
                  drive_socket=sock)


if __name__ == "__main__":
    unittest.main()
