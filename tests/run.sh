#!/usr/bin/env bash
# The test command (README). Builds every binary the suites exec, then runs every
# test in the workspace. As root (CI) the privileged suites run too; in CI a
# privileged test that cannot run fails instead of skipping (see sluice-testkit).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --bins --locked
cargo test --workspace --locked -- "$@"
