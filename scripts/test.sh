#!/usr/bin/env bash
# The test command: installs build dependencies, then runs every test of the workspace
# (unit tests, the conformance suite on every backend, the CLI end-to-end tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
cargo test --workspace --release "$@"
