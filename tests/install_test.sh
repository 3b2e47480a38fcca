#!/usr/bin/env bash
# `cmake --install` puts the CLI in bin/ and the plugin in nbdkit's plugin
# directory as nbdkit-dmremap-plugin.so, so that `nbdkit dmremap ...` works.
# Always checked with DESTDIR; with CI=true (a throwaway machine, as root)
# also installed for real, served by name, and removed again.
#   tests/install_test.sh BUILD_DIR
set -euo pipefail
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
build=$(realpath "$1")
work=$(mktemp -d -t dmremap-install-XXXXXX)
trap 'rm -rf "$work"' EXIT
plugindir=$(pkg-config --variable=plugindir nbdkit)
fail() { echo "FAIL - $*"; exit 1; }

DESTDIR=$work/root cmake --install "$build" --prefix /usr/local >/dev/null
installed=$work/root$plugindir/nbdkit-dmremap-plugin.so
[[ -f $installed ]] || fail "no $plugindir/nbdkit-dmremap-plugin.so under DESTDIR"
[[ -x $work/root/usr/local/bin/dmremap ]] || fail "no bin/dmremap under DESTDIR"
nbdkit "$installed" --dump-plugin | grep -q '^name=dmremap$' || fail "installed plugin does not load"
nbdkit "$installed" --dump-plugin | grep -q '^api_version=2$' || fail "plugin is not API version 2"
echo "ok - DESTDIR install"

if [[ ${CI:-} == true && $(id -u) == 0 ]]; then
  cmake --install "$build" --prefix /usr/local >/dev/null
  cleanup_real() { xargs -r rm -f <"$build/install_manifest.txt"; rm -rf "$work"; }
  trap cleanup_real EXIT
  truncate -s 16M "$work/main.img"
  truncate -s 8M "$work/spare.img"
  /usr/local/bin/dmremap format --main "$work/main.img" --spare "$work/spare.img" >/dev/null
  out=$(nbdkit -U - dmremap main="$work/main.img" spare="$work/spare.img" --run 'nbdinfo --size "$uri"')
  [[ $out == 16777216 ]] || fail "nbdkit dmremap did not serve: $out"
  echo "ok - nbdkit dmremap after a real install"
else
  echo "skip - real install (only with CI=true as root)"
fi
