#!/bin/bash
# policyc's arm64 Xen lab: Xen 4.17 arm64 (Debian bookworm's own packages) under
# qemu-system-aarch64 TCG (-machine virt,virtualization=on,gic-version=3 -cpu cortex-a57) on this
# amd64 machine, a Debian arm64 dom0 kernel whose initramfs carries Debian's arm64 python3.11,
# policyc (its ring extension cross-built with gcc-aarch64-linux-gnu) and the Xen tools, and a
# Debian arm64 Linux guest (busybox initramfs). Called by `tests/lab/lab.sh arm64`, or directly:
#
#   tests/lab/lab_arm64.sh setup   # apt: qemu-system-arm, gcc-aarch64-linux-gnu, qemu-user-static; then fetch + build
#   tests/lab/lab_arm64.sh fetch   # apt-get download the arm64 .debs into $LAB/debs, dpkg-deb -x into $LAB/root
#   tests/lab/lab_arm64.sh xen     # Xen 4.17 arm64 rebuilt from Debian's source with CONFIG_MEM_ACCESS=y (see xen_mem_access)
#   tests/lab/lab_arm64.sh build   # ring extension for aarch64, dom0 and guest initramfs
#   tests/lab/lab_arm64.sh run     # build if not built yet, then boot
#   tests/lab/lab_arm64.sh boot    # QEMU: prints the serial console; results between === LAB-BEGIN / LAB-END
#
# Everything is written under $LAB (default /tmp/policyc-lab-arm64), never into the repository;
# nothing is installed from the arm64 packages (they are only unpacked).
# Why these QEMU options: Xen needs EL2 (virtualization=on) and a GICv3 it can virtualize; Xen's
# arm64 image is a Linux-style Image that QEMU's -kernel loads; the dom0 kernel and initramfs
# reach Xen as multiboot modules in the device tree (-device guest-loader).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LAB=${LAB:-/tmp/policyc-lab-arm64}
LAB_SECONDS=${LAB_SECONDS:-20}
mkdir -p "$LAB"
log() { echo "lab-arm64: $*" >&2; }
# shellcheck source=boot.sh
. "$HERE/boot.sh"
# dom0 reaches its /init in 1-2 min of TCG here, 3-5 under load: a longer wait than x86's
LAB_BOOT_SECONDS=${LAB_BOOT_SECONDS:-600}
export DEBIAN_FRONTEND=noninteractive

# The arm64 packages: hypervisor, tools and libraries, a kernel (dom0 and guest), busybox, and
# Python 3.11 with policyc's dependencies as Debian packages them (arch:all ones need no suffix).
# The kernel (dom0's and the guest's) is the build examples/policies/linux-arm64-integrity.vmi and its
# symbol file linux-6.1-arm64.System.map were written for.
KPKG=${KPKG:-linux-image-6.1.0-56-arm64}
ARM64_DEBS="xen-hypervisor-4.17-arm64 xen-utils-4.17 libxenmisc4.17 libxenstore4 libxentoollog1 libxentoolcore1
 libxencall1 libxendevicemodel1 libxenevtchn1 libxenforeignmemory1 libxengnttab1 libxenhypfs1 libxen-dev
 busybox-static libc6 libgcc-s1 libbz2-1.0 libcrypt1 libdb5.3 libexpat1 libext2fs2 libfdt1 libffi8 liblzma5
 libncursesw6 libtinfo6 libnsl2 libreadline8 libsqlite3-0 libtirpc3 libuuid1 libyajl2 zlib1g libzstd1 libssl3
 libyaml-0-2 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1 libnl-3-200
 libnl-route-3-200 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libpython3.11-dev libpython3.11
 python3-yaml python3-cffi-backend python3-pyrsistent"
ALL_DEBS="python3-cffi python3-pycparser python3-ply python3-lark python3-networkx python3-jsonschema python3-attr
 python3-typing-extensions python3-importlib-metadata python3-zipp python3-more-itertools"

packages() {   # linux-kbuild-6.1: the host half of the module build
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -q
  # libc6-dev-arm64-cross: the C library's headers for aarch64 (only a recommendation of the cross
  # compiler, so --no-install-recommends leaves it out and the ring extension finds the host's headers)
  apt-get install -y -q --no-install-recommends qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
    qemu-user-static cpio linux-kbuild-6.1 make
}

