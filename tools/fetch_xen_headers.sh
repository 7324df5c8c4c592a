#!/usr/bin/env bash
# Unpack Debian 13's libxen-dev (Xen 4.20) into DIR, for the ABI tests' second header set:
#   tools/fetch_xen_headers.sh DIR   ->  DIR/usr/include (export POLICYC_XEN_HEADERS_4_20 to it)
# A private apt source list for trixie (the machine's own Debian mirror, its sources untouched);
# nothing is installed. Exits non-zero when the package cannot be had.
set -euo pipefail
DIR=${1:?usage: fetch_xen_headers.sh DIR}
[ -f "$DIR/usr/include/xenctrl.h" ] && exit 0
mkdir -p "$DIR/apt/lists/partial" "$DIR/apt/dl"
# the mirror this machine already uses for bookworm
URI=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$URI" ] || URI=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$URI" ] || { echo "no Debian mirror configured" >&2; exit 1; }
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $URI trixie main" > "$DIR/apt/sources.list"
T=(-o "Dir::Etc::sourcelist=$DIR/apt/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$DIR/apt/lists"
   -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
apt-get "${T[@]}" update -qq
(cd "$DIR/apt/dl" && apt-get "${T[@]}" download libxen-dev)
dpkg-deb -x "$DIR"/apt/dl/libxen-dev_*.deb "$DIR"
test -f "$DIR/usr/include/xenctrl.h"
