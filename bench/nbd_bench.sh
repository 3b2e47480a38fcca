#!/usr/bin/env bash
# NBD throughput of dmremap's two frontends (the nbdkit plugin and
# dmremap-server) against their peers, as ../docs/benchmarks.md
# reports it: fio's nbd engine, QD32, 8 s per case, 1 GiB file in /dev/shm,
# Unix socket, each server alone with a warm-up run; fio's psync engine on
# the file itself is the storage ceiling. In each of ROUNDS rounds (default
# 3) every case is run by all the servers back to back, and each server's
# ratio to `nbdkit file` in that round is kept: a noisy neighbour then
# hurts both sides of a ratio alike. Prints markdown tables of the median
# IOPS or MiB/s with the median and range of the ratios, and of each
# server's CPU time per request.
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
declare -A result  # "label/case" -> "iops mib cpu_us ratio" of each round, ';'-separated
# CPU time (user + system) the server process used, in clock ticks.
server_ticks() { awk '{ print $14 + $15 }' "/proc/$server_pid/stat"; }
tck=$(getconf CLK_TCK)
# The storage ceiling: fio reading and writing the file itself, no NBD.
run_raw() { # rw bs runtime
  fio --output-format=json --name=bench --ioengine=psync --filename="$main" \
    --rw="$1" --bs="$2" --time_based --runtime="$3" --size=1G --randrepeat=0 2>/dev/null |
    /usr/bin/python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
print("%.0f %.0f" % (side["iops"], side["bw_bytes"] / 1048576))'
}
measure() { # label, case, then the server command
  local label=$1 rw bs iops mib ios t0 t1
  read -r rw bs <<<"$2"
  shift 2
  if [[ $label == "nbdkit null" && $rw == randwrite ]]; then result["$label/$rw $bs"]+="- - - -;"; return; fi
  if [[ $label == "raw file (fio psync)" ]]; then
    read -r iops mib < <(run_raw "$rw" "$bs" "$secs")
    result["$label/$rw $bs"]+="$iops $mib - -;"
    return
  fi
  start "$@"
  run_fio "$rw" "$bs" 1 >/dev/null  # warm-up
  t0=$(server_ticks)
  read -r iops mib ios < <(run_fio "$rw" "$bs" "$secs")
  t1=$(server_ticks)
  stop
  # The server's CPU per request: steadier than IOPS on a shared machine,
  # since it does not depend on how much CPU the client got.
  result["$label/$rw $bs"]+="$iops $mib $(awk -v t=$((t1 - t0)) -v k="$tck" -v n="$ios" 'BEGIN { printf "%.1f", t / k * 1e6 / n }') -;"
}
median() { # "a b c d;a b c d;..." field -> the median of that field
  tr ';' '\n' <<<"$1" | awk -v f="$2" 'NF && $f != "-" { print $f }' | sort -g |
    awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : "-") }'
}
spread() { # the same -> "min–max" of that field
  tr ';' '\n' <<<"$1" | awk -v f="$2" 'NF && $f != "-" { print $f }' | sort -g |
    awk '{ v[NR] = $1 } END { print (NR ? v[1] "–" v[NR] : "-") }'
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
remaps=$({ "$cli" status --spare "$spare1" --json || true; } | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["remaps"])')

labels=("nbdkit file" "dmremap.so, 0 remaps" "dmremap.so, 1 % remapped"
  "dmremap-server, 0 remaps" "dmremap-server, 1 % remapped" "nbdkit null" "qemu-nbd"
  "raw file (fio psync)")
serve() { # label -> the command that serves it
  case $1 in
    "nbdkit file") echo nbdkit -f -U "$sock" file "$main" ;;
    "dmremap.so, 0 remaps") echo nbdkit -f -U "$sock" "$plugin" main="$main" spare="$spare" ;;
    "dmremap.so, 1 % remapped") echo nbdkit -f -U "$sock" "$plugin" main="$main" spare="$spare1" ;;
    "dmremap-server, 0 remaps") echo "$server" --unix "$sock" --main "$main" --spare "$spare" ;;
    "dmremap-server, 1 % remapped") echo "$server" --unix "$sock" --main "$main" --spare "$spare1" ;;
    "nbdkit null") echo nbdkit -f -U "$sock" null 1G ;;
    "qemu-nbd") echo qemu-nbd -t -e 16 -f raw -k "$sock" "$main" ;;
    *) ;;  # the raw file: measure() runs fio on it, no server
  esac
}
# Every case is run by all servers back to back, so that each ratio compares
# runs a minute apart; the order turns by one server each round, so that
# no server always follows the same one.
for round in $(seq "$rounds"); do
  echo "round $round of $rounds" >&2
  order=("${labels[@]:round-1}" "${labels[@]:0:round-1}")
  for c in "${cases[@]}"; do
    for label in "${order[@]}"; do
      # shellcheck disable=SC2046  # the command's words, none with spaces
      measure "$label" "$c" $(serve "$label")
    done
    # This round's ratio of each server to nbdkit file in this case.
    base=$(tr ';' '\n' <<<"${result["nbdkit file/$c"]}" | awk 'NF' | tail -1)
    field=1  # IOPS at 4k, MiB/s at 1M
    [[ $c == *1M ]] && field=2
    for label in "${labels[@]}"; do
      last=$(tr ';' '\n' <<<"${result["$label/$c"]}" | awk 'NF' | tail -1)
      ratio=$(awk -v a="$last" -v b="$base" -v f=$field \
        'BEGIN { split(a, x, " "); split(b, y, " "); print (x[f] == "-" ? "-" : sprintf("%.2f", x[f] / y[f])) }')
      result["$label/$c"]=$(sed -E "s/[^ ;]+;$/$ratio;/" <<<"${result["$label/$c"]}")
    done
  done
done

echo
echo "fio nbd engine, QD32, ${secs} s per case, $rounds rounds, 1 GiB in /dev/shm; $(nproc) cores; $(date -u +%F)."
echo "1 % remapped = $remaps remaps spread every 100 blocks. Each cell: the median IOPS (4k) or MiB/s (1M),"
echo "then the median and range of the round's ratios to nbdkit file in the same case."
echo
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
throughput_cell() { # IOPS at 4k, MiB/s at 1M, with the ratios to nbdkit file
  local field=1 v
  [[ $2 == *1M ]] && field=2
  v=$(median "${result["$1/$2"]}" $field)
  if [[ $v == - ]]; then echo "—"; return; fi
  echo "$v ($(median "${result["$1/$2"]}" 4)×; $(spread "${result["$1/$2"]}" 4))"
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