fetch() {
  [ -n "$KPKG" ] || { log "no linux-image-arm64 in apt (dpkg --add-architecture arm64; apt-get update)"; exit 1; }
  mkdir -p "$LAB/debs"; cd "$LAB/debs"
  local want=() p
  for p in $ARM64_DEBS "$KPKG"; do want+=("$p:arm64"); done
  for p in $ALL_DEBS; do want+=("$p"); done
  apt-get download "${want[@]}" >/dev/null 2>"$LAB/fetch.err" || { cat "$LAB/fetch.err"; exit 1; }
  rm -rf "$LAB/root"
  for d in *.deb; do dpkg-deb -x "$d" "$LAB/root"; done
  log "fetched $(ls | wc -l) packages, kernel ${KPKG#linux-image-}, $(du -sh "$LAB/root" | cut -f1) unpacked"
}

# policyc.native._vm_event for aarch64: the C that cffi generates on this host, compiled with the
# cross compiler against Debian's arm64 Python headers (abi3, like the host build).
build_ring_extension() {
  local X=$LAB/xbuild R=$LAB/root; rm -rf "$X"; mkdir -p "$X"
  python3 - "$REPO/native" "$X/_vm_event.c" "$X/sources" <<'EOF'
import sys; sys.path.insert(0, sys.argv[1])
import build_vm_event
build_vm_event.make_builder(relative_sources=False).emit_c_code(sys.argv[2])
open(sys.argv[3], "w").write("\n".join(build_vm_event.SOURCES) + "\n")
EOF
  local src=() missing; mapfile -t src < "$X/sources"
  aarch64-linux-gnu-gcc -shared -fPIC -O2 -std=gnu11 -Wall -I "$REPO/native" -I "$R/usr/include/python3.11" \
    -I "$R/usr/include" "$X/_vm_event.c" "${src[@]}" -o "$X/_vm_event.abi3.so"
  # what the extension calls must come from libc or Python: a C source left out fails here, not in dom0
  missing=$(aarch64-linux-gnu-nm -u "$X/_vm_event.abi3.so" | awk '$1 == "U" {print $2}' | grep -v -e '@' -e '^_*Py' || true)
  [ -z "$missing" ] || { log "the aarch64 ring extension leaves undefined: $(echo $missing)"; exit 1; }
}

