#!/usr/bin/env python3
"""Server CPU time per echo message, for one corepin configuration.

Starts `corepin echo` pinned to CPU 0, runs a ping-pong client pinned to CPU 1 over N
connections (64 B messages, one in flight per connection), and reports the server's
utime+stime per message from /proc/<pid>/stat. A quick probe for the ring-flag note, not the
benchmark suite: run it as  benches/echo_cpu_probe.py target/release/corepin monoio [extra args]
"""
import os, selectors, socket, subprocess, sys, time

def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks

def main():
    binary, runtime, *extra = sys.argv[1:]
    conns, msgs_per_conn = 16, 3000
    srv = subprocess.Popen([binary, "echo", "--runtime", runtime, "--cores", "0-0", "--listen", "127.0.0.1:0", *extra],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        probe(srv, runtime, extra, conns, msgs_per_conn)
    finally:
        srv.terminate()
        srv.wait()


def probe(srv, runtime, extra, conns, msgs_per_conn):
    addr, flags = None, "?"
    for line in srv.stdout:
        if "listening on" in line:
            host, port = line.split()[-1].rsplit(":", 1)
            addr = (host, int(port))
        if "ring flags:" in line:
            flags = line.split(":", 1)[1].strip().split(" (")[0]
        if "rent I/O copies" in line:
            break
    if addr is None:
        sys.exit(f"corepin did not start: exit {srv.wait()}")
    os.sched_setaffinity(0, {1})  # after the server started: it must not inherit this mask
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(conns):
        s = socket.create_connection(addr)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    payload = b"x" * 64
    for s in socks:  # warm up
        s.sendall(payload); s.recv(64)
    left = {s: msgs_per_conn for s in socks}
    t0, c0 = time.perf_counter(), cpu_ticks(srv.pid)
    for s in socks:
        s.sendall(payload)
        sel.register(s, selectors.EVENT_READ)
    got = {s: 0 for s in socks}
    done = 0
    while done < conns:
        for key, _ in sel.select():
            s = key.fileobj
            got[s] += len(s.recv(4096))
            while got[s] >= 64:
                got[s] -= 64
                left[s] -= 1
                if left[s] == 0:
                    sel.unregister(s); done += 1
                else:
                    s.sendall(payload)
    wall, ticks = time.perf_counter() - t0, cpu_ticks(srv.pid) - c0
    total = conns * msgs_per_conn
    hz = os.sysconf("SC_CLK_TCK")
    print(f"{runtime:12} {' '.join(extra) or '-':28} flags={flags:32} msgs/s={total / wall:9.0f}  "
          f"server CPU/msg={ticks / hz / total * 1e6:6.2f} us", flush=True)

if __name__ == "__main__":
    main()

