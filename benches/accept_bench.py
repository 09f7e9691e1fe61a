#!/usr/bin/env python3
"""What multishot accept saves: the hand-written io_uring echo loop of benches/peers
(`corepin-peer-echo uring`) with one multishot ACCEPT against the same loop re-arming a single
ACCEPT per connection (`--single-accept`), under connection churn.

Method: the server on CPU 0; on CPU 1, `--clients` processes each connect, send 64 bytes, read
the echo and close (SO_LINGER 0, so no TIME_WAIT piles up on loopback), in a loop for `--secs`.
The server's user + system time over the window, from /proc/<pid>/stat, divided by the
connections completed, is the server CPU per connection. The two variants take turns for
`--reps` rounds, each round starting both afresh; the table gives medians and the ratio of the
two within each round (paired, so a drift of the shared machine cancels).

This bounds what multishot accept could win for a corepin engine that lacks it (Monoio,
Glommio, tokio-uring): the saving measured here is the whole of it, before the cost of
reaching the engine from corepin's auxiliary ring (docs/aux-ring.md).

`--echo NAME=BINARY:RUNTIME` (repeatable) adds `corepin echo` servers to the rotation, for
instance the same backend built before and after a change; the paired ratios are then to the
first server named.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVER_CPU, CLIENT_CPU = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAYLOAD = b"x" * 64
LINGER_0 = struct.pack("ii", 1, 0)


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def churn(port: int, until: float, counter) -> None:
    os.sched_setaffinity(0, {CLIENT_CPU})
    n = 0
    while time.monotonic() < until:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
        s.connect(("127.0.0.1", port))
        s.sendall(PAYLOAD)
        got = 0
        while got < len(PAYLOAD):
            chunk = s.recv(len(PAYLOAD) - got)
            if not chunk:
                raise RuntimeError("the server closed before echoing")
            got += len(chunk)
        s.close()
        n += 1
    with counter.get_lock():
        counter.value += n


def measure(command: list[str], secs: float, clients: int) -> tuple[float, float]:
    """One run of the server started by `command` + `--listen ADDR`: the server CPU per
    connection (µs) and the connections per second."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = ["taskset", "-c", str(SERVER_CPU), *command, "--listen", f"127.0.0.1:{port}"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in server.stdout:
            if "listening on" in line:
                break
        else:
            raise RuntimeError(f"the server did not start: {' '.join(cmd)}")
        counter = multiprocessing.Value("q", 0)
        before = cpu_ticks(server.pid)
        until = time.monotonic() + secs
        procs = [multiprocessing.Process(target=churn, args=(port, until, counter)) for _ in range(clients)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError("a churn client failed")
        used_us = (cpu_ticks(server.pid) - before) * 1e6 / CLK_TCK
        return used_us / max(counter.value, 1), counter.value / secs
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--binary", type=Path, default=REPO / "target/release/corepin-peer-echo")
    ap.add_argument("--secs", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--echo", action="append", default=[], metavar="NAME=BINARY:RUNTIME",
                    help="also measure `corepin echo` from BINARY on RUNTIME (repeatable); ratios are then to the first")
    ap.add_argument("--no-floor", action="store_true", help="leave out the hand-written loop's two variants")
    args = ap.parse_args()
    servers: dict[str, list[str]] = {}
    for spec in args.echo:
        name, _, rest = spec.partition("=")
        binary, _, runtime = rest.rpartition(":")
        if not name or not binary or not runtime:
            ap.error(f"--echo takes NAME=BINARY:RUNTIME, not {spec!r}")
        servers[name] = [binary, "echo", "--runtime", runtime, "--cores", f"{SERVER_CPU}-{SERVER_CPU}"]
    if not args.no_floor:
        if not os.access(args.binary, os.X_OK):
            sys.exit(f"error: {args.binary} not found; build it with: cargo build --release -p corepin-bench-peers")
        peer = [str(args.binary), "uring", "--cpu", str(SERVER_CPU)]
        servers["multishot"] = peer
        servers["single"] = [*peer, "--single-accept"]
    if len(servers) < 2:
        ap.error("nothing to compare")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    names = list(servers)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            runs[name].append(measure(servers[name], args.secs, args.clients))
            cpu, rate = runs[name][-1]
            print(f"  round {rep + 1} {name:12} {cpu:6.2f} µs/conn  {rate:8,.0f} conns/s", file=sys.stderr, flush=True)
    print("| server | server CPU per connection, median (runs) | connections/s, median | vs " + names[0] + ", paired |")
    print("|---|---:|---:|---:|")
    for name, rs in runs.items():
        cpus = [c for c, _ in rs]
        ratios = [a[0] / b[0] for a, b in zip(rs, runs[names[0]])]
        print(f"| {name} | {statistics.median(cpus):.2f} µs ({', '.join(f'{c:.2f}' for c in cpus)}) "
              f"| {statistics.median(r for _, r in rs):,.0f} "
              f"| {statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |")


if __name__ == "__main__":
    main()
