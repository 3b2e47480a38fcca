"""Starts a dmremap frontend on scratch files and gives tests NBD handles.

DMREMAP_FRONTEND picks the frontend: "plugin" (nbdkit with dmremap.so, the
default) or "server" (dmremap-server). Every test is written once and runs
against both. DMREMAP_PLUGIN_MODE=background runs nbdkit as users do by
default: it forks into the background (no -f), logs to syslog, and is
stopped with SIGTERM through its pid file. Run with Debian's /usr/bin/python3, which has the libnbd
bindings (python3-libnbd).
"""
import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import nbd

BLOCK = 4096


class Tools:
    """Paths of the built binaries, from the environment ctest sets."""

    def __init__(self):
        self.plugin = os.environ["DMREMAP_PLUGIN"]
        self.cli = os.environ["DMREMAP_CLI"]
        self.server = os.environ.get("DMREMAP_SERVER", "")
        self.frontend = os.environ.get("DMREMAP_FRONTEND", "plugin")
        self.background = (self.frontend == "plugin"
                           and os.environ.get("DMREMAP_PLUGIN_MODE") == "background")


def _die_with_parent():
    # The server has no --exit-with-parent: ask the kernel (PR_SET_PDEATHSIG).
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


# nbdkit options that keep a backgrounded nbdkit writing to the test's log:
# by default its errors go to syslog once it has forked, and without -v its
# stderr is /dev/null.
KEEP_LOG = ("-v", "--log=stderr")


def frontend_command(tools, sock, main, spare, params=(), nbdkit_args=()):
    """The command that serves main+spare on `sock`. params are the plugin's
    key=value strings; for the server they become its options. nbdkit_args
    go to nbdkit itself (the plugin only)."""
    if tools.frontend == "server":
        cmd = [tools.server, "--unix", sock, "--main", main, "--spare", spare]
        for p in params:
            key, value = p.split("=", 1)
            if key in ("readonly", "direct", "verbose", "tls-verify-peer"):
                if value.lower() in ("1", "true", "yes", "on"):
                    cmd.append("--" + key)
            else:
                cmd += ["--" + key, value]
        return cmd
    if tools.background:
        # No -f: nbdkit forks, and its parent exits once the socket is ready.
        # The filter only makes sure it goes when the test does (it acts
        # when no client is connected).
        return ["nbdkit", *nbdkit_args, "-P", sock + ".pid", "--unix", sock,
                "--filter=exitwhen", tools.plugin, f"main={main}", f"spare={spare}", *params,
                f"exit-when-process-exits={os.getpid()}", "exit-when-poll=1"]
    return ["nbdkit", *nbdkit_args, "--foreground", "--exit-with-parent", "--unix", sock,
            tools.plugin, f"main={main}", f"spare={spare}", *params]


# What a sanitizer prints when it finds something.
SANITIZER_REPORTS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "WARNING: ThreadSanitizer")


def sanitizer_report(log):
    """The first line of a sanitizer's report in `log`, or None."""
    for line in log.splitlines():
        if any(mark in line for mark in SANITIZER_REPORTS):
            return line
    return None


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read())
    except (FileNotFoundError, ValueError):
        return None


