#!/usr/bin/env bash
# The dmremap CLI on regular files, on loop devices (as root) and on an NBD
# URI: format (and its refusals), status --json, list, remap, forget-pending,
# check.
#   tests/cli_test.sh DMREMAP_CLI DMREMAP_PLUGIN
set -uo pipefail
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
cli=$(realpath "$1")
plugin=$(realpath "$2")
work=$(mktemp -d -t dmremap-cli-XXXXXX)
loops=()
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

failures=0
checks=0
pass() { checks=$((checks + 1)); echo "ok - $1"; }
flunk() { checks=$((checks + 1)); failures=$((failures + 1)); echo "FAIL - $1"; }
# expect NAME CODE CMD...: runs CMD, wants exit status CODE; output in $out.
expect() {
  local name=$1 code=$2
  shift 2
  out=$("$@" 2>&1)
  local rc=$?
  if [[ $rc == "$code" ]]; then pass "$name"; else flunk "$name (exit $rc, wanted $code): $out"; fi
}
contains() {  # contains NAME NEEDLE: $out must contain NEEDLE
  if [[ $out == *"$2"* ]]; then pass "$1"; else flunk "$1: no '$2' in: $out"; fi
}
json() {  # json EXPR: evaluates a Python expression over the JSON in $out as j
  /usr/bin/python3 -c "import json,sys; j=json.load(sys.stdin); print($1)" <<<"$out" 2>/dev/null || echo "(no JSON)"
}
equals() {  # equals NAME GOT WANT
  if [[ $2 == "$3" ]]; then pass "$1"; else flunk "$1: got '$2', wanted '$3'"; fi
}
# The block at BLOCK (4 KiB) of FILE, as a checksum.
block_sum() { dd if="$1" bs=4096 skip="$2" count=1 status=none | sha256sum | cut -d' ' -f1; }
bytes_sum() { dd if="$1" bs=1 skip="$2" count=4096 status=none iflag=skip_bytes | sha256sum | cut -d' ' -f1; }

# --- help and usage ---------------------------------------------------------
for cmd in "" format status list map remap forget-pending check evacuate; do
  expect "help ${cmd:-top}" 0 "$cli" $cmd --help
  contains "help ${cmd:-top} has usage" "Usage: dmremap"
done
expect "no subcommand is bad usage" 2 "$cli"
expect "status: unknown option is unknown (3)" 3 "$cli" status --spare x --bogus
expect "unknown option is bad usage" 2 "$cli" list --spare x --bogus
expect "map without --svg is bad usage" 2 "$cli" map --spare x
expect "scan --slow of a served set is bad usage" 2 "$cli" scan --control x --slow 1
contains "scan --slow says the frontend decides" "frontend's slow= setting"
expect "--version" 0 "$cli" --version
contains "--version names the tool" "dmremap "

