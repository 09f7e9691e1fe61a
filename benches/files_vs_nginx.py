#!/usr/bin/env python3
"""corepin's static file server against nginx, measured as server CPU time per request.

Method
------
* A temporary directory holds the document root (``www/``: 4k.bin and 1m.bin of random bytes,
  plus 1 KiB .. 1 MiB files in ``--paths`` mode) and nginx's prefix, config, pid file, error
  log and temp paths, so nothing outside it is touched.
* Every server runs on CPU 0: nginx as a non-daemon master with one worker
  (``worker_cpu_affinity 01`` and ``taskset -c 0``; sendfile, tcp_nopush, no access log,
  unlimited keep-alive), corepin as ``corepin files --cores 0-0`` (also under ``taskset -c 0``).
  The load generator, ``wrk -t1 -c<conns> --latency``, runs on CPU 1 under ``taskset -c 1``.
* Each measured run is preceded by a 1-second warm-up run (page cache, corepin's memory cache,
  connection set-up paths). During the measured run the server's utime+stime is read from
  ``/proc/<pid>/stat`` (user and system time of all threads; for nginx the master plus its worker
  children, found through ``/proc/<pid>/task/*/children`` or, where the kernel lacks that
  file, by scanning the ppid field of ``/proc/*/stat``; reaped children's time is kept by
  adding cutime+cstime). The difference divided by the number of requests wrk completed gives
  the server CPU µs per request.
* wrk's Requests/sec, Transfer/sec, request count, p50/p99 (from its latency distribution),
  non-2xx/3xx responses and socket errors are parsed; a run with any error is flagged.

``--tls`` mode serves HTTPS instead: one EC P-256 certificate (made with openssl for the run)
for both servers, TLS 1.3 only with the AES-128-GCM suite on both (nginx
``ssl_conf_command Ciphersuites``, corepin ``--tls-ciphers``), the same files on keep-alive
connections, plus a ``handshake`` row per server: wrk sending ``Connection: close`` for 4k.bin,
so every request is a new connection with a full handshake (wrk does not resume sessions), and
req/s there is full handshakes per second.

``--floor`` adds the floor for the 4 KiB file: ``corepin-peer-echo uring --http-body 4096``
(benches/peers), the hand-written io_uring loop answering every request with one fixed 4 KiB
``200 OK``, one RECV and one SEND per request and no other work: no parsing beyond finding the
end of the header section, no file, no clock, no task. What it costs is what the kernel charges
any io_uring server for a request on this machine, so ``corepin CPU/req - floor CPU/req`` is
corepin's own share, and the floor's ratio to nginx bounds what any server here can reach.
``bench.py``'s files workload passes it.

``--paths`` mode measures, per backend and file size, corepin's three ways of sending a body
(memory cache, sendfile(2), read+write) to choose the size threshold between the memory path
and sendfile (``--memory-max``).

Caveats
-------
* On a 2-core machine wrk saturates its own core before a fast server saturates CPU 0, so
  req/s (and latency) largely measure wrk and the loopback path; the server CPU time per
  request is the primary figure. The JSON also holds the server's busy share of CPU 0.
* /proc CPU times are in clock ticks (``SC_CLK_TCK``, usually 100 Hz): with short runs or few
  requests (large files) the per-request figure has a granularity of 10 ms / requests.
* Anything else running on CPU 0 or 1 (builds, tests) perturbs the numbers; the 1-minute load
  average is recorded for that reason. Loopback TCP costs are charged to whichever side's
  syscall does the work, so neither the server nor wrk time is pure "application" time.
* Transfer figures use wrk's units, which are powers of 1024 (shown as MiB/s, GiB/s).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import http.client
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVER_CPU, CLIENT_CPU = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
BACKENDS = ("monoio", "glommio", "tokio-uring", "compio")
COMPARE_FILES = {"4k.bin": 4096, "1m.bin": 1 << 20}
PATH_SIZES = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20)
PATH_CONFIGS = {  # --paths mode: name -> extra corepin arguments
    "memory": ["--memory-max", str(1 << 30)],
    "sendfile": ["--memory-max", "0"],
    "read-write": ["--memory-max", "0", "--transfer", "read-write"],
}
START_TIMEOUT = 15.0


# ----------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class RunResult:
    """One measured wrk run against one server and one file."""

    server: str  # "nginx" or the corepin backend
    config: str  # "default" in the nginx comparison; memory / sendfile / read-write in --paths
    file: str
    size: int
    requests: int = 0
    duration_s: float = 0.0
    req_per_s: float = 0.0
    transfer_bytes_per_s: float = 0.0
    p50_us: float | None = None
    p99_us: float | None = None
    server_cpu_s: float = 0.0
    server_user_s: float = 0.0
    server_sys_s: float = 0.0
    server_cpu_us_per_req: float | None = None
    server_busy: float | None = None  # server CPU seconds / wall seconds of the run
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)  # crashed, no output, ...

    @property
    def error_text(self) -> str:
        parts = list(self.problems)
        if self.non_2xx_3xx:
            parts.append(f"non-2xx/3xx {self.non_2xx_3xx}")
        parts += [f"{k} {v}" for k, v in self.socket_errors.items() if v]
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------
# /proc helpers


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # fields from 3 (state) on


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    task_dir = Path(f"/proc/{pid}/task")
    try:
        files = [t / "children" for t in task_dir.iterdir()]
    except OSError:
        return kids
    if files and files[0].exists():
        for f in files:
            with contextlib.suppress(OSError):
                kids.update(int(x) for x in f.read_text().split())
        return kids
    for entry in Path("/proc").iterdir():  # no CONFIG_PROC_CHILDREN: scan ppids
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    kids.add(int(entry.name))
    return kids


def tree_cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks of pid and all its descendants, reaped ones included."""
    user = system = 0
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        with contextlib.suppress(OSError, IndexError, ValueError):
            f = _stat_fields(p)
            utime, stime, cutime, cstime = (int(x) for x in f[11:15])
            user, system = user + utime + cutime, system + stime + cstime
            todo.extend(_children(p))
    return user, system


