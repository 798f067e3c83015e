#!/usr/bin/env bash
# The test command (README). Installs missing system packages (as root), builds every
# binary the suites exec, then runs every test in the workspace. As root the privileged
# suites run too (throwaway network namespaces, podman, containerd, QEMU for IPIP); with
# CI set, a privileged test that cannot run fails instead of skipping (sluice-testkit).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    bash scripts/install-deps.sh
fi
cargo build --workspace --bins --locked
cargo test --workspace --locked --no-fail-fast -- "$@"