# run_suite MAIN SPARE LABEL: the whole round on one pair of devices.
run_suite() {
  local main=$1 spare=$2 label=$3
  # A known pattern in blocks 5 and 6 of main.
  head -c 8192 /dev/urandom >pattern.bin
  dd if=pattern.bin of="$main" bs=4096 seek=5 conv=notrunc status=none
  local want5 want6
  want5=$(block_sum pattern.bin 0)
  want6=$(block_sum pattern.bin 1)

  expect "$label: format" 0 "$cli" format --main "$main" --spare "$spare"
  contains "$label: format says where to serve" "nbdkit dmremap main="
  expect "$label: format refuses a spare holding a set" 1 "$cli" format --main "$main" --spare "$spare"
  contains "$label: refusal names the set" "already holds a dmremap set"
  contains "$label: refusal says how to look" "dmremap status --spare"

  expect "$label: status --json" 0 "$cli" status --spare "$spare" --json
  equals "$label: fresh set has no remaps" "$(json 'j["remaps"]')" 0
  equals "$label: fresh set is healthy" "$(json 'j["health"]')" ok
  equals "$label: fresh set is clean" "$(json 'j["clean"]')" True
  equals "$label: main size recorded" "$(json 'j["main_size"]')" "$(blockdev --getsize64 "$main" 2>/dev/null || stat -c %s "$main")"
  local total
  total=$(json 'j["slots_total"]')

  expect "$label: remap 5 6" 0 "$cli" remap --main "$main" --spare "$spare" 5 6
  contains "$label: remap copies data" "block 5: remapped, data copied"
  expect "$label: remap again" 0 "$cli" remap --main "$main" --spare "$spare" 5
  contains "$label: remap again is a no-op" "already remapped"
  expect "$label: remap past the end" 1 "$cli" remap --main "$main" --spare "$spare" 999999999
  contains "$label: past the end says so" "past the end"
  # LBA 80 (512-byte sectors) lies in 4 KiB block 10.
  expect "$label: remap --lba" 0 "$cli" remap --main "$main" --spare "$spare" --lba 80
  contains "$label: lba 80 is block 10" "block 10: remapped"

  # On a 4Kn disk LBA 5 is byte 20480: block 5, remapped already.
  expect "$label: remap --lba --sector-size 4096" 0 "$cli" remap --main "$main" --spare "$spare" \
    --lba 5 --sector-size 4096
  contains "$label: 4Kn lba 5 is block 5" "block 5: already remapped"
  expect "$label: list --json" 0 "$cli" list --spare "$spare" --json
  equals "$label: list has the three blocks" "$(json '[e["block"] for e in j["remaps"]]')" "[5, 6, 10]"
  equals "$label: cause is manual" "$(json '{e["cause"] for e in j["remaps"]}')" "{'manual'}"
  local off5 off6
  off5=$(json 'j["remaps"][0]["spare_offset"]')
  off6=$(json 'j["remaps"][1]["spare_offset"]')
  equals "$label: slot of block 5 holds its data" "$(bytes_sum "$spare" "$off5")" "$want5"
  equals "$label: slot of block 6 holds its data" "$(bytes_sum "$spare" "$off6")" "$want6"
  expect "$label: list (text)" 0 "$cli" list --spare "$spare"
  contains "$label: text list shows manual remaps" "manual"
  expect "$label: list --pending is empty" 0 "$cli" list --spare "$spare" --pending
  contains "$label: nothing pending" "(none)"

  expect "$label: status after remaps" 0 "$cli" status --spare "$spare" --json --main "$main"
  equals "$label: three remaps" "$(json 'j["remaps"]')" 3
  equals "$label: all manual" "$(json 'j["remaps_by_cause"]["manual"]')" 3
  equals "$label: slots accounted" "$(json 'j["slots_used"] + j["slots_free"]')" "$total"
  equals "$label: main matches" "$(json 'j["main_matches"]')" True
  expect "$label: status (text)" 0 "$cli" status --spare "$spare"
  contains "$label: text status counts causes" "3 manual"

  expect "$label: check" 0 "$cli" check --spare "$spare" --main "$main"
  contains "$label: check says OK" "metadata OK"

  expect "$label: map" 0 "$cli" map --spare "$spare" --svg map.svg
  contains "$label: map says what it drew" "Wrote map.svg: main's"
  expect "$label: map to standard output" 0 "$cli" map --spare "$spare" --svg -
  equals "$label: map gives the same bytes twice" "$out" "$(cat map.svg)"
  contains "$label: map counts the manual remaps" ">remapped, manual: 3 blocks: "

  # Evacuation, offline: NEW gets the virtual disk (block 5 from its slot).
  expect "$label: status for main's size" 0 "$cli" status --spare "$spare" --json
  local size
  size=$(json 'j["main_size"]')
  rm -f new.img small.img
  truncate -s "$size" new.img
  truncate -s 1M small.img
  expect "$label: evacuate refuses a smaller NEW" 1 "$cli" evacuate --main "$main" \
    --spare "$spare" --to small.img
  contains "$label: smaller NEW is named" "smaller than the set's"
  expect "$label: evacuate refuses main as NEW" 1 "$cli" evacuate --main "$main" \
    --spare "$spare" --to "$main"
  contains "$label: main as NEW is named" "a disk of this set"
  expect "$label: evacuate offline" 0 "$cli" evacuate --main "$main" --spare "$spare" \
    --to new.img --verify --report ev.txt --mapfile ev.map
  contains "$label: evacuate says NEW holds it all" "holds the whole disk; 0 block(s) lost"
  contains "$label: evacuate verified NEW" "verified:"
  equals "$label: NEW holds block 5 from its slot" "$(block_sum new.img 5)" "$want5"
  equals "$label: NEW holds block 6 from its slot" "$(block_sum new.img 6)" "$want6"
  equals "$label: the report counts no lost block" "$(grep -c '^lost blocks:    0 ' ev.txt)" 1
  equals "$label: the mapfile is all finished" "$(grep -c '  -$' ev.map)" 0
  expect "$label: evacuate status reads the spare" 0 "$cli" evacuate --main "$main" \
    --spare "$spare" --status
  contains "$label: finished once the set closed" "evacuate finished"
  expect "$label: evacuate refuses a NEW with data" 1 "$cli" evacuate --main "$main" \
    --spare "$spare" --to new.img
  contains "$label: NEW with data needs --force" "give --force"
}

