"""A failing-disk lab on a real Linux kernel: dmremap-server runs inside the
guest (see guest.py) on kernel block devices that the kernel's own fault
emulators break.

- scsi_debug gives a SCSI disk (/dev/sda) whose chosen sectors fail reads
  with a MEDIUM ERROR, which can answer slowly, and which can be deleted
  and found again by a host rescan, as a disk that drops off the bus.
- device-mapper (dm-linear, the error target, dm-flakey) puts ranges that
  fail reads and writes, and outages of the whole device, over that disk.
- The spares are brd ramdisks; the client is the kernel's NBD client
  (nbd-client on the server's Unix socket) driven with busybox dd and
  direct I/O, so every request reaches the server.

One boot runs every scenario. The guest script only records what happened
(lines "LAB <scenario> <fact>" and dumps of `dmremap status`/`list` and the
server's log); the assertions are made here, one test per scenario, so each
can fail on its own:
1. medium errors become pending blocks, a sector that fails a bounded number
   of times is rescued, and neighbours are untouched;
2. a dm-flakey outage under a writing client leaves nothing pending or
   remapped, and all data intact;
3. a deleted and re-added scsi_debug disk: "main offline", then back online
   without a restart (main named /dev/sda, and by a /dev/disk/by-id link);
   and a disk deleted and re-added between two requests;
4. a write error from the dm error target becomes a remap and the data reads
   back, with --direct and with the server's default I/O mode.
"""
import json
import os
import re
import shutil
import tempfile
import time
import unittest

from guest import Guest, GuestError, tools_present
from nbd_harness import Tools, sanitizer_report

BLOCK = 4096
BOOT_TIMEOUT = 240

