#!/usr/bin/env python3
"""Where a server's CPU goes, by layer, from a `perf record --call-graph dwarf` profile.

    perf record -F 997 -e cpu-clock --call-graph dwarf,32768 -p PID -o perf.data -- sleep 4
    python3 benches/perf_breakdown.py perf.data            # or a saved `perf script` text

Each sample is given to one layer (the shares add up to 100%):

* a sample in the kernel goes to the system call it is in: UDP send (sendmsg), UDP receive
  (recvmsg/recvmmsg), io_uring_enter (the engine's submit and wait), or other kernel work;
* a sample in user space goes to the first frame, from the leaf up, of a crate that is not
  generic: libc, core/alloc/std, bytes, hashbrown, the vDSO and the like are generic, so a
  memcpy or a malloc counts for the crate that asked for it (their part is shown beside).

It also prints inclusive shares (samples with a given frame anywhere on their stack): quinn's
endpoint and connection drivers, the request handlers, task spawning.

Used for the closing note of issue 9 (docs/http3.md, "Measured"); works for any Rust
binary whose crates are named in LAYERS.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

ENGINE = "engine: executor, I/O driver, timers (the backend's, or tokio's runtime for the peer)"
# Crate (the first path segment of a symbol) -> layer. Unlisted crates are "other". tokio is
# split: tokio::sync is the channels and Notify that quinn and h3 use; the rest of tokio is the
# peer's engine.
LAYERS = {
    "quinn": "quinn: endpoint/connection drivers and handles",
    "tokio": "tokio::sync (channels, Notify, AtomicWaker) in quinn/h3",
    "quinn_proto": "quinn-proto: QUIC state machine",
    "quinn_udp": "quinn-udp: the UDP syscall wrappers",
    "ring": "crypto: ring (AES-GCM, header protection)",
    "rustls": "crypto: rustls (QUIC keys)",
    "h3": "h3 + h3-quinn (framing, QPACK, stream glue)",
    "h3_quinn": "h3 + h3-quinn (framing, QPACK, stream glue)",
    "http": "h3 + h3-quinn (framing, QPACK, stream glue)",
    "corepin_h3": "corepin-h3 front (request tasks, responses)",
    "corepin_files": "corepin-files (plans, caches)",
    "corepin_core": "corepin runtime layer (tasks, catch_unwind, timers)",
    "corepin_monoio": "corepin runtime layer (tasks, catch_unwind, timers)",
    "corepin_glommio": "corepin runtime layer (tasks, catch_unwind, timers)",
    "corepin_tokio_uring": "corepin runtime layer (tasks, catch_unwind, timers)",
    "corepin_compio": "corepin runtime layer (tasks, catch_unwind, timers)",
    "monoio": ENGINE,
    "glommio": ENGINE,
    "tokio_uring": ENGINE,
    "compio_runtime": ENGINE,
    "compio_driver": ENGINE,
    "io_uring": ENGINE,
    "mio": ENGINE,
    "corepin_peer_h3": "peer: request handling",
    "tracing": "tracing",
}
# corepin-h3's adapter module is a layer of its own.
ADAPTER = "corepin-h3 quic_rt: the runtime adapter (timers, UDP socket, spawn)"
GENERIC = {"core", "alloc", "std", "bytes", "hashbrown", "slab", "tinyvec", "smallvec", "rustc_hash", "lru_slab",
           "futures_util", "futures_core", "futures_channel", "futures_io", "tokio_util", "pin_project_lite",
           "send_wrapper", "rand", "rand_core", "rand_pcg", "getrandom", "web_time", "fastrand", "T", "F", "S",
           "compiler_builtins", "__rustc", "itoa", "memchr"}
COPY_ALLOC = re.compile(r"mem(move|cpy|set)|malloc|_int_free|cfree|free$|realloc|calloc|_int_malloc|"
                        r"malloc_consolidate|unlink_chunk|tcache")
INCLUSIVE = [
    ("quinn endpoint driver (EndpointDriver::poll)", re.compile(r"quinn::endpoint::EndpointDriver")),
    ("quinn connection drivers (ConnectionDriver::poll)", re.compile(r"quinn::connection::ConnectionDriver")),
    ("HTTP/3 connection task (h3 accept loop)", re.compile(r"corepin_h3::front::serve_connection|"
                                                           r"corepin_peer_h3::serve_connection")),
    # Both servers' request tasks under the same name: the header section, the answer, the
    # end of the request.
    ("request tasks (serve_request)", re.compile(r"corepin_h3::front::serve_request|corepin_peer_h3::serve_request")),
    ("spawning a task", re.compile(r"spawn_detached|::spawn_local|task::spawn::<|RawTask::new|Cell<T,S>::new")),
    ("rustls/ring packet crypto", re.compile(r"^(ring|rustls)::|ring_core_")),
]


PRIMITIVES = {"u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize", "f32", "f64",
              "bool", "char", "str"}


def crate_of(sym: str) -> str:
    """The crate a symbol's code belongs to: its first path segment, or for `<X as Trait>::f`
    with X a primitive, a slice or a type parameter, the trait's crate."""
    s = re.sub(r"^(?:[<&*\[( ]|mut |const |dyn )+", "", sym)
    head = s.split("::", 1)[0] if "::" in s else ""
    if re.fullmatch(r"[a-z_][a-z0-9_]*", head) and head not in PRIMITIVES:
        return head
    m = re.search(r" as <*&?(?:dyn )?([a-z_][a-z0-9_]*)::", sym)
    return m.group(1) if m else ""


