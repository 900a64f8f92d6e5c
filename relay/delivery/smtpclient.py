"""The SMTP client connection used for delivery (RFC 5321), with pipelining (RFC 2920).

Why not aiosmtplib (used until issue 9): it sends MAIL, each RCPT and DATA as separate
writes and waits for each reply, parses every address with ``email.utils.parseaddr``,
and runs regular expressions over every body; in the delivery process that was ~40% of
the event loop's time per message (py-spy, docs/performance.md). Here, when the server
offers PIPELINING, MAIL, the RCPTs and DATA go out in one write and their replies are
read in order, as Postfix's smtp client does: one round trip less per recipient, and
one write instead of 2 + recipients.

Addresses were checked at intake; here they only must not break the command line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import re
import ssl
import time
from dataclasses import dataclass
from typing import cast


class SessionBroken(Exception):
    """The SMTP session with the server broke."""


class ConnectionLost(SessionBroken):
    """The server closed the connection."""


class ReplyTimeout(SessionBroken):
    """The server did not answer in time."""


class ProtocolError(SessionBroken):
    """The server sent something that is not an SMTP reply."""


class ReplyError(Exception):
    """The server refused a session command (greeting, EHLO, STARTTLS)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # the lines' texts joined by "\n"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


@dataclass(frozen=True, slots=True)
class TransactionReplies:
    """The server's answers to one transaction. ``rcpts`` pairs with the recipients;
    ``data`` is the answer after the body (or to DATA itself when it was refused), None
    when DATA was never sent (MAIL refused, or every RCPT refused without pipelining)."""

    mail: Reply
    rcpts: list[Reply]
    data: Reply | None


# A reply line longer than this is not SMTP (RFC 5321 §4.5.3.1.5: 512 octets).
_MAX_LINE = 64 * 1024


class _ReplyReader(asyncio.Protocol):
    """Collects complete (possibly multi-line, RFC 5321 §4.2.1) replies as they arrive."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.lines: list[str] = []
        self.replies: collections.deque[Reply] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.error: SessionBroken | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports are not asyncio.Transport subclasses
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            i = buf.find(b"\n")
            if i < 0:
                if len(buf) > _MAX_LINE:
                    self._fail(ProtocolError("reply line too long"))
                break
            raw = bytes(buf[:i]).rstrip(b"\r")
            del buf[: i + 1]
            if len(raw) < 3 or not raw[:3].isdigit() or raw[3:4] not in (b"", b" ", b"-"):
                self._fail(ProtocolError(f"not an SMTP reply: {raw[:80]!r}"))
                return
            self.lines.append(raw[4:].decode("utf-8", "replace"))
            if raw[3:4] != b"-":
                self.replies.append(Reply(int(raw[:3]), "\n".join(self.lines)))
                self.lines = []
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = ConnectionLost(str(exc) if exc else "connection closed by server")
        self._wake()

    def eof_received(self) -> bool:
        return False

    def _fail(self, error: SessionBroken) -> None:
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def stuff(data: bytes) -> bytes:
    """The body as sent after DATA (RFC 5321 §4.5.2): every line ends in CRLF, a line
    starting with "." gets one more, and the terminator follows. Intake already made
    bodies all-CRLF, so this is two C-speed passes in the usual case."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        # Lone CR or LF (a renderer's doing): each becomes CRLF first.
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\n.", b"\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


# What would end or forge an SMTP command line if it sat inside a path.
_NOT_IN_PATH = re.compile("[\r\n<>\x00]")


def _path(address: str) -> bytes:
    if _NOT_IN_PATH.search(address):
        # Never reached with addresses from intake; a command line must not be forged.
        raise ValueError(f"address not usable on an SMTP command line: {address!r}")
    return b"<" + address.encode("utf-8") + b">"


def _sni(name: str) -> str | None:
    """Server Name Indication is a DNS name, never an address (RFC 6066 §3)."""
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return name.rstrip(".") or None
    return None


