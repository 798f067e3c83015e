#!/usr/bin/env bash
# run-vm.sh: run one command as root inside a throwaway QEMU (TCG) guest that boots a
# Debian cloud kernel (which has ipip, vxlan, sctp, … as modules) on top of this host's
# own root filesystem, shared read-only through virtiofs with a tmpfs overlay on top.
# Binaries built on the host (cargo's target dirs included) run unchanged in the guest.
#
#   tests/qemu/run-vm.sh [-t SECONDS] [-m MIB] [-M MOD,MOD] [-e VAR]... [-w DIR]... [-k] [--] CMD [ARG...]
#
#   -t SECONDS  wall-clock limit for the whole VM (default 900)
#   -m MIB      guest memory (default 1024)
#   -M MODS     extra kernel modules to load before CMD (comma separated)
#   -e VAR      pass the host's VAR into the guest (repeatable); CI,
#               SLUICE_REQUIRE_PRIVILEGED, RUST_BACKTRACE, RUST_LOG and SLUICE_BIN_* always are
#   -w DIR      share the host directory DIR read-write at the same path (repeatable;
#               the rest of / is read-only with a throwaway overlay): how results get out
#   -k          keep the run directory (console log etc.) even on success
#
# CMD runs with cwd = the caller's cwd, PATH = the usual root PATH, SLUICE_IN_VM=1, in
# the guest's initial network namespace; its stdout and stderr are streamed here.
# Exit status: CMD's; 124 on timeout; 125 when the VM could not run CMD at all.
#
# Cache (kernel, initramfs; reused across runs): $SLUICE_QEMU_CACHE, default
# <repo>/.sluice-cache/qemu (gitignored). The kernel is the package that
# linux-image-cloud-amd64 depends on (override: SLUICE_QEMU_KERNEL_PKG=linux-image-…),
# fetched once with apt-get download. Needs root, qemu-system-x86, busybox-static, cpio.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${SLUICE_QEMU_CACHE:-$REPO/.sluice-cache/qemu}
TIMEOUT=900 MEM=1024 EXTRA_MODS='' KEEP=0
PASS_ENV=(CI SLUICE_REQUIRE_PRIVILEGED RUST_BACKTRACE RUST_LOG)
RW_DIRS=()

# Defined before option parsing: -w reports a bad directory through it.
die() { echo "[run-vm] error: $*" >&2; exit 125; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 125; }
while getopts "t:m:M:e:w:kh" o; do
    case $o in
        t) TIMEOUT=$OPTARG ;; m) MEM=$OPTARG ;; M) EXTRA_MODS=$OPTARG ;;
        e) PASS_ENV+=("$OPTARG") ;; k) KEEP=1 ;;
        w) d=$(realpath -e "$OPTARG" 2>/dev/null) || d=
           if [ -z "$d" ] || [ ! -d "$d" ]; then die "-w $OPTARG: not a directory"; fi
           case $d in *[[:space:],:]*) die "-w $d: no spaces, commas or colons, please" ;; esac
           RW_DIRS+=("$d") ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ "${1:-}" = -- ] && shift
