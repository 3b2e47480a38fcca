#!/usr/bin/env bash
# NBD throughput of dmremap's two frontends (the nbdkit plugin and
# dmremap-server) against their peers, as ../docs/benchmarks.md
# reports it: fio's nbd engine, QD32, 8 s per case, 1 GiB file in /dev/shm,
# Unix socket, each server alone, one warm-up run each. The servers take
# turns for ROUNDS rounds (default 3) and each figure is the median, so that
# a noisy neighbour hurts every server alike. Prints a markdown table of
# IOPS, MiB/s and the ratio to `nbdkit file`.
#
#   [ROUNDS=3] bench/nbd_bench.sh BUILD_DIR [SECONDS]
set -euo pipefail
build=${1:?usage: bench/nbd_bench.sh BUILD_DIR [SECONDS]}
secs=${2:-8}
rounds=${ROUNDS:-3}
plugin=$(realpath "$build/plugin/dmremap.so")
cli=$(realpath "$build/tools/dmremap")
server=$(realpath "$build/server/dmremap-server")
work=$(mktemp -d /dev/shm/dmremap-bench-XXXXXX)
sock=$work/nbd.sock
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

main=$work/main.img
spare=$work/spare.img
head -c 1G /dev/urandom >"$main"   # real data: nothing reads as a hole
truncate -s 256M "$spare"
"$cli" format --main "$main" --spare "$spare" >/dev/null

start() {
  rm -f "$sock"
  "$@" >"$work/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && return; sleep 0.05; done
  echo "server did not start: $*" >&2
  cat "$work/server.log" >&2
  exit 1
}
stop() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}

# fio prints JSON; keep IOPS and MiB/s of the one job.
run_fio() { # rw bs runtime
  fio --output-format=json --name=bench --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
    --rw="$1" --bs="$2" --iodepth=32 --direct=1 --time_based --runtime="$3" --size=1G \
    --randrepeat=0 2>/dev/null |
    /usr/bin/python3 -c '
import json, sys
text = sys.stdin.read()  # the nbd engine prints a line before the JSON
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
print("%.0f %.0f %d" % (side["iops"], side["bw_bytes"] / 1048576, side["total_ios"]))'
}

cases=("randread 4k" "randwrite 4k" "randread 1M" "randwrite 1M")
declare -A result  # "label/case" -> "iops mib cpu_us" of each round, ';'-separated
# CPU time (user + system) the server process used, in clock ticks.
server_ticks() { awk '{ print $14 + $15 }' "/proc/$server_pid/stat"; }
tck=$(getconf CLK_TCK)
measure() { # label, then the server command
  local label=$1
  shift
  start "$@"
  run_fio randread 4k 2 >/dev/null  # warm-up
  for c in "${cases[@]}"; do
    read -r rw bs <<<"$c"
    if [[ $label == "nbdkit null" && $rw == randwrite ]]; then result["$label/$c"]="- - -"; continue; fi
    local t0 t1 iops mib ios
    t0=$(server_ticks)
    read -r iops mib ios < <(run_fio "$rw" "$bs" "$secs")
    t1=$(server_ticks)
    # The server's CPU per request: steadier than IOPS on a shared machine,
    # since it does not depend on how much CPU the client got.
    result["$label/$c"]+="$iops $mib $(awk -v t=$((t1 - t0)) -v k="$tck" -v n="$ios" 'BEGIN { printf "%.1f", t / k * 1e6 / n }');"
  done
  stop
}
median() { # "iops mib;iops mib;..." field -> the median of that field
  tr ';' '\n' <<<"$1" | awk -v f="$2" 'NF { print $f }' | sort -n |
    awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : "-") }'
}

# 1 % of the blocks remapped, spread out: every 100th block refuses writes,
# so writing it remaps it; then the set is served without faults.
spare1=$work/spare-1pct.img
truncate -s 256M "$spare1"
"$cli" format --main "$main" --spare "$spare1" >/dev/null
start nbdkit -f -U "$sock" "$plugin" main="$main" spare="$spare1" inject=write:0-262143/100
/usr/bin/python3 - "$sock" <<'PY'
import sys, nbd
h = nbd.NBD()
h.connect_uri(f"nbd+unix:///?socket={sys.argv[1]}")
for b in range(0, 262144, 100):
    h.pwrite(h.pread(4096, b * 4096), b * 4096)
h.flush()
h.shutdown()
PY
stop
remaps=$("$cli" status --spare "$spare1" --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["remaps"])')

for round in $(seq "$rounds"); do
  echo "round $round of $rounds" >&2
  measure "nbdkit file" nbdkit -f -U "$sock" file "$main"
  measure "dmremap.so, 0 remaps" nbdkit -f -U "$sock" "$plugin" main="$main" spare="$spare"
  measure "dmremap.so, 1 % remapped" nbdkit -f -U "$sock" "$plugin" main="$main" spare="$spare1"
  measure "dmremap-server, 0 remaps" "$server" --unix "$sock" --main "$main" --spare "$spare"
  measure "dmremap-server, 1 % remapped" "$server" --unix "$sock" --main "$main" --spare "$spare1"
  measure "nbdkit null" nbdkit -f -U "$sock" null 1G
  measure "qemu-nbd" qemu-nbd -t -e 16 -f raw -k "$sock" "$main"
done

echo
echo "fio nbd engine, QD32, ${secs} s per case, median of $rounds rounds, 1 GiB in /dev/shm; $(nproc) cores; $(date -u +%F)."
echo "1 % remapped = $remaps remaps spread every 100 blocks."
echo
labels=("nbdkit file" "dmremap.so, 0 remaps" "dmremap.so, 1 % remapped"
  "dmremap-server, 0 remaps" "dmremap-server, 1 % remapped" "nbdkit null" "qemu-nbd")
# One markdown row per server; `cell` turns a case's results into its cell.
table() { # header, cell function
  echo "$1"
  echo "|---|---|---|---|---|"
  for label in "${labels[@]}"; do
    row="| $label |"
    for c in "${cases[@]}"; do row+=" $("$2" "$label" "$c") |"; done
    echo "$row"
  done
}
throughput_cell() { # IOPS at 4k, MiB/s at 1M, with the ratio to nbdkit file
  local field=1 v b
  [[ $2 == *1M ]] && field=2
  v=$(median "${result["$1/$2"]}" $field)
  b=$(median "${result["nbdkit file/$2"]}" $field)
  if [[ $v == - ]]; then echo "—"; return; fi
  echo "$v ($(/usr/bin/python3 -c "print(f'{$v / $b:.2f}')")×)"
}
cpu_cell() {
  local v
  v=$(median "${result["$1/$2"]}" 3)
  if [[ $v == - ]]; then echo "—"; else echo "$v"; fi
}
table "| server | 4k randread IOPS | 4k randwrite IOPS | 1M randread MiB/s | 1M randwrite MiB/s |" throughput_cell
echo
echo "Server CPU time (user + system) per request, in microseconds, median of $rounds rounds:"
echo
table "| server | 4k randread | 4k randwrite | 1M randread | 1M randwrite |" cpu_cell
