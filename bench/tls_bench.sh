#!/usr/bin/env bash
# NBD throughput over TLS: dmremap-server --tls=require against
# `nbdkit file --tls=require` on the same file, with the same X.509
# credentials, as ../docs/benchmarks.md ("TLS") reports it. fio's nbd engine
# (libnbd, nbds+unix:// URI), QD32, SECONDS per case (default 8) after a 1 s
# warm-up, 1 GiB main of random data in /dev/shm served as a formatted
# dmremap set, Unix socket, each server alone. Four cases: 4k randread,
# 4k randwrite, 1M sequential read, 1M sequential write. The same two
# servers without TLS run in the same rounds (PLAIN=0 leaves them out), so
# the cost of TLS is measured too. In each of ROUNDS rounds (default 3)
# every case is run by all the servers back to back, the order turning by
# one each round, and each server's ratio to `nbdkit file --tls=require` in
# that round is kept. Prints markdown tables of the median IOPS or MiB/s
# with the median and range of the ratios, each server's TLS / plain ratio,
# its CPU time per request, and the TLS sessions both ends negotiated.
#
# The credentials are made at run time (tests/e2e/tls_creds.py: an ECDSA
# CA and server certificate). The client gets none: over a Unix socket
# libnbd has no host name to check the server's certificate against, so it
# needs no CA (for a non-root user fio's HOME holds .pki/libnbd/ca-cert.pem
# all the same; root's default is /etc/pki/libnbd, left alone). libnbd 1.14
# refuses tls-psk-file= in a URI unless the program allows it, which fio
# does not: PSK is not measured.
#
# No silent plaintext: both servers refuse everything but STARTTLS before
# TLS, an nbds URI makes libnbd fail rather than go without, and after each
# run the script checks that every connection the server logged (-v) was
# on TLS, and that libnbd logged a TLS session (LIBNBD_DEBUG=1 on a short
# extra fio run). A plain run must show none.
#
#   [ROUNDS=3] [PLAIN=1] bench/tls_bench.sh BUILD_DIR [SECONDS]
set -euo pipefail
build=${1:?usage: bench/tls_bench.sh BUILD_DIR [SECONDS]}
secs=${2:-8}
rounds=${ROUNDS:-3}
plain=${PLAIN:-1}
here=$(dirname "$(realpath "$0")")
cli=$(realpath "$build/tools/dmremap")
server=$(realpath "$build/server/dmremap-server")
work=$(mktemp -d /dev/shm/dmremap-tls-bench-XXXXXX)
sock=$work/nbd.sock
log=$work/server.log
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
/usr/bin/python3 - "$here/../tests/e2e" "$work" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from tls_creds import Credentials
Credentials(sys.argv[2])  # makes $work/tls
PY
certs=$work/tls
mkdir -p "$work/home/.pki/libnbd"
cp "$certs/ca-cert.pem" "$work/home/.pki/libnbd/"

start() {
  rm -f "$sock"
  "$@" >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && return; sleep 0.05; done
  echo "server did not start: $*" >&2
  cat "$log" >&2
  exit 1
}
stop() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}

uri() { # label -> the URI fio connects to
  if [[ $1 == *TLS* ]]; then echo "nbds+unix:///?socket=$sock"; else echo "nbd+unix:///?socket=$sock"; fi
}
# fio prints JSON; keep IOPS and MiB/s of the one job.
run_fio() { # uri rw bs runtime
  HOME=$work/home fio --output-format=json --name=bench --ioengine=nbd --uri="$1" \
    --rw="$2" --bs="$3" --iodepth=32 --direct=1 --time_based --runtime="$4" --size=1G \
    --randrepeat=0 2>/dev/null |
    /usr/bin/python3 -c '
import json, sys
text = sys.stdin.read()  # the nbd engine prints a line before the JSON
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
print("%.0f %.0f %d" % (side["iops"], side["bw_bytes"] / 1048576, side["total_ios"]))'
}
# A few requests with libnbd's debug on: its line naming the TLS session,
# or nothing.
client_tls() { # uri
  HOME=$work/home LIBNBD_DEBUG=1 fio --name=check --ioengine=nbd --uri="$1" --rw=randread \
    --bs=4k --iodepth=32 --direct=1 --number_ios=64 --size=1G 2>&1 >/dev/null |
    sed -n 's/.*connection is using TLS: //p' | sort -u
}