# --- regular files ------------------------------------------------------------
truncate -s 64M main.img
truncate -s 16M spare.img
run_suite main.img spare.img files

expect "format --force reformats" 0 "$cli" format --main main.img --spare spare.img --force
expect "status after reformat" 0 "$cli" status --spare spare.img --json
equals "reformat forgets remaps" "$(json 'j["remaps"]')" 0

truncate -s 16M dirty.img
printf 'not blank' | dd of=dirty.img bs=1 seek=5000000 conv=notrunc status=none
expect "format refuses non-zero data" 1 "$cli" format --main main.img --spare dirty.img
contains "refusal says it is not blank" "is not blank"
expect "format refuses main as its own spare" 1 "$cli" format --main main.img --spare ./main.img
contains "same-device refusal" "same device"
truncate -s 16K tiny.img
expect "format refuses a spare too small" 1 "$cli" format --main main.img --spare tiny.img --force
expect "format refuses a bad block size" 1 "$cli" format --main main.img --spare dirty.img --force --block-size 3000
contains "bad block size explained" "power of two"
expect "format with options" 0 "$cli" format --main main.img --spare dirty.img --force \
  --block-size 512 --journal-size 512K --pending-capacity 100 --json
equals "block size 512" "$(json 'j["block_size"]')" 512
equals "journal 512K" "$(json 'j["journal_bytes"]')" 524288
equals "pending capacity" "$(json 'j["pending_capacity"]')" 100
expect "status names no set: unknown (3)" 3 "$cli" status
contains "status without a set says what to name" "--control SOCKET"
expect "status --control with nothing behind it" 3 "$cli" status --control nobody.sock
contains "nothing serves: says so" "no running dmremap answers"
expect "status of a missing spare" 3 "$cli" status --spare nonexistent.img
contains "missing spare named" "nonexistent.img"
expect "status of an unformatted spare" 3 "$cli" status --spare tiny.img
contains "unformatted spare says how to format" "dmremap format"

# A main of a different size is refused by every command that opens the set.
truncate -s 32M other.img
expect "status --main refuses a different main: failing (2)" 2 "$cli" status --spare spare.img --main other.img
contains "size mismatch explained" "formatted for a main of 67108864 bytes"
expect "status --main that cannot be opened: unknown (3)" 3 "$cli" status --spare spare.img \
  --main no-such-disk.img
expect "remap refuses a different main" 1 "$cli" remap --main other.img --spare spare.img 1
contains "remap mismatch explained" "formatted for a main of 67108864 bytes"
expect "check refuses a different main" 1 "$cli" check --spare spare.img --main other.img

# check finds damage: one superblock copy destroyed is reported but survivable,
# both is fatal;
# a corrupt checkpoint is reported.
"$cli" remap --main main.img --spare spare.img 3 >/dev/null
cp spare.img damaged.img
dd if=/dev/zero of=damaged.img bs=4096 count=1 conv=notrunc status=none
expect "check reports one superblock destroyed" 1 "$cli" check --spare damaged.img
contains "check names the damaged copy" "superblock copy 0 is damaged"
expect "status with one superblock destroyed" 0 "$cli" status --spare damaged.img --json
equals "remap survives a lost superblock" "$(json 'j["remaps"]')" 1
out=$("$cli" status --spare spare.img --json)
ckpt=$(json 'j["layout"]["checkpoints"][j["layout"]["active_checkpoint"]]')
cp spare.img damaged.img
printf '\xff\xff\xff\xff' | dd of=damaged.img bs=1 seek=$((ckpt + 4096)) conv=notrunc status=none
expect "check finds a corrupt checkpoint" 1 "$cli" check --spare damaged.img
cp spare.img damaged.img
dd if=/dev/zero of=damaged.img bs=4096 count=2 conv=notrunc status=none
expect "check with both superblocks gone" 1 "$cli" check --spare damaged.img
contains "lost superblocks: points to rebuild" "dmremap rebuild --spare"