# The guest's test script. busybox sh; it must run to its end whatever
# happens, so that every scenario reports.
SCRIPT = r"""
set +e
export DM_DISABLE_UDEV=1
dmesg -n 1
SD=/sys/bus/pseudo/drivers/scsi_debug
SP=/sys/module/scsi_debug/parameters
BS=4096
NBD_NEXT=0
mkdir -p /data

fact() { echo "LAB $SCEN $*"; }
dump() { echo "LAB-FILE-BEGIN $SCEN $1"; cat "$2"; echo; echo "LAB-FILE-END"; }
now() { cut -d' ' -f1 /proc/uptime; }
ERR=/tmp/err  # each process that runs dd at the same time has its own
ddmsg() { grep -m1 '^dd:' $ERR | sed 's/^dd: [^:]*: //'; }

# mkdata B: fresh random bytes for block B of this scenario.
mkdata() { dd if=/dev/urandom of=/data/$SCEN.$1 bs=$BS count=1 2>/dev/null; }
# wr B: writes the block's data; rd B: reads it into /tmp/rd.
wr() { timeout 90 dd if=/data/$SCEN.$1 of=$NBD bs=$BS seek=$1 count=1 oflag=direct conv=notrunc 2>$ERR >/dev/null; }
rd() { timeout 90 dd if=$NBD of=/tmp/rd bs=$BS skip=$1 count=1 iflag=direct 2>$ERR >/dev/null; }
# check B: "ok", "differs" or "error <message>".
check() {
  if rd $1; then
    if cmp -s /tmp/rd /data/$SCEN.$1; then echo ok; else echo differs; fi
  else
    echo "error $(ddmsg)"
  fi
}
written() { if wr $1; then echo ok; else echo "error $(ddmsg)"; fi; }

# serve MAIN SPARE [server options]: dmremap-server in the background, and
# the next /dev/nbdN attached to it.
serve() {
  main=$1; spare=$2; shift 2
  rm -f /tmp/$SCEN.sock
  /sbin/dmremap-server --main $main --spare $spare --unix /tmp/$SCEN.sock "$@" >>/tmp/$SCEN.log 2>&1 &
  SERVER=$!
  n=0
  while [ ! -S /tmp/$SCEN.sock ]; do
    if ! kill -0 $SERVER 2>/dev/null || [ $n -gt 300 ]; then
      fact "setup-error dmremap-server did not start"; dump server-log /tmp/$SCEN.log; return 1
    fi
    sleep 0.1; n=$((n+1))
  done
  NBD=/dev/nbd$NBD_NEXT; NBD_NEXT=$((NBD_NEXT+1))
  if ! /sbin/nbd-client -unix /tmp/$SCEN.sock $NBD -N '' -b $BS -t 60 >/tmp/nbd.out 2>&1; then
    fact "setup-error nbd-client: $(tail -1 /tmp/nbd.out)"; return 1
  fi
}
unserve() {
  /sbin/nbd-client -d $NBD >/dev/null 2>&1
  kill $SERVER 2>/dev/null
  wait $SERVER
  fact "server-exit $?"
}
report() { # SPARE: status and list after the server stopped, and its log
  /sbin/dmremap status --spare $1 --json >/tmp/st 2>&1; dump status /tmp/st
  /sbin/dmremap list --spare $1 --json >/tmp/st 2>&1; dump list /tmp/st
  dump server-log /tmp/$SCEN.log
}
format() {
  if ! /sbin/dmremap format --main $1 --spare $2 >/tmp/fmt 2>&1; then
    fact "setup-error format: $(cat /tmp/fmt)"; return 1
  fi
}
# disk_with_wwid W: the sdX whose WWID is W, or nothing.
disk_with_wwid() {
  for d in /sys/block/sd*; do
    [ -e "$d/device/wwid" ] && [ "$(cat $d/device/wwid)" = "$1" ] && basename $d
  done
}

SCEN=setup
load-module scsi_debug dev_size_mb=32 opts=0 || fact "setup-error scsi_debug did not load"
load-module brd rd_nr=7 rd_size=8192 || fact "setup-error brd did not load"
n=0; while [ ! -b /dev/sda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
WWID=$(cat /sys/block/sda/device/wwid)
HOST=$(ls /sys/class/scsi_host | head -1)
SECTORS=$(cat /sys/block/sda/size)
fact "disk sda sectors $SECTORS wwid $WWID host $HOST"
fact "serial $(tail -c +5 /sys/block/sda/device/vpd_pg80 | tr -cd '[:print:]')" \
  "vpd $(cd /sys/block/sda/device && echo vpd_*)"

########## 1. medium errors: pending blocks, a rescue, neighbours intact
SCEN=medium
if format /dev/sda /dev/ram0 && serve /dev/sda /dev/ram0 --direct; then
  for b in 98 99 100 101 102 196 197 198 199 200 201 202 203 204 205 300; do
    mkdata $b; wr $b || fact "setup-error write $b: $(ddmsg)"
  done
  # Block 100 holds sectors 800-807: sectors 803-804 fail.
  echo 803 > $SP/medium_error_start; echo 2 > $SP/medium_error_count; echo 2 > $SD/opts
  for b in 98 99 100 101 102; do fact "read $b $(check $b)"; done
  # Blocks 200 and 201: sectors 1606-1609 fail. First one 40 KiB read over
  # blocks 196-205, then each block alone.
  echo 1606 > $SP/medium_error_start; echo 4 > $SP/medium_error_count
  if timeout 90 dd if=$NBD of=/tmp/wide bs=40960 count=1 skip=$((196*BS)) iflag=skip_bytes,direct 2>/tmp/err >/dev/null
  then fact "wide-read 196-205 ok"; else fact "wide-read 196-205 error $(ddmsg)"; fi
  for b in 196 197 198 199 200 201 202 203 204 205; do fact "read $b $(check $b)"; done
  echo 0 > $SD/opts
  # The pending block 100 is written: it must move to a slot and read back.
  mkdata 100; fact "write 100 $(written 100)"; fact "reread 100 $(check 100)"
  # A weak sector: 2403 (block 300) fails while every command takes 0.4 s;
  # 0.8 s into the client's read the fault is lifted, so the first reads
  # fail and a later retry reads.
  errs0=$(($(cat /sys/block/sda/device/ioerr_cnt)))
  echo 2403 > $SP/medium_error_start; echo 1 > $SP/medium_error_count
  echo 400000000 > $SD/ndelay || fact "setup-error ndelay"
  echo 2 > $SD/opts
  t0=$(now)
  (fact "read 300 $(check 300)") &
  sleep 0.8
  echo 0 > $SD/opts
  wait $!
  fact "weak-read seconds $t0 $(now) failed-commands $(($(cat /sys/block/sda/device/ioerr_cnt) - errs0))"
  echo 0 > $SD/ndelay
  fact "reread 300 $(check 300)"
  unserve
fi
report /dev/ram0

########## 2. dm-flakey: all of main fails for 3 s under a writing client
SCEN=outage
writer() { # rewrites blocks 1000-1063 in turn; a failed write is retried until it succeeds
  i=0; fails=0; ERR=/tmp/err.writer
  while [ ! -e /tmp/stop ]; do
    b=$((1000 + i % 64)); mkdata $b
    until wr $b; do
      fails=$((fails+1)); echo "$(ddmsg)" >> /tmp/writer.errors
      [ -e /tmp/giveup ] && { echo "gave-up $b" >> /tmp/writer.errors; break 2; }
      sleep 0.2
    done
    i=$((i+1)); echo "$i $fails" > /tmp/writer.new; mv /tmp/writer.new /tmp/writer.progress
  done
}
writes() { w=$(cut -d' ' -f1 /tmp/writer.progress); echo ${w:-0}; }
if /sbin/dmsetup create lab2 --table "0 $SECTORS linear /dev/sda 0" && format /dev/mapper/lab2 /dev/ram1 &&
   serve /dev/mapper/lab2 /dev/ram1 --direct; then
  for b in $(seq 900 915); do mkdata $b; wr $b || fact "setup-error write $b: $(ddmsg)"; done
  rm -f /tmp/stop /tmp/giveup /tmp/writer.errors; echo "0 0" > /tmp/writer.progress
  writer &
  WRITER=$!
  sleep 2
  fact "before-outage writes $(writes)"
  /sbin/dmsetup suspend lab2
  /sbin/dmsetup load lab2 --table "0 $SECTORS flakey /dev/sda 0 0 1"
  /sbin/dmsetup resume lab2
  fact "outage-table $(/sbin/dmsetup table lab2)"
  fact "outage-read 900 $(check 900)"
  sleep 3
  /sbin/dmsetup suspend lab2
  /sbin/dmsetup load lab2 --table "0 $SECTORS linear /dev/sda 0"
  /sbin/dmsetup resume lab2
  at_end=$(writes)
  fact "outage-end writes $at_end"
  # Wait for 20 more writes after the outage (30 s at most).
  n=0
  while [ $(writes) -lt $((at_end + 20)) ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
  fact "writes-after-outage $(( $(writes) - at_end )) in $((n / 10)) s"
  touch /tmp/stop /tmp/giveup
  wait $WRITER
  fact "writer $(cat /tmp/writer.progress)"
  [ -e /tmp/writer.errors ] && dump writer-errors /tmp/writer.errors
  gave_up=$(sed -n 's/^gave-up //p' /tmp/writer.errors 2>/dev/null)
  total=$(cut -d' ' -f1 /tmp/writer.progress)
  [ $total -gt 64 ] && total=64
  for b in $(seq 900 915) $(seq 1000 $((999 + total))); do
    [ "$b" = "$gave_up" ] && continue
    fact "verify $b $(check $b)"
  done
  unserve
fi
/sbin/dmsetup remove lab2
report /dev/ram1

########## 3. the disk is deleted and found again by a rescan
gone() { # SCENARIO MAIN-PATH SPARE BYID
  SCEN=$1; main=$2; spare=$3; byid=$4
  disk=$(disk_with_wwid $WWID)
  fact "disk-before $disk"
  if [ -n "$byid" ]; then mkdir -p /dev/disk/by-id; ln -sf ../../$disk $main; fi
  for b in 40 41 42 43 44; do mkdata $b; done
  # The data goes onto the disk itself, and block 40 is moved to the spare.
  cat /data/$SCEN.40 /data/$SCEN.41 /data/$SCEN.42 /data/$SCEN.43 /data/$SCEN.44 > /tmp/five
  dd if=/tmp/five of=/dev/$disk bs=$BS seek=40 oflag=direct conv=notrunc 2>/dev/null
  format $main $spare || return
  /sbin/dmremap remap --main $main --spare $spare 40 >/tmp/remap 2>&1 || fact "setup-error remap: $(cat /tmp/remap)"
  serve $main $spare --direct || return
  pid=$SERVER
  for b in 40 41 42 43; do fact "before $b $(check $b)"; done
  echo 1 > /sys/block/$disk/device/delete
  [ -n "$byid" ] && rm -f $main
  fact "deleted $disk; nodes now: $(ls /dev | grep '^sd' | tr '\n' ' ')"
  t0=$(now); r=$(check 41); fact "offline-read-main 41 $r seconds $t0 $(now)"
  t0=$(now); r=$(check 40); fact "offline-read-spare 40 $r seconds $t0 $(now)"
  cp /data/$SCEN.42 /data/$SCEN.42.old; mkdata 42
  t0=$(now); r=$(written 42); fact "offline-write 42 $r seconds $t0 $(now)"
  [ "${r%% *}" = error ] && cp /data/$SCEN.42.old /data/$SCEN.42
  /sbin/dmremap status --spare $spare --json >/tmp/st 2>&1; dump status-offline /tmp/st
  sleep 1
  echo '- - -' > /sys/class/scsi_host/$HOST/scan
  n=0; back=""
  while [ -z "$back" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); back=$(disk_with_wwid $WWID); done
  fact "readded-as ${back:-nothing} after $((n / 10)) s; nodes now: $(ls /dev | grep '^sd' | tr '\n' ' ')"
  if [ -n "$back" ]; then
    fact "readded-wwid $(cat /sys/block/$back/device/wwid) serial $(tail -c +5 /sys/block/$back/device/vpd_pg80 | tr -cd '[:print:]')"
    [ -n "$byid" ] && ln -sf ../../$back $main
  fi
  # Reads must work again, with no restart: 25 s at most.
  t0=$(now); n=0; r=$(check 41)
  while [ "$r" != ok ] && [ $n -lt 50 ]; do sleep 0.5; n=$((n+1)); r=$(check 41); done
  fact "back-read-main 41 $r seconds $t0 $(now) tries $((n+1))"
  fact "back-read-main 43 $(check 43)"
  fact "back-read-spare 40 $(check 40)"
  fact "back-read 42 $(check 42)"
  mkdata 44; fact "back-write 44 $(written 44)"; fact "back-reread 44 $(check 44)"
  if kill -0 $pid 2>/dev/null; then fact "server-alive yes"; else fact "server-alive no"; fi
  unserve
  [ -n "$byid" ] && rm -f $main
}
gone gone-sda /dev/sda /dev/ram2 ""
report /dev/ram2
gone gone-byid /dev/disk/by-id/wwn-0x${WWID#naa.} /dev/ram3 byid
report /dev/ram3

# 3c. The disk leaves and comes back while no request runs (a link reset):
# the server finds out at the next request.
quiet() {
  SCEN=gone-quiet; spare=/dev/ram6
  disk=$(disk_with_wwid $WWID); main=/dev/$disk
  fact "disk-before $disk"
  for b in 40 41; do mkdata $b; done
  cat /data/$SCEN.40 /data/$SCEN.41 > /tmp/two
  dd if=/tmp/two of=$main bs=$BS seek=40 oflag=direct conv=notrunc 2>/dev/null
  format $main $spare || return
  serve $main $spare --direct || return
  pid=$SERVER
  fact "before 40 $(check 40)"
  echo 1 > /sys/block/$disk/device/delete
  echo '- - -' > /sys/class/scsi_host/$HOST/scan
  n=0; back=""
  while [ -z "$back" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); back=$(disk_with_wwid $WWID); done
  fact "readded-as ${back:-nothing}"
  t0=$(now); n=0; r=$(check 41)
  while [ "$r" != ok ] && [ $n -lt 50 ]; do sleep 0.5; n=$((n+1)); r=$(check 41); done
  fact "back-read-main 41 $r seconds $t0 $(now) tries $((n+1))"
  fact "back-read-main 40 $(check 40)"
  if kill -0 $pid 2>/dev/null; then fact "server-alive yes"; else fact "server-alive no"; fi
  unserve
}
quiet
report /dev/ram6

########## 4. write errors from the dm error target
DISK=$(disk_with_wwid $WWID)
SECTORS=$(cat /sys/block/$DISK/size)
# Blocks 500-501 (sectors 4000-4015) and 600-601 (4800-4815) fail reads and writes.
/sbin/dmsetup create lab4 --table "0 4000 linear /dev/$DISK 0
4000 16 error
4016 784 linear /dev/$DISK 4016
4800 16 error
4816 $((SECTORS - 4816)) linear /dev/$DISK 4816" || { SCEN=werr-setup; fact "setup-error dmsetup lab4 on '$DISK'"; }
werr() { # SCENARIO SPARE FIRST-BLOCK [server options]: one 24 KiB write over FIRST..FIRST+5
  SCEN=$1; spare=$2; first=$3; shift 3
  format /dev/mapper/lab4 $spare || return
  serve /dev/mapper/lab4 $spare "$@" || return
  rm -f /tmp/six
  for b in $(seq $first $((first + 5))); do mkdata $b; cat /data/$SCEN.$b >> /tmp/six; done
  if timeout 90 dd if=/tmp/six of=$NBD bs=24576 count=1 seek=$((first*BS)) oflag=seek_bytes,direct conv=notrunc 2>/tmp/err >/dev/null
  then fact "wide-write $first ok"; else fact "wide-write $first error $(ddmsg)"; fi
  for b in $(seq $first $((first + 5))); do fact "read $b $(check $b)"; done
  unserve
  /sbin/dmremap status --spare $spare --json >/tmp/st 2>&1; dump status-first /tmp/st
  # Again after a restart: nothing can come from a page cache now.
  serve /dev/mapper/lab4 $spare "$@" || return
  for b in $(seq $first $((first + 5))); do fact "restart-read $b $(check $b)"; done
  unserve
}
werr werr-direct /dev/ram4 498 --direct
report /dev/ram4
werr werr-default /dev/ram5 598
report /dev/ram5
/sbin/dmsetup remove lab4

SCEN=end
dmesg > /tmp/dmesg; dump dmesg /tmp/dmesg
fact "done"
"""


