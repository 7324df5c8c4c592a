#!/bin/bash
# policyc's Xen lab: real Xen 4.17 (Debian bookworm; LAB_XEN=4.20: Debian trixie's Xen 4.20 and a
# trixie dom0 root) nested in an emulator, a PV dom0 built
# from an initramfs that carries python3 + policyc, and two PVH test guests that attack and do
# benign work in a loop: a tiny one (tests/lab/guest/labguest.S) and Debian's Linux 6.1.0-56 with
# an attacker module (tests/lab/guest/linux/), the kernel the example policies were written for.
#
#   tests/lab/lab.sh setup    # apt packages, the Debian kernel, then `build`
#   tests/lab/lab.sh build    # rebuild guest + dom0 initramfs + Bochs ISO (after editing the project)
#   tests/lab/lab.sh qemu     # QEMU TCG, emulated AMD SVM+NPT: register policy   (fast)
#   tests/lab/lab.sh bochs    # Bochs, emulated Intel VT-x+EPT: memory+register policy (slow)
#   tests/lab/lab.sh arm64    # Xen 4.17 arm64 in qemu-system-aarch64 TCG (tests/lab/lab_arm64.sh)
#
# LAB_GUEST picks the test guest: `tiny` (QEMU's default) or `linux` (Bochs's default, with the
# example policy linux-kernel-integrity.vmi). For Bochs it is read at `build` (it goes into the ISO).
#
# LAB_XEN picks Xen: 4.17 (the default: the machine's own bookworm packages) or 4.20 (trixie's
# hypervisor, and a dom0 whose Xen tools and libraries and glibc are trixie's, fetched into
# $LAB/trixie by tools/fetch_trixie.sh; the dom0 kernel stays bookworm's).
#
# Everything is written under $LAB (default /tmp/policyc-lab, /tmp/policyc-lab-4.20 for Xen 4.20),
# never into the repository.
# LAB_SECONDS (default 20) is how long the enforcer, and then xen-access, run in dom0.
# The run prints the serial console; the check's results are between
# "=== LAB-BEGIN" and "=== LAB-END" (tests/test_lab.py parses them). See tests/lab/README.md.
#
# Pitfalls taken care of (measured in /work/shared/xenlab/NOTES.md): QEMU's -kernel needs Xen's
# 32-bit multiboot ELF; `-cpu ...,-smap` (QEMU 7.2 TCG pops IRET frames as supervisor accesses,
# SMAP-faulting the ring-3 PV dom0 kernel) and `-monitor` (TCG #GPs on Xen's MWAIT ECX=1);
# static busybox; libgcc_s for xl; devpts for xenconsoled; /var/run -> /run; GRUB multiboot v1
# (not v2) for Bochs; Bochs' built-in debugger needs `-rc` with "c" and stdin from /dev/null;
# Bochs has no nogui in Debian: rfb display with timeout=0.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LAB_XEN=${LAB_XEN:-4.17}
case "$LAB_XEN" in
  4.17) LAB=${LAB:-/tmp/policyc-lab} ;;
  4.20) LAB=${LAB:-/tmp/policyc-lab-4.20} ;;
  *) echo "lab: LAB_XEN=$LAB_XEN: the lab runs Xen 4.17 (Debian 12) or 4.20 (Debian 13)" >&2; exit 2 ;;
esac
KPKG=${KPKG:-linux-image-6.1.0-56-amd64}
KV=${KPKG#linux-image-}
LAB_SECONDS=${LAB_SECONDS:-20}
# The lab's Python: the project's own interpreter (where policyc and its dependencies are
# installed and the ring extension was built). Override with LAB_PYTHON.
LAB_PYTHON=${LAB_PYTHON:-$(command -v python3)}
mkdir -p "$LAB"
log() { echo "lab: $*" >&2; }
# shellcheck source=boot.sh
. "$HERE/boot.sh"

packages() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends \
    qemu-system-x86 xen-hypervisor-4.17-amd64 xen-utils-4.17 busybox-static cpio binutils cpp strace \
    bochs bochs-term bochsbios vgabios grub-pc-bin grub-common xorriso mtools \
    make gcc "linux-headers-$KV"                        # the Linux guest's attacker module
}

