"""The SMTP handler: translates SMTP commands into policy requests and intake calls,
and verdicts back into replies. No SQL, no delivery, no business rules here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from relay.errors import StoreUnavailable
from relay.intake import Intake, ParsedMessage, parse
from relay.model import Account, Stage, Verdict
from relay.policy.engine import Policy, Request
from relay.queue.store import NewRecipient
from relay.smtp.auth import AuthDecision, Authenticator

log = logging.getLogger("relay.smtp")

STORE_DOWN = Verdict(451, "4.3.0", "Temporary failure storing the message, try again later")
# Bodies above this are normalised off the event loop: the regex pass over a few MB takes
# milliseconds that other sessions should not wait for.
_THREAD_PARSE_BYTES = 256 * 1024


def _ip(session: Any) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _bad_address(address: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in address) or len(address) > 512


class SMTPHandler:
    def __init__(
        self,
        *,
        listener: str,
        policy: Policy,
        intake: Intake,
        authenticator: Authenticator,
        on_accept: Callable[[str], None] | None = None,
    ) -> None:
        self.listener = listener
        self.policy = policy
        self.intake = intake
        self.authenticator = authenticator
        self.on_accept = on_accept

    async def authenticate(self, user: str, password: str, ip: str) -> AuthDecision:
        try:
            return await self.authenticator.verify(user, password, ip)
        except StoreUnavailable:
            return AuthDecision(None, "454 4.7.0 Temporary authentication failure")

    def _request(
        self, stage: Stage, session: Any, envelope: Any, mail_from: str | None = None, **kw: Any
    ) -> Request:
        account = session.auth_data if isinstance(session.auth_data, Account) else None
        return Request(
            stage=stage,
            listener=self.listener,
            client_ip=_ip(session),
            account=account,
            mail_from=mail_from if mail_from is not None else envelope.mail_from,
            recipients=tuple(envelope.rcpt_tos),
            **kw,
        )

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if _bad_address(address):
            return "553 5.1.3 Control characters are not allowed in addresses"
        verdict = await self.policy.check(
            self._request(Stage.MAIL, session, envelope, mail_from=address)
        )
        if not verdict.ok:
            self._log_refusal(session, address, None, verdict)
            return verdict.reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if _bad_address(address) or "@" not in address:
            return "553 5.1.3 Recipient address must be user@domain without control characters"
        verdict = await self.policy.check(
            self._request(Stage.RCPT, session, envelope, rcpt=address)
        )
        if not verdict.ok:
            self._log_refusal(session, envelope.mail_from, address, verdict)
            return verdict.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        started = time.monotonic()
        raw: bytes = envelope.original_content or b""
        parsed: ParsedMessage
        if len(raw) > _THREAD_PARSE_BYTES:
            parsed = await asyncio.to_thread(parse, raw)
        else:
            parsed = parse(raw)
        req = self._request(
            Stage.DATA, session, envelope, headers=parsed.headers, size=len(parsed.data)
        )
        verdict = await self.policy.check(req)
        if not verdict.ok:
            self._log_refusal(session, envelope.mail_from, None, verdict)
            return verdict.reply
        account = req.account
        assert account is not None  # RCPT refused everything for unauthenticated sessions
        protocol = "ESMTP"
        if getattr(server, "tls_active", False):
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        try:
            qid = await self.intake.accept(
                account_id=account.id,
                mail_from=envelope.mail_from,
                recipients=[NewRecipient(a) for a in envelope.rcpt_tos],
                parsed=parsed,
                helo=session.host_name or "",
                client_ip=_ip(session),
                protocol=protocol,
            )
        except Exception as exc:
            # Nothing was committed (the accept is one transaction): a temporary refusal
            # makes the client keep the message and try again.
            level = logging.WARNING if isinstance(exc, StoreUnavailable) else logging.ERROR
            log.log(level, "accept failed client=%s error=%r", _ip(session), exc)
            return STORE_DOWN.reply
        log.info(
            "smtp listener=%s client=%s account=%s from=<%s> rcpts=%d size=%d outcome=queued"
            " qid=%s ms=%.1f",
            self.listener,
            _ip(session),
            account.name,
            envelope.mail_from,
            len(envelope.rcpt_tos),
            len(parsed.data),
            qid,
            (time.monotonic() - started) * 1000,
        )
        if self.on_accept is not None:
            self.on_accept(qid)
        return f"250 2.0.0 Ok: queued as {qid}"

    def _log_refusal(self, session: Any, sender: str | None, rcpt: str | None, v: Verdict) -> None:
        account = session.auth_data.name if isinstance(session.auth_data, Account) else "-"
        log.info(
            "smtp listener=%s client=%s account=%s from=<%s> rcpt=<%s> outcome=refused"
            " reason=%s reply=%r",
            self.listener,
            _ip(session),
            account,
            sender or "",
            rcpt or "",
            v.reason,
            v.reply,
        )
