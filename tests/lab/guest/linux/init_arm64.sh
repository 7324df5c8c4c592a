#!/bin/busybox sh
# /init of the arm64 lab guest (tests/lab/lab_arm64.sh): load the attacker module with the link
# addresses of sys_call_table and commit_creds (from the System.map, written in at build), then
# count rounds of a busy shell loop on the console.
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
echo "ARMGUEST up $(uname -r) $(cut -d' ' -f1 /proc/uptime)"
insmod /policyc_lab_attack_arm64.ko $(cat /modparams) || echo "ARMGUEST insmod failed"
n=0
while true; do n=$((n + 1)); [ $((n % 10)) = 0 ] && echo "ARMGUEST round=$n"; sleep 0.1; done
