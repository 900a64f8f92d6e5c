"""Benchmark sink: a minimal asyncio SMTP server that counts messages by X-Bench-Id.

It stands in for every recipient MX (relay routes example.org to it; Postfix relays to it
with relayhost). Each message must carry ``X-Bench-Id: <run>-<n>``; the sink records which
ids arrived, how often, and when the first and last arrived (wall clock, so the load
generator's start time in another process is comparable).

Control port (one line per command, one JSON line back):
    STATS            {"count", "unique", "duplicates", "no_id", "first", "last"}
    RESET            forget everything (between scenarios)
    MISSING <n>      {"missing": [...ids 0..n-1 not seen, first 20], "missing_count": k}

Run: python bench/sink.py --port 2600 --control 2601  (prints "ready" when listening)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time

_ID = re.compile(rb"\r\nX-Bench-Id: ([^\r\n]+)\r\n", re.IGNORECASE)


class Counter:
    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.count = 0
        self.no_id = 0
        self.first = 0.0
        self.last = 0.0

    def add(self, data: bytes) -> None:
        now = time.time()
        if not self.count:
            self.first = now
        self.last = now
        self.count += 1
        head_end = data.find(b"\r\n\r\n")
        m = _ID.search(b"\r\n" + data[: head_end if head_end >= 0 else len(data)] + b"\r\n")
        if m is None:
            self.no_id += 1
            return
        key = m.group(1).decode()
        self.seen[key] = self.seen.get(key, 0) + 1

    def stats(self) -> dict[str, object]:
        dups = sum(n - 1 for n in self.seen.values() if n > 1)
        return {
            "count": self.count,
            "unique": len(self.seen),
            "duplicates": dups,
            "no_id": self.no_id,
            "first": self.first,
            "last": self.last,
        }


class SinkProtocol(asyncio.Protocol):
    """RFC 5321 server side, just enough for Postfix's smtp client and relay's aiosmtplib:
    EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, with PIPELINING (RFC 2920)."""

    def __init__(self, holder: dict[str, Counter]) -> None:
        self.holder = holder  # the counter is swapped on RESET
        self.buf = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 sink.bench ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    break
                self.holder["c"].add(self.buf[:end])
                self.buf = self.buf[end + 5 :]
                self.in_data = False
                out.append(b"250 2.0.0 Ok: counted\r\n")
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                break
            line, self.buf = self.buf[:nl], self.buf[nl + 2 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n")
            elif verb == b"DATA":
                self.in_data = True
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                # "\r\n.\r\n" search needs the CRLF before the body's first line too.
                self.buf = b"\r\n" + self.buf
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                assert self.transport is not None
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:  # HELO, MAIL, RCPT, RSET, NOOP
                out.append(b"250 2.0.0 Ok\r\n")
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


class ControlProtocol(asyncio.Protocol):
    def __init__(self, holder: dict[str, Counter], run: list[str]) -> None:
        self.holder = holder
        self.run = run
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            parts = line.decode().strip().split()
            if not parts:
                continue
            counter = self.holder["c"]
            reply: dict[str, object]
            if parts[0] == "RESET":
                self.holder["c"] = Counter()
                reply = {"ok": True}
            elif parts[0] == "MISSING" and len(parts) == 3:
                prefix, n = parts[1], int(parts[2])
                missing = [i for i in range(n) if f"{prefix}-{i}" not in counter.seen]
                reply = {"missing_count": len(missing), "missing": missing[:20]}
            else:
                reply = counter.stats()
            assert self.transport is not None
            self.transport.write(json.dumps(reply).encode() + b"\n")


async def serve(port: int, control: int) -> None:
    loop = asyncio.get_running_loop()
    holder = {"c": Counter()}
    await loop.create_server(lambda: SinkProtocol(holder), "127.0.0.1", port, backlog=1024)
    await loop.create_server(lambda: ControlProtocol(holder, []), "127.0.0.1", control)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--control", type=int, required=True)
    args = ap.parse_args()
    try:
        asyncio.run(serve(args.port, args.control))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
