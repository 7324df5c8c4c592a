# Sourced by the dom0 /init of both labs (init.sh, init_arm64.sh): the Xen modules, xenfs and the
# toolstack daemons, then `xl info`'s main lines on the console.
for m in xen-privcmd xenfs xen-evtchn xen-gntdev xen-gntalloc; do insmod /mod/$m.ko || echo "LAB-ERR insmod $m"; done
mount -t xenfs xenfs /proc/xen
mkdir -p /run/xen /run/xenstored
xenstored --pid-file=/run/xenstored.pid
xen-init-dom0 >/dev/null
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen
echo "LAB-T toolstack_ready $(cut -d' ' -f1 /proc/uptime)"
xl info | grep -E 'xen_version|xen_caps|virt_caps|nr_cpus|free_memory|xen_commandline' | sed 's/^/LAB-INFO /'
