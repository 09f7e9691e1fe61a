#!/usr/bin/env python3
"""corepin's benchmark suite: one command, every workload, peers measured in the same run.

    python3 benches/bench.py            # default profile (about 10 minutes here)
    python3 benches/bench.py --quick    # smoke profile (CI): every workload, tiny matrix
    python3 benches/bench.py --only echo,scale

Workloads (each a function in WORKLOADS; adding one is a local change: write a function that
returns its results and its markdown, and register it):

* echo   closed-loop ping-pong (corepin-loadgen) against corepin's echo on each backend, the
         same echo written directly on raw Monoio, Glommio and tokio-uring (corepin's own
         overhead), tokio multi-thread (epoll) and a hand-written io_uring loop (the floor).
* files  the file server against nginx with wrk (benches/files_vs_nginx.py).
* https  the same over TLS 1.3 (AES-128-GCM, one certificate for both), and full handshakes per
         second (benches/files_vs_nginx.py --tls).
* cold   a small file's latency on the worker that streams a file evicted from the page
         cache, and the same file cached (benches/cold_files.py).
* scale  resident memory per idle connection at ~19,000 connections (corepin-loadgen hold): echo
         connections, and file-server keep-alive connections after one 4 KiB GET each.
* crosscore  CPU per cross-core call (`submit_to`) between two pinned workers (examples/crosscore.rs).
* kv     the sharded key-value example against redis-server under redis-benchmark, on one core and
         on two workers at 0% and ~50% of requests forwarded to the key's owner (examples/kv.rs).
* h3     `corepin h3` on each backend against quinn + h3 on tokio's current-thread runtime
         (corepin-peer-h3: the same files, TLS and transport settings) under `corepin-loadgen h3`:
         requests/s and server CPU per request for a 16 B and a 4 KiB body at 1/10/100
         connections, MB/s and server CPU per MB for a 100 MiB body on one connection.
* ingest `corepin xdp` taking UDP datagrams off a 2-queue veth pair between two network
         namespaces made for the run (root only; skipped otherwise): AF_XDP native and generic
         against the SO_REUSEPORT + recvmmsg socket source, 64 B and 1472 B payloads, sent by
         `corepin-loadgen udp` (sendmmsg from pinned threads): datagrams/s, loss, corepin's
         and the whole machine's CPU per datagram. Also benches/results/ingest.{json,md}.

Method. The server runs pinned to CPU 0 with one worker, the load generator on CPU 1 (on a
2-core machine the generator saturates its own core from about 16 connections on, so
messages/s is a shared ceiling there). The primary figure is the server's CPU time per
message, from /proc/<pid>/stat (utime + stime) around the measured window; throughput and
latency percentiles are reported beside it. Each server is started once per workload and
warmed before every measured run. Results: benches/results/latest.{json,md} and SVG plots in
benches/results/plots/ (corepin-plot, with plotters).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
# Where cargo puts the binaries: CARGO_TARGET_DIR when set (relative to the repository, where
# build() runs cargo), else target/.
TARGET = REPO / os.environ.get("CARGO_TARGET_DIR", "target") / "release"
RESULTS = REPO / "benches" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CPU, CLIENT_CPU = 0, 1

BACKENDS = ("monoio", "glommio", "tokio-uring", "compio")
PEERS = ("monoio", "glommio", "tokio-uring", "tokio-mt", "uring")


@dataclass
class Profile:
    conns: list[int]
    sizes: list[int]
    secs: float
    warmup: float
    scale_conns: int
    files_args: list[str]
    cold_args: list[str]
    h3_conns: list[int]
    h3_big_secs: float
    h3_reps: int
    ingest_sizes: list[int]
    ingest_layouts: list[str]
    ingest_secs: float
    ingest_reps: int


PROFILES = {
    "default": Profile([1, 16, 128, 1000], [64, 1024, 16384], 2.5, 0.5, 19000, ["--secs", "4"], ["--size", "1024"],
                       [1, 10, 100], 4.0, 5, [64, 1472], ["2 workers", "1 worker"], 3.0, 3),
    "quick": Profile([1, 16], [64], 0.5, 0.2, 1000, ["--secs", "1", "--warmup", "0"],
                     ["--size", "64", "--rate", "100M"], [10], 1.0, 1, [64], ["2 workers"], 0.5, 1),
}


# ---- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_split(pid: int) -> tuple[int, int]:
    """The process's user and system time so far, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime


def cpu_ticks(pid: int) -> int:
    return sum(cpu_split(pid))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def echo_command(server: str, port: int) -> list[str]:
    """The command line of an echo server, by name (`corepin-<backend>` or a peer engine)."""
    listen = f"127.0.0.1:{port}"
    if server.startswith("corepin-"):
        # `corepin-<backend>:own`: each connection reads into a 16 KiB buffer of its own
        # (`--buffer-size`) instead of borrowing one per read (`read_pooled`, the default).
        backend, _, variant = server.removeprefix("corepin-").partition(":")
        own = ["--buffer-size", "16384"] if variant == "own" else []
        return [str(TARGET / "corepin"), "echo", "--runtime", backend, "--cores", f"{SERVER_CPU}-{SERVER_CPU}",
                "--listen", listen] + own
    return [str(TARGET / "corepin-peer-echo"), server, "--listen", listen, "--cpu", str(SERVER_CPU)]


def start_server(name: str, stack: contextlib.ExitStack) -> Server:
    port = free_port()
    return start_listening(name, echo_command(name, port), port, stack)


def start_listening(name: str, command: list[str], port: int, stack: contextlib.ExitStack) -> Server:
    """Starts `command` pinned to the server CPU and waits for its "listening on" line."""
    cmd = ["taskset", "-c", str(SERVER_CPU)] + command
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    server = Server(name, proc, port)
    stack.callback(server.stop)
    deadline = time.monotonic() + 20
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{name} exited before listening: {' '.join(cmd)}")
        if "listening on" in line:
            # Drain the rest of its stdout in the background so it never blocks on a full pipe.
            subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
            return server
    raise RuntimeError(f"{name} did not start listening within 20 s")


