#!/bin/busybox sh
# /init of the arm64 lab guest: announce itself on the console, then count rounds.
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
echo "ARMGUEST up $(uname -r) $(cut -d' ' -f1 /proc/uptime)"
head -c 160 /proc/version; echo
n=0
while true; do n=$((n + 1)); [ $((n % 50)) = 0 ] && echo "ARMGUEST round=$n"; sleep 0.1; done
