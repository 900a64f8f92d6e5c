"""An SMTP sink that plays the recipients' MX: records what arrives, replies as scripted.

Runs aiosmtpd in its own thread with its own event loop on 127.0.0.1 (ephemeral port,
kept across stop()/start() so "MX down, then back" tests work). STARTTLS is offered by
default with a trustme certificate for "mx.test".

    sink = SMTPSink().start()
    sink.set_rcpt_reply("nobody@example.org", "550 5.1.1 user unknown")
    ...
    [msg] = sink.wait_for(1)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session

from .net import LOOPBACK


@dataclass(frozen=True)
class Received:
    """One message the sink accepted (one DATA transaction)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    tls: bool
    peer: tuple[str, int]
    helo: str | None = None
    mail_options: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    def header(self, name: str) -> str | None:
        """The first header called name (case-insensitive), unfolded, or None."""
        import email
        import email.policy

        msg = email.message_from_bytes(self.data, policy=email.policy.compat32)
        value = msg.get(name)
        return None if value is None else " ".join(str(value).split())


class _Handler:
    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        reply = self.sink._mail_reply
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        with self.sink._lock:
            self.sink.rcpt_attempts.append(address)
            reply = self.sink._rcpt_replies.get(address.lower(), self.sink._rcpt_replies.get(None))
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        delay = self.sink._data_delay
        if delay:
            await asyncio.sleep(delay)
        reply = self.sink._data_reply
        if reply is not None:
            return reply
        raw = envelope.original_content or envelope.content or b""
        data = raw if isinstance(raw, bytes) else raw.encode()
        peer = session.peer if isinstance(session.peer, tuple) else ("", 0)
        received = Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=data,
            tls=session.ssl is not None,
            peer=(str(peer[0]), int(peer[1])),
            helo=session.host_name,
            mail_options=tuple(envelope.mail_options),
        )
        with self.sink._cond:
            self.sink.messages.append(received)
            number = len(self.sink.messages)
            self.sink._cond.notify_all()
        return f"250 2.0.0 OK: queued as sink{number}"


