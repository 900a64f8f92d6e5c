"""The SMTP handler: translates SMTP commands into policy requests and intake calls,
and verdicts back into replies. No SQL, no delivery, no business rules here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from relay import metrics
from relay.errors import StorageFull, StoreUnavailable
from relay.intake import Intake, ParsedMessage, parse
from relay.model import Account, Stage, Verdict
from relay.policy.engine import Policy, Request
from relay.queue.store import CounterLimitExceeded, NewRecipient, RateLimited
from relay.smtp.auth import AuthDecision, Authenticator
from relay.smtp.trusted import TrustedNetworks

log = logging.getLogger("relay.smtp")

#: (account, stage, sender, recipient, verdict) -> None; must not block (it schedules).
RefusalCallback = Callable[[Account, Stage, str | None, str | None, Verdict], None]

STORE_DOWN = Verdict(451, "4.3.0", "Temporary failure storing the message, try again later")
DISK_FULL = Verdict(
    452, "4.3.1", "Insufficient system storage: the queue's disk is full, try again later"
)
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
        on_refusal: RefusalCallback | None = None,
        inbound: Callable[[str, Sequence[str], bytes], Awaitable[str]] | None = None,
        trusted: TrustedNetworks | None = None,
    ) -> None:
        # listen.trusted_networks: clients there send as an account without AUTH.
        self.trusted = trusted
        # Unauthenticated mail that policy let through (our bounce/unsubscribe addresses
        # on port 25) goes here instead of the outbound queue.
        self.inbound = inbound
        self.listener = listener
        self.policy = policy
        self.intake = intake
        self.authenticator = authenticator
        self.on_accept = on_accept
        # Records the `rejected` event for authenticated accounts (relay/events/emit.py).
        self.on_refusal = on_refusal

    async def authenticate(self, user: str, password: str, ip: str) -> AuthDecision:
        try:
            return await self.authenticator.verify(user, password, ip)
        except StoreUnavailable:
            return AuthDecision(None, "454 4.7.0 Temporary authentication failure")

    async def trusted_account(self, ip: str) -> Account | None:
        """The account a client on a trusted network sends as (None: not trusted)."""
        if self.trusted is None:
            return None
        try:
            return await self.trusted.account_for(ip)
        except StoreUnavailable:
            return None  # fail safe: the session must AUTH (or is refused) as usual

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
            notes=envelope.notes,
            **kw,
        )

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if _bad_address(address):
            return "553 5.1.3 Control characters are not allowed in addresses"
        verdict = await self.policy.check(
            self._request(
                Stage.MAIL, session, envelope, mail_from=address, size=envelope.declared_size
            )
        )
        if not verdict.ok:
            self._log_refusal(session, address, None, verdict, Stage.MAIL)
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
            self._log_refusal(session, envelope.mail_from, address, verdict, Stage.RCPT)
            return verdict.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        started = time.monotonic()
        raw: bytes = envelope.original_content or b""
        if self.inbound is not None and not isinstance(session.auth_data, Account):
            # RCPT let unauthenticated mail through only for our bounce/unsubscribe
            # addresses (port 25); outbound DATA policy does not apply to it.
            reply = await self.inbound(envelope.mail_from or "", list(envelope.rcpt_tos), raw)
            log.info(
                "smtp listener=%s client=%s account=- from=<%s> rcpts=%d size=%d"
                " outcome=inbound reply=%r",
                self.listener,
                _ip(session),
                envelope.mail_from or "",
                len(envelope.rcpt_tos),
                len(raw),
                reply,
            )
            return reply
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
            self._log_refusal(session, envelope.mail_from, None, verdict, Stage.DATA)
            metrics.smtp_transaction(self.listener, "refused", started)  # metrics
            return verdict.reply
        account = req.account
        assert account is not None  # RCPT refused everything else for unauthenticated sessions
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
        except RateLimited as exc:
            # The rate tokens are taken in the accept transaction; nothing was committed.
            verdict = Verdict(451, "4.7.1", exc.text, "rate")
            self._log_refusal(session, envelope.mail_from, None, verdict, Stage.DATA)
            metrics.smtp_transaction(self.listener, "refused", started)  # metrics
            return verdict.reply
        except CounterLimitExceeded as exc:
            # The quota, counted in the accept transaction, ran out after DATA's check
            # (another session, another process): nothing was committed.
            text = str(exc)
            verdict = Verdict(451, "4.7.1", text[:1].upper() + text[1:], "daily_quota")
            self._log_refusal(session, envelope.mail_from, None, verdict, Stage.DATA)
            metrics.smtp_transaction(self.listener, "refused", started)  # metrics
            return verdict.reply
        except Exception as exc:
            # Nothing was committed (the accept is one transaction): a temporary refusal
            # makes the client keep the message and try again.
            level = logging.WARNING if isinstance(exc, StoreUnavailable) else logging.ERROR
            log.log(level, "accept failed client=%s error=%r", _ip(session), exc)
            metrics.smtp_transaction(self.listener, "failed", started)  # metrics
            return (DISK_FULL if isinstance(exc, StorageFull) else STORE_DOWN).reply
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
        metrics.smtp_transaction(self.listener, "queued", started, len(envelope.rcpt_tos))
        if self.on_accept is not None:
            try:
                self.on_accept(qid)
            except Exception:
                # The message is committed: the client must hear 250, or it would send
                # it again. Delivery still finds it on its next poll.
                log.exception("after-accept hook failed qid=%s", qid)
        return f"250 2.0.0 Ok: queued as {qid}"

    def _log_refusal(
        self,
        session: Any,
        sender: str | None,
        rcpt: str | None,
        v: Verdict,
        stage: Stage = Stage.DATA,
    ) -> None:
        if self.on_refusal is not None and isinstance(session.auth_data, Account):
            self.on_refusal(session.auth_data, stage, sender, rcpt, v)
        metrics.smtp_refused(self.listener, v.reason)  # metrics
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
