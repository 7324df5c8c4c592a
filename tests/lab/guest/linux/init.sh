#!/bin/busybox sh
# /init of the lab's Linux test guest (Debian's 6.1.0-56 kernel, PVH): load the attacker
# module (policyc_lab_attack.ko) with sys_call_table's address from /proc/kallsyms, then idle.
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
SCT=$(awk '$3 == "sys_call_table" {print $1; exit}' /proc/kallsyms)
echo "linuxguest: kernel $(uname -r), sys_call_table at 0x$SCT, uptime $(cut -d' ' -f1 /proc/uptime)"
insmod /policyc_lab_attack.ko sys_call_table=0x$SCT || echo "linuxguest: insmod failed"
# Nothing else runs: every event the enforcer sees is the attacker's (or the kernel's own).
while :; do sleep 3600; done
