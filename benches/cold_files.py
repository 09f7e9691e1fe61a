#!/usr/bin/env python3
"""Does a file that is not in the page cache stall the core that serves it?

Method
------
* One file of ``--size`` MiB of random bytes and one 6-byte file in a document root under
  the target directory (on disk: tmpfs pages cannot be evicted).
* ``corepin files --cores 0-0`` on CPU 0 (one worker). On CPU 1: ``curl`` downloads the big
  file at ``--rate`` (a rate the client core sustains, so that the server is what differs),
  while a second client fetches the small file over one keep-alive connection every 2 ms and
  times each answer. Both go to the same worker, so any time that worker spends blocked on the
  disk shows up as the small file's latency.
* Each backend runs twice: with the big file evicted first (``POSIX_FADV_DONTNEED`` after
  ``fsync``: cold), then with it read into the page cache first (hot).
* The table also gives the block-I/O wait that delay accounting charged to the worker thread
  (``delayacct_blkio_ticks`` in ``/proc/PID/task/TID/stat``, 10 ms ticks; this script turns on
  ``kernel.task_delayacct`` when it can). Engines that park in ``io_uring_enter`` with
  operations in flight (Monoio, Glommio, compio) are charged their idle waits there too, so that
  column separates blocking from not blocking only on tokio-uring, which parks in epoll.
* ``--baseline BINARY`` measures another build the same way in the same run (for example one
  from before a change), so that the two can be compared side by side.

Prints a markdown table; no thresholds are asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from files_vs_nginx import CLIENT_CPU, REPO, SERVER_CPU, start_corepin  # noqa: E402

SMALL = b"hello\n"


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def blkio_ticks(pid: int) -> dict[str, int]:
    """delayacct_blkio_ticks (field 42) of every thread, by thread name."""
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            out[f"{name}/{tid}"] = int(fields[42 - 3])
    return out


def measure(port: int, pid: int, big: str, rate: str) -> dict:
    small = socket.create_connection(("127.0.0.1", port))
    small.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    before = blkio_ticks(pid)
    dl = subprocess.Popen(
        ["taskset", "-c", str(CLIENT_CPU), "curl", "-sS", "-o", "/dev/null", "--limit-rate", rate,
         "-w", "%{speed_download} %{size_download}", f"http://127.0.0.1:{port}/{big}"],
        stdout=subprocess.PIPE, text=True)
    lat: list[float] = []
    time.sleep(0.1)
    while dl.poll() is None:
        t = time.perf_counter()
        small.sendall(b"GET /small.txt HTTP/1.1\r\nHost: bench\r\n\r\n")
        got = b""
        while not got.endswith(SMALL):
            chunk = small.recv(4096)
            if not chunk:
                raise RuntimeError("the server closed the small-file connection")
            got += chunk
        lat.append(time.perf_counter() - t)
        time.sleep(0.002)
    speed, size = dl.stdout.read().split()
    if dl.returncode != 0:
        raise RuntimeError(f"curl failed with status {dl.returncode}")
    after = blkio_ticks(pid)
    small.close()
    worker = sum(v - before.get(k, 0) for k, v in after.items() if k.startswith("corepin-w"))
    lat.sort()

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3

    return {"download_mb_s": float(speed) / 1e6, "bytes": int(size), "requests": len(lat),
            "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999), "max_ms": lat[-1] * 1e3,
            "worker_blkio_ms": worker * 10}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runtimes", default="monoio,glommio,tokio-uring,compio")
    p.add_argument("--size", type=int, default=1024, help="big file in MiB (default: 1024)")
    p.add_argument("--rate", default="200M", help="curl --limit-rate for the big file (default: 200M)")
    p.add_argument("--binary", type=Path, default=REPO / "target/release/corepin")
    p.add_argument("--baseline", type=Path, help="another corepin binary to measure the same way")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args()

    with contextlib.suppress(OSError):
        Path("/proc/sys/kernel/task_delayacct").write_text("1")
    base = REPO / "target" / "cold-files"
    root = base / "root"
    root.mkdir(parents=True, exist_ok=True)
    big = root / "big.bin"
    if not big.exists() or big.stat().st_size != args.size << 20:
        with open(big, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1 << 20))
    (root / "small.txt").write_bytes(SMALL)

    builds = [("corepin", args.binary)] + ([("baseline", args.baseline)] if args.baseline else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="corepin-cold-") as tmp:
        for backend in args.runtimes.split(","):
            for label, binary in builds:
                server = start_corepin(binary, backend, root, Path(tmp), [], "/small.txt")
                try:
                    for state in ("cold", "hot"):
                        evict(big) if state == "cold" else warm(big)
                        r = measure(server.port, server.proc.pid, big.name, args.rate)
                        if r["bytes"] != args.size << 20:
                            raise RuntimeError(f"{label} {backend}: got {r['bytes']} bytes")
                        rows.append((backend, label, state, r))
                        print(f"  {backend} {label} {state}: p99 {r['p99_ms']:.2f} ms", file=sys.stderr)
                finally:
                    server.stop()

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size_mib": args.size, "rate": args.rate, "results": [
            {"backend": b, "build": label, "state": state, **r} for b, label, state, r in rows]}, indent=1))
    print(f"Small-file latency on the worker that streams a {args.size} MiB file "
          f"(curl --limit-rate {args.rate}); server on CPU {SERVER_CPU}, clients on CPU {CLIENT_CPU}.\n")
    print("| backend | build | big file | download | small requests | p50 | p99 | p99.9 | max | worker block-I/O wait |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for backend, label, state, r in rows:
        print(f"| {backend} | {label} | {state} | {r['download_mb_s']:.0f} MB/s | {r['requests']} | "
              f"{r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['p999_ms']:.2f} ms | {r['max_ms']:.2f} ms | "
              f"{r['worker_blkio_ms']} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
