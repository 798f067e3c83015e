#!/bin/sh
# /init of the initramfs that tests/qemu/run-vm.sh builds (busybox sh, PID 1 in the guest).
#
# 1. load the modules that reach the shares (/mods/order), mount the host's / (virtiofs
#    tag hostroot) read-only under a tmpfs overlay, and the run directory (tag hostrun)
#    and every -w directory read-write at the same path as on the host;
# 2. make the guest kernel's modules visible at /lib/modules/$(uname -r), both here (the
#    kernel's request_module() helper runs in PID 1's root) and in the overlay (tools that
#    call modprobe themselves, like iptables-legacy), and load $RUN/modules;
# 3. chroot into the overlay and run $RUN/job.sh with output on ttyS1; write its exit
#    status to $RUN/exit-status and power off.
# Kernel arguments: sluice_run=DIR (run directory), sluice_kmods=DIR (host path of the
# guest kernel's lib/modules/<kver>), sluice_rw=TAG:DIR,... (read-write shares).

PATH=/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

RUN='' KMODS='' RW=''
read -r CMDLINE </proc/cmdline
for w in $CMDLINE; do
    case $w in
        sluice_run=*) RUN=${w#*=} ;;
        sluice_kmods=*) KMODS=${w#*=} ;;
        sluice_rw=*) RW=${w#*=} ;;
    esac
done
uptime_s() { cut -d' ' -f1 /proc/uptime; }
say() { echo "[guest-init $(uptime_s)] $*"; }
fail() {
    # No exit-status file: run-vm.sh reports that the job never ran (125).
    say "FATAL: $*"
    poweroff -f
}

while read -r ko; do
    insmod "/mods/$ko" || say "insmod $ko failed"
done </mods/order

mkdir -p /host /ovl /root
mount -t virtiofs -o ro hostroot /host || fail "mount hostroot"
mount -t tmpfs -o mode=0755 tmpfs /ovl
mkdir -p /ovl/upper /ovl/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work /root ||
    fail "overlay"
R=/root
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
# /tmp stays the overlay of the host's /tmp (writes land in the tmpfs upper layer): a
# checkout or a cargo target under /tmp must stay visible to the job.
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
mkdir -p $R/run/netns $R/run/lock
[ -n "$RUN" ] || fail "no sluice_run= on the kernel command line"
mkdir -p "$R$RUN"
mount -t virtiofs hostrun "$R$RUN" || fail "mount hostrun"
# -w directories: tag:path pairs, comma separated
for pair in $(echo "$RW" | tr ',' ' '); do
    mkdir -p "$R${pair#*:}"
    mount -t virtiofs "${pair%%:*}" "$R${pair#*:}" || fail "mount ${pair#*:}"
done

KVER=$(uname -r)
if [ -n "$KMODS" ] && [ -d "$R$KMODS" ]; then
    mkdir -p /lib/modules/"$KVER" $R/lib/modules/"$KVER"
    mount --bind "$R$KMODS" /lib/modules/"$KVER"
    mount --bind "$R$KMODS" $R/lib/modules/"$KVER"
    echo /sbin/modprobe >/proc/sys/kernel/modprobe
    # A host without kmod has no modprobe in its userland: lend busybox's.
    if [ ! -e $R/sbin/modprobe ] && [ ! -e $R/usr/sbin/modprobe ]; then
        # (iptables-legacy execs the path in /proc/sys/kernel/modprobe inside the chroot)
        cp /bin/busybox $R/usr/local/sbin/busybox-modprobe
        ln -s /usr/local/sbin/busybox-modprobe $R/usr/sbin/modprobe
    fi
    failed=
    while read -r m; do
        modprobe "$m" 2>/dev/null || failed="$failed $m"
    done <"$R$RUN/modules"
    [ -n "$failed" ] && say "modules that failed to load:$failed"
else
    say "no module tree at $KMODS"
fi
hostname sluice-vm
ip link set lo up

uptime_s >"$R$RUN/ready-uptime"
stty -F /dev/ttyS1 raw -echo 2>/dev/null
chroot $R /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root TERM=dumb LANG=C.UTF-8 SLUICE_IN_VM=1 \
    /bin/bash "$RUN/job.sh" </dev/null >/dev/ttyS1 2>&1
echo $? >"$R$RUN/exit-status"
sync
poweroff -f
