#!/usr/bin/env python3
"""Loads one URL several times in headless Chromium and reports how each load travelled.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: commands
on fd 3, events on fd 4, NUL-separated JSON), so nothing beyond the standard library and a
`chromium` binary is needed. The browser cache is off, so every load reaches the server.

For each load one line of JSON: the load's number, the protocol Chromium reports for the
document (`http/1.1`, `h3`, ...), its status, its `Alt-Svc` field, the page's title and, for
each subresource (style sheet, image, ...), its path, status and protocol.

The certificate is accepted by its SPKI fingerprint (`--ignore-certificate-errors-spki-list`).
Chromium also refuses QUIC to a certificate that no public root issued unless the host is
one it was told to allow; `--origin-to-force-quic-on` on a port nothing listens on (`HOST:9`)
puts the host on that list without forcing QUIC on the origin under test, so HTTP/3 still
has to be found through `Alt-Svc` (docs/http3.md). With `--force-quic` the origin under test
itself is forced onto QUIC (for a server that speaks only HTTP/3).
"""

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit


class Browser:
    def __init__(self, args, profile):
        url = urlsplit(args.url)
        host = url.hostname
        forced = f"{host}:{url.port}" if args.force_quic else f"{host}:9"
        cmd_r, self.cmd_w = os.pipe()
        self.evt_r, evt_w = os.pipe()

        def fds():
            os.dup2(cmd_r, 3)
            os.dup2(evt_w, 4)

        self.proc = subprocess.Popen(
            [
                args.chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                f"--ignore-certificate-errors-spki-list={args.spki}",
                "--enable-quic",
                f"--origin-to-force-quic-on={forced}",
            ]
            + ([f"--log-net-log={args.netlog}"] if args.netlog else [])
            + ["about:blank"],
            pass_fds=(3, 4),
            preexec_fn=fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(evt_w)
        self.buf = b""
        self.next_id = 0
        self.events = []

    def send(self, method, params=None, session=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def receive(self, deadline):
        while b"\0" not in self.buf:
            left = deadline - time.time()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.evt_r], [], [], left)
            if not ready:
                return None
            data = os.read(self.evt_r, 1 << 16)
            if not data:
                raise SystemExit("chromium closed its DevTools pipe")
            self.buf += data
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method, params=None, session=None, timeout=30):
        want = self.send(method, params, session)
        deadline = time.time() + timeout
        while True:
            msg = self.receive(deadline)
            if msg is None:
                raise SystemExit(f"chromium did not answer {method} within {timeout} s")
            if msg.get("id") == want:
                if "error" in msg:
                    raise SystemExit(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
            self.proc.wait(timeout=10)
        except (SystemExit, subprocess.TimeoutExpired, OSError):
            self.proc.kill()
            self.proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--spki", required=True, help="base64 SHA-256 of the certificate's SPKI")
    p.add_argument("--loads", type=int, default=4)
    p.add_argument("--pause", type=float, default=0.5, help="seconds between loads")
    p.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    p.add_argument("--netlog", help="also write Chromium's net log here")
    p.add_argument("--force-quic", action="store_true", help="force QUIC on the origin under test")
    args = p.parse_args()

    profile = tempfile.mkdtemp(prefix="corepin-chromium-")
    browser = Browser(args, profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.call("Network.enable", {}, session)
        browser.call("Network.setCacheDisabled", {"cacheDisabled": True}, session)
        browser.call("Page.enable", {}, session)
        for load in range(args.loads):
            browser.events.clear()
            browser.call("Page.navigate", {"url": args.url}, session)
            deadline = time.time() + 30
            while not any(e.get("method") == "Page.loadEventFired" for e in browser.events):
                msg = browser.receive(deadline)
                if msg is None:
                    raise SystemExit(f"load {load}: no load event within 30 s")
                browser.events.append(msg)
            doc = next(
                (
                    e["params"]["response"]
                    for e in browser.events
                    if e.get("method") == "Network.responseReceived" and e["params"].get("type") == "Document"
                ),
                None,
            )
            if doc is None:
                raise SystemExit(f"load {load}: no document response was reported")
            title = browser.call("Runtime.evaluate", {"expression": "document.title"}, session)
            assets = sorted(
                {
                    (urlsplit(r["url"]).path, r.get("status"), r.get("protocol"))
                    for r in (
                        e["params"]["response"]
                        for e in browser.events
                        if e.get("method") == "Network.responseReceived" and e["params"].get("type") != "Document"
                    )
                }
            )
            headers = {k.lower(): v for k, v in doc.get("headers", {}).items()}
            print(
                json.dumps(
                    {
                        "load": load,
                        "protocol": doc.get("protocol"),
                        "status": doc.get("status"),
                        "alt_svc": headers.get("alt-svc"),
                        "title": title.get("result", {}).get("value"),
                        "assets": [{"path": a[0], "status": a[1], "protocol": a[2]} for a in assets],
                    }
                ),
                flush=True,
            )
            time.sleep(args.pause)
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
