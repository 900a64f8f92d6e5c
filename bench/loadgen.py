"""Benchmark load generator: N concurrent SMTP sessions submitting M messages in total.

Plain or STARTTLS, with or without AUTH PLAIN, one message per connection or many; every
message carries ``X-Bench-Id: <run>-<n>`` (n = 0..M-1) so the sink can prove none was lost
or duplicated. MAIL, RCPT and DATA are pipelined (RFC 2920) as Postfix's smtp-source does.

Accept latency of a message: from writing its MAIL command (or, for the first message of a
connection, from starting to connect) to reading the 250 after its final dot.

Prints one JSON line: accepted, refused (by reply code), elapsed, start (wall clock),
latencies_ms (sorted sample), errors.

    python bench/loadgen.py --port 2525 --sessions 20 --messages 2000 --size 2048
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from base64 import b64encode
from dataclasses import dataclass, field

_LINE = b"x" * 76 + b"\r\n"


def make_body(size: int) -> bytes:
    """A text body of about ``size`` bytes: 78-octet lines, none starting with '.'."""
    n = max(1, size // len(_LINE))
    return _LINE * n


@dataclass
class Load:
    host: str
    port: int
    sessions: int
    messages: int
    per_conn: int
    size: int
    starttls: bool
    auth: tuple[str, str] | None
    sender: str
    rcpt_domain: str
    run: str
    rate: float = 0.0  # msg/s offered (0: as fast as the server answers)
    duration: float = 0.0  # stop starting messages after this many seconds (0: no limit)
    timeout: float = 60.0


@dataclass
class Result:
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    start: float = 0.0
    elapsed: float = 0.0


class SMTPError(Exception):
    def __init__(self, reply: bytes) -> None:
        super().__init__(reply.decode(errors="replace"))
        self.code = reply[:3].decode(errors="replace")


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def _expect(reader: asyncio.StreamReader, first: bytes) -> bytes:
    line = await _reply(reader)
    if not line.startswith(first):
        raise SMTPError(line.rstrip())
    return line


class Generator:
    def __init__(self, load: Load) -> None:
        self.load = load
        self.result = Result()
        self.next_index = 0
        self.t0 = time.monotonic()
        self.body = make_body(load.size)
        self.tls_ctx = ssl.create_default_context()
        self.tls_ctx.check_hostname = False
        self.tls_ctx.verify_mode = ssl.CERT_NONE

    def _take(self) -> int | None:
        if self.next_index >= self.load.messages:
            return None
        if self.load.duration and time.monotonic() - self.t0 > self.load.duration:
            return None
        i = self.next_index
        self.next_index += 1
        return i

    def _message(self, i: int) -> tuple[bytes, bytes]:
        ld = self.load
        rcpt = f"r{i % 1000}@{ld.rcpt_domain}"
        head = (
            f"From: <{ld.sender}>\r\nTo: <{rcpt}>\r\nSubject: bench {i}\r\n"
            f"Message-ID: <{ld.run}.{i}@bench.invalid>\r\n"
            f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nX-Bench-Id: {ld.run}-{i}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        ).encode()
        envelope = f"MAIL FROM:<{ld.sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
        return envelope, head

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ld = self.load
        reader, writer = await asyncio.open_connection(ld.host, ld.port, limit=1 << 20)
        await _expect(reader, b"220")
        writer.write(b"EHLO loadgen.bench\r\n")
        await _expect(reader, b"250")
        if ld.starttls:
            writer.write(b"STARTTLS\r\n")
            await _expect(reader, b"220")
            await writer.start_tls(self.tls_ctx)
            writer.write(b"EHLO loadgen.bench\r\n")
            await _expect(reader, b"250")
        if ld.auth is not None:
            token = b64encode(f"\0{ld.auth[0]}\0{ld.auth[1]}".encode()).decode()
            writer.write(f"AUTH PLAIN {token}\r\n".encode())
            await _expect(reader, b"235")
        return reader, writer

    async def _pace(self, i: int, t0: float) -> None:
        if self.load.rate > 0:
            delay = t0 + i / self.load.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def session(self, t0: float) -> None:
        res = self.result
        while True:
            i = self._take()
            if i is None:
                return
            await self._pace(i, t0)
            started = time.monotonic()
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await self._open()
                sent = 0
                while True:
                    envelope, head = self._message(i)
                    writer.write(envelope)
                    await _expect(reader, b"250")
                    await _expect(reader, b"250")
                    await _expect(reader, b"354")
                    writer.write(head)
                    writer.write(self.body)
                    writer.write(b".\r\n")
                    reply = await _reply(reader)
                    if reply.startswith(b"250"):
                        res.accepted += 1
                        res.latencies.append((time.monotonic() - started) * 1000)
                    else:
                        code = reply[:3].decode(errors="replace")
                        res.refused[code] = res.refused.get(code, 0) + 1
                    sent += 1
                    if sent >= self.load.per_conn:
                        break
                    nxt = self._take()
                    if nxt is None:
                        break
                    i = nxt
                    await self._pace(i, t0)
                    started = time.monotonic()
                writer.write(b"QUIT\r\n")
                await _reply(reader)
            except SMTPError as exc:
                res.refused[exc.code] = res.refused.get(exc.code, 0) + 1
                if len(res.refused) == 1 and sum(res.refused.values()) == 1:
                    print(f"loadgen: first refusal: {exc}", file=sys.stderr)
            except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
                key = type(exc).__name__
                res.errors[key] = res.errors.get(key, 0) + 1
            finally:
                if writer is not None:
                    writer.close()

    async def run(self) -> Result:
        self.result.start = time.time()
        self.t0 = t0 = time.monotonic()
        tasks = [asyncio.create_task(self.session(t0)) for _ in range(self.load.sessions)]
        await asyncio.wait_for(asyncio.gather(*tasks), self.load.timeout + self.load.messages)
        self.result.elapsed = time.monotonic() - t0
        self.result.latencies.sort()
        return self.result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--per-conn", type=int, default=1, help="messages per connection")
    ap.add_argument("--size", type=int, default=2048, help="body bytes")
    ap.add_argument("--starttls", action="store_true")
    ap.add_argument("--auth", default=None, help="USER:PASSWORD for AUTH PLAIN")
    ap.add_argument("--sender", default="bench@example.com")
    ap.add_argument("--rcpt-domain", default="example.org")
    ap.add_argument("--run", default="run", help="X-Bench-Id prefix")
    ap.add_argument("--rate", type=float, default=0.0, help="offered msg/s (0 = flat out)")
    ap.add_argument("--duration", type=float, default=0.0, help="stop after S seconds (0: no)")
    args = ap.parse_args()
    auth: tuple[str, str] | None = None
    if args.auth:
        user, _, password = args.auth.partition(":")
        auth = (user, password)
    load = Load(
        args.host,
        args.port,
        args.sessions,
        args.messages,
        args.per_conn,
        args.size,
        args.starttls,
        auth,
        args.sender,
        args.rcpt_domain,
        args.run,
        args.rate,
        args.duration,
    )
    res = asyncio.run(Generator(load).run())
    lat = res.latencies
    step = max(1, len(lat) // 2000)
    print(
        json.dumps(
            {
                "accepted": res.accepted,
                "refused": res.refused,
                "errors": res.errors,
                "start": res.start,
                "elapsed": res.elapsed,
                "latencies_ms": [round(x, 3) for x in lat[::step]] + ([lat[-1]] if lat else []),
            }
        )
    )


if __name__ == "__main__":
    main()
