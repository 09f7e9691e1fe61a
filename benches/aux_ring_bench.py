#!/usr/bin/env python3
"""The auxiliary-ring experiment of issue 11 (docs/aux-ring.md), measured with bench.py's own pieces.

    python3 benches/aux_ring_bench.py --out /tmp/aux-bench            # echo and idle memory
    python3 benches/aux_ring_bench.py --only echo --reps 7 --conns 16,128

Servers (default): corepin-monoio, the raw Monoio peer, the hand-written io_uring peer (`uring`)
and `monoio-aux` (Monoio hosting an auxiliary io_uring with multishot receive into a provided-
buffer ring). Each repetition starts every server afresh, in an order rotated by one per
repetition, so slow drifts of this shared machine spread over all servers. Reports medians and
the min-max spread.

* echo  64 B ping-pong (corepin-loadgen echo, as bench.py's echo workload): server CPU per
        message from /proc/<pid>/stat around the measured window, messages/s, errors.
* idle  resident memory (VmRSS) per idle connection, two ways: `cold`, connections that never
        sent anything (corepin-loadgen hold, as bench.py's scale workload), and `warm`,
        connections that each echoed one message (64 B, or --warm-size) and then went quiet (a server that reads
        into a buffer of its own has touched it by then; a provided-buffer server has given
        the buffer back).
* syscalls  system calls (of which io_uring_enter and read) and context switches of the server
        per echo message, counted by `perf stat -p` during one run per point.

Uses the binaries already built in $CARGO_TARGET_DIR/release (or target/release).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

SERVERS = ("corepin-monoio", "monoio", "uring", "monoio-aux")


def echo_point(server: bench.Server, conns: int, size: int, secs: float, warmup: float) -> dict:
    common = ["echo", "--addr", f"127.0.0.1:{server.port}", "--conns", str(conns), "--size", str(size),
              "--cpu", str(bench.CLIENT_CPU)]
    bench.loadgen(common + ["--secs", str(warmup), "--warmup", "0"])
    before = bench.cpu_ticks(server.proc.pid)
    r = bench.loadgen(common + ["--secs", str(secs), "--warmup", "0"])
    used_us = (bench.cpu_ticks(server.proc.pid) - before) * 1e6 / bench.CLK_TCK
    r.pop("cdf", None)
    r["server"] = server.name
    r["server_cpu_us_per_msg"] = used_us / r["messages"] if r["messages"] else None
    return r


def run_echo(args: argparse.Namespace) -> list[dict]:
    results = []
    for rep in range(args.reps):
        order = args.servers[rep % len(args.servers):] + args.servers[:rep % len(args.servers)]
        for name in order:
            with contextlib.ExitStack() as local:
                server = bench.start_server(name, local)
                for conns in args.conns:
                    r = echo_point(server, conns, args.size, args.secs, args.warmup)
                    r["rep"] = rep
                    results.append(r)
                    print(f"  rep {rep} {name:<16} {conns:>5} conns  {r['msgs_per_sec']:>9,.0f} msg/s  "
                          f"{r['server_cpu_us_per_msg']:.2f} µs CPU/msg  errors {r['errors']}", flush=True)
    return results


PERF_EVENTS = ("raw_syscalls:sys_enter", "syscalls:sys_enter_io_uring_enter", "syscalls:sys_enter_read",
               "context-switches")


def run_syscalls(args: argparse.Namespace) -> list[dict]:
    """System calls and context switches of the server per echo message (perf stat on its
    process during one loadgen run); counts, so far less noisy than CPU time."""
    results = []
    for name in args.servers:
        with contextlib.ExitStack() as local:
            server = bench.start_server(name, local)
            for conns in args.conns:
                common = ["echo", "--addr", f"127.0.0.1:{server.port}", "--conns", str(conns), "--size",
                          str(args.size), "--cpu", str(bench.CLIENT_CPU)]
                bench.loadgen(common + ["--secs", str(args.warmup), "--warmup", "0"])
                perf = subprocess.Popen(["perf", "stat", "-x", ",", "-e", ",".join(PERF_EVENTS), "-p",
                                         str(server.proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
                time.sleep(0.2)
                r = bench.loadgen(common + ["--secs", str(args.secs), "--warmup", "0"])
                perf.send_signal(signal.SIGINT)
                _, err = perf.communicate(timeout=10)
                counts = {}
                for line in err.splitlines():
                    f = line.split(",")
                    if len(f) > 2 and f[2] in PERF_EVENTS and f[0].strip().isdigit():
                        counts[f[2]] = int(f[0])
                m = r["messages"] or 1
                row = {"server": name, "conns": conns, "messages": r["messages"], "errors": r["errors"]}
                row |= {e: counts.get(e, 0) / m for e in PERF_EVENTS}
                results.append(row)
                print(f"  syscalls {name:<20} {conns:>5} conns: " +
                      ", ".join(f"{e.split(':')[-1]} {row[e]:.2f}" for e in PERF_EVENTS) + " per message", flush=True)
    return results


def wait_stable(pid: int) -> int:
    """VmRSS once it has not changed for a second (the server has accepted everything)."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        cur = bench.rss_kib(pid)
        if cur != last:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since > 1.0:
            break
        time.sleep(0.1)
    return bench.rss_kib(pid)