def layer_of_user(frames: list[tuple[str, str]]) -> tuple[str, bool]:
    """(layer, leaf is a copy or an allocation) for a user-space sample."""
    leaf_sym = frames[0][0]
    copy_alloc = bool(COPY_ALLOC.search(leaf_sym))
    for sym, dso in frames:
        if sym.startswith("ring_core_"):
            return LAYERS["ring"], copy_alloc
        if "libc.so" in dso or "[vdso]" in dso or "ld-linux" in dso or sym == "[unknown]":
            continue
        if "corepin_h3::quic_rt" in sym:
            return ADAPTER, copy_alloc
        crate = crate_of(sym)
        if not crate or crate in GENERIC:
            continue
        if crate == "tokio" and "tokio::sync" not in sym:
            # tokio's runtime is the peer's engine; its utilities (loom cells, cache padding)
            # belong to whichever tokio part called them.
            if TOKIO_RUNTIME.search(sym):
                return ENGINE, copy_alloc
            continue
        return LAYERS.get(crate, f"other ({crate})"), copy_alloc
    return "other (no crate on the stack)", copy_alloc


def layer_of_kernel(frames: list[tuple[str, str]]) -> str:
    syms = " ".join(s for s, _ in frames)
    if re.search(r"io_uring", syms):
        return "kernel: io_uring_enter (engine submit/wait)"
    if re.search(r"sendmsg|sendmmsg|udp_send", syms):
        return "kernel: UDP send (sendmsg, GSO)"
    if re.search(r"recvmsg|recvmmsg|udp_recv", syms):
        return "kernel: UDP receive (recvmsg/recvmmsg, GRO)"
    if re.search(r"epoll", syms):
        return "kernel: epoll"
    return "kernel: other (timers, scheduling, page faults, interrupts)"


TOKIO_RUNTIME = re.compile(r"tokio::(runtime|net|time|task|io|fs|signal|process)::")
FRAME = re.compile(r"^\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")


def samples(text: str):
    frames: list[tuple[str, str]] = []
    for line in text.splitlines():
        m = FRAME.match(line)
        if m:
            frames.append((m.group(1), m.group(2)))
        elif frames:
            yield frames
            frames = []
    if frames:
        yield frames


def main() -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the output quietly
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="perf.data (read with `perf script`) or a saved `perf script -F ip,sym,dso` text")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = ap.parse_args()
    path = Path(args.input)
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    head = path.open("rb").read(8)
    if head.startswith(b"PERFILE"):
        run = subprocess.run(["perf", "script", "-i", str(path), "-F", "ip,sym,dso"], capture_output=True, text=True)
        if run.returncode != 0:
            print(f"error: perf script failed: {run.stderr.strip()}", file=sys.stderr)
            return 2
        text = run.stdout
    else:
        text = path.read_text(errors="replace")
    layers: Counter[str] = Counter()
    copies: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for frames in samples(text):
        total += 1
        if "kernel" in frames[0][1]:
            layer = layer_of_kernel(frames)
        else:
            layer, ca = layer_of_user(frames)
            if ca:
                copies[layer] += 1
        layers[layer] += 1
        syms = [s for s, _ in frames]
        for name, pat in INCLUSIVE:
            if any(pat.search(s) for s in syms):
                inclusive[name] += 1
    if total == 0:
        print("error: no samples with call chains in the input (record with --call-graph dwarf)", file=sys.stderr)
        return 2
    pct = lambda n: 100.0 * n / total  # noqa: E731
    if args.markdown:
        print(f"| layer (self time, {total} samples) | share | of which memcpy/malloc/free |\n|---|---:|---:|")
        for layer, n in layers.most_common():
            print(f"| {layer} | {pct(n):.1f}% | {pct(copies[layer]):.1f}% |")
        print("\n| inclusive (on the stack) | share |\n|---|---:|")
        for name, _ in INCLUSIVE:
            print(f"| {name} | {pct(inclusive[name]):.1f}% |")
    else:
        print(f"{total} samples; self time by layer (memcpy/malloc/free counted for their caller):")
        for layer, n in layers.most_common():
            print(f"  {pct(n):5.1f}%  {layer}" + (f"  (of which copies/allocation {pct(copies[layer]):.1f}%)"
                                                 if copies[layer] else ""))
        print("inclusive:")
        for name, _ in INCLUSIVE:
            print(f"  {pct(inclusive[name]):5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