class SMTPConnection:
    """One client session: connect, EHLO, STARTTLS, transactions, QUIT."""

    def __init__(self, transport: asyncio.Transport, reader: _ReplyReader, timeout: float) -> None:
        self._transport = transport
        self._reader = reader
        self.timeout = timeout
        self._deadline: float | None = None  # of the read waiting now, if one is
        self._timer: asyncio.TimerHandle | None = None
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.opened_at = time.monotonic()
        # Set once the current transaction's body is written: before that the server
        # cannot have accepted the message (RFC 2920 §3.1: the body waits for 354).
        self.body_sent = False

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        source_address: str | None = None,
    ) -> SMTPConnection:
        """Connect and read the greeting (ReplyError unless 220)."""
        loop = asyncio.get_running_loop()
        try:
            transport, reader = await asyncio.wait_for(
                loop.create_connection(
                    _ReplyReader,
                    host,
                    port,
                    local_addr=(source_address, 0) if source_address else None,
                ),
                connect_timeout,
            )
        except TimeoutError as exc:
            raise ReplyTimeout(f"connect timed out after {connect_timeout:g} s") from exc
        conn = cls(transport, reader, connect_timeout)
        try:
            greeting = await conn.read()
        except BaseException:
            conn.abort()
            raise
        if greeting.code != 220:
            conn.abort()
            raise ReplyError(greeting.code, greeting.text)
        return conn

    @property
    def is_connected(self) -> bool:
        return self._reader.error is None and not self._transport.is_closing()

    @property
    def is_idle_clean(self) -> bool:
        """Connected, and the server has said nothing since our last read (a server
        closing an idle session sends 421 first, RFC 5321 §3.8)."""
        return self.is_connected and not self._reader.replies

    def supports(self, extension: str) -> bool:
        return extension.upper() in self.extensions

    @property
    def local_ip(self) -> str:
        """Our address on this connection (TLS reports name it as the sending MTA's)."""
        name = self._transport.get_extra_info("sockname")
        return str(name[0]) if name else ""

    async def read(self) -> Reply:
        """The next reply, within ``timeout`` seconds."""
        reader = self._reader
        if not reader.replies:
            loop = asyncio.get_running_loop()
            self._deadline = deadline = loop.time() + self.timeout
            try:
                while not reader.replies:
                    if reader.error is not None:
                        raise reader.error
                    reader.waiter = waiter = loop.create_future()
                    if self._timer is None or self._timer.when() > deadline:
                        # (later than this deadline: the timeout was shortened since)
                        self._stop_timer()
                        self._timer = loop.call_at(deadline, self._on_timer)
                    try:
                        await waiter
                    finally:
                        reader.waiter = None
            finally:
                self._deadline = None
        return reader.replies.popleft()

    # The reply timeout: one timer per connection, moved lazily (as the SMTP server's
    # session timer). asyncio.timeout_at per reply cost a Timeout and the task's
    # cancellation and its undoing (~4% of the delivery process's Python time), and a
    # timer per reply still a TimerHandle, a heap push and a cancel (issue 9). Here a read
    # sets its deadline; the timer, when it fires, fails the waiting read if that read is
    # past its deadline, else is armed again at it, and lapses while no read waits.

    def _on_timer(self) -> None:
        self._timer = None
        waiter, deadline = self._reader.waiter, self._deadline
        if waiter is None or waiter.done() or deadline is None:
            return
        loop = waiter.get_loop()
        if loop.time() < deadline:
            self._timer = loop.call_at(deadline, self._on_timer)
            return
        waiter.set_exception(ReplyTimeout(f"no reply within {self.timeout:g} s"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def send(self, *lines: bytes) -> None:
        if self._reader.error is not None:
            raise self._reader.error
        self._transport.write(b"".join(line + b"\r\n" for line in lines))

    async def command(self, line: bytes) -> Reply:
        self.send(line)
        return await self.read()

    async def ehlo(self, name: str) -> None:
        """EHLO, or HELO when the server refuses EHLO (RFC 5321 §3.2)."""
        reply = await self.command(b"EHLO " + name.encode())
        if reply.code == 250:
            self.extensions = {}
            for line in reply.text.split("\n")[1:]:
                keyword, _, params = line.strip().partition(" ")
                self.extensions[keyword.upper()] = params
            return
        if 500 <= reply.code < 600:
            reply = await self.command(b"HELO " + name.encode())
            if reply.code == 250:
                self.extensions = {}
                return
        raise ReplyError(reply.code, reply.text)

    async def starttls(self, context: ssl.SSLContext, server_name: str) -> None:
        reply = await self.command(b"STARTTLS")
        if reply.code != 220:
            raise ReplyError(reply.code, reply.text)
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(
                self._transport,
                self._reader,
                context,
                server_hostname=_sni(server_name),
                ssl_handshake_timeout=self.timeout,
            )
        except TimeoutError as exc:
            raise ReplyTimeout("TLS handshake timed out") from exc
        if new is None:
            raise ConnectionLost("connection closed during the TLS handshake")
        self._transport = new
        self._reader.transport = self._transport
        self.tls = True
        self.extensions = {}  # RFC 3207 §4.2: EHLO again

    async def transaction(
        self, mail_from: str, options: list[str], rcpts: list[str], data: bytes
    ) -> TransactionReplies:
        """MAIL, RCPTs, DATA and the body; pipelined when the server offers it."""
        self.body_sent = False
        mail = b"MAIL FROM:" + _path(mail_from) + b"".join(b" " + o.encode() for o in options)
        rcpt_lines = [b"RCPT TO:" + _path(a) for a in rcpts]
        if self.supports("PIPELINING"):
            # RFC 2920 §3.1: DATA may end the group; its reply says whether to send the body.
            self.send(mail, *rcpt_lines, b"DATA")
            mail_reply = await self.read()
            rcpt_replies = [await self.read() for _ in rcpt_lines]
            go_ahead = await self.read()
        else:
            mail_reply = await self.command(mail)
            if not mail_reply.ok:
                return TransactionReplies(mail_reply, [], None)
            rcpt_replies = [await self.command(line) for line in rcpt_lines]
            if not any(r.ok for r in rcpt_replies):
                return TransactionReplies(mail_reply, rcpt_replies, None)
            go_ahead = await self.command(b"DATA")
        if go_ahead.code != 354:
            return TransactionReplies(mail_reply, rcpt_replies, go_ahead)
        if not mail_reply.ok or not any(r.ok for r in rcpt_replies):
            # RFC 2920 §3.1: DATA accepted with no recipient; end it empty, ignore the answer.
            self._transport.write(b".\r\n")
            await self.read()
            return TransactionReplies(mail_reply, rcpt_replies, None)
        self.body_sent = True
        self._transport.write(stuff(data))
        return TransactionReplies(mail_reply, rcpt_replies, await self.read())

    async def rset(self) -> None:
        await self.command(b"RSET")

    async def quit(self) -> None:
        """QUIT politely when the session is healthy; close in any case."""
        try:
            if self.is_connected:
                await asyncio.wait_for(self.command(b"QUIT"), min(self.timeout, 5.0))
        except (SessionBroken, OSError, TimeoutError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self._stop_timer()
        self._transport.close()

    def quit_nowait(self) -> None:
        """QUIT without waiting for the 221, then close (an idle cached session)."""
        with contextlib.suppress(SessionBroken, OSError):
            self.send(b"QUIT")
        self.close()

    def abort(self) -> None:
        self._stop_timer()
        self._transport.abort()
