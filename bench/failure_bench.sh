#!/usr/bin/env bash
# Speed under failure (../docs/benchmarks.md, "Under failure"), in one run:
#
# 1. Isolation. Main is an nbdkit `sh` script over a file, parallel and
#    multi-conn, whose bad blocks take 1 s per read and then fail. One
#    client reads bad blocks, one after the other, while a second client
#    reads random healthy blocks; the second client's longest and p99
#    latency are printed for main alone (the script's own socket) and
#    through each frontend, with the ratio of the longest to main alone's.
#    Target: at most 2x main alone, plus 20 ms.
# 2. Remap storm. Main refuses every write (nbdkit's error filter, 100 %);
#    fio runs 4k randwrite at QD32. The spare is a file on a real disk
#    (TMPDIR, /var/tmp by default), then a spare in /dev/shm whose every
#    flush takes 5 ms (a disk's cache flush; --inject-spare flush:5). The
#    plugin runs at nbdkit's default of 16 threads, and again with
#    --threads=32 (one per request of the QD32 client). Remaps per second
#    and spare flushes per remap come from the engine's own counters
#    (`dmremap status --control`). Targets: at most 0.25 flushes per remap,
#    and at least 1,000 remaps/s with the 5 ms spare.
#
#   bench/failure_bench.sh BUILD_DIR [SECONDS]
# Healthy I/O is bench/nbd_bench.sh.
set -euo pipefail
build=${1:?usage: bench/failure_bench.sh BUILD_DIR [SECONDS]}
secs=${2:-10}
plugin=$(realpath "$build/plugin/dmremap.so")
cli=$(realpath "$build/tools/dmremap")
server=$(realpath "$build/server/dmremap-server")
py=/usr/bin/python3  # Debian's, which has libnbd's bindings
shm=$(mktemp -d /dev/shm/dmremap-fbench-XXXXXX)
disk=$(mktemp -d "${TMPDIR:-/var/tmp}/dmremap-fbench-XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$shm" "$disk"
}
trap cleanup EXIT

wait_socket() { # socket, log
  for _ in $(seq 200); do [ -S "$1" ] && return; sleep 0.05; done
  echo "no server on $1:" >&2
  cat "$2" >&2
  exit 1
}
start() { # socket, then the command
  local sock=$1
  shift
  rm -f "$sock"
  "$@" >"$shm/server-$(basename "$sock").log" 2>&1 &
  pids+=($!)
  wait_socket "$sock" "$shm/server-$(basename "$sock").log"
}
stop_last() {
  local p=${pids[-1]}
  kill "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  unset 'pids[-1]'
}

# ------------------------------------------------------------ 1. isolation
bs=4096
blocks=16384  # 64 MiB
bad_first=8192
bad_count=64
head -c $((blocks * bs)) /dev/urandom >"$shm/main.img"
cat >"$shm/main.sh" <<EOF
#!/usr/bin/env bash
# A failing disk: blocks $bad_first-$((bad_first + bad_count - 1)) take 1 s per read, then fail.
f=$shm/main.img
case "\$1" in
  get_size) stat -c %s "\$f" ;;
  thread_model) echo parallel ;;
  can_write|can_flush|can_multi_conn) exit 0 ;;
  flush) exit 0 ;;
  pread)
    first=\$((\$4 / $bs)); last=\$(((\$4 + \$3 - 1) / $bs))
    if [ \$last -ge $bad_first ] && [ \$first -lt $((bad_first + bad_count)) ]; then
      sleep 1
      echo "EIO bad sector" >&2
      exit 1
    fi
    dd if="\$f" iflag=skip_bytes,count_bytes skip=\$4 count=\$3 status=none ;;
  pwrite) dd of="\$f" oflag=seek_bytes conv=notrunc seek=\$4 status=none ;;
  *) exit 2 ;;
esac
EOF
chmod +x "$shm/main.sh"
main_sock=$shm/main.sock
start "$main_sock" nbdkit -f -U "$main_sock" sh "$shm/main.sh"
main_uri="nbd+unix:///?socket=$main_sock"

# The first client reads bad blocks one after the other; the second reads
# random healthy blocks and prints its latencies' longest and p99 (ms).
cat >"$shm/bad_reader.py" <<EOF
import sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
b = $bad_first
while time.monotonic() < end and b < $((bad_first + bad_count)):
    try:
        h.pread($bs, b * $bs)
    except nbd.Error:
        pass
    b += 1
EOF
cat >"$shm/good_reader.py" <<EOF
import random, sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
lat = []
rng = random.Random(1)
while time.monotonic() < end:
    b = rng.randrange(0, $bad_first - 1)
    t = time.monotonic()
    h.pread($bs, b * $bs)
    lat.append((time.monotonic() - t) * 1000)
lat.sort()
print("%.1f %.1f %d" % (lat[-1], lat[int(len(lat) * 0.99) - 1], len(lat)))
EOF
isolation() { # uri -> "max p99 count"
  "$py" "$shm/bad_reader.py" "$1" "$secs" &
  local bad=$!
  sleep 0.2  # the bad read is under way
  "$py" "$shm/good_reader.py" "$1" "$((secs - 1))"
  wait "$bad"
}
declare -A iso
iso[main]=$(isolation "$main_uri")
fe_sock=$shm/fe.sock
for fe in plugin server; do
  truncate -s 0 "$shm/spare.img"
  truncate -s 64M "$shm/spare.img"
  "$cli" format --main "$main_uri" --spare "$shm/spare.img" >/dev/null
  if [ $fe = plugin ]; then
    start "$fe_sock" nbdkit -f -U "$fe_sock" "$plugin" main="$main_uri" spare="$shm/spare.img"
  else
    start "$fe_sock" "$server" --unix "$fe_sock" --main "$main_uri" --spare "$shm/spare.img"
  fi
  iso[$fe]=$(isolation "nbd+unix:///?socket=$fe_sock")
  stop_last
