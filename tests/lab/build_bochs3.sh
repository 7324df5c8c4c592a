#!/usr/bin/env bash
# Builds Bochs 3.0 (Debian trixie's source, on bookworm) into PREFIX (default /opt/bochs3): its Intel
# CPU models have the VMX monitor trap flag, which the lab's x86_64 runs need (Bochs 2.7 has none).
# About 6 minutes on 2 CPUs. `lab.sh bochs3-build` runs it; the lab notes it follows are
# ../shared/xenlab/NOTES.md ("Update 2026-12-06"). The lab boots it with corei7_haswell_4770 (not
# corei7_skylake_x, whose posted interrupts make Xen's VMLAUNCH fail) and the `term` display.
set -euo pipefail
PREFIX=${1:-/opt/bochs3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends g++ make libncurses-dev xz-utils >/dev/null

# trixie's source, through a source list of our own: the machine's apt sources are left alone
mkdir -p lists/partial
echo "deb-src http://deb.debian.org/debian trixie main" > sources.list
APT=(-o Dir::Etc::sourcelist="$WORK/sources.list" -o Dir::Etc::sourceparts=/nonexistent
     -o Dir::State::Lists="$WORK/lists")
apt-get "${APT[@]}" update -qq
# only the upstream tarball is needed (the mirror may lack the .dsc, which is fine)
apt-get "${APT[@]}" source --download-only bochs >/dev/null 2>&1 || true
tarball=$(ls bochs_3.0*orig.tar.xz)
tar xf "$tarball"
cd bochs-3.0*/

# x86-64 with VMX level 2 (EPT, MTF, unrestricted guests), no GUI (the lab runs it under `script`)
./configure --prefix="$PREFIX" --with-term --without-x11 --without-sdl2 --without-wx --without-rfb \
    --enable-x86-64 --enable-cpu-level=6 --enable-vmx=2 --enable-svm --enable-smp --enable-pci \
    --enable-a20-pin --enable-fpu --enable-cdrom --enable-memtype --enable-avx --enable-evex \
    --enable-protection-keys --enable-cet --enable-configurable-msrs --disable-plugins \
    --enable-all-optimizations --enable-repeat-speedups --enable-fast-function-calls \
    --enable-handlers-chaining --enable-trace-linking > configure.log
make -j"$(nproc)" > make.log
make install > install.log
echo "Bochs 3.0 installed under $PREFIX"
