"""aiosmtpd's SMTP protocol, adjusted where a submission server must differ.

- EHLO advertises SIZE, 8BITMIME, PIPELINING, ENHANCEDSTATUSCODES, STARTTLS, and AUTH
  only once TLS is on (RFC 4954 §4: no plaintext passwords); implicit TLS (port 465,
  RFC 8314) counts as TLS.
- AUTH before TLS gets ``530 5.7.0`` (the brief's contract; aiosmtpd says 538).
- AUTH is verified asynchronously (database + scrypt off the event loop).
- Every reply carries an RFC 3463 enhanced status code, as ENHANCEDSTATUSCODES promises
  (RFC 2034 §3); aiosmtpd's built-in replies are given theirs here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import re
import warnings
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

from relay import metrics
from relay.smtp.data import DataState, read_body

log = logging.getLogger("relay.smtp")

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")

# aiosmtpd's fixed replies (by their text) and the enhanced code each should carry.
_LIBRARY_CODES: dict[str, str] = {
    "Error: bad syntax": "5.5.2",
    "Command line too long": "5.5.6",
    "Line too long (see RFC5321 4.5.3.1.6)": "5.5.6",
    "Error: strict ASCII mode": "5.6.7",
    "Error: need MAIL command": "5.5.1",
    "Error: need RCPT command": "5.5.1",
    "Error: nested MAIL command": "5.5.1",
    "Error: malformed address": "5.1.3",
    "Error: BODY can only be one of 7BIT, 8BITMIME": "5.5.4",
    "MAIL FROM parameters not recognized or not implemented": "5.5.4",
    "RCPT TO parameters not recognized or not implemented": "5.5.4",
    "Already authenticated": "5.5.1",
    "Not enough value": "5.5.2",
    "Too many values": "5.5.2",
    "TLS not available": "4.7.0",
    "Ready to start TLS": "2.0.0",
    "Bye": "2.0.0",
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
        if text.startswith("Syntax:") or text.startswith("Error: command"):
            enhanced = "5.5.2" if code.startswith("5") else "4.5.0"
        else:
            enhanced = {"2": "2.0.0", "4": "4.0.0", "5": "5.0.0"}.get(code[0], "")
    return f"{code} {enhanced} {text}" if enhanced else reply


# Bytes past max_message_size still read before an oversized DATA is cut off: the
# ".\r\n" terminator and the next transaction's pipelined MAIL/RCPT lines fit easily.
_DATA_SLACK = 64 * 1024


def _unbalanced_path(arg: str) -> bool:
    """An RFC 5321 §4.1.2 path opened with "<" and never closed (e.g. cut by a bare LF)."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    return rest.startswith("<") and ">" not in rest


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