[ $# -ge 1 ] || usage

log() { echo "[run-vm] $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

T0=$(now)
[ "$(id -u)" = 0 ] || die "needs root (virtiofsd shares / and runs as root)"
for t in qemu-system-x86_64 busybox cpio gzip dpkg-deb apt-get; do
    command -v "$t" >/dev/null || die "$t not found (apt-get install qemu-system-x86 busybox-static cpio)"
done
BUSYBOX=$(command -v busybox)
file_is_static() { ! ldd "$1" >/dev/null 2>&1; }
file_is_static "$BUSYBOX" || die "$BUSYBOX is dynamically linked; the initramfs needs busybox-static"
VIRTIOFSD=
for c in /usr/lib/qemu/virtiofsd /usr/libexec/virtiofsd "$(command -v virtiofsd || true)"; do
    [ -n "$c" ] && [ -x "$c" ] && { VIRTIOFSD=$c; break; }
done
[ -n "$VIRTIOFSD" ] || die "virtiofsd not found (Debian 12: part of qemu-system-common)"

# ------------------------------------------------------------------- kernel ---
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9   # two runs at once must not unpack the same kernel twice
PKG=${SLUICE_QEMU_KERNEL_PKG:-}
if [ -z "$PKG" ]; then
    PKG=$(cat "$CACHE/kernel-package" 2>/dev/null || true)
    if [ -z "$PKG" ]; then
        PKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '/Depends: linux-image-/ { print $2; exit }')
        [ -n "$PKG" ] || die "cannot resolve linux-image-cloud-amd64 (run apt-get update)"
        echo "$PKG" >"$CACHE/kernel-package"
    fi
fi
KDIR=$CACHE/kernel/$PKG
if [ ! -d "$KDIR/boot" ]; then
    log "downloading $PKG (first use)"
    mkdir -p "$CACHE/debs"
    (cd "$CACHE/debs" && { ls "${PKG}"_*.deb >/dev/null 2>&1 || apt-get download -q -o APT::Sandbox::User=root "$PKG" >&2; }) ||
        die "apt-get download $PKG failed"
    rm -rf "$KDIR.tmp" && mkdir -p "$CACHE/kernel"
    debs=("$CACHE/debs/${PKG}"_*.deb)
    dpkg-deb -x "${debs[-1]}" "$KDIR.tmp" || die "dpkg-deb -x"
    mv "$KDIR.tmp" "$KDIR"
fi
kernels=("$KDIR"/boot/vmlinuz-*)
VMLINUZ=${kernels[0]}
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR=$KDIR/lib/modules/$KVER
# Debian's package ships no modules.dep (depmod runs at install). kmod's depmod also
# writes the .bin indexes that kmod's modprobe (used by iptables-legacy in the guest when
# the host has kmod) needs; busybox's writes the text files busybox modprobe reads.
if [ ! -s "$MODDIR/modules.dep" ] ||
    { command -v depmod >/dev/null && [ ! -s "$MODDIR/modules.dep.bin" ]; }; then
    if command -v depmod >/dev/null; then
        depmod -b "$KDIR" "$KVER" || die "depmod"
    else
        "$BUSYBOX" depmod -b "$KDIR" "$KVER" || die "busybox depmod"
    fi
fi

# ---------------------------------------------------------------- initramfs ---
# busybox, our init, and the modules needed to reach the shared root.
INITRD=$CACHE/initramfs-$KVER.cpio.gz
if [ ! -s "$INITRD" ] || [ "$HERE/guest-init.sh" -nt "$INITRD" ] || [ "$0" -nt "$INITRD" ]; then
    log "building $INITRD"
    tmp=$(mktemp -d "$CACHE/initramfs.XXXX")
    mkdir -p "$tmp"/{bin,dev,proc,sys,run,tmp,mods,lib/modules}
    ln -s bin "$tmp/sbin"
    cp "$BUSYBOX" "$tmp/bin/busybox"
    for a in $("$BUSYBOX" --list); do [ "$a" = busybox ] || ln -sf busybox "$tmp/bin/$a"; done
    install -m 755 "$HERE/guest-init.sh" "$tmp/init"
    # dependency order from modules.dep: a module's dependencies come before it
    declare -A seen=()
    order=()
    add_mod() {
        local rel=$1 dep
        [ -n "${seen[$rel]:-}" ] && return
        seen[$rel]=1
        local -a deps
        read -r -a deps < <(awk -F': *' -v m="$rel" '$1 == m { print $2; exit }' "$MODDIR/modules.dep") || true
        for dep in "${deps[@]}"; do
            add_mod "$dep"
        done
        order+=("$rel")
    }
    for m in virtio_pci virtiofs overlay; do
        rel=$(awk -F: -v m="/$m.ko" '{ n = split($1, p, "/"); f = "/" p[n]; sub(/\.(xz|zst|gz)$/, "", f) }
                                   f == m { print $1; exit }' "$MODDIR/modules.dep")
        if [ -n "$rel" ]; then add_mod "$rel"
        elif grep -q "/$m.ko" "$MODDIR/modules.builtin"; then :
        else die "module $m not found for $KVER"; fi
    done
    for rel in "${order[@]}"; do cp "$MODDIR/$rel" "$tmp/mods/"; basename "$rel"; done >"$tmp/mods/order"
    (cd "$tmp" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD.tmp" && mv "$INITRD.tmp" "$INITRD"
    rm -rf "$tmp"
fi
flock -u 9

# ------------------------------------------------------------------ run dir ---
mkdir -p "$CACHE/run"
RUN=$(mktemp -d "$CACHE/run/$(date +%H%M%S).XXXX")
chmod 755 "$RUN"
{
    sed -e 's/#.*//' "$HERE/modules.list"
    echo "$EXTRA_MODS" | tr ',' '\n'
} | awk 'NF { print $1 }' >"$RUN/modules"
{
    for v in "${PASS_ENV[@]}"; do [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"; done
    for v in $(compgen -e | grep '^SLUICE_BIN_' || true); do printf 'export %s=%q\n' "$v" "${!v}"; done
} >"$RUN/env"
{
    echo '#!/bin/bash'
    echo ". $RUN/env"
    printf 'cd %q || exit 125\n' "$PWD"
    printf 'exec'
    printf ' %q' "$@"
    echo
} >"$RUN/job.sh"

PIDS=()
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "$KEEP" = 1 ] || [ "$rc" -ge 124 ]; then log "run dir kept: $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# virtiofsd: the C daemon of QEMU 7.2 cannot pivot_root when sharing "/", hence
# sandbox=chroot; it has no read-only mode, so the guest mounts the share read-only
# and writes only to its tmpfs overlay. setsid keeps a terminal ^C from killing the
# daemons before QEMU; timeout bounds them if this script dies.
start_virtiofsd() {   # tag source cache
    setsid timeout $((TIMEOUT + 30)) "$VIRTIOFSD" --socket-path="$RUN/$1.sock" \
        -o source="$2" -o cache="$3" -o sandbox=chroot -o no_posix_lock -o no_xattr \
        </dev/null >"$RUN/virtiofsd-$1.log" 2>&1 &
    PIDS+=($!)
}
start_virtiofsd hostroot / always
start_virtiofsd hostrun "$RUN" none
RW_ARG=
for i in "${!RW_DIRS[@]}"; do
    start_virtiofsd "rw$i" "${RW_DIRS[$i]}" none
    RW_ARG+="${RW_ARG:+,}rw$i:${RW_DIRS[$i]}"
done
for _ in $(seq 200); do
    ok=1
    for s in hostroot hostrun "${!RW_DIRS[@]}"; do
        case $s in [0-9]*) s=rw$s ;; esac
        [ -S "$RUN/$s.sock" ] || ok=0
    done
    [ "$ok" = 1 ] && break
    sleep 0.02
done
[ "$ok" = 1 ] || die "virtiofsd did not start (see $RUN)"

: >"$RUN/job.log"
QEMU=(qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m "$MEM" -M pc -nodefaults -no-user-config
    -display none -no-reboot
    -kernel "$VMLINUZ" -initrd "$INITRD"
    -append "console=ttyS0 quiet loglevel=3 panic=-1 sluice_run=$RUN sluice_kmods=$MODDIR${RW_ARG:+ sluice_rw=$RW_ARG}"
    -chardev "file,id=console,path=$RUN/console.log" -serial chardev:console
    -chardev "file,id=job,path=$RUN/job.log" -serial chardev:job
    # virtiofs needs guest RAM that the daemons can map: a shared memfd
    -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on" -numa "node,memdev=mem"
    -chardev "socket,id=hostroot,path=$RUN/hostroot.sock" -device "vhost-user-fs-pci,chardev=hostroot,tag=hostroot"
    -chardev "socket,id=hostrun,path=$RUN/hostrun.sock" -device "vhost-user-fs-pci,chardev=hostrun,tag=hostrun")
for i in "${!RW_DIRS[@]}"; do
    QEMU+=(-chardev "socket,id=rw$i,path=$RUN/rw$i.sock" -device "vhost-user-fs-pci,chardev=rw$i,tag=rw$i")
done
# qboot: a minimal firmware that boots faster than SeaBIOS
[ -r /usr/share/qemu/qboot.rom ] && QEMU+=(-bios /usr/share/qemu/qboot.rom)
log "kernel $KVER, ${MEM} MiB, limit ${TIMEOUT}s, run dir $RUN"
T_QEMU=$(now)
timeout -k 5 "$TIMEOUT" "${QEMU[@]}" </dev/null >"$RUN/qemu.log" 2>&1 &
QPID=$!
PIDS+=("$QPID")
tail -n +1 -s 0.1 -f --pid=$QPID "$RUN/job.log" &
TPID=$!
set +e
wait $QPID
QRC=$?
wait $TPID 2>/dev/null
set -e

if [ -s "$RUN/exit-status" ]; then
    RC=$(cat "$RUN/exit-status")
elif [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
    log "timeout after ${TIMEOUT}s"
    RC=124
else
    log "the VM stopped (qemu exit $QRC) without running the job"
    RC=125
fi
if [ "$RC" -ge 124 ]; then
    log "--- last console lines ($RUN/console.log) ---"
    tail -n 30 "$RUN/console.log" >&2 || true
    tail -n 5 "$RUN/qemu.log" >&2 || true
fi
READY=$(cat "$RUN/ready-uptime" 2>/dev/null || echo "?")
log "exit $RC; guest ready at ${READY}s uptime; VM $(since "$T_QEMU")s; total $(since "$T0")s"
exit "$RC"
