#!/usr/bin/env bash
# Download Debian 13 (trixie) packages and unpack them into DIR/root (nothing is installed):
#   tools/fetch_trixie.sh DIR PACKAGE...
# A private apt source list for trixie on the machine's own Debian mirror (its sources, lists and
# package state are left alone), kept under DIR/apt; the .debs under DIR/dl. Used for the ABI tests'
# Xen 4.20 headers (fetch_xen_headers.sh) and the Xen 4.20 lab (tests/lab/lab.sh, LAB_XEN=4.20).
# Exits non-zero when a package cannot be had.
set -euo pipefail
DIR=${1:?usage: fetch_trixie.sh DIR PACKAGE...}; shift
[ $# -gt 0 ] || { echo "usage: fetch_trixie.sh DIR PACKAGE..." >&2; exit 2; }
mkdir -p "$DIR/apt/lists/partial" "$DIR/dl" "$DIR/root"
# the mirror this machine already uses for bookworm
URI=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$URI" ] || URI=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$URI" ] || { echo "no Debian mirror configured" >&2; exit 1; }
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $URI trixie main" > "$DIR/apt/sources.list"
T=(-o "Dir::Etc::sourcelist=$DIR/apt/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$DIR/apt/lists"
   -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
# the lists are kept between calls; refreshed when empty, or when a download fails (a point release
# replaced a version they name)
[ -n "$(ls "$DIR/apt/lists/" 2>/dev/null | grep -v partial)" ] || apt-get "${T[@]}" update -qq
(cd "$DIR/dl" && apt-get "${T[@]}" download "$@") \
  || { apt-get "${T[@]}" update -qq && (cd "$DIR/dl" && apt-get "${T[@]}" download "$@"); }
for p in "$@"; do dpkg-deb -x "$(ls -t "$DIR/dl/${p}"_*.deb | head -1)" "$DIR/root"; done   # the newest fetched
