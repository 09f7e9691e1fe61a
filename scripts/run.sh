#!/usr/bin/env bash
# The main command: installs build dependencies, builds corepin in release mode and runs the
# static file server on every core, serving the demo site shipped in the repository
# (services/files/demo) on http://127.0.0.1:8080/ (Ctrl-C drains and stops it). Extra
# arguments go to `corepin files`, e.g. `scripts/run.sh --runtime glommio --list-dirs` or
# `scripts/run.sh /srv/www --listen 0.0.0.0:8080 --metrics 127.0.0.1:9090`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bin corepin
exec target/release/corepin files "$@"
