#!/bin/busybox sh
# /init of the lab's dom0 initramfs (built by tests/lab/lab.sh): start the Xen toolstack,
# create the test guest, run tests/lab/dom0_check.py, print the results between the
# markers on the console, power off (QEMU and Bochs then exit by themselves).
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:$(echo /usr/lib/xen-*/bin):/bin:/sbin   # xen-4.17 or xen-4.20 (LAB_XEN)
export PYTHONHOME=/opt/py PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
up() { cut -d' ' -f1 /proc/uptime; }
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run
rm -rf /var/run; ln -s /run /var/run
MODE=qemu; SECS=20; GUEST=tiny
for a in $(cat /proc/cmdline); do
  case "$a" in
    lab.mode=*) MODE=${a#lab.mode=} ;; lab.seconds=*) SECS=${a#lab.seconds=} ;; lab.guest=*) GUEST=${a#lab.guest=} ;;
  esac
done
[ "$GUEST" = linux ] && [ ! -f /lab/linuxguest.cfg ] && { echo "LAB-ERR no Linux guest in this build"; GUEST=tiny; }
echo "=== LAB-BEGIN mode=$MODE guest=$GUEST seconds=$SECS"
echo "LAB-T dom0_init $(up)"
. /lab/toolstack.sh
T=$(up)
P=/lab/policies
case "$MODE/$GUEST" in
  bochs3/tiny)
    # Bochs 3.0 has the monitor trap flag: the x86_64 target's strategies (altp2m views with
    # FAST_SINGLESTEP, the breakpoint in a shadow frame, a fed read, an injected #UD, register refusals),
    # then in the same boot the audit-mode policy (would-deny)
    NAME=labguest; xl create -q /lab/labguest-altp2m.cfg || xl create -q /lab/labguest.cfg
    ARGS="--policy $P/lab-strategies-vmx.vmi --audit-policy $P/lab-audit-vmx.vmi --check $P/lab-strategies-vmx.vmi $P/lab-audit-vmx.vmi --startup 900" ;;
  bochs3/linux)
    NAME=linuxguest; xl create -q /lab/linuxguest-altp2m.cfg || xl create -q /lab/linuxguest.cfg
    # the example policy as written, for x86_64 (MTF)
    ARGS="--policy $P/linux-kernel-integrity.vmi --check $P/linux-kernel-integrity.vmi --startup 900 --boot-timeout 1500" ;;
  bochs/tiny)
    NAME=labguest; xl create -q /lab/labguest-altp2m.cfg || xl create -q /lab/labguest.cfg
    ARGS="--policy $P/lab-memory-vmx.vmi --startup 900" ;;
  bochs/linux)
    NAME=linuxguest; xl create -q /lab/linuxguest-altp2m.cfg || xl create -q /lab/linuxguest.cfg
    # the example policy as written; Bochs's VT-x has EPT but no monitor trap flag
    ARGS="--policy $P/linux-kernel-integrity.vmi --target x86_64-nomtf --check $P/linux-kernel-integrity.vmi --startup 900 --boot-timeout 1500" ;;
  qemu/linux)
    NAME=linuxguest; xl create -q /lab/linuxguest.cfg
    ARGS="--policy $P/lab-linux-registers-svm.vmi --must-refuse $P/linux-kernel-integrity.vmi --host-target x86_64-svm" ;;
  *)
    NAME=labguest; xl create -q /lab/labguest.cfg
    ARGS="--policy $P/lab-registers-svm.vmi --check $P/lab-registers-svm.vmi $P/lab-memory-vmx.vmi $P/lab-cpuid-svm.vmi --baseline $P/lab-cpuid-svm.vmi --must-refuse $P/lab-memory-vmx.vmi --host-target x86_64-svm" ;;
esac
D=$(xl domid $NAME 2>/dev/null)
echo "LAB-T guest_created $(up) (create started at $T) domid=$D"
# With two or more physical CPUs (QEMU: -smp 2), dom0 and the guest each get one of their own: an
# event then never waits for the other's 30 ms scheduler slice to end, which otherwise decides
# the rates the lab compares (the enforcer's and xen-access's alike) more than either program does.
NCPU=$(xl info 2>/dev/null | awk '$1=="nr_cpus"{print $3}')
if [ -n "$D" ] && [ "${NCPU:-1}" -ge 2 ]; then
  xl vcpu-pin 0 all 0 && xl vcpu-pin "$D" all 1-$((NCPU - 1)) && echo "LAB-INFO pinned: dom0 on pCPU 0, d$D on 1-$((NCPU - 1))"
fi
if [ -n "$D" ]; then
  /opt/py/bin/python3 /lab/dom0_check.py --mode "$MODE" --guest "$GUEST" --domid "$D" --seconds "$SECS" $ARGS 2>&1
  echo "LAB-T check_done $(up) rc=$?"
  xl list | sed 's/^/LAB-INFO /'
  if [ "$MODE/$GUEST" = bochs3/tiny ] && [ -f /lab/labguest64.elf ]; then
    # the page-table remap followed live: the long-mode guest in its place (one emulated CPU: the tiny
    # guest would take its time), under policies/lab-remap-vmx.vmi (tests/lab/dom0_remap.py)
    xl destroy "$D"
    xl create -q /lab/labguest64-altp2m.cfg
    D64=$(xl domid labguest64 2>/dev/null)
    echo "LAB-T remap_guest_created $(up) domid=$D64"
    # 8 s enforced: about 1,700 writes through the watched address, the remap among them
    [ -n "$D64" ] && /opt/py/bin/python3 /lab/dom0_remap.py --domid "$D64" --policy $P/lab-remap-vmx.vmi \
      --seconds 8 2>&1
    echo "LAB-T remap_done $(up) rc=$?"
  fi
else
  echo "LAB-ERR no guest"
fi
echo "=== LAB-END"
sync; poweroff -f