# Where Xen's packages are unpacked: 4.17 is installed on the machine (`packages`); 4.20 is trixie's,
# unpacked under $LAB/trixie/root with the dom0 libraries its tools need (the closure of
# xen-utils-4.20's and libxenmisc4.20's dependencies, trixie's glibc among them).
TRIXIE_PACKAGES="xen-hypervisor-4.20-amd64 xen-utils-4.20 libxenmisc4.20 libxencall1 libxendevicemodel1
  libxenevtchn1 libxenforeignmemory1 libxengnttab1 libxenstore4 libxentoollog1 libxenhypfs1 libxentoolcore1
  libyajl2 libc6 libgcc-s1 libext2fs2t64 liblzma5 libuuid1 libzstd1 zlib1g libncurses6 libtinfo6"
XROOT=/
xen_root() {
  [ "$LAB_XEN" = 4.17 ] && return 0
  XROOT=$LAB/trixie/root
  [ -f "$XROOT/boot/xen-$LAB_XEN-amd64.gz" ] && [ -x "$XROOT/usr/lib/xen-$LAB_XEN/bin/xl" ] && return 0
  log "fetching Debian trixie's Xen $LAB_XEN and dom0 libraries into $LAB/trixie"
  # shellcheck disable=SC2086
  "$REPO/tools/fetch_trixie.sh" "$LAB/trixie" $TRIXIE_PACKAGES >&2
}

kernel() {
  xen_root
  cd "$LAB"
  zcat "$XROOT/boot/xen-$LAB_XEN-amd64.gz" > "xen-$LAB_XEN.elf"   # QEMU -kernel wants the ELF32 multiboot image
  if [ ! -f "kernel/boot/vmlinuz-$KV" ]; then
    rm -rf kpkg kernel && mkdir -p kpkg
    (cd kpkg && apt-get download "$KPKG")
    dpkg-deb -x kpkg/"${KPKG}"_*.deb kernel              # extracted, never installed
  fi
}

build_guest() {
  mkdir -p "$LAB/guest"; cd "$LAB/guest"
  cpp -P "$HERE/guest/labguest.S" > labguest.s
  as --32 -o labguest.o labguest.s
  ld -m elf_i386 -T "$HERE/guest/labguest.ld" -o labguest.elf labguest.o
  # the policies name the guest's real addresses: check them against the build
  local bp wat sym addr const pol
  bp=$(nm labguest.elf | awk '$3=="bp_site"{print $1}' | sed 's/^0*/0x/')
  wat=$(nm labguest.elf | awk '$3=="watched"{print $1}' | sed 's/^0*/0x/')
  for check in lab-memory-vmx:BP_SITE:bp_site lab-memory-vmx:WATCHED:watched \
               lab-strategies-vmx:BP_SITE:bp_site lab-strategies-vmx:WATCHED:watched \
               lab-strategies-vmx:SECRET:secret lab-strategies-vmx:EXEC_FN:exec_fn \
               lab-strategies-vmx:PROBE:probe lab-audit-vmx:WATCHED:watched; do
    IFS=: read -r pol const sym <<< "$check"
    addr=$(nm labguest.elf | awk -v s="$sym" '$3==s{print $1}' | sed 's/^0*/0x/')
    grep -qi "const $const = $addr\b" "$HERE/policies/$pol.vmi" \
      || { log "$sym is at $addr: update $const in policies/$pol.vmi"; exit 1; }
  done
  log "guest built: bp_site=$bp watched=$wat"
  # the long-mode guest of the remap run (Bochs 3.0): 64-bit ELF, its PVH entry 32-bit
  cpp -P "$HERE/guest/labguest64.S" > labguest64.s
  as --64 -o labguest64.o labguest64.s
  ld -m elf_x86_64 -T "$HERE/guest/labguest64.ld" -o labguest64.elf labguest64.o
  addr=$(nm labguest64.elf | awk '$3=="remap_va"{print $1}' | sed 's/^0*/0x/')
  grep -qi "const REMAP_VA = $addr\b" "$HERE/policies/lab-remap-vmx.vmi" \
    || { log "remap_va is at $addr: update REMAP_VA in policies/lab-remap-vmx.vmi"; exit 1; }
}

copy_libs() {   # copy_libs STAGE FILE...: the shared libraries FILEs need (recursively, via ldd)
  local S=$1; shift
  ldd "$@" 2>/dev/null | awk '/=> \//{print $3}' | sort -u | while read -r l; do
    [ -e "$S/lib/x86_64-linux-gnu/$(basename "$l")" ] || cp -L "$l" "$S/lib/x86_64-linux-gnu/"
  done
}