class Lab:
    """What the guest printed: facts per scenario, and dumped files."""

    def __init__(self, console):
        self.facts = {}
        self.files = {}
        current = None
        body = []
        for raw in console.splitlines():
            line = raw.rstrip("\r")
            if current is not None:
                if line == "LAB-FILE-END":
                    self.files[current] = "\n".join(body)
                    current, body = None, []
                else:
                    body.append(line)
                continue
            m = re.match(r"LAB-FILE-BEGIN (\S+) (\S+)$", line)
            if m:
                current = (m.group(1), m.group(2))
                continue
            m = re.match(r"LAB (\S+) (.*)$", line)
            if m:
                self.facts.setdefault(m.group(1), []).append(m.group(2))

    def fact(self, scenario, prefix):
        """The first fact of scenario starting with prefix (without it), or None."""
        for f in self.facts.get(scenario, []):
            if f.startswith(prefix + " ") or f == prefix:
                return f[len(prefix):].strip()
        return None

    def json(self, scenario, name):
        text = self.files.get((scenario, name))
        if text is None:
            raise AssertionError(f"the guest printed no {name} for {scenario}")
        try:
            return json.loads(text)
        except ValueError:
            raise AssertionError(f"{scenario} {name} is not JSON: {text}")

    def log(self, scenario):
        return self.files.get((scenario, "server-log"), "")