# The server's own word on each connection (its -v log): TLS or not.
# dmremap-server logs "a client is on TLS: ..." and then "a client has
# finished its handshake" for each connection; nbdkit's backend logs
# "open ... tls=0|1" for each connection.
check_server_log() { # label
  local conns on_tls
  if [[ $1 == dmremap-server* ]]; then
    conns=$(grep -c "a client has finished its handshake" "$log" || true)
    on_tls=$(grep -c "a client is on TLS: " "$log" || true)
  else
    conns=$(grep -c ': open readonly=.* tls=[01]$' "$log" || true)
    on_tls=$(grep -c ': open readonly=.* tls=1$' "$log" || true)
  fi
  if [[ $1 == *TLS* ]] && { [ "$conns" -eq 0 ] || [ "$on_tls" -ne "$conns" ]; }; then
    echo "$1: only $on_tls of $conns connections were on TLS:" >&2
    cat "$log" >&2
    exit 1
  fi
  if [[ $1 != *TLS* ]] && { [ "$conns" -eq 0 ] || [ "$on_tls" -ne 0 ]; }; then
    echo "$1: $on_tls of $conns connections were on TLS, none should be:" >&2
    cat "$log" >&2
    exit 1
  fi
}
declare -A session  # label -> "server: ...; client: ..."
note_session() { # label, libnbd's line
  local srv
  if [[ $1 == dmremap-server* ]]; then
    srv=$(sed -n 's/.*a client is on TLS: //p' "$log" | sort -u | paste -sd'|')
  else
    # nbdkit -D nbdkit.tls.session=1: "TLS session: (TLS1.3)-(...)-(...)".
    srv=$(grep -o 'TLS session: .*' "$log" | sed 's/^TLS session: //' | sort -u | paste -sd'|')
  fi
  session["$1"]="server: ${srv:-?}; libnbd: $2"
}

cases=("randread 4k" "randwrite 4k" "read 1M" "write 1M")
declare -A result  # "label/case" -> "iops mib cpu_us ratio" of each round, ';'-separated
declare -A cost    # "server/case" -> TLS / plain of each round, ';'-separated
# CPU time (user + system) the server process used, in clock ticks.
server_ticks() { awk '{ print $14 + $15 }' "/proc/$server_pid/stat"; }
tck=$(getconf CLK_TCK)
measure() { # label, case, then the server command
  local label=$1 rw bs iops mib ios t0 t1 u client
  read -r rw bs <<<"$2"
  shift 2
  u=$(uri "$label")
  start "$@"
  client=$(client_tls "$u")
  if [[ $label == *TLS* && -z $client ]]; then
    echo "$label: libnbd did not log a TLS session" >&2
    exit 1
  elif [[ $label != *TLS* && -n $client ]]; then
    echo "$label: libnbd logged a TLS session on a plain run: $client" >&2
    exit 1
  fi
  run_fio "$u" "$rw" "$bs" 1 >/dev/null  # warm-up
  t0=$(server_ticks)
  read -r iops mib ios < <(run_fio "$u" "$rw" "$bs" "$secs")
  t1=$(server_ticks)
  stop
  check_server_log "$label"
  [[ $label == *TLS* ]] && note_session "$label" "$client"
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
last() { tr ';' '\n' <<<"$1" | awk 'NF' | tail -1; }

labels=("nbdkit file, TLS" "dmremap-server, TLS")
[ "$plain" = 1 ] && labels+=("nbdkit file, plain" "dmremap-server, plain")
serve() { # label -> the command that serves it
  # -v for the log checks; nbdkit without its line per request.
  local nbdkit=(nbdkit -f -v -D nbdkit.backend.datapath=0 -U "$sock")
  local dmremap=("$server" -v --unix "$sock" --main "$main" --spare "$spare")
  case $1 in
    "nbdkit file, TLS")
      echo "${nbdkit[@]}" --tls=require --tls-certificates "$certs" -D nbdkit.tls.session=1 file "$main" ;;
    "dmremap-server, TLS") echo "${dmremap[@]}" --tls=require --tls-certificates "$certs" ;;
    "nbdkit file, plain") echo "${nbdkit[@]}" file "$main" ;;
    "dmremap-server, plain") echo "${dmremap[@]}" ;;
  esac
}
# Every case is run by all servers back to back, so that each ratio compares
# runs a minute apart; the order turns by one server each round, so that
# no server always follows the same one.
for round in $(seq "$rounds"); do
  echo "round $round of $rounds" >&2
  order=("${labels[@]:(round-1)%${#labels[@]}}" "${labels[@]:0:(round-1)%${#labels[@]}}")
  for c in "${cases[@]}"; do
    for label in "${order[@]}"; do
      # shellcheck disable=SC2046  # the command's words, none with spaces
      measure "$label" "$c" $(serve "$label")
    done
    # This round's ratio of each server to nbdkit file over TLS in this case.
    field=1  # IOPS at 4k, MiB/s at 1M
    [[ $c == *1M ]] && field=2
    base=$(last "${result["nbdkit file, TLS/$c"]}")
    for label in "${labels[@]}"; do
      ratio=$(awk -v a="$(last "${result["$label/$c"]}")" -v b="$base" -v f=$field \
        'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.2f", x[f] / y[f] }')
      result["$label/$c"]=$(sed -E "s/[^ ;]+;$/$ratio;/" <<<"${result["$label/$c"]}")
    done
    if [ "$plain" = 1 ]; then
      for s in "nbdkit file" "dmremap-server"; do
        cost["$s/$c"]+=$(awk -v a="$(last "${result["$s, TLS/$c"]}")" \
          -v b="$(last "${result["$s, plain/$c"]}")" -v f=$field \
          'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.2f", x[f] / y[f] }')";"
      done
    fi
  done
