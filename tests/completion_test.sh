#!/usr/bin/env bash
# completions/dmremap offers what `dmremap --help` lists: each command, each
# command's options, the values of --io and --block-size, and file names for
# --main, --spare and --control. Checked twice: under bash-completion's
# helpers (_init_completion, _filedir), as installed, and without them, as
# when the file is sourced by hand. bash-completion comes with the test
# profile (scripts/setup-deps test): if it is missing, the test fails.
#   tests/completion_test.sh DMREMAP_CLI
set -uo pipefail
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
cli=$(realpath "$1")
completion=$(realpath "$(dirname "$0")/../completions/dmremap")
helpers=/usr/share/bash-completion/bash_completion
work=$(mktemp -d -t dmremap-completion-XXXXXX)
trap 'rm -rf "$work"' EXIT

failures=0
checks=0
pass() { checks=$((checks + 1)); echo "ok - $1"; }
flunk() { checks=$((checks + 1)); failures=$((failures + 1)); echo "FAIL - $1"; }

# complete MODE LINE: the completions bash would offer with the cursor at the
# end of LINE, sorted, one per line. MODE is "helpers" or "plain". COMP_WORDS
# is split as bash splits it ("--io=d" is "--io" "=" "d").
complete() {
  MODE=$1 LINE=$2 HELPERS=$helpers COMPLETION=$completion \
    bash --norc --noprofile -c '
      if [[ $MODE == helpers ]]; then source "$HELPERS" || exit 3; fi
      source "$COMPLETION" || exit 3
      read -ra COMP_WORDS <<<"${LINE//=/ = }"
      [[ $LINE == *[\ =] ]] && COMP_WORDS+=("")
      COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
      COMP_LINE=$LINE
      COMP_POINT=${#LINE}
      COMPREPLY=()
      _dmremap dmremap "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
      if [[ ${#COMPREPLY[@]} -gt 0 ]]; then printf "%s\n" "${COMPREPLY[@]}" | sort -u; fi' 2>&1
}

# offers NAME MODE LINE WORD: completing LINE offers WORD (among others).
offers() {
  local got
  got=$(complete "$2" "$3")
  if grep -qxF -- "$4" <<<"$got"; then pass "$1"; else flunk "$1: '$3' offers: ${got//$'\n'/ }"; fi
}
# offers_exactly NAME MODE LINE WORDS: completing LINE offers WORDS (one per
# line, sorted) and nothing else.
offers_exactly() {
  local got
  got=$(complete "$2" "$3")
  if [[ $got == "$4" ]]; then
    pass "$1"
  else
    flunk "$1: '$3' offers: ${got//$'\n'/ }; wanted: ${4//$'\n'/ }"
  fi
}

# What --help lists: the commands, and each one's options.
commands=$("$cli" --help | sed -n '/^Subcommands:/,/^[^ ]/p' |
  sed -nE 's/^  ([a-z][a-z-]*) .*/\1/p' | sort -u)
options() { "$cli" "$@" --help | sed -nE 's/^  (-[^ ]+).*/\1/p' | tr ',' '\n' | sort -u; }
if [[ -n $commands ]]; then
  pass "found $(wc -l <<<"$commands") commands in dmremap --help"
else
  flunk "found no commands in dmremap --help: is the binary right?"
fi

if [[ -f $helpers ]]; then
  modes="helpers plain"
else
  flunk "no $helpers: install bash-completion (scripts/setup-deps test)"
  modes=plain
fi

# File names are completed in the working directory.
cd "$work" || exit 1
touch spare.img
mkdir ctl.d
for mode in $modes; do
  offers "$mode: dmremap st offers status" "$mode" "dmremap st" status
  offers "$mode: dmremap status --sp offers --spare" "$mode" "dmremap status --sp" --spare
  offers_exactly "$mode: dmremap offers every command of --help" "$mode" "dmremap " "$commands"
  offers_exactly "$mode: dmremap - offers the options of dmremap --help" "$mode" "dmremap -" \
    "$(options)"
  for c in $commands; do
    offers_exactly "$mode: dmremap $c - offers the options of dmremap $c --help" "$mode" \
      "dmremap $c -" "$(options "$c")"
  done
  offers "$mode: dmremap -v remap --sp offers --spare" "$mode" "dmremap -v remap --sp" --spare
  offers_exactly "$mode: --io offers its values" "$mode" "dmremap remap --io " \
    "$(printf '%s\n' auto buffered direct)"
  offers_exactly "$mode: --io=d offers direct" "$mode" "dmremap forget-pending --io=d" direct
  offers "$mode: format -b offers 4096" "$mode" "dmremap format -b 40" 4096
  offers_exactly "$mode: --retries offers nothing" "$mode" "dmremap remap --retries " ""
  offers "$mode: --spare offers file names" "$mode" "dmremap status --spare sp" spare.img
  offers "$mode: --main= offers file names" "$mode" "dmremap check --main=sp" spare.img
  offers "$mode: --control offers file names" "$mode" "dmremap status --control ct" ctl.d
done

echo "completion_test: $((checks - failures)) passed, $failures failed"
[[ $failures == 0 ]]
