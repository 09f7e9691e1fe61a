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
* scale  resident memory per idle connection at ~19,000 connections (corepin-loadgen hold).
* crosscore  CPU per cross-core call (`submit_to`) between two pinned workers (examples/crosscore.rs).
* kv     the sharded key-value example against redis-server under redis-benchmark, on one core and
         on two workers at 0% and ~50% of requests forwarded to the key's owner (examples/kv.rs).
* h3     `corepin h3` on each backend against quinn + h3 on tokio's current-thread runtime
         (corepin-peer-h3: the same files, TLS and transport settings) under `corepin-loadgen h3`:
         requests/s and server CPU per request for a 16 B and a 4 KiB body at 1/10/100
         connections, MB/s and server CPU per MB for a 100 MiB body on one connection.

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
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "target" / "release"
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


PROFILES = {
    "default": Profile([1, 16, 128, 1000], [64, 1024, 16384], 2.5, 0.5, 19000, ["--secs", "4"], ["--size", "1024"],
                       [1, 10, 100], 4.0, 3),
    "quick": Profile([1, 16], [64], 0.5, 0.2, 1000, ["--secs", "1", "--warmup", "0"],
                     ["--size", "64", "--rate", "100M"], [10], 1.0, 1),
}


# ---- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


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
        backend = server.removeprefix("corepin-")
        return [str(TARGET / "corepin"), "echo", "--runtime", backend, "--cores", f"{SERVER_CPU}-{SERVER_CPU}",
                "--listen", listen]
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
                    before = cpu_ticks(server.proc.pid)
                    r = loadgen(common + ["--secs", str(prof.secs), "--warmup", "0"])
                    used_us = (cpu_ticks(server.proc.pid) - before) * 1e6 / CLK_TCK
                    r["server"] = name
                    r["server_cpu_us_per_msg"] = used_us / r["messages"] if r["messages"] else None
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
    return run_script("files_vs_nginx.py", "files_vs_nginx.json", "corepin files vs nginx", prof.files_args, args)


def run_https(args: argparse.Namespace, prof: Profile, stack: contextlib.ExitStack) -> Outcome:
    return run_script("files_vs_nginx.py", "https_vs_nginx.json", "corepin files vs nginx over HTTPS",
                      prof.files_args + ["--tls"], args)


def run_cold(args: argparse.Namespace, prof: Profile, stack: contextlib.ExitStack) -> Outcome:
    return run_script("cold_files.py", "cold_files.json", "Small-file latency", prof.cold_args, args)


