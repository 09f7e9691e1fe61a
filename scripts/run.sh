#!/usr/bin/env bash
# The main command: installs build dependencies, builds corepin in release mode and runs the
# echo service on every core (Ctrl-C drains and stops it). Extra arguments go to `corepin echo`,
# e.g. `scripts/run.sh --runtime glommio --listen 0.0.0.0:7000`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bin corepin
exec target/release/corepin echo "$@"
