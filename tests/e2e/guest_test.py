"""A real Linux kernel on top of dmremap, with an ext4 filesystem on a
failing main.

The guest (see guest.py) is a Debian kernel in qemu. Main refuses writes to
every 97th block and fails the first two reads of every 211th, so mkfs and the
file writes are remapped as they go. Two ways in, as users run it:
- qemu -drive file=nbd:unix:...: the guest sees a virtio disk;
- nbd-client inside the guest with two connections (multi-conn), reaching the
  host's socket through qemu's restricted user network.
Each case: boot 1 makes ext4, writes a tree of files with known SHA-256 sums,
syncs, unmounts, checks with e2fsck -f, remounts and verifies every sum. Then
the frontend is stopped, `dmremap status` must show the remaps with nothing
pending, and the frontend is started again. Boot 2 (a fresh kernel, so no
page cache) checks the filesystem and every sum again.
"""
import hashlib
import os
import random
import unittest

from guest import FORWARD_ADDR, FORWARD_PORT, Guest, tools_present
from nbd_harness import DemoSet, Tools

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


if __name__ == "__main__":
    unittest.main()