done

echo
echo "fio nbd engine (libnbd, nbds+unix), QD32, ${secs} s per case, $rounds rounds, 1 GiB in /dev/shm,"
echo "X.509 (ECDSA P-256); $(nproc) cores; $(date -u +%F). Each cell: the median IOPS (4k) or MiB/s (1M),"
echo "then the median and range of the round's ratios to nbdkit file --tls=require in the same case."
echo
header="| server | 4k randread IOPS | 4k randwrite IOPS | 1M read MiB/s | 1M write MiB/s |"
table() { # header, cell function, labels...
  local h=$1 cell=$2 row label c
  shift 2
  echo "$h"
  echo "|---|---|---|---|---|"
  for label in "$@"; do
    row="| $label |"
    for c in "${cases[@]}"; do row+=" $("$cell" "$label" "$c") |"; done
    echo "$row"
  done
}
throughput_cell() { # IOPS at 4k, MiB/s at 1M, with the ratios to nbdkit file over TLS
  local field=1
  [[ $2 == *1M ]] && field=2
  echo "$(median "${result["$1/$2"]}" $field) ($(median "${result["$1/$2"]}" 4)×; $(spread "${result["$1/$2"]}" 4))"
}
cost_cell() { echo "$(median "${cost["$1/$2"]}" 1)× ($(spread "${cost["$1/$2"]}" 1))"; }
cpu_cell() { median "${result["$1/$2"]}" 3; }
table "$header" throughput_cell "${labels[@]}"
if [ "$plain" = 1 ]; then
  echo
  echo "The cost of TLS: each server's figure over TLS divided by its own figure without, same round"
  echo "(median and range of $rounds rounds):"
  echo
  table "$header" cost_cell "nbdkit file" "dmremap-server"
fi
echo
echo "Server CPU time (user + system) per request, in microseconds, median of $rounds rounds:"
echo
table "| server | 4k randread | 4k randwrite | 1M read | 1M write |" cpu_cell "${labels[@]}"
echo
echo "TLS sessions (every connection checked in the servers' -v logs):"
for label in "nbdkit file, TLS" "dmremap-server, TLS"; do echo "- $label: ${session["$label"]}"; done