def run_scale(args: argparse.Namespace, prof: Profile, stack: contextlib.ExitStack) -> Outcome:
    out = Outcome()
    for name in echo_servers(args):
        with contextlib.ExitStack() as local:
            server = start_server(name, local)
            addr = f"127.0.0.1:{server.port}"
            # Warm the server (allocator arenas, first connection paths) before the baseline.
            loadgen(["echo", "--addr", addr, "--conns", "8", "--size", "64", "--secs", "0.3", "--warmup", "0",
                     "--cpu", str(CLIENT_CPU)])
            time.sleep(0.2)
            base = rss_kib(server.proc.pid)
            hold = subprocess.Popen(["taskset", "-c", str(CLIENT_CPU), str(TARGET / "corepin-loadgen"), "hold",
                                     "--addr", addr, "--conns", str(prof.scale_conns), "--secs", "120"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            local.callback(lambda: (hold.kill(), hold.wait()))
            assert hold.stdout is not None
            line = hold.stdout.readline()
            if not line:
                raise RuntimeError(f"hold failed against {name}: {hold.stderr.read() if hold.stderr else ''}")
            held = json.loads(line)["held"]
            # Wait until the server has accepted everything (its RSS stops growing).
            last, stable_since = -1, time.monotonic()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                cur = rss_kib(server.proc.pid)
                if cur != last:
                    last, stable_since = cur, time.monotonic()
                elif time.monotonic() - stable_since > 1.0:
                    break
                time.sleep(0.1)
            total = rss_kib(server.proc.pid)
            per_conn = (total - base) * 1024 / held
            r = {"server": name, "conns": held, "rss_base_kib": base, "rss_kib": total,
                 "bytes_per_conn": per_conn, "mib_per_100k": per_conn * 100_000 / (1 << 20)}
            out.results.append(r)
            print(f"  scale {name:<20} {held} idle conns: RSS {base} -> {total} KiB, {per_conn:,.0f} B/conn, "
                  f"{r['mib_per_100k']:,.0f} MiB per 100k", flush=True)
    rows = ["| server | idle connections | RSS before | RSS with them | per connection | per 100,000 |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in out.results:
        rows.append(f"| {r['server']} | {r['conns']:,} | {r['rss_base_kib'] / 1024:.1f} MiB | "
                    f"{r['rss_kib'] / 1024:.1f} MiB | {r['bytes_per_conn'] / 1024:.2f} KiB | "
                    f"{r['mib_per_100k']:,.0f} MiB |")
    out.markdown = ("Resident memory of the server process (VmRSS) with idle connections open, one worker; "
                    "kernel socket memory is not included.\n\n" + "\n".join(rows) + "\n")
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
    is run `h3_reps` times per server, the servers taking turns; the run with the median CPU
    figure is kept (the others are in `cpu_runs`: corepin's vary by up to about 1.5x from one
    run to the next)."""

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
            for _ in range(prof.h3_reps):
                for name, server in running.items():
                    runs[name].append(loadgen(["h3", "--addr", f"127.0.0.1:{server.port}", "--path", f"/{path}",
                                               "--conns", str(conns), "--secs", str(secs), "--warmup",
                                               str(prof.warmup), "--cpu", str(CLIENT_CPU), "--ca", str(cert),
                                               "--server-pid", str(server.proc.pid)]))
            for name in servers:
                rs = sorted(runs[name], key=lambda x: x.get(metric) if x.get(metric) is not None else float("inf"))
                r = rs[len(rs) // 2]
                r |= {"server": name, "body": label, "size": size, "cpu_runs": [x.get(metric) for x in rs],
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


def h3_markdown(results: list[dict], servers: list[str], prof: Profile) -> str:
    def find(server: str, size: int, conns: int) -> dict | None:
        return next((r for r in results if r["server"] == server and r["size"] == size and r["conns"] == conns), None)

    def ratio(v: float | None, base: float | None) -> str:
        return f"{v / base:.2f}" if v is not None and base else "n/a"

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
                             f"{ratio(r.get('server_cpu_us_per_req'), base and base.get('server_cpu_us_per_req'))}")
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
                     f"{ratio(r.get('server_cpu_us_per_mb'), base and base.get('server_cpu_us_per_mb'))} | "
                     f"{f'{per / 1000:,.0f} ms' if per else 'n/a'} |")
    parts.append("")
    reps = f"the median of {prof.h3_reps} runs" if prof.h3_reps > 1 else "one run"
    parts.append(f"Server pinned to CPU {SERVER_CPU} with one worker (corepin: `--cores {SERVER_CPU}-{SERVER_CPU}`; the "
                 f"peer: one tokio current-thread runtime), `corepin-loadgen h3` on CPU {CLIENT_CPU} with one request in "
                 f"flight per connection; CPU is the server's user + system time inside the measured window; each "
                 f"figure is {reps} ({prof.secs:g} s each, {prof.h3_big_secs:g} s for the big body). vs quinn: "
                 f"the server's CPU per request (per MB for the {label} body) divided by {H3_PEER}'s; below 1.00 is "
                 "cheaper. ⚠: the run saw errors.\n")
    return "\n".join(parts)


WORKLOADS: dict[str, Callable[[argparse.Namespace, Profile, contextlib.ExitStack], Outcome]] = {
    "echo": run_echo,
    "files": run_files,
    "https": run_https,
    "cold": run_cold,
    "scale": run_scale,
    "crosscore": run_crosscore,
    "kv": run_kv,
    "h3": run_h3,
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
            report[w] = outcome.results
            md.append(f"### {w}\n\n{outcome.markdown}")
    report["meta"]["seconds"] = round(time.monotonic() - started, 1)
    (out_dir / "latest.json").write_text(json.dumps(report, indent=1))
    (out_dir / "latest.md").write_text("\n".join(md))
    plots = out_dir / "plots"
    if {"echo", "files", "https", "h3"} & set(only):
        subprocess.run([str(TARGET / "corepin-plot"), "--input", str(out_dir / "latest.json"), "--out-dir", str(plots)],
                       check=True)
    print("\n".join(md))
    print(f"results: {out_dir / 'latest.json'}, {out_dir / 'latest.md'}, plots in {plots} "
          f"({report['meta']['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