def open_warm(port: int, n: int, size: int) -> list[socket.socket]:
    """`n` connections that each echo one message, then stay open and quiet (on the client CPU)."""
    os.sched_setaffinity(0, {bench.CLIENT_CPU})
    msg = bytes((i * 7 + 3) % 256 for i in range(size))
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(msg)
            got = b""
            while len(got) < size:
                part = s.recv(size - len(got))
                if not part:
                    raise RuntimeError("server closed a warm connection")
                got += part
            if got != msg:
                raise RuntimeError("wrong echo on a warm connection")
            socks.append(s)
    except BaseException:
        for s in socks:
            s.close()
        raise
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return socks


def idle_point(name: str, n: int, warm: bool, warm_size: int) -> dict:
    with contextlib.ExitStack() as local:
        server = bench.start_server(name, local)
        addr = f"127.0.0.1:{server.port}"
        bench.loadgen(["echo", "--addr", addr, "--conns", "8", "--size", "64", "--secs", "0.3", "--warmup", "0",
                       "--cpu", str(bench.CLIENT_CPU)])
        time.sleep(0.3)
        base = bench.rss_kib(server.proc.pid)
        if warm:
            socks = open_warm(server.port, n, warm_size)
            local.callback(lambda: [s.close() for s in socks])
            held = len(socks)
        else:
            held = bench.hold_idle(addr, n, name, local)
        total = wait_stable(server.proc.pid)
        return {"server": name, "mode": "warm" if warm else "cold", "conns": held, "rss_base_kib": base,
                "rss_kib": total, "bytes_per_conn": (total - base) * 1024 / held}


def run_idle(args: argparse.Namespace) -> list[dict]:
    results = []
    for rep in range(args.idle_reps):
        order = args.servers[rep % len(args.servers):] + args.servers[:rep % len(args.servers)]
        for warm in (False, True) if not args.warm_only else (True,):
            for name in order:
                r = idle_point(name, args.idle_conns, warm, args.warm_size)
                r["rep"] = rep
                results.append(r)
                print(f"  rep {rep} idle {r['mode']:<4} {name:<16} {r['conns']} conns: RSS {r['rss_base_kib']} -> "
                      f"{r['rss_kib']} KiB, {r['bytes_per_conn']:,.0f} B/conn", flush=True)
    return results


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def per_server_table(args: argparse.Namespace, echo: list[dict], key: str, fmt: str, errors: bool = False) -> list[str]:
    """A row per server, a column per connection count: the median (min–max) of `key`."""
    rows = ["| server | " + " | ".join(f"{c} conns" for c in args.conns) + " |",
            "|---|" + "---:|" * len(args.conns)]
    for s in args.servers:
        cells = []
        for c in args.conns:
            v = [r[key] for r in echo if r["server"] == s and r["conns"] == c]
            errs = sum(r["errors"] for r in echo if r["server"] == s and r["conns"] == c) if errors else 0
            cells.append((spread(v, fmt) if v else "") + (f" ⚠ {errs} errors" if errs else ""))
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    return rows