def seconds(value):
    """'... seconds T0 T1 ...' -> T1 - T0."""
    m = re.search(r"seconds (\S+) (\S+)", value or "")
    return float(m.group(2)) - float(m.group(1)) if m else None


class GuestLabTest(unittest.TestCase):
    lab = None
    boot_error = None

    @classmethod
    def setUpClass(cls):
        # Not a skip: scripts/setup-deps installs all of it, and a test that
        # skips itself in CI proves nothing.
        why_not = tools_present()
        if why_not is None and not shutil.which("dmsetup"):
            why_not = "dmsetup is not installed"
        tools = Tools()
        if why_not is None and not (tools.server and os.path.exists(tools.server)):
            why_not = "DMREMAP_SERVER does not name dmremap-server"
        if why_not:
            raise AssertionError(f"cannot build the lab: {why_not} (run scripts/setup-deps)")
        cls.workdir = tempfile.mkdtemp(prefix="dmremap-lab-")
        guest = Guest(cls.workdir, programs=[tools.server, tools.cli, "dmsetup", "nbd-client"],
                      modules=["nbd", "sd_mod", "dm_mod", "dm_flakey"],
                      extra_modules=["scsi_debug", "brd"], memory_mib=768)
        started = time.monotonic()
        try:
            console = guest.boot(SCRIPT, "lab", timeout=BOOT_TIMEOUT)
        except GuestError as e:
            cls.boot_error = str(e)
            console = ""
            try:
                with open(os.path.join(cls.workdir, "lab.console.log"), errors="replace") as f:
                    console = f.read()
            except FileNotFoundError:
                pass
        cls.seconds = time.monotonic() - started
        cls.lab = Lab(console)
        print(f"\n[lab] one boot, every scenario: {cls.seconds:.1f} s")
        for scenario, facts in cls.lab.facts.items():
            for f in facts:
                if not re.match(r"verify \d+ ok$", f):
                    print(f"  {scenario}: {f}")
            for line in cls.lab.log(scenario).splitlines():
                if re.search(r"offline|online|remapped|pending", line):
                    print(f"  {scenario} log: {line}")

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "workdir", None):
            shutil.rmtree(cls.workdir, ignore_errors=True)

    def setUp(self):
        if self.lab is None or "end" not in self.lab.facts:
            self.fail(f"the guest did not run to its end: {self.boot_error}")
        self.assertIsNone(self.lab.fact("setup", "setup-error"), self.lab.facts.get("setup"))

    # ------------------------------------------------------------- helpers
    def scenario(self, name):
        facts = self.lab.facts.get(name)
        self.assertTrue(facts, f"scenario {name} printed nothing")
        errors = [f for f in facts if f.startswith("setup-error")]
        self.assertEqual(errors, [], f"{name}: the lab itself failed:\n" + self.lab.log(name))
        log = self.lab.log(name)
        found = sanitizer_report(log)
        self.assertIsNone(found, f"{name}: sanitizer report in the server's log:\n{log}")
        return facts

    def log_tail(self, name, lines=25):
        """The end of the server's log, repeated lines folded, for a message."""
        out = []
        for line in self.lab.log(name).splitlines():
            if out and out[-1][0] == line:
                out[-1][1] += 1
            else:
                out.append([line, 1])
        text = [f"{l} (x{c})" if c > 1 else l for l, c in out][-lines:]
        return "\nserver log (end):\n" + "\n".join(text)

    def assertFact(self, name, prefix, expected, msg=""):
        got = self.lab.fact(name, prefix)
        self.assertEqual(got, expected, f"{name}: '{prefix}' was {got!r}, expected {expected!r}. "
                                        f"{msg}{self.log_tail(name)}")

    def assertFailedRead(self, name, prefix):
        got = self.lab.fact(name, prefix) or ""
        self.assertTrue(got.startswith("error"), f"{name}: '{prefix}' was {got!r}, expected an "
                                                 f"error{self.log_tail(name)}")

    def listing(self, name):
        listed = self.lab.json(name, "list")
        remaps = {r["block"]: r["cause"] for r in listed["remaps"]}
        pending = sorted(p["block"] if isinstance(p, dict) else p for p in listed["pending"])
        return remaps, pending

    # ----------------------------------------------------------- scenarios
    def test_1_medium_errors_pending_rescue_neighbours(self):
        """scsi_debug MEDIUM ERRORs: exactly the bad blocks become pending,
        a sector that fails a few times is rescued, neighbours read intact."""
        n = "medium"
        self.scenario(n)
        for b in (98, 99, 101, 102, 196, 197, 198, 199, 202, 203, 204, 205):
            self.assertFact(n, f"read {b}", "ok", "a neighbour of a bad block")
        for b in (100, 200, 201):
            self.assertFailedRead(n, f"read {b}")
        self.assertFailedRead(n, "wide-read 196-205")
        self.assertFact(n, "write 100", "ok", "a write to a pending block remaps it")
        self.assertFact(n, "reread 100", "ok")
        self.assertFact(n, "read 300", "ok", "the weak block must read on a retry")
        self.assertFact(n, "reread 300", "ok")
        weak = self.lab.fact(n, "weak-read")
        failed = int(re.search(r"failed-commands (\d+)", weak).group(1))
        self.assertGreaterEqual(failed, 1, f"the weak sector never failed: {weak}")
        self.assertFact(n, "server-exit", "0")
        remaps, pending = self.listing(n)
        self.assertEqual(pending, [200, 201], "pending blocks")
        self.assertEqual(remaps, {100: "pending-write", 300: "rescue"}, "remaps")
        st = self.lab.json(n, "status")
        self.assertEqual(st["pending"], 2)
        self.assertEqual(st["remaps_by_cause"]["rescue"], 1)

    def test_2_flakey_outage_is_not_bad_blocks(self):
        """All of main fails for 3 s (dm-flakey) under a writing client:
        nothing becomes pending or remapped, every write lands in the end."""
        n = "outage"
        facts = self.scenario(n)
        remaps, pending = self.listing(n)
        self.assertEqual(pending, [], "an outage must mark nothing pending" + self.log_tail(n))
        self.assertEqual(remaps, {}, "an outage must remap nothing" + self.log_tail(n))
        writer = self.lab.fact(n, "writer").split()
        writes, fails = int(writer[0]), int(writer[1])
        self.assertGreater(fails, 0, "no write failed during the outage: requests that need "
                                     "main must fail with EIO" + self.log_tail(n))
        self.assertFailedRead(n, "outage-read 900")
        after = int(self.lab.fact(n, "writes-after-outage").split()[0])
        self.assertGreaterEqual(after, 20, "writes must succeed again after the outage")
        verified = [f for f in facts if f.startswith("verify ")]
        self.assertGreaterEqual(len(verified), 16 + min(writes, 64) - 1)
        bad = [f for f in verified if not f.endswith(" ok")]
        self.assertEqual(bad, [], "data after the outage" + self.log_tail(n))
        self.assertFact(n, "server-exit", "0")
        self.assertLogSays(n, "main offline")
        self.assertLogSays(n, "main back online")

    def assertLogSays(self, name, text, msg=""):
        self.assertTrue(text in self.lab.log(name),
                        f"{name}: the server never logged '{text}'. {msg}{self.log_tail(name)}")

    def assertFactStarts(self, name, prefix, start, msg=""):
        got = self.lab.fact(name, prefix) or ""
        self.assertTrue(got.startswith(start), f"{name}: '{prefix}' was {got!r}. "
                                               f"{msg}{self.log_tail(name)}")

    def gone(self, n):
        self.scenario(n)
        for b in (40, 41, 42, 43):
            self.assertFact(n, f"before {b}", "ok")
        self.assertLogSays(n, "main offline")
        self.assertFailedRead(n, "offline-read-main 41")
        took = seconds(self.lab.fact(n, "offline-read-main 41"))
        self.assertLess(took, 5, "a request that needs main must fail at once while it is offline")
        self.assertFactStarts(n, "offline-read-spare 40", "ok",
                              "a block on the spare is served while main is offline")
        self.assertFactStarts(n, "offline-write 42", "error",
                              "a write to main while it is offline fails (it is not remapped)")
        self.assertFactStarts(n, "back-read-main 41", "ok",
                              "reads of main must work again once the disk is back, no restart")
        self.assertFact(n, "back-read-main 43", "ok")
        self.assertFact(n, "back-read-spare 40", "ok")
        self.assertFact(n, "back-read 42", "ok", "the refused write must have changed nothing")
        self.assertFact(n, "back-write 44", "ok")
        self.assertFact(n, "back-reread 44", "ok")
        self.assertFact(n, "server-alive", "yes")
        self.assertLogSays(n, "main back online")
        self.assertFact(n, "server-exit", "0")
        remaps, pending = self.listing(n)
        self.assertEqual(pending, [], "a deleted disk must mark nothing pending" + self.log_tail(n))
        self.assertEqual(remaps, {40: "manual"},
                         "a deleted disk must remap nothing" + self.log_tail(n))

    def test_3a_disk_deleted_and_readded_by_name(self):
        """main is /dev/sda; the disk is deleted and a rescan finds it again."""
        self.gone("gone-sda")

    def test_3b_disk_deleted_and_readded_by_id(self):
        """main is a /dev/disk/by-id link (made as udev would), which follows
        the disk to whatever name it comes back under."""
        self.gone("gone-byid")

    def test_3c_disk_replugged_between_requests(self):
        """The disk is deleted and found again while no request runs: the
        next requests find it (under its new name) with no restart."""
        n = "gone-quiet"
        self.scenario(n)
        self.assertFact(n, "before 40", "ok")
        self.assertFactStarts(n, "back-read-main 41", "ok", "reads must work again, no restart")
        self.assertFact(n, "back-read-main 40", "ok")
        self.assertFact(n, "server-alive", "yes")
        self.assertFact(n, "server-exit", "0")
        remaps, pending = self.listing(n)
        self.assertEqual(pending, [], "a replugged disk must mark nothing pending" + self.log_tail(n))
        self.assertEqual(remaps, {}, "a replugged disk must remap nothing" + self.log_tail(n))

    def werr(self, n, first):
        self.assertIsNone(self.lab.fact("werr-setup", "setup-error"))
        self.scenario(n)
        self.assertFact(n, f"wide-write {first}", "ok", "the client sees success")
        st = self.lab.json(n, "status-first")
        self.assertEqual(st["remaps_by_cause"]["write-error"], 2,
                         "remaps of the two blocks that refuse writes" + self.log_tail(n))
        for b in range(first, first + 6):
            self.assertFact(n, f"read {b}", "ok")
            self.assertFact(n, f"restart-read {b}", "ok", "after a restart, no page cache")
        remaps, pending = self.listing(n)
        self.assertEqual(remaps, {first + 2: "write-error", first + 3: "write-error"})
        self.assertEqual(pending, [])
        exits = [f for f in self.lab.facts[n] if f.startswith("server-exit")]
        self.assertEqual(exits, ["server-exit 0"] * 2, self.log_tail(n))

    def test_4a_kernel_write_error_is_remapped_direct(self):
        """dm error target, server with --direct: the write error is seen by
        the write, remapped, and the data reads back."""
        self.werr("werr-direct", 498)

    def test_4b_kernel_write_error_is_remapped_by_default(self):
        """The same with the server's default I/O mode, which must be direct
        I/O on a block device (a buffered write error surfaces only later, at
        writeback, where no block can be named)."""
        self.werr("werr-default", 598)


if __name__ == "__main__":
    unittest.main()
