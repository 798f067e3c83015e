#!/usr/bin/env bash
# Builds the two CNI binaries as they are installed on a node, `sluice` and
# `sluice-ipam`: release, statically linked, for this host's target (or $TARGET), in
# a cargo invocation of their own. It prints the `SLUICE_BIN_*` exports that point
# the lab, the tests and the ADD/DEL bench at them (cargo's own output goes to
# stderr), so one recipe builds what all of them run:
#
#   eval "$(scripts/build-cni.sh)"         # then `sluicectl lab up`, `cargo bench ...`
#   TARGET=x86_64-unknown-linux-musl scripts/build-cni.sh
#
# Why static: a runtime execs the plugin for every pod start and stop, and for a
# short-lived process the dynamic loader is a large share of its life (about 0.4 ms
# of ADD's CPU here; cni-plugin/BENCH.md). glibc's static link is safe for these two
# binaries because neither resolves names (no NSS). Why a cargo invocation of its
# own: `+crt-static` needs an explicit --target (it must not reach proc macros), and
# the agent and sluicectl keep their dynamic build.
#
# `sha2_backend="soft"`: the host interface name is one SHA-256 of a few bytes;
# detecting SHA-NI costs two CPUID instructions, and CPUID traps to the hypervisor in
# a VM (about 40 us each on this project's machines), far more than the hash.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${TARGET:-$(rustc -vV | sed -n 's/^host: //p')}"
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static --cfg sha2_backend=\"soft\"" \
    cargo build --release --locked --target "$target" -p sluice-cni -p sluice-ipam --bins >&2

out="$(realpath "${CARGO_TARGET_DIR:-target}")/$target/release"
echo "export SLUICE_BIN_SLUICE=$out/sluice"
echo "export SLUICE_BIN_SLUICE_IPAM=$out/sluice-ipam"