def markdown(args: argparse.Namespace, echo: list[dict], idle: list[dict], syscalls: list[dict]) -> str:
    parts = []
    if echo:
        parts.append(f"Echo {args.size} B, server CPU per message in µs, median (min–max) of {args.reps} runs:\n")
        parts += per_server_table(args, echo, "server_cpu_us_per_msg", "{:.2f}", errors=True)
        if args.baseline in args.servers:
            parts.append(f"\nCPU per message divided by that of `{args.baseline}` in the same repetition (paired, so "
                         "drifts of the shared machine between repetitions cancel), median (min–max):\n")
            parts.append("| server | " + " | ".join(f"{c} conns" for c in args.conns) + " |")
            parts.append("|---|" + "---:|" * len(args.conns))
            for s in args.servers:
                if s == args.baseline:
                    continue
                cells = []
                for c in args.conns:
                    v = []
                    for r in echo:
                        if r["server"] != s or r["conns"] != c:
                            continue
                        b = next((x for x in echo if x["server"] == args.baseline and x["conns"] == c
                                  and x["rep"] == r["rep"]), None)
                        if b and b["server_cpu_us_per_msg"] and r["server_cpu_us_per_msg"]:
                            v.append(r["server_cpu_us_per_msg"] / b["server_cpu_us_per_msg"])
                    cells.append(spread(v, "{:.2f}") if v else "")
                parts.append(f"| {s} | " + " | ".join(cells) + " |")
        parts.append("\nMessages/s, median (min–max):\n")
        parts += per_server_table(args, echo, "msgs_per_sec", "{:,.0f}")
        parts.append("")
    if syscalls:
        parts.append(f"Per echo message ({args.size} B), counted by perf stat on the server process "
                     "(system calls, of which io_uring_enter and read, and context switches):\n")
        parts.append("| server | conns | syscalls | io_uring_enter | read | context switches |")
        parts.append("|---|---:|---:|---:|---:|---:|")
        for r in syscalls:
            parts.append(f"| {r['server']} | {r['conns']} | " + " | ".join(f"{r[e]:.2f}" for e in PERF_EVENTS) + " |")
        parts.append("")
    if idle:
        parts.append(f"Resident memory per idle connection ({args.idle_conns:,} connections; warm ones echoed "
                     f"{args.warm_size} B once), median (min–max) of {args.idle_reps} runs; RSS before = after an "
                     "8-connection warm-up:\n")
        parts.append("| server | cold: KiB per connection | warm: KiB per connection | RSS before (cold), MiB |")
        parts.append("|---|---:|---:|---:|")
        for s in args.servers:
            cells = []
            for mode in ("cold", "warm"):
                v = [r["bytes_per_conn"] / 1024 for r in idle if r["server"] == s and r["mode"] == mode]
                cells.append(spread(v, "{:.2f}") if v else "")
            base = [r["rss_base_kib"] / 1024 for r in idle if r["server"] == s and r["mode"] == "cold"]
            cells.append(spread(base, "{:.1f}") if base else "")
            parts.append(f"| {s} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="echo,idle,syscalls", help="any of echo, idle, syscalls")
    ap.add_argument("--servers", default=",".join(SERVERS), help="corepin-<backend> or peer engine names")
    ap.add_argument("--conns", default="16,128,1000")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--secs", type=float, default=2.5)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--idle-conns", type=int, default=19000)
    ap.add_argument("--idle-reps", type=int, default=3)
    ap.add_argument("--warm-size", type=int, default=64, help="bytes each warm idle connection echoes once")
    ap.add_argument("--warm-only", action="store_true", help="idle: only the warm connections")
    ap.add_argument("--report", help="only rewrite the tables from this aux_ring.json (same options)")
    ap.add_argument("--baseline", default="monoio", help="server the paired ratios divide by")
    ap.add_argument("--out", required=True, help="results directory (aux_ring.json, aux_ring.md)")
    args = ap.parse_args()
    args.servers = [s for s in args.servers.split(",") if s]
    args.conns = [int(c) for c in args.conns.split(",") if c]
    only = set(args.only.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = bench.machine() | {"args": {k: v for k, v in vars(args).items()}}
    print(f"server on CPU {bench.SERVER_CPU}, load generator on CPU {bench.CLIENT_CPU}; kernel {meta['kernel']}",
          flush=True)
    if args.report:
        data = json.loads(Path(args.report).read_text())
        echo, idle, syscalls = data["echo"], data["idle"], data.get("syscalls", [])
    else:
        echo = run_echo(args) if "echo" in only else []
        idle = run_idle(args) if "idle" in only else []
        syscalls = run_syscalls(args) if "syscalls" in only else []
    md = markdown(args, echo, idle, syscalls)
    (out / "aux_ring.json").write_text(json.dumps({"meta": meta, "echo": echo, "idle": idle, "syscalls": syscalls}, indent=1))
    (out / "aux_ring.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