def _stop_daemon(pid, timeout=30):
    """SIGTERM to a process that is not our child; 0 once it has gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"nbdkit (pid {pid}) did not stop on SIGTERM in {timeout} s")


def run_frontend(tools, sock, main, spare, params=(), timeout=30):
    """Runs a frontend that is expected to stop at once (bad configuration)."""
    r = subprocess.run(frontend_command(tools, sock, main, spare, params),
                       capture_output=True, text=True, timeout=timeout,
                       preexec_fn=_die_with_parent)
    found = sanitizer_report(r.stderr)
    if found:
        raise AssertionError(f"sanitizer report: {found}\n{r.stderr}")
    return r


def pattern(seed, length=BLOCK):
    """Deterministic bytes, different per seed."""
    out = bytearray(length)
    x = (seed * 0x9E3779B97F4A7C15 + 1) & 0xFFFFFFFFFFFFFFFF
    for i in range(0, length, 8):
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        out[i:i + 8] = x.to_bytes(8, "little")[: min(8, length - i)]
    return bytes(out)


class DemoSet:
    """A main file, a formatted spare, and an nbdkit serving them."""

    def __init__(self, tools, main_size=64 << 20, spare_size=16 << 20, extra_format=()):
        self.tools = tools
        self.dir = tempfile.mkdtemp(prefix="dmremap-e2e-")
        self.main = os.path.join(self.dir, "main.img")
        self.spare = os.path.join(self.dir, "spare.img")
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.log = os.path.join(self.dir, "nbdkit.log")
        for path, size in ((self.main, main_size), (self.spare, spare_size)):
            with open(path, "wb") as f:
                f.truncate(size)
        self.cli("format", "--main", self.main, "--spare", self.spare, *extra_format)
        self.proc = None

    def cli(self, *args, check=True):
        r = subprocess.run([self.tools.cli, *args], capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"dmremap {' '.join(args)} failed: {r.stderr}")
        return r

    def health_cli(self, *args):
        """`dmremap status` speaks the monitoring plugins' language: 0 ok, 1
        warning, 2 failing; 3 (unknown) is an error here."""
        r = self.cli("status", *args, "--json", check=False)
        if r.returncode not in (0, 1, 2):
            raise AssertionError(f"dmremap status {' '.join(args)} failed: {r.stderr}")
        j = json.loads(r.stdout)
        expected = {"ok": 0, "warning": 1, "failing": 2}[j["health"]]
        if r.returncode != expected and "main_problem" not in j:
            raise AssertionError(f"status exited {r.returncode} for health {j['health']}")
        return j

    def status(self):
        return self.health_cli("--spare", self.spare)

    @property
    def control(self):
        """The control socket, served when start() is given control_param()."""
        return os.path.join(self.dir, "control.sock")

    def control_param(self):
        return f"control={self.control}"

    def live_status(self):
        """`dmremap status --control`: what the running frontend reports."""
        return self.health_cli("--control", self.control)

    def listing(self):
        return json.loads(self.cli("list", "--spare", self.spare, "--json").stdout)

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def start(self, *params, nbdkit_args=()):
        """Starts the frontend; params are plugin-style key=value strings.
        nbdkit_args: see frontend_command."""
        self.stop()
        for stale in (self.sock, self.sock + ".pid"):
            if os.path.exists(stale):
                os.unlink(stale)
        self.logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            frontend_command(self.tools, self.sock, self.main, self.spare, params, nbdkit_args),
            stdout=self.logf, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        # An NBD spare that was not closed cleanly is watched for 8 s first
        # (the lease), through a scripted nbdkit in some tests, on a loaded
        # machine: give it time.
        deadline = time.monotonic() + 60
        if self.tools.background:
            # The parent returns once the daemon is ready, or fails.
            if self.proc.wait(timeout=20) != 0:
                raise AssertionError(f"nbdkit failed to start: {self.read_log()}")
            self.proc = None
            # The daemon writes its pid file after the parent has gone.
            while not read_pid(self.sock + ".pid"):
                if time.monotonic() > deadline:
                    raise AssertionError("nbdkit wrote no pid file")
                time.sleep(0.02)
            self.daemon_pid = read_pid(self.sock + ".pid")
        while not os.path.exists(self.sock):
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.tools.frontend} exited: {self.read_log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.tools.frontend} did not start")
            time.sleep(0.05)

    def connect(self, strict=True):
        h = nbd.NBD()
        if not strict:
            h.set_strict_mode(0)
        h.connect_uri(self.uri)
        return h

    def stop(self):
        """SIGTERM, as a service manager would; nbdkit finishes and cleans up.
        A sanitizer's report in the log, from this run or an earlier one that
        a test killed, fails the test."""
        code = None
        if getattr(self, "daemon_pid", None):
            code = _stop_daemon(self.daemon_pid)
            self.daemon_pid = None
            self.logf.close()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
            self.logf.close()
            code = self.proc.returncode
            self.proc = None
        if os.path.exists(self.log):
            found = sanitizer_report(self.read_log())
            if found:
                raise AssertionError(f"sanitizer report: {found}\n{self.read_log()}")
        return code

    def read_log(self):
        with open(self.log) as f:
            return f.read()

    def close(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class NbdkitBackend:
    """An nbdkit serving a device of the set (a failing main, a spare) on a
    Unix socket, so that dmremap reaches it through an NBD URI. start()
    again after kill() brings it back on the same socket."""

    def __init__(self, workdir, name, args):
        self.sock = os.path.join(workdir, name + ".sock")
        self.args = args
        self.proc = None
        self.start()

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(
            ["nbdkit", "--foreground", "--exit-with-parent", "--unix", self.sock, *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nbdkit {self.args} did not start")
            time.sleep(0.05)

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
