#!/usr/bin/env bash
# Installs the Debian packages sluice's demo and tests use, when any is missing.
# Idempotent and quiet when everything is there; needs root and apt-get to install.
#   scripts/install-deps.sh          # install what is missing
#   scripts/install-deps.sh --always # apt-get update + install regardless (CI)
set -euo pipefail

# package → a file it provides (to tell whether it is installed without dpkg queries)
declare -A PROVIDES=(
    [iproute2]=/usr/sbin/ip
    [iptables]=/usr/sbin/iptables-legacy
    [ipset]=/usr/sbin/ipset
    # the nftables dataplane (issue 11)
    [nftables]=/usr/sbin/nft
    [conntrack]=/usr/sbin/conntrack
    [kmod]=/usr/bin/kmod
    [containernetworking-plugins]=/usr/lib/cni/host-local
    [podman]=/usr/bin/podman
    [runc]=/usr/sbin/runc
    [containerd]=/usr/bin/containerd
    # tests/e2e/image_daemonset.rs: the image's base root file system, and stripping
    # the debug binaries it copies into the image
    [debootstrap]=/usr/sbin/debootstrap
    [binutils]=/usr/bin/strip
    [qemu-system-x86]=/usr/bin/qemu-system-x86_64
    [busybox-static]=/bin/busybox
    [cpio]=/usr/bin/cpio
    [iperf3]=/usr/bin/iperf3
    [socat]=/usr/bin/socat
    [shellcheck]=/usr/bin/shellcheck
    [ca-certificates]=/etc/ssl/certs/ca-certificates.crt
)

missing=()
for pkg in "${!PROVIDES[@]}"; do
    [ -e "${PROVIDES[$pkg]}" ] || missing+=("$pkg")
done

if [ "${1:-}" != "--always" ] && [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-deps: missing packages: ${missing[*]} (install them as root with apt-get)" >&2
    exit 1
fi
if [ "${1:-}" = "--always" ]; then
    missing=("${!PROVIDES[@]}")
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