class _SinkSMTP(SMTP):
    """aiosmtpd SMTP that tells the sink about each connection so stop() can cut them."""

    def __init__(self, sink: SMTPSink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink
        self._raw_transport: asyncio.BaseTransport | None = None
        self._turned_away = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._raw_transport is None:  # first call: the TCP connection itself
            self._raw_transport = transport
            with self._sink._lock:
                limit = self._sink._connection_limit
                if limit is not None and len(self._sink._live) >= limit:
                    # What big receivers do past their per-client limit: 421 and close.
                    self._sink.turned_away += 1
                    self._turned_away = True
                    assert isinstance(transport, asyncio.WriteTransport)
                    transport.write(b"421 4.7.0 mx.test Too many connections, try later\r\n")
                    transport.close()
                    return
                self._sink.connections += 1
                self._sink._live.add(self)
                self._sink.peak_connections = max(
                    self._sink.peak_connections, len(self._sink._live)
                )
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._turned_away:
            return
        with self._sink._lock:
            self._sink._live.discard(self)
        super().connection_lost(error)

    def abort(self) -> None:
        if self._raw_transport is not None:
            self._raw_transport.abort()  # type: ignore[attr-defined]


class SMTPSink:
    """Recipients' MX for tests. Thread-safe; every method may be called from tests."""

    def __init__(
        self,
        *,
        tls: bool = True,
        hostname: str = "mx.test",
        ca: trustme.CA | None = None,
        host: str = LOOPBACK,
        port: int = 0,
        data_size_limit: int = 64 * 1024 * 1024,
    ) -> None:
        self.host = host
        self.hostname = hostname
        self.tls = tls
        self.ca = ca or trustme.CA()
        self.cert = self.ca.issue_cert(hostname, "localhost", host)
        self.data_size_limit = data_size_limit
        self._port = port
        self.messages: list[Received] = []
        self.rcpt_attempts: list[str] = []
        self.connections = 0
        self.peak_connections = 0  # most connections open at once
        self.turned_away = 0  # connections refused with 421 (set_connection_limit)
        self._connection_limit: int | None = None
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._live: set[_SinkSMTP] = set()
        self._rcpt_replies: dict[str | None, str] = {}
        self._mail_reply: str | None = None
        self._data_reply: str | None = None
        self._data_delay: float = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("SMTPSink was never started")
        return self._port

    @property
    def running(self) -> bool:
        return self._thread is not None

    def server_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(ctx)
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this sink's CA (verifies "mx.test")."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def write_ca(self, path: str) -> str:
        """Write the sink CA certificate (PEM) to path, for a client's CA file option."""
        self.ca.cert_pem.write_to_path(path)
        return path

    def start(self) -> SMTPSink:
        """Start listening (again) on the same port. Returns self."""
        if self.running:
            return self
        sock = self._listen_socket()
        self._port = sock.getsockname()[1]
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(loop.create_server(self._factory, sock=sock))
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(asyncio.sleep(0.01))
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"test-sink-{self._port}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"sink could not start on port {self._port}: {errors[0]!r}")
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (the MX is "down")."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            with self._lock:
                live = list(self._live)
            for proto in live:
                proto.abort()
            # Let each connection_lost run (TLS connections take a few loop turns).
            for _ in range(100):
                with self._lock:
                    if not self._live:
                        break
                await asyncio.sleep(0.02)
            if self._server is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._server.wait_closed(), 5)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            self._thread = None
            self._loop = None
            self._server = None

    def __enter__(self) -> SMTPSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _listen_socket(self) -> socket.socket:
        deadline = time.monotonic() + 10
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self._port))
                sock.listen(128)
                sock.setblocking(False)
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _factory(self) -> _SinkSMTP:
        return _SinkSMTP(
            self,
            _Handler(self),
            hostname=self.hostname,
            tls_context=self.server_ssl_context() if self.tls else None,
            require_starttls=False,
            data_size_limit=self.data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            ident="test-sink",
        )

    # ------------------------------------------------------------------ scripting

    def set_rcpt_reply(self, address: str | None, reply: str | None) -> None:
        """Reply to RCPT TO:<address> (None: every RCPT without its own reply) with reply.

        reply None removes the scripted reply. Example: "550 5.1.1 user unknown".
        """
        with self._lock:
            key = None if address is None else address.lower()
            if reply is None:
                self._rcpt_replies.pop(key, None)
            else:
                self._rcpt_replies[key] = reply

    def set_mail_reply(self, reply: str | None) -> None:
        """Reply to every MAIL FROM with reply (None: accept)."""
        with self._lock:
            self._mail_reply = reply

    def set_data_reply(self, reply: str | None) -> None:
        """Reply to the end of DATA with reply instead of accepting (None: accept)."""
        with self._lock:
            self._data_reply = reply

    def set_connection_limit(self, limit: int | None) -> None:
        """Greet connections past this many open at once with 421 and close them (None:
        no limit), as big receivers limit each client."""
        with self._lock:
            self._connection_limit = limit

    def set_data_delay(self, seconds: float) -> None:
        """Wait this long before answering the end of DATA (a slow MX)."""
        with self._lock:
            self._data_delay = seconds

    def clear_replies(self) -> None:
        with self._lock:
            self._rcpt_replies.clear()
            self._mail_reply = None
            self._data_reply = None
            self._data_delay = 0.0

    def reset(self) -> None:
        """Forget received messages, attempts and the connection count; clear replies."""
        with self._lock:
            self.messages.clear()
            self.rcpt_attempts.clear()
            self.connections = 0
            self.peak_connections = 0
            self.turned_away = 0
            self._connection_limit = None
        self.clear_replies()

    # ------------------------------------------------------------------ waiting

    def wait_for(self, n: int = 1, timeout: float = 30.0) -> list[Received]:
        """Block until at least n messages arrived; return a copy of all of them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(self._timeout_message(n, timeout))
                self._cond.wait(remaining)
            return list(self.messages)

    async def wait_for_async(
        self,
        n: int = 1,
        timeout: float = 30.0,  # noqa: ASYNC109 (same API as wait_for)
    ) -> list[Received]:
        """wait_for for async tests: does not block the test's event loop."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            if time.monotonic() >= deadline:
                raise AssertionError(self._timeout_message(n, timeout))
            await asyncio.sleep(0.05)

    def _timeout_message(self, n: int, timeout: float) -> str:
        with self._lock:
            return (
                f"sink on port {self._port} got {len(self.messages)} message(s) of the "
                f"{n} awaited within {timeout}s (connections={self.connections}, "
                f"RCPT attempts={self.rcpt_attempts!r})"
            )