def loadgen(args: list[str]) -> dict:
    cmd = ["taskset", "-c", str(CLIENT_CPU), str(TARGET / "corepin-loadgen")] + args
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    # Exit 2: the run finished but saw wrong echoes or I/O errors; the JSON counts them.
    if out.returncode not in (0, 2) or not out.stdout.strip():
        raise RuntimeError(f"loadgen failed ({' '.join(cmd)}): {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- workloads ---------------------------------------------------------------------------


@dataclass
class Outcome:
    results: list[dict] = field(default_factory=list)
    markdown: str = ""
    # Why the workload could not run here (e.g. it needs root); reported, not a failure.
    skipped: str = ""


def echo_servers(args: argparse.Namespace) -> list[str]:
    return [f"corepin-{b}" for b in args.backends] + list(args.peers)


def run_echo(args: argparse.Namespace, prof: Profile, stack: contextlib.ExitStack) -> Outcome:
    out = Outcome()
    for name in echo_servers(args):
        with contextlib.ExitStack() as local:
            server = start_server(name, local)
            for size in prof.sizes:
                for conns in prof.conns:
                    common = ["echo", "--addr", f"127.0.0.1:{server.port}", "--conns", str(conns), "--size", str(size),
                              "--cpu", str(CLIENT_CPU)]
                    loadgen(common + ["--secs", str(prof.warmup), "--warmup", "0"])
                    before = cpu_split(server.proc.pid)
                    r = loadgen(common + ["--secs", str(prof.secs), "--warmup", "0"])
                    after = cpu_split(server.proc.pid)
                    user_us, sys_us = ((a - b) * 1e6 / CLK_TCK for a, b in zip(after, before))
                    used_us = user_us + sys_us
                    r["server"] = name
                    r["server_cpu_us_per_msg"] = used_us / r["messages"] if r["messages"] else None
                    # The split shows how much of a message is the kernel's (the same for every
                    # server making the same system calls) and how much the server's own code.
                    r["server_user_us_per_msg"] = user_us / r["messages"] if r["messages"] else None
                    r["server_sys_us_per_msg"] = sys_us / r["messages"] if r["messages"] else None
                    r["server_busy"] = used_us / (r["secs"] * 1e6) if r["secs"] else None
                    out.results.append(r)
                    print(f"  echo {name:<20} {size:>6} B {conns:>5} conns  {r['msgs_per_sec']:>10,.0f} msg/s  "
                          f"{fmt_us(r['server_cpu_us_per_msg'])} CPU/msg  p99 {fmt_us(r['p99_us'])}  "
                          f"errors {r['errors']}", flush=True)
    out.markdown = echo_markdown(out.results, prof)
    return out


def run_script(script: str, json_name: str, header: str, extra: list[str], args: argparse.Namespace) -> Outcome:
    """Runs one of the standalone bench scripts; its markdown is the table and the line
    starting with `header` that it prints, its results the JSON it writes."""
    json_path = Path(args.out) / json_name
    cmd = [sys.executable, str(REPO / "benches" / script), "--json", str(json_path),
           "--runtimes", ",".join(args.backends)] + extra
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    sys.stdout.write(run.stdout)
    if run.returncode != 0:
        raise RuntimeError(f"{script} failed: {run.stderr.strip()}")
    table = "\n".join(line for line in run.stdout.splitlines() if line.startswith("|"))
    title = next((line for line in run.stdout.splitlines() if line.startswith(header)), "")
    data = json.loads(json_path.read_text())
    return Outcome(results=data.get("results", []), markdown=f"{title}\n\n{table}\n")


def run_files(args: argparse.Namespace, prof: Profile, stack: contextlib.ExitStack) -> Outcome:
    return run_script("files_vs_nginx.py", "files_vs_nginx.json", "corepin files vs nginx", prof.files_args + ["--floor"], args)


def run_https(args: argparse.Namespace, prof: Profile, stack: contextlib.ExitStack) -> Outcome:
    return run_script("files_vs_nginx.py", "https_vs_nginx.json", "corepin files vs nginx over HTTPS",
                      prof.files_args + ["--tls"], args)


def run_cold(args: argparse.Namespace, prof: Profile, stack: contextlib.ExitStack) -> Outcome:
    return run_script("cold_files.py", "cold_files.json", "Small-file latency", prof.cold_args, args)


def hold_idle(addr: str, conns: int, name: str, stack: contextlib.ExitStack, get: str | None = None) -> int:
    """Opens `conns` idle connections to `addr` with `corepin-loadgen hold` on the client CPU,
    kept open until `stack` closes (hold closes them at EOF on its stdin, so stdin stays a
    pipe); with `get`, each first answers one keep-alive GET of that path. Returns how many it
    holds."""
    hold = subprocess.Popen(["taskset", "-c", str(CLIENT_CPU), str(TARGET / "corepin-loadgen"), "hold",
                             "--addr", addr, "--conns", str(conns), "--secs", "180"]
                            + (["--get", get] if get else []),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stack.callback(lambda: (hold.kill(), hold.wait()))
    assert hold.stdout is not None
    line = hold.stdout.readline()
    if not line:
        raise RuntimeError(f"hold failed against {name}: {hold.stderr.read() if hold.stderr else ''}")
    return int(json.loads(line)["held"])


#: Idle connections held before the measured slope starts (see run_scale).
SCALE_FIRST = 4000


def wait_rss_stable(pid: int) -> int:
    """The server's RSS once it has stopped growing (everything held has been accepted)."""
    last, stable_since = -1, time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cur = rss_kib(pid)
        if cur != last:
            last, stable_since = cur, time.monotonic()
        elif time.monotonic() - stable_since > 1.0:
            break
        time.sleep(0.1)
    return rss_kib(pid)


def run_scale(args: argparse.Namespace, prof: Profile, stack: contextlib.ExitStack) -> Outcome:
    """Resident memory per idle connection: echo connections that never sent anything, and
    file-server keep-alive connections that each fetched a 4 KiB file once. The figure is the
    slope of the server's RSS from SCALE_FIRST held connections to the full count (the base RSS
    right after start moves by tens of MiB from one start to the next with the allocator's
    arenas, a slope does not); (RSS - base) / connections is reported beside it."""
    out = Outcome()
    site = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="corepin-bench-scale-")))
    (site / "4k.bin").write_bytes(os.urandom(4096))
    servers: list[tuple[str, list[str] | None, str | None]] = [(n, None, None) for n in echo_servers(args)]
    for b in args.backends:
        servers.append((f"corepin-{b} files", [str(TARGET / "corepin"), "files", str(site), "--runtime", b,
                                               "--cores", f"{SERVER_CPU}-{SERVER_CPU}",
                                               "--max-connections-per-core", str(prof.scale_conns + 1000),
                                               "--idle-timeout", "600"], "/4k.bin"))
    first = min(SCALE_FIRST, prof.scale_conns // 4)
    for name, command, get in servers:
        with contextlib.ExitStack() as local:
            port = free_port()
            cmd = echo_command(name, port) if command is None else command + ["--listen", f"127.0.0.1:{port}"]
            # mimalloc (every server here uses it) gives freed memory back to the system only after a
            # delay, and only when the thread next allocates: an idle worker would keep what its
            # startup and the warm-up freed, and its RSS would drop at some later point of the
            # measurement. Without the delay, RSS is the memory in use.
            server = start_listening(name, ["env", "MIMALLOC_PURGE_DELAY=0", "MIMALLOC_RESET_DELAY=0"] + cmd, port, local)
            addr = f"127.0.0.1:{server.port}"
            # Warm the server (allocator arenas, first connection paths) before the baseline.
            if get is None:
                loadgen(["echo", "--addr", addr, "--conns", "8", "--size", "64", "--secs", "0.3", "--warmup", "0",
                         "--cpu", str(CLIENT_CPU)])
            else:
                hold_idle(addr, 8, name, local, get)
            time.sleep(0.2)
            base = rss_kib(server.proc.pid)
            held_first = hold_idle(addr, first, name, local, get)
            at_first = wait_rss_stable(server.proc.pid)
            held = held_first + hold_idle(addr, prof.scale_conns - first, name, local, get)
            total = wait_rss_stable(server.proc.pid)
            per_conn = (total - base) * 1024 / held
            slope = (total - at_first) * 1024 / max(1, held - held_first)
            r = {"server": name, "kind": "echo" if get is None else "files", "conns": held, "rss_base_kib": base,
                 "rss_first_kib": at_first, "first": held_first, "rss_kib": total, "bytes_per_conn": per_conn,
                 "slope_bytes_per_conn": slope, "mib_per_100k": slope * 100_000 / (1 << 20)}
            out.results.append(r)
            print(f"  scale {name:<22} {held} idle conns: RSS {base} -> {at_first} ({held_first}) -> {total} KiB, "
                  f"slope {slope:,.0f} B/conn, {per_conn:,.0f} B/conn over the base, "
                  f"{r['mib_per_100k']:,.0f} MiB per 100k", flush=True)
    rows = ["| server | idle connections | RSS before | RSS at " + f"{first:,}" + " | RSS with all | per connection (slope) "
            "| per connection (over the base) | per 100,000 (slope) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out.results:
        rows.append(f"| {r['server']} | {r['conns']:,} | {r['rss_base_kib'] / 1024:.1f} MiB | "
                    f"{r['rss_first_kib'] / 1024:.1f} MiB | {r['rss_kib'] / 1024:.1f} MiB | "
                    f"**{r['slope_bytes_per_conn'] / 1024:.2f} KiB** | {r['bytes_per_conn'] / 1024:.2f} KiB | "
                    f"{r['mib_per_100k']:,.0f} MiB |")
    out.markdown = ("Resident memory of the server process (VmRSS) with idle connections open, one worker; "
                    "kernel socket memory is not included. Echo connections never sent anything; file-server "
                    "connections (`corepin-<backend> files`) each fetched a 4 KiB file once (one connection at a time) and "
                    "wait, kept alive. Servers run with mimalloc's purge delay at 0 (`MIMALLOC_PURGE_DELAY=0`), so freed "
                    "memory leaves RSS at once. "
                    "Per connection is the slope of RSS from the first "
                    f"{first:,} held connections to all of them (the RSS right after start varies by tens of MiB "
                    "between starts with the allocator's arenas); over the base is (RSS - RSS before) / connections."
                    "\n\n" + "\n".join(rows) + "\n")
    return out


def run_crosscore(args: argparse.Namespace, prof: Profile, stack: contextlib.ExitStack) -> Outcome:
    """Cross-core calls (`submit_to`) from worker 0 (CPU 0) to worker 1 (CPU 1): calls/s and
    the process's CPU per call, with 1 call in flight (between calls both cores go idle) and
    with 64 (both cores stay busy and calls batch), each with the inbox sleeping as soon as its
    core is idle (the default) and with a 20 µs idle poll window (`--inbox-poll-us 20`). Both
    CPUs serve here: no load generator."""
    out = Outcome()
    calls = 20_000 if args.quick else 200_000
    points = [(inflight, poll) for poll in (0, 20) for inflight in (1, 64)]
    kinds = ("submit_to", "invoke_on")
    for backend in args.backends:
        for kind in kinds:
            for inflight, poll in points:
                cmd = [str(TARGET / "examples" / "crosscore"), "--runtime", backend, "--calls", str(calls),
                       "--inflight", str(inflight), "--inbox-poll-us", str(poll)]
                if kind == "invoke_on":
                    cmd.append("--sharded")
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if run.returncode != 0 or not run.stdout.strip():
                    raise RuntimeError(f"crosscore failed ({' '.join(cmd)}): {run.stderr.strip()}")
                r = json.loads(run.stdout.strip().splitlines()[-1])
                r["server"] = f"corepin-{backend}"
                out.results.append(r)
                print(f"  crosscore {backend:<12} {kind:<9} {inflight:>3} in flight, poll {poll:>2} µs  "
                      f"{r['calls_per_sec']:>10,.0f} calls/s  {fmt_us(r['cpu_us_per_call'])} CPU/call", flush=True)
    head = "| backend | call | " + " | ".join(f"{i} in flight, poll {p} µs: calls/s | CPU/call" for i, p in points) + " |"
    rows = [head, "|---|---|" + "---:|---:|" * len(points)]
    for backend in args.backends:
        for kind in kinds:
            cells = []
            for inflight, poll in points:
                r = next(r for r in out.results if r["runtime"] == backend and r["call"] == kind
                         and r["inflight"] == inflight and r["inbox_poll_us"] == poll)
                cells.append(f"{r['calls_per_sec']:,.0f} | {fmt_us(r['cpu_us_per_call'])}")
            rows.append(f"| {backend} | `{kind}` | " + " | ".join(cells) + " |")
    out.markdown = ("Cross-core calls (`submit_to` and its reply) between two pinned workers; CPU per call is "
                    "the whole process's user + system time (both cores) divided by the calls. `submit_to` runs a "
                    "future as a task on the target; `invoke_on` runs a closure in the target's inbox loop. `poll` is "
                    "`LaunchConfig::inbox_poll`, how long an idle core's inbox keeps looking before it sleeps.\n\n"
                    + "\n".join(rows) + "\n")
    return out


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within 20 s")


def redis_benchmark(port: int, requests: int, cpus: str, pipeline: int = 1) -> dict[str, float]:
    """SET then GET, 50 connections, random keys over 100,000, `pipeline` requests in flight per
    connection; requests/s per command."""
    cmd = ["taskset", "-c", cpus, "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
           "-n", str(requests), "-c", "50", "-r", "100000", "-P", str(pipeline), "--csv"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed ({' '.join(cmd)}): {run.stderr.strip()}")
    rps = {}
    for line in run.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) > 1 and cells[0] in ("SET", "GET"):
            rps[cells[0]] = float(cells[1])
    if set(rps) != {"SET", "GET"}:
        raise RuntimeError(f"redis-benchmark printed no SET/GET rates: {run.stdout!r}")
    return rps


PIPELINE = 16


def run_kv(args: argparse.Namespace, prof: Profile, stack: contextlib.ExitStack) -> Outcome:
    """The sharded key-value example (examples/kv.rs) against redis-server under
    redis-benchmark (SET and GET, 50 connections, random keys). One core: each server pinned
    to CPU 0, the generator on CPU 1. Two workers: kv on both CPUs beside the generator, once
    with every key served where its connection landed (`--local-keys`, 0% forwarded) and once
    sharded (a key's owner is fixed, so about half the requests go to the other core). The
    figure that matters is server CPU per request; forwarding's extra cost per forwarded
    request is (sharded - local) / 0.5. The two-worker runs are made with one request in flight
    per connection and with PIPELINE (redis-benchmark -P), where the example batches a
    pipeline's commands for the other worker into one cross-core call."""
    if shutil.which("redis-benchmark") is None:
        raise RuntimeError("redis-benchmark not found: run scripts/setup.sh --bench (redis-tools)")
    out = Outcome()
    requests = 20_000 if args.quick else 200_000
    kv = str(TARGET / "examples" / "kv")
    setups: list[tuple[str, str, list[str], str, int]] = []
    if shutil.which("redis-server"):
        setups.append(("redis-server", "1 core", ["redis-server", "--save", "", "--appendonly", "no"], "redis", 1))
    for backend in args.backends:
        setups.append((f"corepin-{backend}", "1 core", [kv, "--runtime", backend, "--cores", "0-0"], "kv", 1))
    for backend in args.backends:
        for pipeline in (1, PIPELINE):
            for mode, extra in (("2 workers, 0% forwarded", ["--local-keys"]), ("2 workers, ~50% forwarded", [])):
                setups.append((f"corepin-{backend}", mode, [kv, "--runtime", backend, "--cores", "0-1"] + extra,
                               "kv", pipeline))
    for name, mode, cmd, kind, pipeline in setups:
        # Pipelined runs send 16 times as many requests, so that they last about as long.
        n = requests * pipeline // 2 if pipeline > 1 else requests
        port = free_port()
        if kind == "redis":
            full = ["taskset", "-c", str(SERVER_CPU)] + cmd + ["--port", str(port)]
        else:
            full = cmd + ["--listen", f"127.0.0.1:{port}"]
            if mode == "1 core":
                full = ["taskset", "-c", str(SERVER_CPU)] + full
        with contextlib.ExitStack() as local:
            proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            server = Server(name, proc, port)
            local.callback(server.stop)
            wait_port(port, proc, name)
            gen_cpus = str(CLIENT_CPU) if mode == "1 core" else f"{SERVER_CPU},{CLIENT_CPU}"
            redis_benchmark(port, n // 4, gen_cpus, pipeline)  # warm-up
            before = cpu_ticks(proc.pid)
            rps = redis_benchmark(port, n, gen_cpus, pipeline)
            used_us = (cpu_ticks(proc.pid) - before) * 1e6 / CLK_TCK
            r = {"server": name, "mode": mode, "pipeline": pipeline, "requests": 2 * n, "set_per_sec": rps["SET"],
                 "get_per_sec": rps["GET"], "server_cpu_us_per_req": used_us / (2 * n)}
            out.results.append(r)
            print(f"  kv {name:<20} {mode:<26} -P {pipeline:<3} SET {rps['SET']:>9,.0f}/s  "
                  f"GET {rps['GET']:>9,.0f}/s  {fmt_us(r['server_cpu_us_per_req'])} CPU/req", flush=True)
    rows = ["| server | setup | in flight per connection | SET/s | GET/s | server CPU per request |",
            "|---|---|---:|---:|---:|---:|"]
    for r in out.results:
        rows.append(f"| {r['server']} | {r['mode']} | {r['pipeline']} | {r['set_per_sec']:,.0f} | "
                    f"{r['get_per_sec']:,.0f} | {fmt_us(r['server_cpu_us_per_req'])} |")
    extra = ["", f"| backend | extra CPU per forwarded request, 1 in flight | the same, {PIPELINE} in flight |",
             "|---|---:|---:|"]
    for backend in args.backends:
        cells = []
        for pipeline in (1, PIPELINE):
            both = {r["mode"]: r["server_cpu_us_per_req"] for r in out.results
                    if r["server"] == f"corepin-{backend}" and r["pipeline"] == pipeline}
            local_cpu, fwd_cpu = both.get("2 workers, 0% forwarded"), both.get("2 workers, ~50% forwarded")
            cells.append(fmt_us((fwd_cpu - local_cpu) / 0.5) if local_cpu is not None and fwd_cpu is not None
                         else "n/a")
        extra.append(f"| {backend} | {cells[0]} | {cells[1]} |")
    out.markdown = ("Sharded key-value example vs redis-server 7 (redis-benchmark: SET and GET, 50 connections, "
                    f"random keys, 1 or {PIPELINE} requests in flight per connection); server CPU per request is "
                    "the process's user + system time divided by the requests. With two workers the generator "
                    "shares both CPUs. A pipeline's GETs and SETs for the other worker travel in one cross-core "
                    "call.\n\n" + "\n".join(rows + extra) + "\n")
    return out


H3_PEER = "quinn-tokio"
# (label, file name, bytes): the bodies `h3` asks for; the big one is measured per MB.
H3_BODIES = (("16 B", "tiny.bin", 16), ("4 KiB", "4k.bin", 4096))
H3_BIG = ("100 MiB", "100m.bin", 100 << 20)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def h3_command(server: str, port: int, root: Path, cert: Path, key: Path) -> list[str]:
    """The command line of an HTTP/3 file server: `corepin h3` on a backend, or the quinn peer."""
    listen = f"127.0.0.1:{port}"
    tls = ["--cert", str(cert), "--key", str(key)]
    if server == H3_PEER:
        return [str(TARGET / "corepin-peer-h3"), str(root), "--listen", listen, "--cpu", str(SERVER_CPU)] + tls
    backend = server.removeprefix("corepin-")
    return [str(TARGET / "corepin"), "h3", str(root), "--runtime", backend, "--cores", f"{SERVER_CPU}-{SERVER_CPU}",
            "--listen", listen] + tls


def h3_site(tmp: Path) -> tuple[Path, Path, Path]:
    """The served directory (random bytes, so nothing compresses) and one EC P-256
    certificate, not a CA, that both servers present and the generator trusts."""
    root = tmp / "site"
    root.mkdir()
    for _, name, size in H3_BODIES + (H3_BIG,):
        with open(root / name, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 20)
                f.write(os.urandom(n))
                left -= n
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-addext", "basicConstraints=critical,CA:FALSE"], check=True, capture_output=True)
    return root, cert, key


def run_h3(args: argparse.Namespace, prof: Profile, stack: contextlib.ExitStack) -> Outcome:
    """HTTP/3 static files: `corepin h3` on each backend (one worker, CPU 0) and quinn + h3 on
    tokio's current-thread runtime (corepin-peer-h3, CPU 0), the generator on CPU 1. Each
    point is one `corepin-loadgen h3` run: its connections are opened first, then a warm-up,
    then the measured window, whose edges are where the server's CPU time is read (so
    handshakes and warm-up are not in it). One request in flight per connection. Each point
    is run `h3_reps` times per server, in rounds in which the servers take turns; the run with
    the median CPU figure is kept (every round's is in `cpu_runs`: a server's vary by up to
    about 1.5x from one run to the next), and the comparison with the peer is the median of
    the rounds' paired ratios (`paired_ratios`)."""

    out = Outcome()
    servers = [f"corepin-{b}" for b in args.backends] + [H3_PEER]
    points = [(label, name, size, conns, prof.secs) for label, name, size in H3_BODIES for conns in prof.h3_conns]
    points.append((*H3_BIG, 1, prof.h3_big_secs))
    with tempfile.TemporaryDirectory(prefix="corepin-bench-h3-") as tmp_name, contextlib.ExitStack() as local:
        root, cert, key = h3_site(Path(tmp_name))
        # Every server runs for the whole workload (an idle QUIC endpoint costs nothing), and
        # each round of a point visits them in turn, so a machine that slows down for a while
        # (a shared VM) moves every server's figures alike, not one server's.
        running: dict[str, Server] = {}
        for name in servers:
            port = free_udp_port()
            running[name] = start_listening(name, h3_command(name, port, root, cert, key), port, local)
        for label, path, size, conns, secs in points:
            metric = "server_cpu_us_per_mb" if size >= 1 << 20 else "server_cpu_us_per_req"
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            for rep in range(prof.h3_reps):
                # Each round starts one server further on, so no server always runs first or last.
                order = servers[rep % len(servers):] + servers[:rep % len(servers)]
                for name in order:
                    server = running[name]
                    runs[name].append(loadgen(["h3", "--addr", f"127.0.0.1:{server.port}", "--path", f"/{path}",
                                               "--conns", str(conns), "--secs", str(secs), "--warmup",
                                               str(prof.warmup), "--cpu", str(CLIENT_CPU), "--ca", str(cert),
                                               "--server-pid", str(server.proc.pid)]))
            for name in servers:
                ratios = paired_ratios([x.get(metric) for x in runs[name]], [x.get(metric) for x in runs[H3_PEER]])
                rs = sorted(runs[name], key=lambda x: x.get(metric) if x.get(metric) is not None else float("inf"))
                r = rs[len(rs) // 2]
                r |= {"server": name, "body": label, "size": size, "cpu_runs": [x.get(metric) for x in runs[name]],
                      "vs_peer_runs": ratios, "vs_peer": statistics.median(ratios) if ratios else None,
                      "errors": sum(x["errors"] for x in rs)}
                out.results.append(r)
                if size >= 1 << 20:
                    print(f"  h3 {name:<20} {label:>7} {conns:>3} conns  {r['bytes_per_sec'] / 1e6:>9,.0f} MB/s  "
                          f"{fmt_us(r['server_cpu_us_per_mb'])} CPU/MB  errors {r['errors']}", flush=True)
                else:
                    print(f"  h3 {name:<20} {label:>7} {conns:>3} conns  {r['req_per_sec']:>9,.0f} req/s  "
                          f"{fmt_us(r['server_cpu_us_per_req'])} CPU/req  p99 {fmt_us(r['p99_us'])}  "
                          f"errors {r['errors']}", flush=True)
    out.markdown = h3_markdown(out.results, servers, prof)
    # Its own file too (as files_vs_nginx.json), so a run of this workload alone can be kept
    # beside the suite's latest.json.
    (Path(args.out) / "h3.json").write_text(json.dumps({"meta": machine(), "h3": out.results}, indent=1))
    return out


def paired_ratios(values: list[float | None], peer: list[float | None]) -> list[float]:
    """Round by round, a server's figure divided by the peer's from the same round. The VM's
    speed drifts by more than the servers differ (the peer alone moved by a fifth between runs
    of one point), and a round's servers run within seconds of each other, so the median of
    these ratios tells the servers apart where a ratio of two medians taken minutes apart
    does not."""
    return [v / b for v, b in zip(values, peer) if v is not None and b]


def h3_markdown(results: list[dict], servers: list[str], prof: Profile) -> str:
    def find(server: str, size: int, conns: int) -> dict | None:
        return next((r for r in results if r["server"] == server and r["size"] == size and r["conns"] == conns), None)

    def vs(r: dict, base: dict | None, metric: str) -> str:
        # The median of the rounds' paired ratios; a result without them (an older file) gets
        # the ratio of the two medians.
        if r.get("vs_peer") is not None:
            return f"{r['vs_peer']:.2f}"
        v, b = r.get(metric), base and base.get(metric)
        return f"{v / b:.2f}" if v is not None and b else "n/a"

    parts = []
    for label, _, size in H3_BODIES:
        parts.append(f"#### HTTP/3, {label} body: requests/s, server CPU per request, and that CPU relative to "
                     f"{H3_PEER}\n")
        head = "| server | " + " | ".join(f"{c} conn{'s' if c > 1 else ''}: req/s | CPU/req | vs quinn"
                                          for c in prof.h3_conns) + " |"
        parts += [head, "|---|" + "---:|---:|---:|" * len(prof.h3_conns)]
        for s in servers:
            cells = []
            for c in prof.h3_conns:
                r, base = find(s, size, c), find(H3_PEER, size, c)
                if r is None:
                    cells.append(" | | ")
                    continue
                flag = " ⚠" if r.get("errors") else ""
                cells.append(f"{r['req_per_sec']:,.0f}{flag} | {fmt_us(r.get('server_cpu_us_per_req'))} | "
                             f"{vs(r, base, 'server_cpu_us_per_req')}")
            parts.append(f"| {s} | " + " | ".join(cells) + " |")
        parts.append("")
    label, _, size = H3_BIG
    parts.append(f"#### HTTP/3, {label} body, one connection: MB/s and server CPU per MB (10^6 bytes)\n")
    parts += ["| server | MB/s | CPU/MB | vs quinn | time per transfer (p50) |", "|---|---:|---:|---:|---:|"]
    base = find(H3_PEER, size, 1)
    for s in servers:
        r = find(s, size, 1)
        if r is None:
            continue
        flag = " ⚠" if r.get("errors") else ""
        per = r.get("p50_us")
        parts.append(f"| {s} | {r['bytes_per_sec'] / 1e6:,.0f}{flag} | {fmt_us(r.get('server_cpu_us_per_mb'))} | "
                     f"{vs(r, base, 'server_cpu_us_per_mb')} | "
                     f"{f'{per / 1000:,.0f} ms' if per else 'n/a'} |")
    parts.append("")
    reps = f"the median of {prof.h3_reps} runs" if prof.h3_reps > 1 else "one run"
    parts.append(f"Server pinned to CPU {SERVER_CPU} with one worker (corepin: `--cores {SERVER_CPU}-{SERVER_CPU}`; the "
                 f"peer: one tokio current-thread runtime), `corepin-loadgen h3` on CPU {CLIENT_CPU} with one request in "
                 f"flight per connection; CPU is the server's user + system time inside the measured window; each "
                 f"figure is {reps} ({prof.secs:g} s each, {prof.h3_big_secs:g} s for the big body), the servers "
                 f"taking turns in each round, a different one first each time. vs quinn: the server's CPU per request "
                 f"(per MB for the {label} body) divided by {H3_PEER}'s in the same round, the median over the rounds "
                 "(`vs_peer_runs` in h3.json has each round's); below 1.00 is cheaper. ⚠: the run saw errors.\n")
    return "\n".join(parts)


# ---- ingest ------------------------------------------------------------------------------

INGEST_PORT = 47400
# The sender's and the receiver's addresses, each only inside its own namespace.
INGEST_ADDRS = ("10.79.0.1", "10.79.0.2")
INGEST_PREFIX = "corepin-bench-"
# (label, --source, --mode) of each source measured; the last is the one the others are
# compared with.
INGEST_SOURCES = (("AF_XDP native", "xdp", "native"), ("AF_XDP generic", "xdp", "generic"),
                  ("socket (recvmmsg)", "socket", "auto"))
INGEST_BASE = INGEST_SOURCES[-1][0]
INGEST_URING = "socket (io_uring multishot RECVMSG)"
# Per layout: corepin's --cores and --queues, the sender threads' CPUs, and each TX queue's
# CPUs for XPS (hex masks, queue 0 first) in the sender's namespace: the sender's TX queue is
# the receiver's RX queue on veth, so this plays the part of a NIC's RSS + IRQ affinity.
INGEST_LAYOUTS = {
    "2 workers": (["--cores", "0-1", "--queues", "0,1"], [0, 1], ["1", "2"]),
    "1 worker": (["--cores", "0-0", "--queues", "0"], [1], ["3", "0"]),
}
INGEST_SOURCE_PORTS = 64
CLONE_NEWNET = 0x40000000


def netns_call(ns: str, fn: Callable[[], object]) -> object:
    """Runs `fn` on a thread that has entered network namespace `ns` (setns(2) changes only the
    calling thread's namespace); returns its result or raises its exception."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/var/run/netns/{ns}") as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - carried to the caller
            box["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def ip(*args: str) -> str:
    run = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if run.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {run.stderr.strip()}")
    return run.stdout


@dataclass
class VethPair:
    """Two network namespaces joined by a 2-queue veth pair: `va` (INGEST_ADDRS[0]) in `a`
    sends, `vb` (INGEST_ADDRS[1]) in `b` receives."""
    a: str
    b: str

    def remove(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def set_xps(self, masks: list[str]) -> None:
        writes = "; ".join(f"echo {m} > /sys/class/net/va/queues/tx-{q}/xps_cpus" for q, m in enumerate(masks))
        ip("netns", "exec", self.a, "sh", "-c", writes)

    def link_drops(self) -> tuple[int, int]:
        """Packets the veth pair dropped: the sender side's TX drops (the receiving queue's ring
        was full) and the receiver side's RX drops (with an XDP program: its redirects that
        failed, e.g. into a full XSK RX ring)."""
        out = []
        for ns, dev, way in ((self.a, "va", "tx"), (self.b, "vb", "rx")):
            link = json.loads(ip("-n", ns, "-s", "-j", "link", "show", dev))[0]
            out.append(int(link["stats64"][way]["dropped"]))
        return out[0], out[1]


def remove_stale_namespaces() -> None:
    """Removes the namespaces of earlier runs whose process is gone (killed before its cleanup)."""
    for line in ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(INGEST_PREFIX):
            continue
        pid = name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def veth_pair(stack: contextlib.ExitStack) -> VethPair:
    remove_stale_namespaces()
    pid = os.getpid()
    pair = VethPair(f"{INGEST_PREFIX}a-{pid}", f"{INGEST_PREFIX}b-{pid}")
    stack.callback(pair.remove)  # before creating, so that a half-made pair goes too
    ip("netns", "add", pair.a)
    ip("netns", "add", pair.b)
    ip("-n", pair.a, "link", "add", "va", "numtxqueues", "2", "numrxqueues", "2", "type", "veth", "peer", "name",
       "vb", "numtxqueues", "2", "numrxqueues", "2", "netns", pair.b)
    for ns, dev, addr in ((pair.a, "va", INGEST_ADDRS[0]), (pair.b, "vb", INGEST_ADDRS[1])):
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")
        ip("-n", ns, "link", "set", "lo", "up")
    # Checksums finished by the sender, so that AF_XDP receives the frames a NIC would hand over.
    subprocess.run(["ip", "netns", "exec", pair.a, "ethtool", "-K", "va", "tx", "off"], capture_output=True,
                   timeout=30)
    # Both neighbours resolved before the first datagram (unresolved, the sender's kernel
    # queues a few and drops the rest).
    ping = subprocess.run(["ip", "netns", "exec", pair.a, "ping", "-c", "1", "-W", "5", INGEST_ADDRS[1]],
                          capture_output=True, text=True, timeout=30)
    if ping.returncode != 0:
        raise RuntimeError(f"ping across the veth pair failed: {ping.stdout.strip()} {ping.stderr.strip()}")
    return pair


@dataclass
class Receiver:
    proc: subprocess.Popen
    metrics_port: int
    banner: list[str]
    ns: str

    def scrape(self) -> dict[str, float]:
        """The receiver's metrics (sample with labels -> value), read inside its namespace."""
        def get() -> str:
            with socket.create_connection(("127.0.0.1", self.metrics_port), timeout=10) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
                chunks = []
                while chunk := s.recv(1 << 16):
                    chunks.append(chunk)
            return b"".join(chunks).decode()

        text = str(netns_call(self.ns, get))
        out = {}
        for line in text.split("\r\n\r\n", 1)[-1].splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out


def start_receiver(pair: VethPair, source: str, mode: str, backend: str, layout: list[str],
                   stack: contextlib.ExitStack) -> Receiver:
    """Starts `corepin xdp` in the receiving namespace. The kernel releases a closed AF_XDP
    socket's hold on its queue after the process is gone (deferred work), so binding the same
    queue again at once can fail with EBUSY for a short while: that is retried for up to 5 s."""
    started, retried = time.monotonic(), False
    while True:
        try:
            recv = start_receiver_once(pair, source, mode, backend, layout, stack)
        except RuntimeError as e:
            if "Device or resource busy" not in str(e) or time.monotonic() - started > 5:
                raise
            retried = True
            time.sleep(0.1)
            continue
        if retried:
            print(f"  (corepin xdp: EBUSY on AF_XDP bind, a queue still held by the previous run's socket; "
                  f"started after {time.monotonic() - started:.1f} s)", flush=True)
        return recv


def start_receiver_once(pair: VethPair, source: str, mode: str, backend: str, layout: list[str],
                        stack: contextlib.ExitStack) -> Receiver:
    cmd = ["ip", "netns", "exec", pair.b, str(TARGET / "corepin"), "xdp", "--interface", "vb", "--port",
           str(INGEST_PORT), "--source", source, "--mode", mode, "--runtime", backend, "--metrics", "127.0.0.1:0",
           "--drain-timeout", "5"] + layout
    # `ip netns exec` execs the command: the process measured is corepin itself.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stack.callback(Server("corepin xdp", proc, INGEST_PORT).stop)
    assert proc.stdout is not None and proc.stderr is not None
    banner: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"corepin xdp exited before its banner was complete ({' '.join(cmd)}): "
                               f"{proc.stderr.read().strip()}")
        banner.append(line.rstrip())
        if line.strip().startswith("metrics: http://"):
            port = int(line.strip().removeprefix("metrics: http://").split("/")[0].rsplit(":", 1)[1])
            subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
            subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
            return Receiver(proc, port, banner, pair.b)
    raise RuntimeError(f"corepin xdp printed no metrics address within 30 s: {' '.join(cmd)}")


def cpu_times() -> dict[str, tuple[int, int, int]]:
    """Per CPU line of /proc/stat ("cpu", "cpu0", ...): (busy, niced, total) in clock ticks.
    Busy includes interrupts and softirqs but not niced processes (the benchmark's own run at
    nice 0; niced ones are someone else's, e.g. a build)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
            out[name] = (sum(v) - v[1] - v[3] - v[4], v[1], sum(v))
    return out


def udp_drops(ns: str) -> int:
    """The receiving namespace's UDP receive-buffer and checksum drops (/proc/net/snmp)."""
    def read() -> int:
        lines = [line.split() for line in open("/proc/thread-self/net/snmp") if line.startswith("Udp:")]
        row = dict(zip(lines[0][1:], (int(x) for x in lines[1][1:])))
        return row["RcvbufErrors"] + row["InCsumErrors"]
    return int(netns_call(ns, read))  # type: ignore[arg-type]


def drops(pair: VethPair, m: dict[str, float]) -> dict[str, int]:
    """Where datagrams were dropped so far, by place."""
    tx, rx = pair.link_drops()
    xsk = sum(m.get(f"corepin_xsk_{k}_all_cores_total", 0) for k in ("rx_ring_full", "fill_ring_empty", "rx_dropped"))
    return {"dropped_veth_tx": tx, "dropped_veth_rx": rx, "dropped_xsk": int(xsk),
            "dropped_udp_socket": udp_drops(pair.b)}


def ingest_point(pair: VethPair, recv: Receiver, label: str, layout: str, size: int, secs: float, warmup: float,
                 sender_cpus: list[int]) -> dict:
    """One measured run: the sender sends for `warmup` + `secs`; the receiver's counters and the
    CPU times are read at the edges of the sender's measured window; loss is counted over the
    whole run once the receiver has taken what was queued."""
    m0 = recv.scrape()
    drops0 = drops(pair, m0)
    cmd = ["ip", "netns", "exec", pair.a, str(TARGET / "corepin-loadgen"), "udp", "--to",
           f"{INGEST_ADDRS[1]}:{INGEST_PORT}", "--from", INGEST_ADDRS[0], "--size", str(size), "--ports",
           str(INGEST_SOURCE_PORTS), "--cpus", ",".join(map(str, sender_cpus)), "--secs", str(secs), "--warmup",
           str(warmup)]
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert gen.stdout is not None and gen.stderr is not None
        if "window" not in gen.stdout.readline():
            gen.wait(30)
            raise RuntimeError(f"the UDP sender failed ({' '.join(cmd)}): {gen.stderr.read().strip()}")
        a = (time.monotonic(), recv.scrape(), cpu_ticks(recv.proc.pid), cpu_ticks(gen.pid), cpu_times())
        line = gen.stdout.readline()
        b = (time.monotonic(), cpu_times(), cpu_ticks(recv.proc.pid), cpu_ticks(gen.pid), recv.scrape())
        if gen.wait(30) not in (0, 2) or not line.strip():
            raise RuntimeError(f"the UDP sender failed ({' '.join(cmd)}): {gen.stderr.read().strip()}")
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    sent = json.loads(line)
    # Let the receiver take what is still queued: until its count stops moving.
    total, last, stable_since = "corepin_ingest_datagrams_all_cores_total", -1.0, time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m2 = recv.scrape()
        if m2.get(total, 0) != last:
            last, stable_since = m2.get(total, 0), time.monotonic()
        elif time.monotonic() - stable_since > 0.3:
            break
        time.sleep(0.05)
    drops2 = drops(pair, m2)
    window = b[0] - a[0]
    got = int(b[4].get(total, 0) - a[1].get(total, 0))
    batches_total = "corepin_ingest_batches_all_cores_total"
    batches = b[4].get(batches_total, 0) - a[1].get(batches_total, 0)
    per_worker = [b[4].get(f'corepin_ingest_datagrams_total{{core="{c}"}}', 0)
                  - a[1].get(f'corepin_ingest_datagrams_total{{core="{c}"}}', 0) for c in range(2)]
    taken = int(m2.get(total, 0) - m0.get(total, 0))
    lost = max(sent["sent_total"] - taken, 0)
    def share(name: str, i: int) -> float:
        return (b[1][name][i] - a[4][name][i]) / max(b[1][name][2] - a[4][name][2], 1)

    used = {name: share(name, 0) for name in b[1] if name != "cpu"}
    machine_us = (b[1]["cpu"][0] - a[4]["cpu"][0]) * 1e6 / CLK_TCK
    corepin_us = (b[2] - a[2]) * 1e6 / CLK_TCK
    r = {"source": label, "layout": layout, "size": size, "secs": window, "sent_pps": sent["pps"],
         "sent_total": sent["sent_total"], "sender_busy_calls": sent["busy"], "sender_refused_calls": sent["refused"],
         "pps": got / window, "pps_per_worker": [n / window for n in per_worker], "datagrams": got,
         "taken_total": taken, "lost": lost, "loss": lost / sent["sent_total"] if sent["sent_total"] else None,
         **{k: drops2[k] - drops0[k] for k in drops2}, "datagrams_per_batch": got / batches if batches else None,
         "corepin_ns_per_pkt": corepin_us * 1e3 / got if got else None,
         "machine_ns_per_pkt": machine_us * 1e3 / got if got else None,
         "sender_ns_per_pkt": (b[3] - a[3]) * 1e9 / CLK_TCK / got if got else None,
         "corepin_cores_busy": corepin_us / (window * 1e6), "cpu_busy": used, "sender_cpus": sender_cpus}
    # CPU time that is neither corepin's nor the sender's (whose process time includes the softirqs
    # it ran): other processes competing for the CPUs, or ksoftirqd.
    all_busy = b[1]["cpu"][0] + b[1]["cpu"][1] - a[4]["cpu"][0] - a[4]["cpu"][1]
    r["other_cpu"] = max(all_busy - (b[2] - a[2]) - (b[3] - a[3]), 0) / max(b[1]["cpu"][2] - a[4]["cpu"][2], 1)
    r["limit"] = ingest_limit(r)
    return r


# Where a datagram can be dropped on its way to corepin, as named in the table. A failed XDP
# redirect (e.g. into a full XSK RX ring) is counted both by the XSK socket and as a veth RX drop.
INGEST_DROPS = (("veth TX ring full", "dropped_veth_tx"), ("veth RX", "dropped_veth_rx"),
                ("XSK rings", "dropped_xsk"), ("socket buffer", "dropped_udp_socket"))


def ingest_limit(r: dict) -> str:
    """What held the figure down, from the loss and where it happened and from how busy the CPUs
    were; flagged when something else took a share of the CPUs."""
    if r["other_cpu"] >= 0.05:
        return f"⚠ other processes took {r['other_cpu']:.0%} of the CPUs; " + ingest_limit(r | {"other_cpu": 0})
    if r["loss"] is not None and r["loss"] >= 0.01:
        where = [f"{name} {r[key]:,}" for name, key in INGEST_DROPS if r[key]]
        return "receiver: drops (" + (", ".join(where) or "not located") + ")"
    sender = [f"cpu{c}" for c in sorted(set(r["sender_cpus"]))]
    busy = [r["cpu_busy"].get(c, 0) for c in sender]
    if busy and min(busy) >= 0.9:
        shared = " (shared with corepin)" if r["layout"] == "2 workers" else " (sender + kernel receive path)"
        return f"sender's CPU{'s' if len(sender) > 1 else ''} busy {min(busy):.0%}{shared}"
    return f"not CPU-bound (sender's CPUs {', '.join(f'{b:.0%}' for b in busy)} busy)"


def run_ingest(args: argparse.Namespace, prof: Profile, stack: contextlib.ExitStack) -> Outcome:
    """UDP datagrams for one port taken off a veth pair by `corepin xdp`: AF_XDP with the XDP
    program attached in native and in generic mode, and the SO_REUSEPORT + recvmmsg socket
    source. The pair joins two network namespaces made for the run (removed afterwards, on
    failure and on Ctrl-C or SIGTERM too); corepin runs in one, `corepin-loadgen udp` (sendmmsg
    from pinned threads, 64 source ports) in the other. Two layouts: two workers (CPUs 0 and 1)
    with one sender thread on each CPU, and one worker on CPU 0 with the sender on CPU 1. The
    figures: datagrams/s corepin took in the sender's measured window, corepin's CPU per
    datagram (user + system of its process), the whole machine's CPU per datagram (sender,
    kernel and corepin, softirqs included), and the loss over the whole run."""
    if os.geteuid() != 0:
        return Outcome(skipped=f"needs root (network namespaces, XDP, AF_XDP); euid is {os.geteuid()}")
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return Outcome(skipped=f"`{tool}` not found (iproute2, iputils-ping)")
    backend = "monoio" if "monoio" in args.backends else args.backends[0]
    out = Outcome()
    old_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)  # so that the namespaces are removed on the way out
    try:
        with contextlib.ExitStack() as local:
            pair = veth_pair(local)
            runs: dict[tuple[str, str, int], list[dict]] = {}
            # Each round visits every point, so that a machine that slows down for a while (a
            # shared VM) moves every source's figures alike, not one source's.
            for rnd in range(prof.ingest_reps):
                for layout in prof.ingest_layouts:
                    cores, sender_cpus, xps = INGEST_LAYOUTS[layout]
                    pair.set_xps(xps)
                    for label, source, mode in INGEST_SOURCES:
                        with contextlib.ExitStack() as run:
                            recv = start_receiver(pair, source, mode, backend, cores, run)
                            for size in prof.ingest_sizes:
                                # A short untimed run first: pages touched, flows in the tables.
                                ingest_point(pair, recv, label, layout, size, 0.2, 0.0, sender_cpus)
                                r = ingest_point(pair, recv, label, layout, size, prof.ingest_secs, prof.warmup,
                                                 sender_cpus)
                                r |= {"backend": backend, "banner": recv.banner}
                                runs.setdefault((layout, label, size), []).append(r)
                                print(f"  ingest {rnd + 1}/{prof.ingest_reps} {layout:<9} {label:<18} {size:>5} B  "
                                      f"sent {r['sent_pps']:>10,.0f}/s  taken {r['pps']:>10,.0f}/s  "
                                      f"corepin {fmt_ns(r['corepin_ns_per_pkt'])}/pkt  "
                                      f"machine {fmt_ns(r['machine_ns_per_pkt'])}/pkt  loss {r['loss']:.2%}  "
                                      f"{r['datagrams_per_batch'] or 0:.1f}/batch  [{r['limit']}]", flush=True)
            # Per point, the run with the median corepin CPU per datagram; the others' figures beside it.
            for rs in runs.values():
                rs.sort(key=lambda x: x["corepin_ns_per_pkt"] or float("inf"))
                r = rs[len(rs) // 2]
                r["runs"] = [{k: x[k] for k in ("pps", "loss", "corepin_ns_per_pkt", "machine_ns_per_pkt", "other_cpu")}
                             for x in rs]
                out.results.append(r)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    out.markdown = ingest_markdown(out.results, prof, backend)
    results = Path(args.out)
    (results / "ingest.json").write_text(json.dumps({"meta": machine(), "ingest": out.results}, indent=1))
    (results / "ingest.md").write_text(out.markdown)
    return out


def fmt_ns(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f} ns"


def spread(r: dict) -> str:
    """The range of corepin's CPU per datagram over the runs of a point, when there were several."""
    cpu = [x["corepin_ns_per_pkt"] for x in r.get("runs", []) if x["corepin_ns_per_pkt"] is not None]
    return f" ({min(cpu):,.0f}–{max(cpu):,.0f})" if len(cpu) > 1 else ""


def ingest_markdown(results: list[dict], prof: Profile, backend: str) -> str:
    rows = ["| layout | source | payload | sent/s | taken/s (per worker) | loss | datagrams per batch | "
            "corepin CPU/datagram | vs socket | machine CPU/datagram | what limited it |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for layout in prof.ingest_layouts:
        for size in prof.ingest_sizes:
            base = next((r for r in results if r["layout"] == layout and r["size"] == size
                         and r["source"] == INGEST_BASE), None)
            for r in (x for x in results if x["layout"] == layout and x["size"] == size):
                ratio = (f"{r['corepin_ns_per_pkt'] / base['corepin_ns_per_pkt']:.2f}"
                         if base and base.get("corepin_ns_per_pkt") and r.get("corepin_ns_per_pkt") else "n/a")
                split = " / ".join(f"{p / 1e6:.2f}" for p in r["pps_per_worker"][:2 if layout == "2 workers" else 1])
                rows.append(f"| {layout} | {r['source']} | {size} B | {r['sent_pps'] / 1e6:.2f} M | "
                            f"{r['pps'] / 1e6:.2f} M ({split}) | {r['loss']:.1%} | "
                            f"{r['datagrams_per_batch'] or 0:.1f} | {fmt_ns(r['corepin_ns_per_pkt'])}{spread(r)} | "
                            f"{ratio} | "
                            f"{fmt_ns(r['machine_ns_per_pkt'])} | {r['limit']} |")
            rows.append(f"| {layout} | {INGEST_URING} | {size} B | | not measured: not in corepin's socket source "
                        "yet (docs/af_xdp.md, \"Not done\") | | | | | | |")
    return (f"UDP datagrams for one port taken off a 2-queue veth pair between two network namespaces by "
            f"`corepin xdp` ({backend}); `corepin-loadgen udp` sends from the other namespace (sendmmsg, "
            f"{INGEST_SOURCE_PORTS} source ports, one pinned thread per sender CPU). 2 workers: corepin on CPUs 0 "
            "and 1, a sender thread on each, XPS sending CPU n's datagrams through TX queue n (= RX queue n); "
            "1 worker: corepin on CPU 0 with queue 0, the sender on CPU 1. taken/s: datagrams corepin counted "
            f"in the sender's measured window ({prof.ingest_secs:g} s, after {prof.warmup:g} s of warm-up), in "
            "millions; loss: sent but never taken, over the whole run. corepin CPU: its process's user + system "
            f"time per datagram (of {prof.ingest_reps} run{'s' if prof.ingest_reps > 1 else ''} per point, the one "
            "with the median figure, the range in parentheses; every run in ingest.json); machine CPU: all "
            "CPUs' busy time (sender, kernel, softirqs, corepin; niced processes left out) per datagram. "
            "datagrams per batch: how many a worker took per wake-up, on average (at most 64). ⚠: other "
            "processes took 5% or more of the CPUs. "
            "On veth the kernel's receive path (XDP program, copy into the UMEM or the socket buffer) runs in "
            "the sender's softirq, so it shows in the machine figure, not in corepin's. vs socket: corepin CPU "
            f"per datagram divided by that of the {INGEST_BASE} source in the same run.\n\n" + "\n".join(rows) + "\n")


WORKLOADS: dict[str, Callable[[argparse.Namespace, Profile, contextlib.ExitStack], Outcome]] = {
    "echo": run_echo,
    "files": run_files,
    "https": run_https,
    "cold": run_cold,
    "scale": run_scale,
    "crosscore": run_crosscore,
    "kv": run_kv,
    "h3": run_h3,
    "ingest": run_ingest,
}


# ---- reporting ---------------------------------------------------------------------------


def fmt_us(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.0f} µs" if v >= 100 else f"{v:.2f} µs"


def best_peer(rows: list[dict]) -> dict | None:
    peers = [r for r in rows if not r["server"].startswith("corepin-") and r.get("server_cpu_us_per_msg")]
    return min(peers, key=lambda r: r["server_cpu_us_per_msg"]) if peers else None


def echo_markdown(results: list[dict], prof: Profile) -> str:
    parts = []
    for size in prof.sizes:
        rows = [r for r in results if r["size"] == size]
        servers = list(dict.fromkeys(r["server"] for r in rows))
        parts.append(f"#### Echo, {size} B messages: server CPU per message (messages/s)\n")
        head = "| server | " + " | ".join(f"{c} conn{'s' if c > 1 else ''}" for c in prof.conns) + \
               " | CPU/msg vs best peer |"
        parts.append(head)
        parts.append("|---|" + "---:|" * (len(prof.conns) + 1))
        for s in servers:
            cells, ratios = [], []
            for c in prof.conns:
                r = next((x for x in rows if x["server"] == s and x["conns"] == c), None)
                if r is None:
                    cells.append("")
                    continue
                bp = best_peer([x for x in rows if x["conns"] == c])
                if bp and r.get("server_cpu_us_per_msg"):
                    ratios.append(r["server_cpu_us_per_msg"] / bp["server_cpu_us_per_msg"])
                flag = " ⚠" if r.get("errors") else ""
                cells.append(f"{fmt_us(r.get('server_cpu_us_per_msg'))} ({r['msgs_per_sec']:,.0f}){flag}")
            geo = (f"{prod(ratios) ** (1 / len(ratios)):.2f}" if ratios else "n/a")
            parts.append(f"| {s} | " + " | ".join(cells) + f" | {geo} |")
        c_lat = 128 if 128 in prof.conns else prof.conns[-1]
        parts.append(f"\nLatency at {c_lat} connections, {size} B:\n")
        parts.append("| server | p50 | p99 | p99.9 | messages/s | vs best peer msgs/s |")
        parts.append("|---|---:|---:|---:|---:|---:|")
        lat_rows = [r for r in rows if r["conns"] == c_lat]
        best_tp = max((r["msgs_per_sec"] for r in lat_rows if not r["server"].startswith("corepin-")), default=None)
        for r in lat_rows:
            ratio = f"{r['msgs_per_sec'] / best_tp:.2f}" if best_tp else "n/a"
            parts.append(f"| {r['server']} | {fmt_us(r['p50_us'])} | {fmt_us(r['p99_us'])} | {fmt_us(r['p999_us'])} | "
                         f"{r['msgs_per_sec']:,.0f} | {ratio} |")
        parts.append("")
    parts.append("CPU/msg vs best peer: the geometric mean over connection counts of the server's CPU per message "
                 "divided by that of the cheapest peer (raw engines, tokio, the io_uring floor) at the same "
                 "point; below 1.00 is cheaper than every peer.\n")
    return "\n".join(parts)


def prod(xs: list[float]) -> float:
    p = 1.0
    for x in xs:
        p *= x
    return p


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": cpu,
            "server_cpu": SERVER_CPU, "client_cpu": CLIENT_CPU, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def build() -> None:
    # corepin on its own first, so that the binary measured is the one `cargo build --release`
    # makes: built together, the peers' and the load generator's features (quinn's and tokio's
    # runtimes) would be unified into corepin's dependencies too.
    for cmd in (["cargo", "build", "--release", "-p", "corepin-cli"],
                ["cargo", "build", "--release", "-p", "corepin-bench-peers", "-p", "corepin-loadgen"],
                ["cargo", "build", "--release", "-p", "corepin-cli", "--example", "crosscore", "--example", "kv"]):
        print("building:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke profile: every workload, tiny matrix")
    ap.add_argument("--only", default=",".join(WORKLOADS), help=f"workloads to run (default: {','.join(WORKLOADS)})")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="corepin backends")
    ap.add_argument("--peers", default=",".join(PEERS), help="peer echo servers (empty for none)")
    ap.add_argument("--no-build", action="store_true", help="use the binaries already in target/release")
    ap.add_argument("--out", help="results directory (default: benches/results, or benches/results/quick "
                    "with --quick)")
    args = ap.parse_args()
    args.out = args.out or str(RESULTS / "quick" if args.quick else RESULTS)
    args.backends = [b for b in args.backends.split(",") if b]
    args.peers = [p for p in args.peers.split(",") if p]
    only = [w for w in args.only.split(",") if w]
    unknown = [w for w in only if w not in WORKLOADS]
    if unknown:
        print(f"error: unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("error: needs at least 2 CPUs (server and load generator on separate cores)", file=sys.stderr)
        return 2
    tools = ["taskset"] + (["nginx", "wrk"] if "files" in only else []) + (["curl"] if "cold" in only else [])
    for tool in tools + (["openssl"] if "h3" in only else []):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"error: {tool} not found; run scripts/setup.sh --bench", file=sys.stderr)
            return 2
    prof = PROFILES["quick" if args.quick else "default"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_build:
        build()
    else:
        # Every binary the chosen workloads start, checked now rather than after the earlier
        # workloads have run for minutes.
        needed = ["corepin", "corepin-peer-echo", "corepin-loadgen"]
        needed += ["corepin-peer-h3"] if "h3" in only else []
        needed += ["examples/crosscore"] if "crosscore" in only else []
        needed += ["examples/kv"] if "kv" in only else []
        missing = [n for n in needed if not os.access(TARGET / n, os.X_OK)]
        if missing:
            print(f"error: --no-build, but {', '.join(str(TARGET / n) for n in missing)} not built "
                  "(run without --no-build, or build them: see build() in this file)", file=sys.stderr)
            return 2
    meta = machine() | {"profile": "quick" if args.quick else "default", "workloads": only}
    print(f"server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}; kernel {meta['kernel']}; "
          f"profile {meta['profile']}", flush=True)
    report: dict = {"meta": meta}
    md = [f"### Benchmarks ({meta['date']}, {meta['cpu_model'] or 'unknown CPU'}, {meta['cpus']} CPUs, "
          f"kernel {meta['kernel']}, profile {meta['profile']})\n",
          f"Server pinned to CPU {SERVER_CPU} with one worker; load generator on CPU {CLIENT_CPU}. "
          "The primary figure is the server's CPU time per message or request.\n"]
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        for w in only:
            print(f"== {w}", flush=True)
            outcome = WORKLOADS[w](args, prof, stack)
            if outcome.skipped:
                print(f"  skipped: {outcome.skipped}", flush=True)
                report.setdefault("skipped", {})[w] = outcome.skipped
                md.append(f"### {w}\n\nSkipped: {outcome.skipped}.\n")
                continue
            report[w] = outcome.results
            md.append(f"### {w}\n\n{outcome.markdown}")
    report["meta"]["seconds"] = round(time.monotonic() - started, 1)
    (out_dir / "latest.json").write_text(json.dumps(report, indent=1))
    (out_dir / "latest.md").write_text("\n".join(md))
    plots = out_dir / "plots"
    if {"echo", "files", "https", "h3", "ingest"} & set(report):
        subprocess.run([str(TARGET / "corepin-plot"), "--input", str(out_dir / "latest.json"), "--out-dir", str(plots)],
                       check=True)
    print("\n".join(md))
    print(f"results: {out_dir / 'latest.json'}, {out_dir / 'latest.md'}, plots in {plots} "
          f"({report['meta']['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