build_initrd() {
  local S=$LAB/stage; rm -rf "$S"
  local XBIN=/usr/lib/xen-$LAB_XEN/bin
  mkdir -p $S/{bin,sbin,lib/x86_64-linux-gnu,lib64,usr/local/bin,proc,sys,dev,tmp,run,mod,lab/policies} "$S$XBIN"
  mkdir -p $S/{var/log/xen,var/lib/xen,var/lib/xenstored,etc/xen}
  cp /bin/busybox "$S/bin/busybox"                              # busybox-static (Debian's other one is dynamic)
  cp /sbin/ldconfig "$S/sbin/ldconfig"                          # static; ctypes.util.find_library needs `ldconfig -p`
  if command -v strace >/dev/null; then                          # the lab's system calls per event, where present
    cp "$(command -v strace)" "$S/usr/local/bin/strace"; copy_libs "$S" "$(command -v strace)"
  fi
  local XB="xl xenstored xenconsoled xen-init-dom0 xen-access"
  for b in $XB; do cp "$XROOT$XBIN/$b" "$S$XBIN/"; done
  if [ "$LAB_XEN" = 4.17 ]; then
    cp -a /usr/lib/x86_64-linux-gnu/libxen*.so* "$S/lib/x86_64-linux-gnu/"   # every libxen* for the cffi backend
    cp -L /lib64/ld-linux-x86-64.so.2 "$S/lib64/"
    cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$S/lib/x86_64-linux-gnu/"     # xl aborts at exit without it
    (cd "$XBIN" && copy_libs "$S" $XB)
  else
    # trixie's dom0 libraries first: glibc 2.41 (the 4.20 tools need its symbols), every libxen* of
    # 4.20 for the tools and the cffi backend, libgcc_s; copy_libs below adds only what the host's
    # Python needs beyond them (built on bookworm's older glibc, it runs on trixie's)
    find "$XROOT/usr/lib/x86_64-linux-gnu" -maxdepth 1 -name '*.so*' -exec cp -a {} "$S/lib/x86_64-linux-gnu/" \;
    cp -L "$XROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$S/lib64/"
  fi
  cp /etc/xen/xl.conf "$S/etc/xen/" 2>/dev/null || true
  local M=$LAB/kernel/lib/modules/$KV/kernel/drivers/xen
  cp $M/xen-privcmd.ko $M/xenfs/xenfs.ko $M/xen-evtchn.ko $M/xen-gntdev.ko $M/xen-gntalloc.ko "$S/mod/"

  # --- python: the interpreter, a trimmed stdlib, the project's dependencies, the project
  local PYV PFX PY=$S/opt/py
  PYV=$("$LAB_PYTHON" -c 'import sys;print("%d.%d"%sys.version_info[:2])')
  PFX=$("$LAB_PYTHON" -c 'import sys;print(sys.base_prefix)')
  local PEXE; PEXE=$("$LAB_PYTHON" -c 'import sys,os;print(os.path.realpath(sys.executable))')
  mkdir -p "$PY/bin" "$PY/lib"
  cp "$PEXE" "$PY/bin/python3"
  copy_libs "$S" "$PEXE"
  tar -C "$PFX/lib" --exclude="python$PYV/site-packages" --exclude="python$PYV/test" \
      --exclude="python$PYV/idlelib" --exclude="python$PYV/tkinter" --exclude="python$PYV/turtledemo" \
      --exclude="python$PYV/ensurepip" --exclude="python$PYV/lib2to3" --exclude="python$PYV/pydoc_data" \
      --exclude="python$PYV/distutils" --exclude="python$PYV/config-$PYV-*" --exclude='__pycache__' \
      --exclude='*/tests' --exclude='*/test' --exclude='_tkinter*' --exclude='_curses*' --exclude='readline*' \
      --exclude='_dbm*' --exclude='_gdbm*' --exclude='nis.*' --exclude='*.a' \
      -cf - "python$PYV" | tar -C "$PY/lib" -xf -
  copy_libs "$S" "$PY/lib/python$PYV/lib-dynload/"*.so
  local SP=$PY/lib/python$PYV/site-packages; mkdir -p "$SP"
  # the runtime dependencies of policyc (pyproject.toml), resolved from the installed metadata
  "$LAB_PYTHON" - "$SP" <<'EOF'
import importlib.metadata as md, re, shutil, sys, pathlib
dest = pathlib.Path(sys.argv[1]); seen = set(); todo = list(md.requires("policyc") and
    [r for r in md.requires("policyc") if "extra ==" not in r])
todo = [re.split(r"[ ;<>=!\[~(]", r)[0] for r in todo]
while todo:
    name = todo.pop(); key = name.lower().replace("_", "-")
    if key in seen: continue
    seen.add(key); d = md.distribution(name)
    todo += [re.split(r"[ ;<>=!\[~(]", r)[0] for r in (d.requires or []) if "extra ==" not in r]
    tops = {f.parts[0] for f in d.files if f.parts[0] not in ("..", "bin", "__pycache__")}
    for t in tops:
        src = pathlib.Path(d.locate_file(t))
        if src.is_dir():
            shutil.copytree(src, dest / t, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "tests", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / t)
    print(f"lab: python dependency {d.metadata['Name']} {d.version}", file=sys.stderr)
EOF
  # policyc laid out as installed (pyproject's package-dir), ring extension included
  mkdir -p "$SP/policyc"
  cp -a "$REPO/policyc/." "$SP/policyc/"
  cp -a "$REPO/grammar" "$SP/policyc/grammar"
  cp -a "$REPO/runtime" "$SP/policyc/runtime"
  cp -a "$REPO/native" "$SP/policyc/native"
  find "$SP/policyc" -name __pycache__ -prune -exec rm -rf {} +
  ls "$SP/policyc/native/"_vm_event*.so >/dev/null || { log "policyc.native._vm_event is not built (pip install -e .)"; exit 1; }
  copy_libs "$S" "$SP/policyc/native/"_vm_event*.so "$SP"/*.so
  # precompile with the same interpreter (the emulated dom0 is slow at it)
  "$LAB_PYTHON" -m compileall -q -j0 "$PY/lib/python$PYV" >/dev/null || true
  printf '#!/bin/sh\nexec /opt/py/bin/python3 -m policyc "$@"\n' > "$S/usr/local/bin/policyc"
  chmod +x "$S/usr/local/bin/policyc"
  /sbin/ldconfig -r "$S" 2>/dev/null || true        # /etc/ld.so.cache for dlopen/find_library by name

  # --- the lab: guest, policies, driver, /init
  cp "$LAB/guest/labguest.elf" "$LAB/guest/labguest64.elf" "$S/lab/"
  cp "$HERE"/policies/*.vmi "$S/lab/policies/"
  cp "$HERE/dom0_check.py" "$HERE/dom0_strategies.py" "$HERE/dom0_remap.py" "$HERE/toolstack.sh" "$S/lab/"
  cat > "$S/lab/labguest.cfg" <<'EOF'
name = "labguest"
type = "pvh"
kernel = "/lab/labguest.elf"
memory = 16
vcpus = 1
on_crash = "preserve"
EOF
  sed 's/^vcpus = 1/vcpus = 1\naltp2m = "external"/' "$S/lab/labguest.cfg" > "$S/lab/labguest-altp2m.cfg"
  sed 's/labguest/labguest64/g' "$S/lab/labguest-altp2m.cfg" > "$S/lab/labguest64-altp2m.cfg"
  if [ -f "$LAB/linuxguest.cpio.gz" ]; then
    cp "$LAB/kernel/boot/vmlinuz-$KV" "$S/lab/vmlinuz"
    cp "$LAB/linuxguest.cpio.gz" "$S/lab/"
    # the example policy as written, with the symbol file it names
    cp "$REPO/examples/policies/linux-kernel-integrity.vmi" "$REPO/examples/policies/linux-6.1.System.map" \
       "$S/lab/policies/"
    # tsc_mode native: QEMU TCG misreports RDTSCP intercepts without nrip-save (NOTES.md)
    cat > "$S/lab/linuxguest.cfg" <<'EOF'
name = "linuxguest"
type = "pvh"
kernel = "/lab/vmlinuz"
ramdisk = "/lab/linuxguest.cpio.gz"
extra = "console=hvc0 loglevel=6"
memory = 256
vcpus = 1
tsc_mode = "native"
on_crash = "preserve"
EOF
    sed 's/^vcpus = 1/vcpus = 1\naltp2m = "external"/' "$S/lab/linuxguest.cfg" > "$S/lab/linuxguest-altp2m.cfg"
  fi
  cp "$HERE/init.sh" "$S/init"; chmod +x "$S/init"
  (cd "$S" && find . | cpio -o -H newc 2>/dev/null) | gzip -1 > "$LAB/dom0.cpio.gz"
  log "dom0 initramfs: $(du -h "$LAB/dom0.cpio.gz" | cut -f1) gz, $(du -sh "$S" | cut -f1) unpacked"
}

build_iso() {   # Bochs has no direct kernel loading: GRUB, multiboot v1 (v2 triple-faults there)
  command -v grub-mkrescue >/dev/null || { log "no grub-mkrescue: skipping the Bochs ISO"; return 0; }
  cd "$LAB"; rm -rf iso; mkdir -p iso/boot/grub
  cp "xen-$LAB_XEN.elf" iso/boot/xen
  cp "kernel/boot/vmlinuz-$KV" iso/boot/vmlinuz
  cp dom0.cpio.gz iso/boot/dom0.cpio.gz
  # one ISO per Bochs: the mode on dom0's command line picks the target (bochs: x86_64-nomtf; bochs3: x86_64)
  local mode iso
  for mode in bochs bochs3; do
    iso=lab.iso; [ "$mode" = bochs3 ] && iso=lab-bochs3.iso
    cat > iso/boot/grub/grub.cfg <<EOF
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
menuentry "xen" {
  multiboot /boot/xen console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=1 loglvl=all guest_loglvl=all altp2m=1
  module /boot/vmlinuz console=hvc0 earlyprintk=xen lab.mode=$mode lab.seconds=$LAB_SECONDS lab.guest=${LAB_GUEST:-linux}
  module /boot/dom0.cpio.gz
}
EOF
    grub-mkrescue -o "$iso" iso >/dev/null 2>&1
  done
  log "Bochs ISOs (Xen $LAB_XEN): $LAB/lab.iso, $LAB/lab-bochs3.iso"
}

build_linux_guest() {   # the attacker module, built against the guest kernel's own headers
  local G=$LAB/linuxguest KB=/usr/src/linux-headers-$KV
  [ -d "$KB" ] || { log "no $KB (apt-get install linux-headers-$KV): skipping the Linux guest"; return 0; }
  rm -rf "$G"; mkdir -p "$G/mod" "$G/root/bin"
  cp "$HERE/guest/linux/Kbuild" "$HERE/guest/linux/policyc_lab_attack.c" "$G/mod/"
  make -s -C "$KB" M="$G/mod" modules >"$G/make.log" 2>&1 || { cat "$G/make.log"; log "module build failed"; exit 1; }
  cp /bin/busybox "$G/root/bin/busybox"
  cp "$G/mod/policyc_lab_attack.ko" "$G/root/"
  cp "$HERE/guest/linux/init.sh" "$G/root/init"; chmod +x "$G/root/init"
  mkdir -p "$G/root/"{proc,sys,dev,tmp}
  (cd "$G/root" && find . | cpio -o -H newc 2>/dev/null) | gzip -1 > "$LAB/linuxguest.cpio.gz"
  log "Linux guest: kernel $KV, initramfs $(du -h "$LAB/linuxguest.cpio.gz" | cut -f1)"
}

build() { kernel; build_guest; build_linux_guest; build_initrd; build_iso; }

qemu() {
  cd "$LAB"
  [ -f dom0.cpio.gz ] || { log "run '$0 setup' first"; exit 1; }
  local t0=$SECONDS
  # -smap / -monitor: see the header. nrip-save is missing under TCG (a harmless warning).
  # A boot stalled before dom0's /init is booted again, once (boot.sh).
  boot_with_retry qemu qemu-serial.log \
    timeout "${LAB_TIMEOUT:-1200}" qemu-system-x86_64 -machine q35 -accel tcg,thread=multi \
    -cpu EPYC,+svm,+npt,-smap,-monitor -smp 2 -m 3G -nographic -no-reboot \
    -kernel "xen-$LAB_XEN.elf" \
    -append "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M loglvl=all guest_loglvl=all" \
    -initrd "kernel/boot/vmlinuz-$KV console=hvc0 lab.mode=qemu lab.seconds=$LAB_SECONDS lab.guest=${LAB_GUEST:-tiny},dom0.cpio.gz"
  echo "=== LAB-WALL qemu seconds=$((SECONDS - t0))" | tee -a qemu-serial.log
}

bochs() {
  cd "$LAB"
  [ -f lab.iso ] || { log "run '$0 setup' first"; exit 1; }
  cat > bochsrc.txt <<EOF
memory: guest=2048, host=2048
cpu: model=corei7_skylake_x, count=1, ips=100000000, reset_on_triple_fault=0, ignore_bad_msrs=1
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/vgabios/vgabios.bin
ata0-master: type=cdrom, path=$LAB/lab.iso, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=$LAB/bochs-serial.log
display_library: rfb, options="timeout=0"
clock: sync=none, time0=local
log: $LAB/bochs.log
panic: action=fatal
error: action=report
info: action=report
debug: action=ignore
EOF
  rm -f bochs-serial.log; echo c > bochs-dbg.rc
  local t0=$SECONDS
  timeout "${LAB_TIMEOUT:-1500}" bochs-bin -q -f bochsrc.txt -rc bochs-dbg.rc < /dev/null > bochs.out 2>&1 || true
  cat bochs-serial.log
  echo "=== LAB-WALL bochs seconds=$((SECONDS - t0))" | tee -a bochs-serial.log
}

# Bochs 3.0 (Debian trixie's source, built once into $BOCHS3): its Intel models have the monitor
# trap flag. Built by build_bochs3.sh beside this script (after the lab notes' recipe); about 6 min on 2 CPUs.
BOCHS3=${BOCHS3:-/opt/bochs3}
BOCHS3_RECIPE=${BOCHS3_RECIPE:-$HERE/build_bochs3.sh}
bochs3_build() {
  [ -x "$BOCHS3/bin/bochs" ] && { log "Bochs 3.0: $BOCHS3/bin/bochs (cached)"; return 0; }
  [ -f "$BOCHS3_RECIPE" ] || { log "no Bochs 3.0 and no recipe at $BOCHS3_RECIPE"; return 1; }
  log "building Bochs 3.0 into $BOCHS3 (about 6 min)"
  bash "$BOCHS3_RECIPE" "$BOCHS3" > "$LAB/bochs3-build.log" 2>&1 || { tail -5 "$LAB/bochs3-build.log"; return 1; }
}

bochs3() {
  cd "$LAB"
  [ -f lab-bochs3.iso ] || { log "run '$0 build' first"; exit 1; }
  [ -x "$BOCHS3/bin/bochs" ] || { log "no Bochs 3.0 at $BOCHS3: run '$0 bochs3-build'"; exit 1; }
  # corei7_haswell_4770, not skylake_x (posted interrupts break Xen's VMLAUNCH); no GUI and no
  # debugger in this build: the term display under `script`, no -rc.
  cat > bochs3rc.txt <<EOF
memory: guest=2048, host=2048
cpu: model=corei7_haswell_4770, count=1, ips=100000000, reset_on_triple_fault=0, ignore_bad_msrs=1
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/vgabios/vgabios.bin
ata0-master: type=cdrom, path=$LAB/lab-bochs3.iso, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=$LAB/bochs3-serial.log
display_library: term
clock: sync=none, time0=local
log: $LAB/bochs3.log
panic: action=fatal
error: action=report
info: action=report
debug: action=ignore
EOF
  rm -f bochs3-serial.log
  local t0=$SECONDS
  timeout "${LAB_TIMEOUT:-2700}" script -qc "$BOCHS3/bin/bochs -q -f bochs3rc.txt" /dev/null < /dev/null > bochs3.out 2>&1 || true
  cat bochs3-serial.log
  echo "=== LAB-WALL bochs3 seconds=$((SECONDS - t0))" | tee -a bochs3-serial.log
}

case "${1:-}" in
  setup) packages; build; [ -z "${LAB_BOCHS3:-}" ] || bochs3_build ;;
  bochs3-build) bochs3_build ;;
  bochs3) bochs3 ;;
  build) build ;;
  qemu) qemu ;;
  bochs) bochs ;;
  arm64) shift; LAB=${LAB_ARM64:-/tmp/policyc-lab-arm64} exec "$HERE/lab_arm64.sh" "${@:-run}" ;;   # Xen on arm64: lab_arm64.sh
  *) echo "usage: $0 setup|build|qemu|bochs|bochs3-build|bochs3|arm64 [setup|fetch|build|boot|run]   (work dir: \$LAB=$LAB)"; exit 2 ;;
esac