class RelaySMTP(SMTP):
    """One SMTP session. ``listener`` names the port's role (submission/smtps/smtp)."""

    AuthLoginUsernameChallenge = "Username:"
    # RFC 5321 §4.5.3.1.6 caps text lines at 1000 octets, but a 500 in the middle of DATA
    # hides which rule was broken: longer lines are read and policy refuses the message
    # at end of DATA with 554 5.6.0 naming the rule (subject length, line length).
    line_length_limit = 64 * 1024
    AuthLoginPasswordChallenge = "Password:"

    def __init__(
        self,
        handler: Any,
        *,
        listener: str,
        implicit_tls: bool = False,
        require_auth: bool,
        max_message_size: int,
        limiter: ConnectionLimiter | None = None,
        **kwargs: Any,
    ) -> None:
        self.listener = listener
        self.limiter = limiter
        self._client_ip: str | None = None
        self.implicit_tls = implicit_tls
        self.max_message_size = max_message_size
        self._in_ehlo = False
        # Bytes received since "354"; None outside DATA (see data_received).
        self._data_bytes: int | None = None
        with warnings.catch_warnings():
            # We require TLS for AUTH ourselves (see smtp_AUTH), including implicit TLS,
            # which aiosmtpd's own check does not recognise.
            warnings.simplefilter("ignore")
            super().__init__(
                handler,
                auth_required=require_auth,
                auth_require_tls=False,
                data_size_limit=max_message_size,
                decode_data=False,
                enable_SMTPUTF8=True,
                **kwargs,
            )
        # aiosmtpd keeps command_size_limits on the class, shared by every session and
        # grown on every EHLO; each session gets its own.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)

    def connection_lost(self, error: Exception | None) -> None:
        if self._client_ip is not None and self.limiter is not None:
            self.limiter.release(self._client_ip)
            self.limiter.sessions.discard(self)
            self._client_ip = None
        if self.session is not None:
            super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self.session is None:
            return False
        result: bool | None = super().eof_received()
        return result

    @property
    def in_transaction(self) -> bool:
        """True between MAIL and the end of DATA: shutdown waits for these."""
        return self.envelope is not None and bool(self.envelope.mail_from)

    def shutdown(self) -> None:
        """Say goodbye (RFC 5321 §3.8: 421 when the service is closing) and close."""
        transport: Any = self.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                transport.write(b"421 4.3.2 Service shutting down, try again later\r\n")
            transport.close()

    @property
    def tls_active(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._client_ip is None and self.limiter is not None:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else str(peer)
            if not self.limiter.acquire(ip):
                # Refuse before aiosmtpd starts a session: one write, then close.
                msg = f"421 4.7.0 Too many connections from {ip} (limit {self.limiter.per_ip})"
                writer: Any = transport
                writer.write(msg.encode() + b"\r\n")
                metrics.smtp_connection_refused(self.listener)  # metrics
                transport.close()
                return
            self._client_ip = ip
            self.limiter.sessions.add(self)
        super().connection_made(transport)
        metrics.smtp_connection(self.listener, self.tls_active, self._tls_protocol is not None)
        if self.implicit_tls and self.session is not None and self.session.ssl is None:
            self.session.ssl = {"ssl_object": transport.get_extra_info("ssl_object")}

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = self._rewrite(status)
            self._data_bytes = 0 if status.startswith("354") else None
        await super().push(status)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._data_bytes is None:
            return
        self._data_bytes += len(data)
        # aiosmtpd reads an oversized message to its end before answering 552: a client
        # could hold the connection for an unbounded upload. Past the limit (plus slack
        # for the terminator and commands pipelined behind it, RFC 2920) we answer and
        # hang up (RFC 5321 §4.2.5 lets the server close after a failed DATA).
        if self._data_bytes > self.max_message_size + _DATA_SLACK:
            self._data_bytes = None
            transport: Any = self.transport
            if transport is not None and not transport.is_closing():
                log.info(
                    "smtp listener=%s client=%s outcome=refused reason=size_exceeded_cut",
                    self.listener,
                    self._client_ip,
                )
                transport.write(
                    f"552 5.3.4 Message size exceeds the limit of {self.max_message_size}"
                    " bytes (max_message_size); closing connection\r\n".encode()
                )
                transport.close()

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2: say why before closing an idle or too slow session.
        transport: Any = self.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                transport.write(
                    f"421 4.4.2 {self.hostname} Timeout: no complete command within"
                    f" {self._timeout_duration:g} s (smtp.timeout); closing connection\r\n".encode()
                )
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        # smtp.timeout is the client's allowance, not ours: while policy and intake work
        # (waiting on the database under load) the timer is off. aiosmtpd counts that time,
        # closed sessions mid-accept with 421 and made clients resend committed messages.
        handle = self._timeout_handle
        if handle is not None:
            handle.cancel()
        try:
            return await super()._call_handler_hook(command, *args)
        finally:
            if self.transport is not None:
                self._reset_timeout()

    async def _verify_untimed(self, user: str, secret: str, ip: str) -> Any:
        handle = self._timeout_handle
        if handle is not None:
            handle.cancel()  # scrypt off the loop is our time, as above
        try:
            return await self.event_handler.authenticate(user, secret, ip)
        finally:
            if self.transport is not None:
                self._reset_timeout()

    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg and _unbalanced_path(arg):
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address> (unbalanced < >)")
            return
        if self.session is not None and not self.session.authenticated:
            await self._apply_trust()
        await super().smtp_MAIL(arg)

    async def _apply_trust(self) -> None:
        """listen.trusted_networks: at the first MAIL without AUTH, a client on a trusted
        network becomes that network's account (relay/smtp/trusted.py)."""
        lookup = getattr(self.event_handler, "trusted_account", None)
        if lookup is None or self.session is None:
            return
        peer = self.session.peer
        account = await lookup(peer[0] if isinstance(peer, tuple) else str(peer))
        if account is not None:
            self.session.authenticated = True
            self.session.auth_data = account

    async def smtp_RCPT(self, arg: str | None) -> None:
        if arg and _unbalanced_path(arg):
            await self.push("501 5.5.4 Syntax: RCPT TO:<address> (unbalanced < >)")
            return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the body read in chunks (relay/smtp/data.py)."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            body = await read_body(self._reader, self.data_size_limit, self.line_length_limit)
        except asyncio.CancelledError:
            log.info("connection lost during DATA")
            self._writer.close()
            raise
        except asyncio.IncompleteReadError:
            # The client closed mid-body: nothing to answer, nothing accepted.
            self._writer.close()
            return
        if body.state is not DataState.OK:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            if body.state is DataState.TOO_LONG:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            else:
                await self.push("552 Error: Too much mail data")
            return
        self.envelope.content = body.content
        self.envelope.original_content = body.content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    smtp_DATA.__smtp_syntax__ = "DATA"  # type: ignore[attr-defined]  # for HELP, as @syntax
    smtp_DATA.__smtp_syntax_extended__ = None  # type: ignore[attr-defined]
    smtp_DATA.__smtp_syntax_when__ = None  # type: ignore[attr-defined]

    def _rewrite(self, status: str) -> str:
        if status.startswith("552 Error:"):
            return (
                f"552 5.3.4 Message size exceeds the limit of {self.max_message_size} bytes"
                " (max_message_size)"
            )
        if status.startswith("530 Must issue a STARTTLS"):
            return "530 5.7.0 Must issue a STARTTLS command first"
        if status.startswith("503 Error: send"):
            return "503 5.5.1 " + status[4:]
        if status.startswith("502 5.5.1 Too many unrecognized"):
            return status
        if status.startswith("500 Error: command"):
            return "500 5.5.2 " + status[4:]
        return with_enhanced_code(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.2 Syntax: EHLO hostname")
            return
        self._set_rset_state()  # type: ignore[no-untyped-call]
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        # RFC 1870 SIZE= (+10) and RFC 6531/6152 BODY=/SMTPUTF8 (+26) lengthen MAIL; set,
        # not added, so repeated EHLOs do not grow the limit.
        self.command_size_limits["MAIL"] = SMTP.command_size_limit + 26 + 10
        lines = [self.hostname, f"SIZE {self.max_message_size}", "8BITMIME", "SMTPUTF8"]
        lines += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        if self.tls_context and not self.tls_active:
            lines.append("STARTTLS")
        if self.tls_active:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        for line in lines[:-1]:
            await super().push(f"250-{line}")
        await super().push(f"250 {lines[-1]}")

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.tls_active:
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return
        await super().smtp_AUTH(arg)

    async def _check(self, login: bytes, password: bytes) -> AuthResult:
        try:
            user = login.decode("utf-8")
            secret = password.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False)
        assert self.session is not None
        peer = self.session.peer
        ip = peer[0] if isinstance(peer, tuple) else str(peer)
        decision = await self._verify_untimed(user, secret, ip)
        metrics.smtp_auth(self.listener, decision.reply)  # metrics
        if decision.ok:
            return AuthResult(
                success=True,
                handled=False,
                message=decision.reply,
                auth_data=decision.account,
            )
        if decision.reply.startswith("454"):
            await self.push(decision.reply)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=decision.reply)

    async def _b64(self, value: str) -> bytes | None:
        try:
            return base64.b64decode(value.encode(), validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Cannot decode base64")
            return None

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            decoded = await self._b64(args[1])
            if decoded is None:
                return AuthResult(success=False, handled=True)
            blob = decoded
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Cannot split AUTH PLAIN value")
            return AuthResult(success=False, handled=True)
        return await self._check(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if not isinstance(login, bytes):
                return AuthResult(success=False, handled=True)
        else:
            decoded = await self._b64(args[1])
            if decoded is None:
                return AuthResult(success=False, handled=True)
            login = decoded
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check(login, password)


__all__ = ["LoginPassword", "RelaySMTP", "with_enhanced_code"]