def load_average() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TLS = False  # --tls: every server speaks HTTPS


def wait_http(port: int, path: str, proc: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    """Poll until GET path answers 200, or fail if the process died or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} during start-up")
        try:
            if TLS:
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    "127.0.0.1", port, timeout=2, context=ssl._create_unverified_context())
            else:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status == 200:
                return
            raise RuntimeError(f"GET {path} answered {resp.status}")
        except (ConnectionError, socket.timeout, http.client.HTTPException, ssl.SSLError):
            time.sleep(0.05)
    raise RuntimeError(f"no answer on port {port} within {timeout:.0f}s")


class Server:
    """A started server process: name, port, pid; stop() ends it."""

    def __init__(self, name: str, proc: subprocess.Popen, port: int, log: Path, stop_signal: int):
        self.name, self.proc, self.port, self.log, self.stop_signal = name, proc, port, log, stop_signal

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_ticks(self) -> tuple[int, int]:
        return tree_cpu_ticks(self.proc.pid)

    def log_tail(self, lines: int = 10) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # own session: its whole group
                self.proc.wait()


NGINX_CONF = """\
user root;
daemon off;
master_process on;
worker_processes 1;
worker_cpu_affinity 01;
pid {state}/nginx.pid;
error_log {state}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 60;
    default_type application/octet-stream;
    client_body_temp_path {state}/client_body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    server {{
        listen 127.0.0.1:{port}{tls};
        root {root};
    }}
}}
"""

# --tls: TLS 1.3, AES-128-GCM only, the run's certificate; tickets off (wrk never resumes).
NGINX_TLS = """ ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;
        ssl_session_tickets off"""
TLS_SUITE = "TLS13_AES_128_GCM_SHA256"


def make_certificate(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def start_nginx(tmp: Path, root: Path, probe_path: str) -> Server:
    state = tmp / "nginx"
    state.mkdir()
    port = free_port()
    conf = state / "nginx.conf"
    tls = NGINX_TLS.format(cert=tmp / "cert.pem", key=tmp / "key.pem") if TLS else ""
    conf.write_text(NGINX_CONF.format(state=state, port=port, root=root, tls=tls))
    log = state / "stderr.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ["taskset", "-c", str(SERVER_CPU), "nginx", "-p", f"{state}/", "-c", str(conf),
             "-e", str(state / "error.log")],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
    server = Server("nginx", proc, port, log, signal.SIGQUIT)  # SIGQUIT: graceful shutdown
    try:
        wait_http(port, probe_path, proc)
    except Exception as e:
        server.stop()
        raise RuntimeError(f"nginx did not start: {e}\n{server.log_tail()}\n"
                           f"{(state / 'error.log').read_text(errors='replace')[-2000:]}") from None
    return server


def start_floor(binary: Path, tmp: Path, probe_path: str) -> Server:
    """The floor (``--floor``): the hand-written io_uring loop of benches/peers answering every
    request with one fixed 4 KiB 200 response, one RECV and one SEND per request."""
    port = free_port()
    log = tmp / f"floor-{port}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ["taskset", "-c", str(SERVER_CPU), str(binary), "uring", "--listen", f"127.0.0.1:{port}",
             "--cpu", str(SERVER_CPU), "--http-body", str(COMPARE_FILES["4k.bin"])],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
    server = Server("floor", proc, port, log, signal.SIGTERM)
    try:
        wait_http(port, probe_path, proc)
    except Exception as e:
        server.stop()
        raise RuntimeError(f"the floor server did not start: {e}\n{server.log_tail()}") from None
    return server


def start_corepin(binary: Path, backend: str, root: Path, tmp: Path, extra: list[str],
                  probe_path: str) -> Server:
    port = free_port()
    if TLS:
        extra = [*extra, "--tls-cert", str(tmp / "cert.pem"), "--tls-key", str(tmp / "key.pem"),
                 "--tls-ciphers", TLS_SUITE]
    log = tmp / f"corepin-{backend}-{port}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ["taskset", "-c", str(SERVER_CPU), str(binary), "files", str(root),
             "--listen", f"127.0.0.1:{port}", "--runtime", backend,
             "--cores", f"{SERVER_CPU}-{SERVER_CPU}", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            text=True, start_new_session=True)
    server = Server(backend, proc, port, log, signal.SIGTERM)
    ready = threading.Event()

    def drain() -> None:  # watch for the banner, then keep the pipe from filling up
        for line in proc.stdout:
            if "listening on" in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        if not ready.wait(START_TIMEOUT) or proc.poll() is not None:
            raise RuntimeError("no 'listening' line" if proc.poll() is None
                               else f"exited with status {proc.returncode}")
        wait_http(port, probe_path, proc)
    except Exception as e:
        server.stop()
        raise RuntimeError(f"corepin {backend} {' '.join(extra)} did not start: {e}\n"
                           f"{server.log_tail()}") from None
    return server


# ----------------------------------------------------------------------------------------
# wrk


_UNITS_TIME = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_UNITS_BYTES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def _time_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    return float(m[1]) * _UNITS_TIME[m[2]]


def parse_wrk(out: str, r: RunResult) -> None:
    """Fill r's wrk fields from wrk's --latency output."""
    if m := re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out, re.M):
        r.requests = int(m[1])
        r.duration_s = _time_us(m[2] + m[3]) / 1e6
    if m := re.search(r"^Requests/sec:\s*([\d.]+)", out, re.M):
        r.req_per_s = float(m[1])
    if m := re.search(r"^Transfer/sec:\s*([\d.]+)([KMGT]?B)", out, re.M):
        r.transfer_bytes_per_s = float(m[1]) * _UNITS_BYTES[m[2]]
    for pct, attr in (("50", "p50_us"), ("99", "p99_us")):
        if m := re.search(rf"^\s*{pct}(?:\.0+)?%\s+([\d.]+(?:us|ms|s|m|h))", out, re.M):
            setattr(r, attr, _time_us(m[1]))
    if m := re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out):
        r.non_2xx_3xx = int(m[1])
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        r.socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    if not r.requests:
        r.problems.append("no requests parsed from wrk")


def run_wrk(url: str, conns: int, secs: int, close: bool = False) -> str:
    cmd = ["taskset", "-c", str(CLIENT_CPU), "wrk", "-t1", f"-c{conns}", f"-d{secs}s",
           "--latency", url]
    if close:
        cmd[5:5] = ["-H", "Connection: close"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def measure(server: Server, file: str, size: int, config: str, args: argparse.Namespace) -> RunResult:
    url = f"{'https' if TLS else 'http'}://127.0.0.1:{server.port}/{file}"
    r = RunResult(server=server.name, config=config, file=file, size=size)
    close = config == "handshake"
    if args.warmup > 0:
        run_wrk(url, args.conns, args.warmup, close)
    t0, c0 = time.monotonic(), server.cpu_ticks()
    out = run_wrk(url, args.conns, args.secs, close)
    t1, c1 = time.monotonic(), server.cpu_ticks()
    parse_wrk(out, r)
    r.server_user_s = (c1[0] - c0[0]) / CLK_TCK
    r.server_sys_s = (c1[1] - c0[1]) / CLK_TCK
    r.server_cpu_s = r.server_user_s + r.server_sys_s
    r.server_busy = r.server_cpu_s / (t1 - t0)
    if r.requests:
        r.server_cpu_us_per_req = r.server_cpu_s / r.requests * 1e6
    if not server.alive:
        r.problems.append(f"server exited ({server.proc.returncode})")
    flag = f"  ERRORS: {r.error_text}" if r.error_text else ""
    print(f"  {server.name:11} {config:10} {file:10} {r.req_per_s:10.0f} req/s  "
          f"{fmt_cpu(r.server_cpu_us_per_req)} server CPU/req (sys {r.server_sys_s / (r.server_cpu_s or 1):4.0%})  "
          f"busy {r.server_busy:4.0%}{flag}",
          file=sys.stderr, flush=True)
    return r


# ----------------------------------------------------------------------------------------
# Formatting


def fmt_cpu(us: float | None) -> str:
    return "n/a" if us is None else f"{us:.2f} µs"


def fmt_latency(us: float | None) -> str:
    if us is None:
        return "n/a"
    return f"{us:.0f} µs" if us < 1000 else f"{us / 1000:.2f} ms"


def fmt_transfer(bps: float) -> str:
    return f"{bps / (1 << 30):.2f} GiB/s" if bps >= 1 << 30 else f"{bps / (1 << 20):.1f} MiB/s"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}"


def fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else \
        f"{n >> 10} KiB" if n % 1024 == 0 else f"{n} B"


def header_line(args: argparse.Namespace, what: str) -> str:
    return (f"{what}: servers on CPU {SERVER_CPU}, wrk on CPU {CLIENT_CPU} "
            f"(wrk -t1 -c{args.conns} -d{args.secs}s, {args.warmup}s warm-up per run); "
            f"kernel {platform.release()}; load average at start {args.load_at_start:.2f}.")


def compare_table(results: list[RunResult], args: argparse.Namespace) -> str:
    what = ("corepin files vs nginx over HTTPS (TLS 1.3, AES-128-GCM, EC P-256) " if TLS
            else "corepin files vs nginx ") + nginx_version()
    lines = [header_line(args, what), "",
             "| file | server | req/s | transfer | server CPU/req | ratio req/s to nginx "
             "| ratio CPU/req to nginx | p50 | p99 | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    rows = [(f, "default") for f in COMPARE_FILES] + ([("4k.bin", "handshake")] if TLS else [])
    for file, config in rows:
        base = next((r for r in results if r.file == file and r.config == config and r.server == "nginx"), None)
        for r in (r for r in results if r.file == file and r.config == config):
            err = f"**{r.error_text}**" if r.error_text else "none"
            name = f"{r.file}, new connection each" if config == "handshake" else r.file
            lines.append(
                f"| {name} | {r.server} | {r.req_per_s:,.0f} | {fmt_transfer(r.transfer_bytes_per_s)} "
                f"| {fmt_cpu(r.server_cpu_us_per_req)} "
                f"| {fmt_ratio(r.req_per_s, base and base.req_per_s)} "
                f"| {fmt_ratio(r.server_cpu_us_per_req, base and base.server_cpu_us_per_req)} "
                f"| {fmt_latency(r.p50_us)} | {fmt_latency(r.p99_us)} | {err} |")
    return "\n".join(lines)


def paths_table(results: list[RunResult], args: argparse.Namespace) -> str:
    cols = list(PATH_CONFIGS)
    lines = [header_line(args, "corepin files body paths (memory cache / sendfile / read+write)"),
             "",
             "| size | backend | " + " | ".join(f"{c} CPU/req | {c} req/s" for c in cols)
             + " | least CPU | errors |",
             "|---|---|" + "---:|---:|" * len(cols) + "---|---|"]
    for size in args.sizes:
        for backend in args.runtimes:
            row = {r.config: r for r in results if r.size == size and r.server == backend}
            if not row:
                continue
            cells = []
            for c in cols:
                r = row.get(c)
                cells.append("n/a | n/a" if r is None else
                             f"{fmt_cpu(r.server_cpu_us_per_req)} | {r.req_per_s:,.0f}")
            measured = [r for r in row.values() if r.server_cpu_us_per_req is not None]
            best = min(measured, key=lambda r: r.server_cpu_us_per_req).config if measured else "n/a"
            errs = "; ".join(f"{c}: {r.error_text}" for c, r in row.items() if r.error_text)
            lines.append(f"| {fmt_size(size)} | {backend} | " + " | ".join(cells)
                         + f" | {best} | {'**' + errs + '**' if errs else 'none'} |")
    return "\n".join(lines)


def nginx_version() -> str:
    p = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    return (p.stderr or p.stdout).strip().split(":", 1)[-1].strip()


def write_json(path: Path, mode: str, args: argparse.Namespace, results: list[RunResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "mode": mode, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kernel": platform.release(),
        "server_cpu": SERVER_CPU, "client_cpu": CLIENT_CPU, "conns": args.conns, "secs": args.secs,
        "warmup_secs": args.warmup, "runtimes": args.runtimes, "binary": str(args.binary),
        "clk_tck": CLK_TCK, "load_average_at_start": args.load_at_start,
        "load_average_at_end": load_average(),
    }
    if mode == "compare":
        meta["nginx"] = nginx_version()
    doc = {"meta": meta, "results": [dataclasses.asdict(r) | {"errors": r.error_text}
                                     for r in results]}
    path.write_text(json.dumps(doc, indent=2) + "\n")


# ----------------------------------------------------------------------------------------
# Modes


def make_files(root: Path, sizes: dict[str, int]) -> None:
    root.mkdir()
    for name, size in sizes.items():
        (root / name).write_bytes(os.urandom(size))


def run_compare(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> list[RunResult]:
    root = tmp / "www"
    make_files(root, COMPARE_FILES)
    probe = "/" + next(iter(COMPARE_FILES))
    results = []
    servers = [("nginx", lambda: start_nginx(tmp, root, probe))]
    servers += [(b, lambda b=b: start_corepin(args.binary, b, root, tmp, [], probe))
                for b in args.runtimes]
    if args.floor:
        servers.append(("floor", lambda: start_floor(args.floor_binary, tmp, probe)))
    for name, start in servers:
        server = start()
        stack.callback(server.stop)
        for file, size in COMPARE_FILES.items():
            if name == "floor" and file != "4k.bin":
                continue  # it has one answer, of 4 KiB
            results.append(measure(server, file, size, "default", args))
        if TLS:
            results.append(measure(server, "4k.bin", 4096, "handshake", args))
        server.stop()
    # Stable: nginx first per row.
    results.sort(key=lambda r: (r.config == "handshake", list(COMPARE_FILES).index(r.file)))
    return results


def run_paths(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> list[RunResult]:
    root = tmp / "www"
    files = {f"{size}.bin": size for size in args.sizes}
    make_files(root, files)
    probe = "/" + next(iter(files))
    results = []
    for backend in args.runtimes:
        for config, extra in PATH_CONFIGS.items():
            server = start_corepin(args.binary, backend, root, tmp, extra, probe)
            stack.callback(server.stop)
            for file, size in files.items():
                results.append(measure(server, file, size, config, args))
            server.stop()
    return results


# ----------------------------------------------------------------------------------------
# Main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="2-second measured runs (unless --secs)")
    p.add_argument("--runtimes", default=",".join(BACKENDS),
                   help="comma-separated corepin backends (default: %(default)s)")
    p.add_argument("--conns", type=int, default=16, help="wrk connections (default: 16)")
    p.add_argument("--secs", type=int, help="seconds per measured run (default: 8, --quick: 2)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per run (default: 1)")
    p.add_argument("--binary", type=Path, default=REPO / "target/release/corepin",
                   help="corepin binary (default: target/release/corepin in the repository)")
    p.add_argument("--json", type=Path, help="raw results (default: benches/results/"
                   "files_vs_nginx.json, or files_paths.json with --paths)")
    p.add_argument("--paths", action="store_true",
                   help="compare corepin's memory / sendfile / read-write paths by file size")
    p.add_argument("--tls", action="store_true",
                   help="HTTPS: TLS 1.3 with AES-128-GCM on both servers, plus full handshakes per second")
    p.add_argument("--floor", action="store_true",
                   help="also measure the floor for 4k.bin: benches/peers' io_uring loop answering "
                        "every request with a fixed 4 KiB response (build corepin-bench-peers first)")
    p.add_argument("--floor-binary", type=Path, default=REPO / "target/release/corepin-peer-echo",
                   help="--floor: the peers binary (default: %(default)s)")
    p.add_argument("--sizes", default=",".join(map(str, PATH_SIZES)),
                   help="--paths: comma-separated file sizes in bytes (default: %(default)s)")
    args = p.parse_args()
    args.runtimes = [b.strip() for b in args.runtimes.split(",") if b.strip()]
    if unknown := [b for b in args.runtimes if b not in BACKENDS]:
        p.error(f"unknown runtime(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error("--sizes takes comma-separated byte counts")
    if args.secs is None:
        args.secs = 2 if args.quick else 8
    if args.secs < 1 or args.conns < 1 or args.warmup < 0:
        p.error("--secs and --conns must be >= 1, --warmup >= 0")
    if args.json is None:
        name = "files_paths.json" if args.paths else "https_vs_nginx.json" if args.tls else "files_vs_nginx.json"
        args.json = REPO / "benches/results" / name
    args.binary = args.binary.resolve()
    if args.floor and (args.tls or args.paths):
        p.error("--floor is for the plain HTTP comparison")
    return args


def check_tools(args: argparse.Namespace) -> None:
    needed = {"wrk": "wrk", "taskset": "util-linux"}
    if not args.paths:
        needed["nginx"] = "nginx"
    for tool, package in needed.items():
        if shutil.which(tool) is None:
            sys.exit(f"error: {tool} not found; install it with: apt-get install {package}")
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"error: corepin binary {args.binary} not found; build it with: cargo build --release")
    if os.cpu_count() is None or max(SERVER_CPU, CLIENT_CPU) >= os.cpu_count():
        sys.exit(f"error: needs CPUs {SERVER_CPU} and {CLIENT_CPU}")


def main() -> None:
    args = parse_args()
    if not shutil.which("nginx"):  # Debian installs it in /usr/sbin, not always on PATH
        os.environ["PATH"] += os.pathsep + "/usr/sbin"
    check_tools(args)
    global TLS
    TLS = args.tls
    # SIGTERM/SIGHUP end the run like Ctrl-C (SIGINT is set too, in case it was inherited as
    # ignored), so the ExitStack clean-up runs.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    args.load_at_start = load_average()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="corepin-files-bench-")))
        try:
            if TLS:
                make_certificate(tmp)
            if args.paths:
                results = run_paths(args, tmp, stack)
                table = paths_table(results, args)
            else:
                results = run_compare(args, tmp, stack)
                table = compare_table(results, args)
        except KeyboardInterrupt:
            sys.exit("interrupted; servers stopped")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            sys.exit(f"error: {e}")
    print(table)
    write_json(args.json, "paths" if args.paths else "compare", args, results)
    print(f"\nraw results: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
