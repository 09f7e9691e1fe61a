#!/usr/bin/env bash
# Installs what building and testing corepin need from the system (Debian/Ubuntu, as root or
# via sudo): the hwloc library for topology, a C toolchain, curl, the independent HTTP client
# the file server's tests compare against, openssl (s_client, the TLS tests' independent
# client), redis-cli (redis-tools), the independent client the kv example's test drives,
# clang (the build compiles the XDP program in services/xdp for the BPF target), iproute2 (the
# XDP tests make their own network namespaces and veth pairs), python3 with pip, and Python's
# aioquic (PyPI), the independent HTTP/3 client of the h3 tests. `scripts/setup.sh --test` also
# installs Chromium (the browser test: HTTPS, Alt-Svc, then HTTP/3) and ngtcp2's client (a second
# independent HTTP/3 client, which also changes its address mid-transfer), tcpdump (reads the
# ingest service's pcap files), ping and ethtool (the XDP tests' other traffic and veth offloads),
# `--bench` the peers the
# benchmarks measure against (nginx, wrk, redis-server). Idempotent: does nothing when
# everything is already there.
set -euo pipefail
pkgs=(libhwloc-dev pkg-config build-essential curl openssl redis-tools clang linux-libc-dev iproute2)
# python3 and pip only when there is no python3 with pip yet (a pyenv or venv one counts).
python3 -m pip --version >/dev/null 2>&1 || pkgs+=(python3 python3-pip)
for arg in "$@"; do
  case "$arg" in
    --test) pkgs+=(chromium ngtcp2-client tcpdump iputils-ping ethtool) ;;
    --bench) pkgs+=(nginx wrk redis-server) ;;
    *) echo "usage: scripts/setup.sh [--test] [--bench]" >&2; exit 2 ;;
  esac
done
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
# aioquic for the h3 tests (they skip, saying so, without it). Debian's python3 refuses
# system-wide pip installs (PEP 668), hence --break-system-packages where pip knows it.
if ! python3 -c "import aioquic" >/dev/null 2>&1; then
  echo "installing: aioquic (pip)"
  pip_flags=(--quiet --disable-pip-version-check)
  python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages && pip_flags+=(--break-system-packages)
  python3 -m pip install "${pip_flags[@]}" aioquic
fi
