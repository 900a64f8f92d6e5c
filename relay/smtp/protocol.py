"""One SMTP server session (RFC 5321) as an asyncio protocol, written for relay.

Why not aiosmtpd (used until issue 9): per command it went through a StreamReader, an
awaited ``drain`` per reply line, a new timer, ``email``'s header parser for every
address, and per connection an ``inspect.getmembers`` scan of itself; under the bench's
one-message-per-connection load that was half of the listener's CPU (py-spy, docs/
performance.md). Here the client's bytes go into one buffer that the session task reads
lines from without awaiting when a line is already there, replies are collected and
written in one ``write`` when the session next needs input (RFC 2920 §3.1 lets a server
hold replies to pipelined commands until then; Postfix does the same), and the timeout
is one deadline.

What a client sees:
- EHLO advertises SIZE, 8BITMIME, SMTPUTF8, PIPELINING, ENHANCEDSTATUSCODES, STARTTLS
  (until TLS is on), and AUTH PLAIN LOGIN only once TLS is on (RFC 4954 §4: no plaintext
  passwords); implicit TLS (port 465, RFC 8314) counts as TLS.
- AUTH before TLS gets ``530 5.7.0``; AUTH is verified asynchronously (database and
  scrypt off the event loop), with the session's timeout off meanwhile.
- Every reply except the greeting, EHLO/HELO's and the 334/354 go-aheads carries an
  RFC 3463 enhanced status code, as ENHANCEDSTATUSCODES promises (RFC 2034 §3).
- Commands longer than 512 octets (RFC 5321 §4.5.3.1.4; MAIL may carry 36 more for
  SIZE=/BODY=/SMTPUTF8) get ``500 5.5.6``; the fifth unknown command ends the session.
- STARTTLS discards whatever the client pipelined behind it in plaintext (RFC 3207 §5,
  CVE-2011-0411) and everything learnt before it (RFC 3207 §4.2).
- A body over max_message_size is read to its end and refused with 552; one that runs
  more than 64 KB past it gets the 552 at once and the connection is closed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import ssl
from typing import Any, cast

from relay import metrics
from relay.smtp.data import Body, DataState, body_end, finish

log = logging.getLogger("relay.smtp")

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")

# Texts aiosmtpd used to answer with, by their text, and the enhanced code each carries;
# with_enhanced_code still gives codes to any reply a handler returns without one.
_LIBRARY_CODES: dict[str, str] = {
    "Error: bad syntax": "5.5.2",
    "Command line too long": "5.5.6",
    "Line too long (see RFC5321 4.5.3.1.6)": "5.5.6",
    "Error: need MAIL command": "5.5.1",
    "Error: need RCPT command": "5.5.1",
    "Error: nested MAIL command": "5.5.1",
    "Error: malformed address": "5.1.3",
    "Already authenticated": "5.5.1",
    "OK": "2.0.0",
}


def with_enhanced_code(reply: str) -> str:
    """Give a single-line reply an RFC 3463 code when it has none."""
    if len(reply) < 4 or not reply[:3].isdigit() or reply[3] != " ":
        return reply
    if _HAS_ENHANCED.match(reply):
        return reply
    code, text = reply[:3], reply[4:]
    if code in ("220", "334", "354"):
        return reply  # greeting, AUTH challenge, DATA go-ahead: no enhanced code (RFC 2034)
    enhanced = _LIBRARY_CODES.get(text)
    if enhanced is None:
        if code[0] == "5" and (text.startswith("Syntax:") or text.startswith("Error: command")):
            enhanced = "5.5.2"
        else:
            enhanced = {"2": "2.0.0", "4": "4.0.0", "5": "5.0.0"}.get(code[0], "")
    return f"{code} {enhanced} {text}" if enhanced else reply


# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF. MAIL may
# carry SIZE= (RFC 1870, +10 octets... counted generously as aiosmtpd did) and
# BODY=/SMTPUTF8 (RFC 6152 / 6531) after EHLO.
_COMMAND_LIMIT = 512
_MAIL_LIMIT = _COMMAND_LIMIT + 26 + 10
# A line with no CRLF within this many octets is not a command: it is read to its end
# and answered 500 (a DATA line may be longer: see line_length_limit).
_LINE_BUFFER = 64 * 1024
# Bytes past max_message_size still read before an oversized DATA is cut off: the
# ".\r\n" terminator and the next transaction's pipelined MAIL/RCPT lines fit easily.
_DATA_SLACK = 64 * 1024
# Unknown commands a session may send; the last one is answered 502 and the session ends
# (aiosmtpd's limit, kept: garbage from port scanners and HTTP clients stops quickly).
_BOGUS_LIMIT = 5
# Replies held back before they are written even though more pipelined input is
# waiting: a client that pipelines thousands of NOOPs gets its answers in batches.
_FLUSH_AT = 64 * 1024

_COMMANDS = ("AUTH", "DATA", "EHLO", "HELO", "HELP", "MAIL", "NOOP", "QUIT", "RCPT", "RSET")
_KNOWN = frozenset((*_COMMANDS, "STARTTLS", "VRFY"))
_SYNTAX = {
    "AUTH": "AUTH <mechanism>",
    "DATA": "DATA",
    "EHLO": "EHLO hostname",
    "HELO": "HELO hostname",
    "HELP": "HELP [command]",
    "MAIL": "MAIL FROM: <address>",
    "NOOP": "NOOP [ignored]",
    "QUIT": "QUIT",
    "RCPT": "RCPT TO: <address>",
    "RSET": "RSET",
    "STARTTLS": "STARTTLS",
    "VRFY": "VRFY <address>",
}
_PARAMS_SYNTAX = " [SP <mail-parameters>]"

# An address the fast path takes as it is: RFC 5321 dot-atom local part (§4.1.2) and a
# domain of LDH labels, or their UTF-8 forms (RFC 6531). Anything else (quoted local
# parts, address literals, source routes) goes through the full RFC 5322 parser.
# (Surrogates are left out: they stand for octets that were not UTF-8.)
_UTF8 = "\u0080-\ud7ff\ue000-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_UTF8}]"
_LABEL = rf"[A-Za-z0-9\-{_UTF8}]+"
_SIMPLE_PATH = re.compile(rf"<({_ATEXT}+(?:\.{_ATEXT}+)*@{_LABEL}(?:\.{_LABEL})*\.?)>")


class _Closed(Exception):
    """The client went away (or the session was closed) while it was being read."""


class _TooLong(Exception):
    """A command line longer than the line buffer."""


def parse_path(arg: str) -> tuple[str | None, str]:
    """(address, the rest) from ``<path> params``; address None when malformed, "" when
    there is none. The null path ``<>`` is returned as "<>" (the handler's convention)."""
    arg = arg.lstrip()
    if not arg:
        return "", ""
    m = _SIMPLE_PATH.match(arg)
    if m is not None:
        return m.group(1), arg[m.end() :]
    from email._header_value_parser import get_addr_spec, get_angle_addr
    from email.errors import HeaderParseError

    address: Any
    try:
        if arg.startswith("<"):
            address, rest = get_angle_addr(arg)
        else:
            address, rest = get_addr_spec(arg)
    except (HeaderParseError, IndexError, ValueError):
        return None, ""
    addr_spec: str = address.addr_spec
    return addr_spec, str(rest)


def _params(words: list[str]) -> dict[str, str | bool] | None:
    """ESMTP parameters (RFC 5321 §4.1.2 esmtp-param); None when malformed."""
    out: dict[str, str | bool] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not key.isalnum() or (eq and not value):
            return None
        out[key] = value if eq else True
    return out


def _unbalanced_path(arg: str) -> bool:
    """An RFC 5321 §4.1.2 path opened with "<" and never closed (e.g. cut by a bare LF)."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    return rest.startswith("<") and ">" not in rest


class Session:
    """What the handler sees of the connection (aiosmtpd's Session attributes)."""

    __slots__ = ("auth_data", "authenticated", "extended_smtp", "host_name", "peer")

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.host_name: str | None = None
        self.extended_smtp = False
        self.authenticated = False
        self.auth_data: Any = None


class Envelope:
    """One transaction: MAIL, RCPTs, and the body once DATA has it."""

    __slots__ = (
        "declared_size",
        "mail_from",
        "mail_options",
        "notes",
        "original_content",
        "rcpt_options",
        "rcpt_tos",
    )

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        # MAIL's SIZE= (RFC 1870), 0 when not given: policy checks it against free space.
        self.declared_size = 0
        # What policy checks learned at one stage for a later one (Request.notes).
        self.notes: dict[str, object] = {}
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []
        self.original_content: bytes | None = None


class ConnectionLimiter:
    """Open sessions per client IP, shared by every listener of the process; it also
    knows every live session, so shutdown can let transactions finish and close the rest.
    """

    def __init__(self, per_ip: int) -> None:
        self.per_ip = per_ip
        self.open: dict[str, int] = {}
        self.sessions: set[RelaySMTP] = set()

    def acquire(self, ip: str) -> bool:
        if self.per_ip and self.open.get(ip, 0) >= self.per_ip:
            return False
        self.open[ip] = self.open.get(ip, 0) + 1
        return True

    def release(self, ip: str) -> None:
        left = self.open.get(ip, 0) - 1
        if left > 0:
            self.open[ip] = left
        else:
            self.open.pop(ip, None)


class RelaySMTP(asyncio.Protocol):
    """One SMTP session. ``listener`` names the port's role (submission/smtps/smtp)."""

    # RFC 5321 §4.5.3.1.6 caps text lines at 1000 octets, but a 500 in the middle of DATA
    # hides which rule was broken: longer lines are read and policy refuses the message
    # at end of DATA with 554 5.6.0 naming the rule (subject length, line length).
    line_length_limit = 64 * 1024

    def __init__(
        self,
        handler: Any,
        *,
        listener: str,
        hostname: str,
        require_auth: bool,
        max_message_size: int,
        timeout: float,
        implicit_tls: bool = False,
        tls_context: ssl.SSLContext | None = None,
        limiter: ConnectionLimiter | None = None,
        ident: str = "relay ESMTP",
    ) -> None:
        self.event_handler = handler
        self.listener = listener
        self.hostname = hostname
        self.ident = ident
        self.require_auth = require_auth
        self.max_message_size = max_message_size
        self.timeout = timeout
        self.implicit_tls = implicit_tls
        self.tls_context = tls_context
        self.limiter = limiter
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.envelope = Envelope()
        self._starttls_done = False
        self._client_ip: str | None = None
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._out_size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._lost = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        # Bytes received since "354"; None outside DATA (see data_received).
        self._data_bytes: int | None = None
        self._deadline = 0.0
        self._busy = False  # policy/intake/AUTH at work: the client's clock is stopped
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are no subclasses
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else str(peer)
        if self.limiter is not None:
            if not self.limiter.acquire(ip):
                msg = f"421 4.7.0 Too many connections from {ip} (limit {self.limiter.per_ip})"
                transport.write(msg.encode() + b"\r\n")
                metrics.smtp_connection_refused(self.listener)  # metrics
                transport.close()
                return
            self._client_ip = ip
            self.limiter.sessions.add(self)
        self.transport = transport
        self.session = Session(peer)
        metrics.smtp_connection(self.listener, self.tls_active, False)
        self._touch()
        self._timer = self._loop.call_at(self._deadline, self._on_timer)
        self._task = self._loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._data_bytes is not None:
            self._data_bytes += len(data)
            # Without this cut a client could hold the connection for an unbounded
            # upload; past the limit (plus slack for the terminator and commands
            # pipelined behind it, RFC 2920) we answer and hang up (RFC 5321 §4.2.5 lets
            # the server close after a failed DATA).
            if self._data_bytes > self.max_message_size + _DATA_SLACK:
                self._data_bytes = None
                log.info(
                    "smtp listener=%s client=%s outcome=refused reason=size_exceeded_cut",
                    self.listener,
                    self._client_ip,
                )
                self._buf.clear()
                self._close_with(
                    f"552 5.3.4 Message size exceeds the limit of {self.max_message_size}"
                    " bytes (max_message_size); closing connection"
                )
                return
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # Keep the write side open: the commands already received are still answered
        # (a client may pipeline QUIT and half-close). TLS transports ignore this.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._client_ip is not None and self.limiter is not None:
            self.limiter.release(self._client_ip)
            self.limiter.sessions.discard(self)
            self._client_ip = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self.transport = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # ------------------------------------------------------------------ for the app

    @property
    def tls_active(self) -> bool:
        return self.implicit_tls or self._starttls_done

    @property
    def in_transaction(self) -> bool:
        """True between MAIL and the end of DATA: shutdown waits for these."""
        return bool(self.envelope.mail_from)

    def shutdown(self) -> None:
        """Say goodbye (RFC 5321 §3.8: 421 when the service is closing) and close."""
        self._close_with("421 4.3.2 Service shutting down, try again later")

    # ------------------------------------------------------------------ I/O

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def reply(self, line: str) -> None:
        """Queue a reply; it is written when the session next waits for the client."""
        data = line.encode("utf-8", "surrogateescape") + b"\r\n"
        self._out.append(data)
        self._out_size += len(data)

    def _flush(self) -> None:
        transport = self.transport
        if self._out and transport is not None and not transport.is_closing():
            transport.write(self._out[0] if len(self._out) == 1 else b"".join(self._out))
        self._out.clear()
        self._out_size = 0

    async def _wait_input(self) -> None:
        """Write what is queued, then wait for more bytes from the client."""
        self._flush()
        if self._write_paused and not self._lost:
            # The client is not reading its replies: stop reading its commands too.
            self._drain = self._loop.create_future()
            await self._drain
        if self._lost or self._eof or self.transport is None or self.transport.is_closing():
            raise _Closed
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _readline(self) -> bytes:
        """The next line without its CRLF (or bare LF). Raises _TooLong after reading
        an over-long line to its end."""
        buf = self._buf
        scanned = 0
        while True:
            i = buf.find(b"\n", scanned)
            if i >= 0:
                line = bytes(buf[:i])
                del buf[: i + 1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if self._out_size > _FLUSH_AT:
                    self._flush()
                return line
            if len(buf) > _LINE_BUFFER:
                await self._skip_line()
                raise _TooLong
            scanned = len(buf)
            await self._wait_input()

    async def _skip_line(self) -> None:
        buf = self._buf
        while True:
            i = buf.find(b"\n")
            if i >= 0:
                del buf[: i + 1]
                return
            buf.clear()
            await self._wait_input()

    def _close_with(self, line: str) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.reply(line)
        self._flush()
        transport.close()

    # ------------------------------------------------------------------ timeout

    def _touch(self) -> None:
        self._deadline = self._loop.time() + self.timeout

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        now = self._loop.time()
        if self._busy or now < self._deadline:
            # One timer per session, moved lazily: commands only push the deadline.
            when = now + self.timeout if self._busy else self._deadline
            self._timer = self._loop.call_at(when, self._on_timer)
            return
        # RFC 5321 §4.5.3.2: say why before closing an idle or too slow session.
        self._close_with(
            f"421 4.4.2 {self.hostname} Timeout: no complete command within"
            f" {self.timeout:g} s (smtp.timeout); closing connection"
        )

    async def _untimed(self, awaitable: Any) -> Any:
        """Run handler work with the session's timer off: smtp.timeout is the client's
        allowance, not ours (waiting on the database under load must not cut a session
        mid-accept and make its client resend a committed message)."""
        self._busy = True
        try:
            return await awaitable
        finally:
            self._busy = False
            self._touch()

    # ------------------------------------------------------------------ the session

    async def _serve(self) -> None:
        try:
            self.reply(f"220 {self.hostname} {self.ident}")
            bogus = _BOGUS_LIMIT
            while self.transport is not None and not self.transport.is_closing():
                try:
                    line = await self._readline()
                except _TooLong:
                    self.reply("500 5.5.6 Command line too long")
                    continue
                if len(line) + 2 > _MAIL_LIMIT:
                    self.reply("500 5.5.6 Command line too long")
                    continue
                command, _, rest = line.partition(b" ")
                if not command:
                    self.reply("500 5.5.2 Error: bad syntax")
                    continue
                try:
                    verb = command.decode("ascii").upper()
                except UnicodeDecodeError:
                    self.reply("500 5.5.2 Error: bad syntax")
                    continue
                if verb not in _KNOWN:
                    bogus -= 1
                    if bogus < 1:
                        self._close_with("502 5.5.1 Too many unrecognized commands, goodbye.")
                        return
                    self.reply(f'500 5.5.2 Error: command "{verb[:32]}" not recognized')
                    continue
                limit = _MAIL_LIMIT if verb == "MAIL" and self.session_extended else 0
                if len(line) + 2 > (limit or _COMMAND_LIMIT):
                    self.reply("500 5.5.6 Command line too long")
                    continue
                # RFC 5321 allows UTF-8 only in SMTPUTF8 addresses; surrogateescape keeps
                # any other octets recoverable instead of failing the command.
                arg = rest.strip().decode("utf-8", "surrogateescape") if rest else ""
                self._touch()
                try:
                    await self._dispatch(verb, arg)
                except (_Closed, ConnectionError):
                    raise
                except Exception:
                    log.exception(
                        "smtp listener=%s client=%s command %s failed",
                        self.listener,
                        self._client_ip,
                        verb,
                    )
                    self.reply("451 4.3.0 Internal error, try again later")
        except (_Closed, ConnectionError):
            pass
        except asyncio.CancelledError:
            log.info("smtp listener=%s client=%s session cancelled", self.listener, self._client_ip)
            raise
        finally:
            self._flush()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    @property
    def session_extended(self) -> bool:
        return self.session is not None and self.session.extended_smtp

    async def _dispatch(self, verb: str, arg: str) -> None:
        if verb == "MAIL":
            await self.smtp_MAIL(arg)
        elif verb == "RCPT":
            await self.smtp_RCPT(arg)
        elif verb == "DATA":
            await self.smtp_DATA(arg)
        elif verb == "EHLO":
            self.smtp_EHLO(arg)
        elif verb == "HELO":
            self.smtp_HELO(arg)
        elif verb == "QUIT":
            if arg:
                self.reply("501 5.5.2 Syntax: QUIT")
                return
            self._close_with("221 2.0.0 Bye")
            raise _Closed
        elif verb == "RSET":
            if arg:
                self.reply("501 5.5.2 Syntax: RSET")
                return
            self.envelope = Envelope()
            self.reply("250 2.0.0 OK")
        elif verb == "NOOP":
            self.reply("250 2.0.0 OK")
        elif verb == "STARTTLS":
            await self.smtp_STARTTLS(arg)
        elif verb == "AUTH":
            await self.smtp_AUTH(arg)
        elif verb == "HELP":
            self.smtp_HELP(arg)
        elif verb == "VRFY":
            self.smtp_VRFY(arg)

    def _helo_needed(self, helo: str = "HELO") -> bool:
        assert self.session is not None
        if not self.session.host_name:
            self.reply(f"503 5.5.1 Error: send {helo} first")
            return True
        return False

    def _auth_needed(self) -> bool:
        assert self.session is not None
        if self.require_auth and not self.session.authenticated:
            self.reply("530 5.7.0 Authentication required")
            return True
        return False

    def smtp_HELO(self, hostname: str) -> None:
        if not hostname:
            self.reply("501 5.5.2 Syntax: HELO hostname")
            return
        assert self.session is not None
        self.envelope = Envelope()
        self.session.extended_smtp = False
        self.session.host_name = hostname
        self.reply(f"250 {self.hostname}")

    def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            self.reply("501 5.5.2 Syntax: EHLO hostname")
            return
        assert self.session is not None
        self.envelope = Envelope()
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [self.hostname, f"SIZE {self.max_message_size}", "8BITMIME", "SMTPUTF8"]
        lines += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and not self.tls_active:
            lines.append("STARTTLS")
        if self.tls_active:
            lines.append("AUTH PLAIN LOGIN")
        for line in lines:
            self.reply(f"250-{line}")
        self.reply("250 HELP")

    def _available(self) -> list[str]:
        names = [*list(_COMMANDS), "VRFY"]
        if self.tls_context is not None:
            names.append("STARTTLS")
        return sorted(names)

    def smtp_HELP(self, arg: str) -> None:
        if self._auth_needed():
            return
        if arg:
            verb = arg.upper()
            if verb in self._available():
                text = _SYNTAX[verb]
                if verb in ("MAIL", "RCPT") and self.session_extended:
                    text += _PARAMS_SYNTAX
                self.reply(f"250 2.0.0 Syntax: {text}")
                return
            self.reply(f"501 5.5.4 Supported commands: {' '.join(self._available())}")
            return
        self.reply(f"250 2.0.0 Supported commands: {' '.join(self._available())}")

    def smtp_VRFY(self, arg: str) -> None:
        if self._auth_needed():
            return
        if not arg:
            self.reply("501 5.5.2 Syntax: VRFY <address>")
            return
        address, _ = parse_path(arg)
        if address is None:
            self.reply(f"502 5.5.4 Could not VRFY {arg}")
            return
        # RFC 5321 §3.5.3: 252 when the server will not verify but will accept.
        self.reply("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    async def _apply_trust(self) -> None:
        """listen.trusted_networks: at the first MAIL without AUTH, a client on a trusted
        network becomes that network's account (relay/smtp/trusted.py)."""
        assert self.session is not None
        lookup = getattr(self.event_handler, "trusted_account", None)
        if lookup is None:
            return
        peer = self.session.peer
        account = await self._untimed(lookup(peer[0] if isinstance(peer, tuple) else str(peer)))
        if account is not None:
            self.session.authenticated = True
            self.session.auth_data = account

    def _path(self, keyword: str, arg: str, syntax: str) -> tuple[str, list[str]] | None:
        """The address and upper-cased parameters of MAIL/RCPT, or None (replied)."""
        assert self.session is not None
        if self.session.extended_smtp:
            syntax += _PARAMS_SYNTAX
        if arg[: len(keyword)].upper() != keyword:
            self.reply(f"501 5.5.2 Syntax: {syntax}")
            return None
        address, rest = parse_path(arg[len(keyword) :])
        if address is None:
            self.reply("553 5.1.3 Error: malformed address")
            return None
        if not address or (rest.strip() and not self.session.extended_smtp):
            self.reply(f"501 5.5.2 Syntax: {syntax}")
            return None
        return address, rest.upper().split()

    async def smtp_MAIL(self, arg: str) -> None:
        if arg and _unbalanced_path(arg):
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address> (unbalanced < >)")
            return
        if self._helo_needed():
            return
        assert self.session is not None
        if not self.session.authenticated:
            await self._apply_trust()
        if self._auth_needed():
            return
        parsed = self._path("FROM:", arg, "MAIL FROM: <address>")
        if parsed is None:
            return
        address, options = parsed
        if self.envelope.mail_from:
            self.reply("503 5.5.1 Error: nested MAIL command")
            return
        params = _params(options)
        syntax = "501 5.5.2 Syntax: MAIL FROM: <address>" + _PARAMS_SYNTAX
        if params is None:
            self.reply(syntax)
            return
        if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            self.reply("501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME")
            return
        smtputf8 = params.pop("SMTPUTF8", False)
        if not isinstance(smtputf8, bool):
            self.reply("501 5.5.4 Error: SMTPUTF8 takes no arguments")
            return
        size = params.pop("SIZE", None)
        if size is not None:
            if isinstance(size, bool) or not size.isdigit():
                self.reply(syntax)
                return
            if int(size) > self.max_message_size:
                # RFC 1870 §6.1: refuse at MAIL when the declared size is over the limit.
                self.reply(
                    f"552 5.3.4 Message size exceeds the limit of {self.max_message_size}"
                    " bytes (max_message_size)"
                )
                return
        if params:
            self.reply("555 5.5.4 MAIL FROM parameters not recognized or not implemented")
            return
        # Set on every MAIL: a refused MAIL leaves the envelope for the next one.
        self.envelope.declared_size = 0 if size is None else int(size)
        status = await self._untimed(
            self.event_handler.handle_MAIL(self, self.session, self.envelope, address, options)
        )
        self.reply(with_enhanced_code(status))

    async def smtp_RCPT(self, arg: str) -> None:
        if arg and _unbalanced_path(arg):
            self.reply("501 5.5.4 Syntax: RCPT TO:<address> (unbalanced < >)")
            return
        if self._helo_needed() or self._auth_needed():
            return
        if not self.envelope.mail_from:
            self.reply("503 5.5.1 Error: need MAIL command")
            return
        parsed = self._path("TO:", arg, "RCPT TO: <address>")
        if parsed is None:
            return
        address, options = parsed
        params = _params(options)
        if params is None:
            self.reply("501 5.5.2 Syntax: RCPT TO: <address>" + _PARAMS_SYNTAX)
            return
        if params:
            self.reply("555 5.5.4 RCPT TO parameters not recognized or not implemented")
            return
        status = await self._untimed(
            self.event_handler.handle_RCPT(self, self.session, self.envelope, address, options)
        )
        self.reply(with_enhanced_code(status))

    async def smtp_DATA(self, arg: str) -> None:
        if self._helo_needed() or self._auth_needed():
            return
        if not self.envelope.rcpt_tos:
            self.reply("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            self.reply("501 5.5.2 Syntax: DATA")
            return
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        self._data_bytes = 0
        try:
            body = await self._read_body()
        finally:
            self._data_bytes = None
        envelope = self.envelope
        if body.state is DataState.TOO_LONG:
            self.envelope = Envelope()
            self.reply("500 5.5.6 Line too long (see RFC5321 4.5.3.1.6)")
            return
        if body.state is DataState.TOO_MUCH:
            self.envelope = Envelope()
            self.reply(
                f"552 5.3.4 Message size exceeds the limit of {self.max_message_size}"
                " bytes (max_message_size)"
            )
            return
        envelope.original_content = body.content
        try:
            # The envelope stays the session's until the answer: shutdown waits for it.
            status = await self._untimed(
                self.event_handler.handle_DATA(self, self.session, envelope)
            )
        finally:
            self.envelope = Envelope()
        self.reply(with_enhanced_code(status))

    async def _read_body(self) -> Body:
        buf = self._buf
        scanned = 0
        while True:
            end = body_end(buf, scanned)
            if end >= 0:
                raw = bytes(buf[:end])
                del buf[:end]
                return finish(raw, self.max_message_size, self.line_length_limit)
            scanned = len(buf)
            await self._wait_input()

    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self.reply("501 5.5.2 Syntax: STARTTLS")
            return
        if self.tls_context is None or self.tls_active:
            # Implicit TLS (465) or already upgraded: RFC 3207 §4 allows one STARTTLS.
            self.reply("454 4.7.0 TLS not available")
            return
        transport = self.transport
        assert transport is not None
        self.reply("220 2.0.0 Ready to start TLS")
        self._flush()
        # RFC 3207 §5 (CVE-2011-0411): plaintext pipelined after STARTTLS is discarded.
        self._buf.clear()
        try:
            new = await self._untimed(
                self._loop.start_tls(
                    transport,
                    self,
                    self.tls_context,
                    server_side=True,
                    ssl_handshake_timeout=self.timeout,
                )
            )
        except (OSError, ssl.SSLError) as exc:
            log.info(
                "smtp listener=%s client=%s outcome=tls_failed error=%r",
                self.listener,
                self._client_ip,
                exc,
            )
            transport.close()
            raise _Closed from exc
        if new is None or self._lost:
            raise _Closed
        self.transport = new
        self._starttls_done = True
        self._eof = False
        # RFC 3207 §4.2: forget everything the client said before TLS.
        peer = self.session.peer if self.session is not None else None
        self.session = Session(peer)
        self.envelope = Envelope()
        metrics.smtp_connection(self.listener, True, True)

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.tls_active:
            self.reply("530 5.7.0 Must issue a STARTTLS command first")
            return
        if self._helo_needed("EHLO"):
            return
        assert self.session is not None
        if not self.session.extended_smtp:
            self.reply("500 5.5.2 Error: command 'AUTH' not recognized")
            return
        if self.session.authenticated:
            self.reply("503 5.5.1 Already authenticated")
            return
        if self.envelope.mail_from:
            # RFC 4954 §4: AUTH is not permitted during a mail transaction.
            self.reply("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        args = arg.split()
        if not args:
            self.reply("501 5.5.2 Not enough value")
            return
        if len(args) > 2:
            self.reply("501 5.5.2 Too many values")
            return
        mechanism = args[0].upper()  # RFC 4954 §4: mechanism names are case-insensitive
        if mechanism == "PLAIN":
            creds = await self._auth_plain(args)
        elif mechanism == "LOGIN":
            creds = await self._auth_login(args)
        else:
            self.reply("504 5.5.4 Unrecognized authentication type")
            return
        if creds is None:
            return  # already answered
        try:
            user, secret = creds[0].decode("utf-8"), creds[1].decode("utf-8")
        except UnicodeDecodeError:
            self.reply("535 5.7.8 Authentication credentials invalid")
            return
        peer = self.session.peer
        ip = peer[0] if isinstance(peer, tuple) else str(peer)
        decision = await self._untimed(self.event_handler.authenticate(user, secret, ip))
        metrics.smtp_auth(self.listener, decision.reply)  # metrics
        if decision.ok:
            self.session.authenticated = True
            self.session.auth_data = decision.account
        self.reply(decision.reply)

    async def _challenge(self, challenge: bytes) -> bytes | None:
        """RFC 4954 §4: a 334 challenge and the client's base64 answer (None: replied)."""
        self.reply("334 " + base64.b64encode(challenge).decode())
        try:
            line = await self._readline()
        except _TooLong:
            self.reply("500 5.5.6 Command line too long")
            return None
        blob = line.strip()
        if blob == b"*":
            self.reply("501 5.7.0 Auth aborted")
            return None
        return self._b64(blob, "Can't decode base64")

    def _b64(self, value: bytes, text: str = "Cannot decode base64") -> bytes | None:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            self.reply(f"501 5.5.2 {text}")
            return None

    async def _auth_plain(self, args: list[str]) -> tuple[bytes, bytes] | None:
        if len(args) == 1:
            blob = await self._challenge(b"")
        else:
            blob = self._b64(args[1].encode("utf-8", "surrogateescape"))
        if blob is None:
            return None
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            self.reply("501 5.5.2 Cannot split AUTH PLAIN value")
            return None
        return parts[1], parts[2]

    async def _auth_login(self, args: list[str]) -> tuple[bytes, bytes] | None:
        if len(args) == 1:
            login = await self._challenge(b"Username:")
        else:
            login = self._b64(args[1].encode("utf-8", "surrogateescape"))
        if login is None:
            return None
        password = await self._challenge(b"Password:")
        if password is None:
            return None
        return login, password


__all__ = ["ConnectionLimiter", "Envelope", "RelaySMTP", "Session", "with_enhanced_code"]
