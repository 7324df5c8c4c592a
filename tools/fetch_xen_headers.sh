#!/usr/bin/env bash
# Unpack Debian 13's libxen-dev (Xen 4.20) into DIR, for the ABI tests' second header set:
#   tools/fetch_xen_headers.sh DIR   ->  DIR/usr/include (export POLICYC_XEN_HEADERS_4_20 to it)
# Through fetch_trixie.sh (a private apt source list; nothing is installed). Exits non-zero when the
# package cannot be had.
set -euo pipefail
DIR=${1:?usage: fetch_xen_headers.sh DIR}
[ -f "$DIR/usr/include/xenctrl.h" ] && exit 0
"$(dirname "${BASH_SOURCE[0]}")/fetch_trixie.sh" "$DIR/trixie" libxen-dev
mkdir -p "$DIR/usr"
cp -a "$DIR/trixie/root/usr/include" "$DIR/usr/"
test -f "$DIR/usr/include/xenctrl.h"
