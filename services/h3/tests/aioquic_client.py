#!/usr/bin/env python3
"""A minimal HTTP/3 client on aioquic (an independent QUIC + HTTP/3 stack) for corepin's tests.

Fetches every PATH from https://localhost:PORT over one connection, all requests at once, and
prints one line per path, in the order given: `PATH STATUS LENGTH SHA256`. A path written as
`PATH@bytes=A-B` is requested with that Range. Trusts only the certificate in --ca.
"""

import argparse
import asyncio
import hashlib
import ssl
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.pending = {}  # stream id -> (future, status holder, body)

    def quic_event_received(self, event: QuicEvent) -> None:
        for ev in self.h3.handle_event(event):
            entry = self.pending.get(ev.stream_id)
            if entry is None:
                continue
            fut, answer = entry
            if isinstance(ev, HeadersReceived):
                for k, v in ev.headers:
                    if k == b":status":
                        answer["status"] = int(v)
            elif isinstance(ev, DataReceived):
                answer["body"] += ev.data
            if getattr(ev, "stream_ended", False) and not fut.done():
                fut.set_result(answer)

    async def get(self, authority: str, path: str, extra):
        stream_id = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            (b"user-agent", b"corepin-aioquic-test"),
        ] + extra
        fut = asyncio.get_running_loop().create_future()
        self.pending[stream_id] = (fut, {"status": None, "body": bytearray()})
        self.h3.send_headers(stream_id=stream_id, headers=headers, end_stream=True)
        self.transmit()
        return await asyncio.wait_for(fut, 30)


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--ca", required=True)
    ap.add_argument("paths", nargs="+")
    args = ap.parse_args()

    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    config.verify_mode = ssl.CERT_REQUIRED
    config.load_verify_locations(args.ca)
    authority = f"localhost:{args.port}"
    async with connect(args.host, args.port, configuration=config, create_protocol=H3Client) as client:
        jobs = []
        for p in args.paths:
            path, _, rng = p.partition("@")
            extra = [(b"range", rng.encode())] if rng else []
            jobs.append(client.get(authority, path, extra))
        answers = await asyncio.gather(*jobs)
        for p, a in zip(args.paths, answers):
            body = bytes(a["body"])
            print(f"{p.partition('@')[0]} {a['status']} {len(body)} {hashlib.sha256(body).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
