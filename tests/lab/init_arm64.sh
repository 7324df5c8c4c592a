#!/bin/busybox sh
# /init of the arm64 lab's dom0 initramfs (tests/lab/lab_arm64.sh): Debian arm64 userland pieces
# (python3.11, Xen 4.17 tools), the toolstack, the arm64 guest, then dom0_check_arm64.py; results
# between the markers, then power off (QEMU exits by itself).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/lib/xen-4.17/bin HOME=/tmp PYTHONDONTWRITEBYTECODE=1
up() { cut -d' ' -f1 /proc/uptime; }
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run
rm -rf /var/run; ln -s /run /var/run
SECS=20
for a in $(cat /proc/cmdline); do case "$a" in lab.seconds=*) SECS=${a#lab.seconds=} ;; esac; done
echo "=== LAB-BEGIN mode=arm64 guest=linux seconds=$SECS"
echo "LAB-T dom0_init $(up)"
. /lab/toolstack.sh
T=$(up)
xl create -q /lab/guest.cfg || echo "LAB-ERR xl create failed"
D=$(xl domid armguest 2>/dev/null)
echo "LAB-T guest_created $(up) (create started at $T) domid=$D"
/usr/bin/python3 /lab/dom0_check_arm64.py --domid "${D:-0}" --seconds "$SECS" 2>&1
echo "LAB-T check_done $(up) rc=$?"
xl list | sed 's/^/LAB-INFO /'
echo "=== LAB-END"
sync; poweroff -f