# rebuild: every copy of the table gone (superblocks, both copies of both
# checkpoint areas, both journals); the slot headers bring the remaps back.
expect "rebuild refuses metadata that opens" 1 "$cli" rebuild --spare spare.img
contains "rebuild says why it refuses" "nothing to rebuild"
"$cli" status --spare spare.img --json > layout.json
before=$("$cli" list --spare spare.img --remapped --json)
cp spare.img wiped.img
/usr/bin/python3 - layout.json <<'PY' | while read -r off len; do
import json, sys
l = json.load(open(sys.argv[1]))["layout"]
for off in l["checkpoints"] + l["checkpoint_copies"]:
    print(off, l["checkpoint_bytes"])
for off in l["journals"]:
    print(off, l["journal_bytes"])
print(0, 8192)
PY
  dd if=/dev/zero of=wiped.img bs=4096 seek=$((off / 4096)) count=$((len / 4096)) conv=notrunc status=none
done
expect "a wiped set does not open" 3 "$cli" status --spare wiped.img
expect "rebuild from the slot headers" 0 "$cli" rebuild --spare wiped.img --json
equals "rebuild found the geometry's copy" "$(json 'j["geometry_from_backup"]')" True
expect "list after the rebuild" 0 "$cli" list --spare wiped.img --remapped --json
equals "every remap is back, in its slot" "$out" "$before"
expect "check after the rebuild" 0 "$cli" check --spare wiped.img
expect "upgrade of a version 2 spare does nothing" 0 "$cli" upgrade --spare spare.img
contains "upgrade says there is nothing to do" "nothing to do"