done
stop_last  # main's script

# ---------------------------------------------------------- 2. remap storm
storm_main=$shm/storm-main.img
truncate -s 1G "$storm_main"
storm_sock=$shm/storm-main.sock
start "$storm_sock" nbdkit -f -U "$storm_sock" --filter=error file "$storm_main" \
  error-pwrite=EIO error-pwrite-rate=100% error-zero=EIO error-zero-rate=100%
storm_uri="nbd+unix:///?socket=$storm_sock"
ctl=$shm/ctl.sock
declare -A storm
storm_cases=("plugin disk" "plugin slow" "plugin32 slow" "server disk" "server slow")
for c in "${storm_cases[@]}"; do
  read -r fe spare_kind <<<"$c"
  {
    spare=$disk/spare.img
    [ $spare_kind = slow ] && spare=$shm/storm-spare.img
    rm -f "$disk/spare.img" "$shm/storm-spare.img"
    truncate -s 2G "$spare"
    "$cli" format --main "$storm_uri" --spare "$spare" >/dev/null
    inject=()
    if [ $spare_kind = slow ]; then
      if [ $fe = server ]; then inject=(--inject-spare flush:5); else inject=(inject-spare=flush:5); fi
    fi
    rm -f "$ctl"
    if [ $fe = plugin ] || [ $fe = plugin32 ]; then
      threads=()
      [ $fe = plugin32 ] && threads=(--threads=32)
      start "$fe_sock" nbdkit -f "${threads[@]}" -U "$fe_sock" "$plugin" main="$storm_uri" \
        spare="$spare" control="$ctl" "${inject[@]}"
    else
      start "$fe_sock" "$server" --unix "$fe_sock" --main "$storm_uri" --spare "$spare" \
        --control "$ctl" "${inject[@]}"
    fi
    fio --name=storm --ioengine=nbd --uri="nbd+unix:///?socket=$fe_sock" --rw=randwrite \
      --bs=4k --iodepth=32 --direct=1 --time_based --runtime="$secs" --size=1G \
      --randrepeat=0 >/dev/null 2>&1
    storm[$fe/$spare_kind]=$({ "$cli" status --control "$ctl" --json || true; } | "$py" -c '
import json, sys
j = json.load(sys.stdin)
c = j["commits"]
print(j["remaps"], c["spare_flushes"], c["groups"])')
    stop_last
  }
done

# ------------------------------------------------------------------ report
echo
echo "Under failure: $(nproc) cores; $(date -u +%F); ${secs} s per case."
echo
echo "Isolation: a second client's 4k reads of healthy blocks while a first client reads bad"
echo "blocks (1 s per attempt). Target: longest at most 2x main alone + 20 ms."
echo
echo "| path | longest (ms) | p99 (ms) | reads | longest vs main alone | target met |"
echo "|---|---|---|---|---|---|"
read -r m_max _ _ <<<"${iso[main]}"
for k in main plugin server; do
  read -r mx p99 n <<<"${iso[$k]}"
  name=$k
  [ $k = main ] && name="main alone (nbdkit sh)"
  [ $k = plugin ] && name="through dmremap.so"
  [ $k = server ] && name="through dmremap-server"
  echo "| $name | $mx | $p99 | $n | $(awk -v a="$mx" -v b="$m_max" 'BEGIN { printf "%.2fx", a / b }') | $(awk -v a="$mx" -v b="$m_max" 'BEGIN { print (a <= 2 * b + 20 ? "yes" : "no") }') |"
done
echo
echo "Remap storm: main refuses every write; fio 4k randwrite, QD32. Targets: at most 0.25 spare"
echo "flushes per remap; at least 1,000 remaps/s with the 5 ms-flush spare."
echo
echo "| frontend | spare | remaps | remaps/s | groups | remaps per group | spare flushes per remap | target met |"
echo "|---|---|---|---|---|---|---|---|"
for c in "${storm_cases[@]}"; do
  read -r fe spare_kind <<<"$c"
  read -r remaps flushes groups <<<"${storm[$fe/$spare_kind]}"
  label="file on disk"
  [ $spare_kind = slow ] && label="flush takes 5 ms"
  case $fe in
    plugin) name="dmremap.so (nbdkit, 16 threads)" ;;
    plugin32) name="dmremap.so (nbdkit --threads=32)" ;;
    *) name="dmremap-server" ;;
  esac
  awk -v name="$name" -v sp="$label" -v r="$remaps" -v f="$flushes" -v g="$groups" -v t="$secs" -v slow="$spare_kind" 'BEGIN {
    rate = r / t; fpr = r ? f / r : 0
    ok = (fpr <= 0.25) && (slow != "slow" || rate >= 1000)
    printf "| %s | %s | %d | %.0f | %d | %.1f | %.3f | %s |\n", name, sp, r, rate, g, (g ? r / g : 0), fpr, (ok ? "yes" : "no")
  }'
done
