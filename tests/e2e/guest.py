"""A small Linux guest under qemu-system-x86_64, for tests that need a real
kernel as the NBD client.

The guest is built at test time from the host's Debian packages: the kernel
and its modules (linux-image-amd64), busybox-static for the shell and the
small tools, and any dynamically linked program the test asks for (mke2fs,
e2fsck, nbd-client) together with the libraries ldd names. They go into an
initramfs written here (cpio "newc"), with a test script and any files. The
guest runs the script as its init, prints a verdict line on the serial
console and powers off.

No network leaves the machine. A disk served over NBD reaches the guest as
a virtio disk through qemu's own NBD client (-drive file=nbd:unix:...). For
a client inside the guest, qemu's user network is restricted (restrict=on)
and has one guest-forward: a TCP connection to FORWARD_ADDR:FORWARD_PORT in
the guest runs socat on the host, which connects to the host's Unix socket.
"""
import glob
import os
import re
import shlex
import shutil
import stat
import subprocess
import time

FORWARD_ADDR = "10.0.2.100"
FORWARD_PORT = 10809
VERDICT = "DMREMAP-GUEST-VERDICT"

# Modules the tests load, in dependency order after modules.dep is applied.
DEFAULT_MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "nbd", "crc32c_generic", "ext4"]

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
ln -s /proc/mounts /etc/mtab
for m in $(cat /etc/modules.order); do
  insmod "$m" || echo "guest: insmod $m failed"
done
echo "guest: kernel $(uname -r), $(nproc) cpu(s); running the test script"
sh -e /test.sh
rc=$?
sync
echo "@VERDICT@ rc=$rc"
reboot -f

Busybox's shell runs its own applets before anything on PATH, so a test
script calls the programs it asked for by their full path, /sbin/NAME.
"""

# /bin/load-module NAME [PARAM=VALUE...]: loads an extra module after what it
# depends on (each line of /etc/modules.extra is a name, then the module files
# in load order, the module itself last).
LOAD_MODULE = r"""#!/bin/busybox sh
name=$(echo "$1" | tr - _)
shift
paths=$(sed -n "s|^$name ||p" /etc/modules.extra)
if [ -z "$paths" ]; then
  echo "load-module: $name is not in the initramfs (Guest(extra_modules=...))" >&2
  exit 1
fi
last=${paths##* }
for p in $paths; do
  [ "$p" = "$last" ] && break
  m=$(basename "$p"); m=$(echo "${m%%.ko*}" | tr - _)
  [ -d "/sys/module/$m" ] || insmod "$p" || exit 1
done
insmod "$last" "$@"
"""


class GuestError(AssertionError):
    pass


def find_kernel():
    """The newest installed kernel that has its modules, or DMREMAP_GUEST_KERNEL."""
    forced = os.environ.get("DMREMAP_GUEST_KERNEL")
    candidates = [forced] if forced else sorted(glob.glob("/boot/vmlinuz-*"), reverse=True)
    for path in candidates:
        release = os.path.basename(path)[len("vmlinuz-"):]
        if os.path.isdir(f"/lib/modules/{release}"):
            return path, release
    raise GuestError("no kernel with modules in /boot (install linux-image-amd64)")


def tools_present():
    """Why the guest cannot be built here, or None."""
    for tool in ("qemu-system-x86_64", "socat"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not os.path.exists("/bin/busybox"):
        return "/bin/busybox is missing (busybox-static)"
    try:
        find_kernel()
    except GuestError as e:
        return str(e)
    return None


def _module_order(release, names):
    """Module files (relative to /lib/modules/RELEASE) for names and their
    dependencies, dependencies first."""
    base = f"/lib/modules/{release}"
    deps = {}
    by_name = {}
    with open(os.path.join(base, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
            name = re.sub(r"\.ko(\.[a-z]+)?$", "", os.path.basename(path)).replace("-", "_")
            by_name[name] = path
    order = []

    def visit(path):
        if path in order:
            return
        for d in deps.get(path, []):
            visit(d)
        order.append(path)

    for name in names:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            continue  # built into this kernel
        visit(path)
    return order


def _libraries(binary):
    """Absolute paths of the shared libraries binary needs, with its loader."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


class Cpio:
    """A newc cpio archive, the format the kernel unpacks as its initramfs."""

    def __init__(self):
        self.data = bytearray()
        self.ino = 1
        self.seen = set()

    def _entry(self, name, mode, body=b""):
        name = name.lstrip("/")
        if name in self.seen:
            return
        self.seen.add(name)
        fields = [self.ino, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name) + 1, 0]
        self.ino += 1
        header = "070701" + "".join(f"{v:08x}" for v in fields)
        self.data += header.encode() + name.encode() + b"\0"
        self.data += b"\0" * (-len(self.data) % 4)
        self.data += body
        self.data += b"\0" * (-len(self.data) % 4)

    def directory(self, name):
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name, body, mode=0o644):
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.directory(parent)
        self._entry(name, stat.S_IFREG | mode, body)

    def host_file(self, host_path, name=None, mode=None):
        with open(host_path, "rb") as f:
            body = f.read()
        if mode is None:
            mode = os.stat(host_path).st_mode & 0o777
        self.file(name or host_path, body, mode)

    def tree(self, host_dir, name):
        for root, dirs, files in os.walk(host_dir):
            rel = os.path.relpath(root, host_dir)
            target = name if rel == "." else os.path.join(name, rel)
            self.directory(target)
            for d in sorted(dirs):
                self.directory(os.path.join(target, d))
            for fn in sorted(files):
                self.host_file(os.path.join(root, fn), os.path.join(target, fn))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)