# --- while nbdkit serves the set --------------------------------------------------
if command -v nbdkit >/dev/null; then
  nbdkit --foreground --exit-with-parent --unix "$work/s.sock" "$plugin" \
    main="$work/main.img" spare="$work/spare.img" control="$work/ctl.sock" 2>nbdkit.log &
  pids+=($!)
  for _ in $(seq 100); do [[ -S s.sock && -S ctl.sock ]] && break; sleep 0.1; done
  expect "status works while served" 0 "$cli" status --spare spare.img --json
  equals "served set is not clean" "$(json 'j["clean"]')" False
  # The frontend recorded its control socket on the spare, and --spare finds
  # it (status reads the spare itself: it works while served).
  expect "list --spare of a served set goes through its frontend" 0 "$cli" list --spare spare.img
  expect "a served set found by its spare, with a --main that is not its main" 1 "$cli" remap \
    --main other.img --spare spare.img 4
  contains "the wrong main is named" "is not this set's main"
  expect "status --control asks the server" 0 "$cli" status --control ctl.sock --json
  equals "live status is served" "$(json 'j["served"]')" True
  equals "live status knows main is online" "$(json 'j["main"]["state"]')" online
  expect "status --control (text)" 0 "$cli" status --control ctl.sock
  contains "text status says served" "served (figures from ctl.sock)"
  expect "status --control with the set's spare" 0 "$cli" status --control ctl.sock --spare spare.img
  truncate -s 16M other-spare.img
  "$cli" format --main other.img --spare other-spare.img >/dev/null
  expect "status --control with another set's spare" 3 "$cli" status --control ctl.sock --spare other-spare.img
  contains "another set: says which" "holds set"
  # Offline it would be refused (the set is locked): the frontend did it.
  expect "remap --main --spare of a served set goes through its frontend" 0 "$cli" remap \
    --main main.img --spare spare.img 4
  contains "the frontend remapped it" "block 4: remapped, data copied"
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null
  expect "status after nbdkit stops" 0 "$cli" status --spare spare.img --json
  equals "clean after SIGTERM" "$(json 'j["clean"]')" True

  # A control path that cannot be used stops start-up, in the foreground and
  # in the background (before the fork), and leaves the set as it was.
  echo "not a socket" > not-a-socket
  expect "nbdkit: a bad control= path stops start-up" 1 \
    nbdkit --foreground --unix "$work/c.sock" "$plugin" main="$work/main.img" \
    spare="$work/spare.img" control="$work/not-a-socket"
  contains "bad control path: says why" "not a socket is in the way"
  expect "nbdkit in the background: a bad control= path fails the start" 1 \
    nbdkit --unix "$work/c.sock" "$plugin" main="$work/main.img" \
    spare="$work/spare.img" control="$work/not-a-socket"
  expect "status after a refused start" 0 "$cli" status --spare spare.img --json
  equals "still clean after a refused start" "$(json 'j["clean"]')" True
  equals "the file in the way is kept" "$(cat not-a-socket)" "not a socket"

  # An NBD URI as main whose reads all fail: that is main as a whole failing,
  # not a bad block (reads rule 7). remap says so and marks nothing.
  nbdkit --foreground --exit-with-parent --unix "$work/bad.sock" --filter=error \
    file "$work/main.img" error-pread=EIO error-pread-rate=100% 2>bad.log &
  pids+=($!)
  for _ in $(seq 100); do [[ -S bad.sock ]] && break; sleep 0.1; done
  expect "remap while every read of main fails" 1 "$cli" remap \
    --main "nbd+unix:///?socket=$work/bad.sock" --spare spare.img --retries 1 20
  contains "main as a whole is offline, not a bad block" "main offline"
  expect "status after the failed remap" 0 "$cli" status --spare spare.img --json
  equals "nothing marked pending" "$(json 'j["pending"]')" 0
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null

  # One bad block (a ddrescue mapfile): remap marks exactly it pending.
  printf '0 +\n0x0 0x14000 +\n0x14000 0x1000 -\n0x15000 0x3FEB000 +\n' > bad.map
  # (ddrescue exports read-only; cow on top takes the writes)
  nbdkit --foreground --exit-with-parent --unix "$work/map.sock" --filter=cow --filter=ddrescue \
    file "$work/main.img" ddrescue-mapfile="$work/bad.map" 2>map.log &
  pids+=($!)
  for _ in $(seq 100); do [[ -S map.sock ]] && break; sleep 0.1; done
  mapped="nbd+unix:///?socket=$work/map.sock"
  expect "remap of an unreadable block" 0 "$cli" remap --main "$mapped" \
    --spare spare.img --retries 1 20
  contains "unreadable block marked pending" "marked pending"
  expect "list --pending" 0 "$cli" list --spare spare.img --pending --json
  equals "pending block listed" "$(json '[e["block"] for e in j["pending"]]')" "[20]"
  # The same set as a ddrescue mapfile: block 20 is '-', the rest '+'. GNU
  # ddrescuelog reads it, and nbdkit's ddrescue filter fails exactly block 20.
  expect "list --format=ddrescue --remapped still maps the pending block" 0 "$cli" list \
    --spare spare.img --format=ddrescue --remapped
  contains "the pending block is '-'" "0x00001000  -"
  expect "--json with --format is bad usage" 2 "$cli" list --spare spare.img --json --format text
  expect "list --format=ddrescue" 0 "$cli" list --spare spare.img --format=ddrescue
  printf '%s\n' "$out" > exported.map
  expect "ddrescuelog reads the map" 0 ddrescuelog -t exported.map
  expect "ddrescuelog: the bad blocks" 0 ddrescuelog -b 4096 -l- exported.map
  equals "ddrescuelog lists block 20 alone" "$out" 20
  expect "ddrescuelog: the rescued size" 0 ddrescuelog -b 4096 -l+ exported.map
  equals "every other block rescued" "$(wc -l <<<"$out")" $((64 * 256 - 1))
  expect "nbdkit's ddrescue filter takes the map" 0 nbdkit -U - --filter=ddrescue \
    file "$work/main.img" ddrescue-mapfile="$work/exported.map" \
    --run 'qemu-io -r -f raw -c "read 0 81920" -c "read 86016 4096" "$uri" &&
           ! qemu-io -r -f raw -c "read 81920 4096" "$uri"'
  # The map goes back in: into a new set, import makes the same block pending.
  truncate -s 16M spare2.img
  expect "format a second spare" 0 "$cli" format --main main.img --spare spare2.img
  expect "import --dry-run marks nothing" 0 "$cli" import --main main.img --spare spare2.img \
    --ddrescue exported.map --dry-run
  contains "dry run names block 20" "Blocks: 20"
  expect "import of the exported map" 0 "$cli" import --main main.img --spare spare2.img \
    --ddrescue exported.map
  contains "import marks one block" "marked 1 block(s) pending"
  expect "list after import" 0 "$cli" list --spare spare2.img --json
  equals "the imported map gives the same pending block" \
    "$(json '[e["block"] for e in j["pending"]]')" "[20]"
  printf '80\n81\n' > bb.txt
  expect "import of a badblocks list without its -b is bad usage" 2 "$cli" import \
    --main main.img --spare spare2.img --badblocks bb.txt
  expect "import of a badblocks -b 1024 list" 0 "$cli" import --main main.img \
    --spare spare2.img --badblocks bb.txt --block-size 1024
  contains "badblocks 80-81 of 1 KiB are block 20, pending already" "marked 0 block(s) pending"
  contains "block 20 counted as already" "1 already remapped or pending"
  printf '0x1000\n' > lba.txt
  expect "import of an LBA list needs --sector-size" 2 "$cli" import --main main.img \
    --spare spare2.img --lba-list lba.txt
  expect "import of an LBA list of 512-byte sectors" 0 "$cli" import --main main.img \
    --spare spare2.img --lba-list lba.txt --sector-size 512
  expect "list after the LBA import" 0 "$cli" list --spare spare2.img --json
  equals "LBA 0x1000 of 512 bytes is block 512" \
    "$(json '[e["block"] for e in j["pending"]]')" "[20, 512]"
  printf '99999999\n' > far.txt
  expect "import of a list past main's end" 1 "$cli" import --main main.img \
    --spare spare2.img --lba-list far.txt --sector-size 4096
  contains "past the end names the line" "line 1"
  expect "status counts pending: a warning (1)" 1 "$cli" status --spare spare.img --json
  equals "one pending" "$(json 'j["pending"]')" 1
  equals "pending gives a warning" "$(json 'j["health"]')" warning
  # forget-pending keeps a mark while the block still fails...
  expect "forget-pending of a block still bad" 1 "$cli" forget-pending --main "$mapped" \
    --spare spare.img 20
  contains "still bad: kept" "block 20: still unreadable; kept pending"
  expect "forget-pending of a block that is not pending" 1 "$cli" forget-pending \
    --main "$mapped" --spare spare.img 21
  contains "not pending: refused" "block 21 is not pending"
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null
  # ...and clears it once main reads the block.
  expect "forget-pending --all once main reads" 0 "$cli" forget-pending --main main.img \
    --spare spare.img --all
  contains "mark cleared" "block 20: reads now; pending mark cleared"
  expect "status after forget-pending" 0 "$cli" status --spare spare.img --json
  equals "nothing pending any more" "$(json 'j["pending"]')" 0

  # qemu-nbd by default takes one client and no multi-conn: dmremap must use
  # one connection, not wait for a second that never comes.
  truncate -s 16M qspare.img
  qemu-nbd -k "$work/q.sock" -f raw qspare.img 2>qemu-nbd.log &
  pids+=($!)
  for _ in $(seq 100); do [[ -S q.sock ]] && break; sleep 0.1; done
  expect "format a spare on qemu-nbd (one client)" 0 timeout 60 "$cli" format --main main.img \
    --spare "nbd+unix:///?socket=$work/q.sock" --force
  contains "formatted over qemu-nbd" "Formatted nbd+unix"
  wait "${pids[-1]}" 2>/dev/null
else
  flunk "nbdkit is not installed (scripts/setup-deps installs it)"
fi

# --- loop devices ------------------------------------------------------------------
if [[ $(id -u) == 0 ]] && losetup -f >/dev/null 2>&1; then
  truncate -s 64M lmain.img
  truncate -s 16M lspare.img
  lmain=$(losetup -f --show lmain.img) && loops+=("$lmain")
  lspare=$(losetup -f --show lspare.img) && loops+=("$lspare")
  if [[ -b $lmain && -b $lspare ]]; then
    run_suite "$lmain" "$lspare" loop
  else
    flunk "losetup did not give two loop devices"
  fi
else
  echo "skip - loop devices need root and a free loop device"
fi

echo "$checks checks, $failures failed"
[[ $failures == 0 ]]