build_dom0() {
  local R=$LAB/root S=$LAB/stage KV=${KPKG#linux-image-}; rm -rf "$S"
  mkdir -p $S/{bin,sbin,proc,sys,dev,tmp,run,mod,lab/policies,usr/lib,var/log/xen,var/lib/xen,var/lib/xenstored,etc/xen}
  cp "$R/bin/busybox" "$S/bin/busybox"
  tar -C "$R" --exclude=lib/modules --exclude=lib/firmware -cf - lib | tar -C "$S" -xf -
  tar -C "$R/usr/lib" --exclude='*.a' --exclude='python3.11/test' --exclude='python3.11/idlelib' \
      --exclude='python3.11/tkinter' --exclude='python3.11/ensurepip' --exclude='python3.11/lib2to3' \
      --exclude='python3.11/pydoc_data' --exclude='python3.11/config-3.11-*' --exclude='gcc' --exclude='linux-image-*' -cf - . \
    | tar -C "$S/usr/lib" -xf -
  mkdir -p "$S/usr/bin"; cp "$R/usr/bin/python3.11" "$S/usr/bin/python3"
  [ -e "$S/lib/ld-linux-aarch64.so.1" ] || ln -s aarch64-linux-gnu/ld-linux-aarch64.so.1 "$S/lib/ld-linux-aarch64.so.1"
  local M=$R/lib/modules/$KV/kernel/drivers/xen
  cp $M/xen-privcmd.ko $M/xenfs/xenfs.ko $M/xen-evtchn.ko $M/xen-gntdev.ko $M/xen-gntalloc.ko "$S/mod/"
  # policyc laid out as installed, with the aarch64 ring extension
  local SP=$S/usr/lib/python3/dist-packages
  mkdir -p "$SP/policyc"
  cp -a "$REPO/policyc/." "$SP/policyc/"
  cp -a "$REPO/grammar" "$REPO/runtime" "$REPO/native" "$SP/policyc/"
  find "$SP/policyc" \( -name __pycache__ -prune -o -name '_vm_event*.so' \) -exec rm -rf {} +
  cp "$LAB/xbuild/_vm_event.abi3.so" "$SP/policyc/native/"
  printf '#!/bin/sh\nexec /usr/bin/python3 -m policyc "$@"\n' > "$S/bin/policyc"; chmod +x "$S/bin/policyc"
  # the lab: the example policy as written, with the symbol file it names
  cp "$REPO/examples/policies/linux-arm64-integrity.vmi" "$REPO/examples/policies/linux-6.1-arm64.System.map" \
     "$S/lab/policies/"
  cp "$HERE/dom0_check_arm64.py" "$HERE/toolstack.sh" "$S/lab/"
  cp "$R/boot/vmlinuz-$KV" "$S/lab/Image"                   # Debian's arm64 vmlinuz is the bare Image
  cp "$LAB/guest.cpio.gz" "$S/lab/"
  cat > "$S/lab/guest.cfg" <<'EOF'
name = "armguest"
kernel = "/lab/Image"
ramdisk = "/lab/guest.cpio.gz"
extra = "console=hvc0 loglevel=6"
memory = 128
vcpus = 1
on_crash = "preserve"
EOF
  cp "$HERE/init_arm64.sh" "$S/init"; chmod +x "$S/init"
  (cd "$S" && find . | cpio -o -H newc 2>/dev/null) | gzip -1 > "$LAB/dom0.cpio.gz"
  log "dom0 initramfs: $(du -h "$LAB/dom0.cpio.gz" | cut -f1) gz, $(du -sh "$S" | cut -f1) unpacked"
}

build_guest() {   # busybox, and the attacker module cross-built against the guest kernel's own headers
  local G=$LAB/guest KV=${KPKG#linux-image-} KC KH=$LAB/kh MAP=$REPO/examples/policies/linux-6.1-arm64.System.map
  KC=${KV%-arm64}            # the flavour-independent half: linux-headers-6.1.0-56-common
  rm -rf "$G"; mkdir -p "$G"/{bin,proc,sys,dev,tmp} "$LAB/mod"
  cp "$LAB/root/bin/busybox" "$G/bin/"
  if [ ! -d "$KH/usr/src/linux-headers-$KV" ]; then
    (cd "$LAB/debs" && apt-get download "linux-headers-$KV:arm64" "linux-headers-$KC-common" >/dev/null \
      2>"$LAB/headers.err") || { cat "$LAB/headers.err"; log "the guest kernel's headers could not be fetched"; exit 1; }
    dpkg-deb -x "$LAB/debs/linux-headers-${KV}_"*_arm64.deb "$KH"
    dpkg-deb -x "$LAB/debs/linux-headers-${KC}-common_"*_all.deb "$KH"
    mkdir -p "$KH/usr/lib"; ln -sfn /usr/lib/linux-kbuild-6.1 "$KH/usr/lib/linux-kbuild-6.1"   # host tools (amd64)
    sed -i "s|include /usr/src/|include $KH/usr/src/|" "$KH/usr/src/linux-headers-$KV/Makefile"
  fi
  cp "$HERE/guest/linux-arm64/Kbuild" "$HERE/guest/linux-arm64/policyc_lab_attack_arm64.c" "$LAB/mod/"
  make -s -C "$KH/usr/src/linux-headers-$KV" M="$LAB/mod" ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- modules \
    >"$LAB/mod/make.log" 2>&1 || { cat "$LAB/mod/make.log"; log "module build failed"; exit 1; }
  cp "$LAB/mod/policyc_lab_attack_arm64.ko" "$G/"
  awk '$3 == "sys_call_table" {t = $1} $3 == "commit_creds" {c = $1} END {print "table_link=0x" t " creds_link=0x" c}' \
    "$MAP" > "$G/modparams"
  cp "$HERE/guest/linux/init_arm64.sh" "$G/init"; chmod +x "$G/init"
  (cd "$G" && find . | cpio -o -H newc 2>/dev/null) | gzip -1 > "$LAB/guest.cpio.gz"
  log "guest: $(cat "$G/modparams")"
}

# Debian's arm64 hypervisor is built without CONFIG_MEM_ACCESS (its xen-4.17-arm64.config says
# "# CONFIG_MEM_ACCESS is not set"; xc_set_mem_access gives ENOSYS, measured), so no stage-2 watching.
# The same Xen 4.17 from Debian's source package (4.17.5: the 4.17.7 source is 404 on the mirror),
# with Debian's own config plus CONFIG_MEM_ACCESS=y, cross-built: the hypervisor only, ~2 min.
# The tools stay Debian's 4.17.7 (same domctl/vm_event interface versions).
xen_mem_access() {
  local X=$LAB/xensrc; mkdir -p "$X/lists/partial"; cd "$X"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main" > src.list
  local O=(-o Dir::Etc::sourcelist="$X/src.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$X/lists")
  apt-get "${O[@]}" update -q >/dev/null
  local V; V=$(apt-cache "${O[@]}" showsrc xen | awk '/^Version: 4[.]17/{print $2}' | sort -V | tail -1)
  ls xen_*.orig.tar.xz >/dev/null 2>&1 || apt-get "${O[@]}" source --download-only "xen=$V" >/dev/null
  command -v flex >/dev/null && command -v bison >/dev/null || apt-get install -y -q flex bison >/dev/null
  rm -rf src; mkdir src; tar -C src --strip-components=1 -xf xen_*.orig.tar.xz
  cp "$LAB/root/boot/xen-4.17-arm64.config" src/xen/.config
  sed -i 's/^# CONFIG_MEM_ACCESS is not set/CONFIG_MEM_ACCESS=y/' src/xen/.config
  local M=(-C src/xen XEN_TARGET_ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-)
  make "${M[@]}" olddefconfig >/dev/null
  grep -qx CONFIG_MEM_ACCESS=y src/xen/.config || { log "CONFIG_MEM_ACCESS did not stick"; exit 1; }
  nice make "${M[@]}" -j"$(nproc)" >"$X/build.log" 2>&1 || { tail -20 "$X/build.log"; exit 1; }
  cp src/xen/xen "$LAB/xen-4.17-arm64-mem-access"
  log "Xen $V with CONFIG_MEM_ACCESS=y: $LAB/xen-4.17-arm64-mem-access"
}

build() {
  [ -d "$LAB/root/boot" ] || fetch
  build_ring_extension; build_guest; build_dom0
}

boot() {
  cd "$LAB"
  [ -f dom0.cpio.gz ] || { log "run '$0 setup' first"; exit 1; }
  local KV=${KPKG#linux-image-} t0=$SECONDS XEN=${LAB_XEN:-xen-4.17-arm64-mem-access}
  [ "$XEN" = debian ] || [ -f "$XEN" ] || XEN=debian
  [ "$XEN" = debian ] && XEN=root/boot/xen-4.17-arm64
  echo "=== LAB-XEN $XEN"
  boot_with_retry arm64 boot-serial.log \
    timeout "${LAB_TIMEOUT:-900}" qemu-system-aarch64 -machine virt,virtualization=on,gic-version=3 \
    -cpu "${LAB_CPU:-cortex-a57}" -accel tcg,thread=multi -smp 2 -m 3G -nographic -no-reboot \
    -kernel "$XEN" \
    -append "dom0_mem=1536M console=dtuart dtuart=/pl011@9000000 loglvl=all guest_loglvl=all" \
    -device guest-loader,addr=0x49000000,kernel=root/boot/vmlinuz-$KV,bootargs="console=hvc0 earlycon=xenboot rdinit=/init lab.seconds=$LAB_SECONDS" \
    -device guest-loader,addr=0x50000000,initrd=dom0.cpio.gz
  echo "=== LAB-WALL arm64 seconds=$((SECONDS - t0))" | tee -a boot-serial.log
}

case "${1:-}" in
  setup) packages; fetch; xen_mem_access; build ;;
  fetch) fetch ;;
  xen) xen_mem_access ;;
  build) build ;;
  boot) boot ;;
  run) [ -f "$LAB/dom0.cpio.gz" ] || build; boot ;;
  *) echo "usage: $0 setup|fetch|xen|build|boot|run   (work dir: \$LAB=$LAB)"; exit 2 ;;
esac