class Guest:
    """Builds an initramfs around a test script and boots it."""

    def __init__(self, workdir, programs=(), modules=DEFAULT_MODULES, memory_mib=512,
                 extra_modules=()):
        self.workdir = workdir
        self.kernel, self.release = find_kernel()
        self.programs = list(programs)
        self.modules = list(modules)
        self.extra_modules = list(extra_modules)
        self.memory_mib = memory_mib

    def build(self, script, files=None, trees=None):
        """Writes the initramfs; files maps guest path to bytes, trees maps
        guest path to a host directory. Returns its path."""
        a = Cpio()
        for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "mnt", "tmp", "lib64"):
            a.directory(d)
        a.host_file("/bin/busybox", "bin/busybox", 0o755)
        for prog in self.programs:
            path = shutil.which(prog) or prog
            if not os.path.exists(path):
                raise GuestError(f"{prog} is not installed")
            a.host_file(path, "sbin/" + os.path.basename(path), 0o755)
            for lib in _libraries(path):
                a.host_file(os.path.realpath(lib), lib, 0o755)
        if os.path.exists("/etc/mke2fs.conf"):
            a.host_file("/etc/mke2fs.conf", "etc/mke2fs.conf")
        order = []
        for rel in _module_order(self.release, self.modules):
            guest_path = f"/lib/modules/{self.release}/{rel}"
            a.host_file(f"/lib/modules/{self.release}/{rel}", guest_path)
            order.append(guest_path)
        a.file("etc/modules.order", ("\n".join(order) + "\n").encode())
        extra = []
        for name in self.extra_modules:
            needed = _module_order(self.release, [name])
            if not needed:
                raise GuestError(f"module {name} is not in /lib/modules/{self.release}")
            paths = []
            for rel in needed:
                guest_path = f"/lib/modules/{self.release}/{rel}"
                a.host_file(f"/lib/modules/{self.release}/{rel}", guest_path)
                paths.append(guest_path)
            extra.append(" ".join([name.replace("-", "_"), *paths]))
        a.file("etc/modules.extra", ("\n".join(extra) + "\n").encode())
        a.file("bin/load-module", LOAD_MODULE.encode(), 0o755)
        a.file("init", INIT.replace("@VERDICT@", VERDICT).encode(), 0o755)
        a.file("test.sh", script.encode(), 0o755)
        for path, body in (files or {}).items():
            a.file(path, body)
        for path, host_dir in (trees or {}).items():
            a.tree(host_dir, path)
        out = os.path.join(self.workdir, "initramfs.cpio")
        with open(out, "wb") as f:
            f.write(a.finish())
        return out

    @staticmethod
    def accelerator():
        """Software emulation (tcg) unless DMREMAP_GUEST_ACCEL says otherwise.
        /dev/kvm is not trusted on its own: on nested machines it can exist
        and still hang or abort the guest."""
        accel = os.environ.get("DMREMAP_GUEST_ACCEL", "tcg")
        return ["-accel", accel, "-cpu", "max" if accel == "tcg" else "host"]

    def boot(self, script, name, drive_socket=None, forward_socket=None,
             files=None, trees=None, timeout=300):
        """Boots the guest with script as its test. drive_socket: an NBD Unix
        socket seen by the guest as /dev/vda. forward_socket: an NBD Unix
        socket the guest reaches at FORWARD_ADDR:FORWARD_PORT. Returns the
        console log; raises GuestError unless the script exited 0."""
        initrd = self.build(script, files, trees)
        log = os.path.join(self.workdir, f"{name}.console.log")
        cmd = ["qemu-system-x86_64", *self.accelerator(), "-m", str(self.memory_mib),
               "-smp", "2", "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
               "-serial", f"file:{log}", "-kernel", self.kernel, "-initrd", initrd,
               "-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"]
        if drive_socket:
            # werror/rerror=report: the guest sees every error. qemu's default
            # pauses the VM on ENOSPC (a full spare), which here would only
            # look like a hang.
            cmd += ["-drive", f"file=nbd:unix:{drive_socket},format=raw,if=virtio,cache=none,"
                              "werror=report,rerror=report"]
        if forward_socket:
            if "," in forward_socket + self.workdir:
                raise GuestError("the forwarded socket and work directory must not contain a comma")
            # qemu runs the relay once per guest connection. It splits the
            # command into words itself (no shell), hence the explicit sh -c.
            # Each run adds a line to the count file.
            count = os.path.join(self.workdir, f"{name}.connections")
            open(count, "w").close()
            relay = "sh -c " + shlex.quote(
                f"echo >>{shlex.quote(count)}; "
                f"exec socat STDIO UNIX-CONNECT:{shlex.quote(forward_socket)}")
            cmd += ["-netdev", f"user,id=n0,restrict=on,"
                               f"guestfwd=tcp:{FORWARD_ADDR}:{FORWARD_PORT}-cmd:{relay}",
                    "-device", "virtio-net-pci,netdev=n0"]
        else:
            cmd += ["-nic", "none"]
        started = time.monotonic()
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"guest {name} did not finish in {timeout} s:\n{_tail(log)}")
        self.last_seconds = time.monotonic() - started
        self.last_connections = None
        if forward_socket:
            with open(count) as f:
                self.last_connections = len(f.readlines())
        text = _read(log)
        m = re.search(VERDICT + r" rc=(\d+)", text)
        if r.returncode != 0 or m is None or m.group(1) != "0":
            raise GuestError(f"guest {name} failed (qemu exit {r.returncode}, "
                             f"verdict {m.group(0) if m else 'none'}):\n{r.stderr}\n{_tail(log)}")
        return text


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _tail(path, lines=60):
    return "\n".join(_read(path).splitlines()[-lines:])
