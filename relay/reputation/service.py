"""The reputation service: what the worker, the port-25 listener, the HTTP unsubscribe
endpoint and the policy checks share — token secret, our inbound addresses, bounce and
complaint processing, and the suspension decision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from relay.config import Config
from relay.errors import StoreUnavailable
from relay.model import AccountStatus, Claim, EventKind, Outcome, RecipientStatus
from relay.queue import reputation as q
from relay.queue.store import Store
from relay.reputation.arf import parse_arf
from relay.reputation.classify import BounceClass, classify
from relay.reputation.dsn import parse_dsn
from relay.reputation.tokens import TokenKind, make_token, read_token, split_local

log = logging.getLogger("relay.reputation")

#: local parts accepted without AUTH on port 25 (with or without +TOKEN)
INBOUND_TAGS = frozenset({"bounce", "unsubscribe", "fbl"})


# Reports above this are parsed in a thread: MIME parsing of a few MB takes long enough
# to stall other SMTP sessions.
_THREAD_PARSE_BYTES = 256 * 1024
T = TypeVar("T")


async def _off_loop(fn: Callable[[bytes], T], data: bytes) -> T:
    if len(data) > _THREAD_PARSE_BYTES:
        return await asyncio.to_thread(fn, data)
    return fn(data)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".>")


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    domain: str
    address: str
    new: bool


class Reputation:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg
        self.rcfg = cfg.reputation
        self.store = store
        self._secret: bytes | None = (
            self.rcfg.secret.encode() if self.rcfg.secret is not None else None
        )

    # ------------------------------------------------------------------ addresses, tokens

    @property
    def bounce_domain(self) -> str:
        return (self.rcfg.bounce_domain or self.cfg.hostname).lower().rstrip(".")

    @property
    def public_url(self) -> str:
        base = self.rcfg.public_url or self.cfg.http.public_url
        if not base:
            base = f"http://{self.cfg.http.listen}" if self.cfg.http.listen else "http://localhost"
        return base.rstrip("/")

    async def secret(self) -> bytes:
        if self._secret is None:
            self._secret = await q.token_secret(self.store)
        return self._secret

    async def token(self, kind: TokenKind, recipient_id: int) -> str:
        return make_token(await self.secret(), kind, recipient_id)

    async def read(self, kind: TokenKind, token: str) -> int | None:
        return read_token(await self.secret(), kind, token)

    async def is_inbound(self, address: str) -> bool:
        """A bounce/unsubscribe address of one of our domains (port 25, no AUTH)."""
        tag, _token, dom = split_local(address)
        if tag not in INBOUND_TAGS or not dom:
            return False
        if dom in (self.bounce_domain, self.cfg.hostname.lower()):
            return True
        d = await self.store.get_domain(dom)
        return d is not None

    # ------------------------------------------------------------------ outcomes

    async def after_outcomes(self, claims: Sequence[Claim], outcomes: dict[int, Outcome]) -> None:
        """Hard bounces from the MX: log them, blocklist recipient-class ones, re-rate."""
        bounces: list[q.Bounce] = []
        for c in claims:
            o = outcomes.get(c.recipient_id)
            if o is None or o.status is not RecipientStatus.BOUNCED:
                continue
            cls = classify(o.reply)
            bounces.append(
                q.Bounce(c.address, cls.value, o.reply, "smtp", c.account_id, c.message_id, o.mx)
            )
            if cls is BounceClass.REPUTATION:
                # Counted against the sending IP (one pool today), not the address.
                now = self.store.clock()
                day = now - now % 86400
                await self.store.incr_counter(
                    f"reputation_refusal:{o.mx or '-'}", day, 1, day + 8 * 86400
                )
                log.warning(
                    "reputation refusal rcpt_domain=%s mx=%s reply=%r",
                    c.rcpt_domain,
                    o.mx,
                    o.reply[:200],
                )
        if not bounces:
            return
        await q.record_bounces(self.store, bounces, self.rcfg.blocklist_days)
        for account_id in {b.account_id for b in bounces if b.account_id is not None}:
            await self.evaluate(account_id)

    # ------------------------------------------------------------------ suspension

    async def evaluate(self, account_id: int) -> bool:
        """Suspend the account if a rate crossed its threshold; True if suspended now."""
        state = await q.account_state(self.store, account_id)
        if state is None or state.status is AccountStatus.SUSPENDED:
            return False
        stats = await q.window_stats(self.store, account_id, self.rcfg.window_seconds)
        hours = self.rcfg.window_seconds / 3600
        reason = None
        if stats.total >= self.rcfg.min_sample and stats.bad_rate >= self.rcfg.bounce_threshold:
            reason = (
                f"hard-bounce+blocklisted rate {stats.bad_rate:.1%}"
                f" ({stats.hard + stats.refused}/{stats.total}) reached the threshold"
                f" {self.rcfg.bounce_threshold:.1%} (reputation.bounce_threshold)"
                f" over the last {hours:g} h"
            )
        elif (
            stats.sent >= self.rcfg.min_sample
            and stats.complaint_rate >= self.rcfg.complaint_threshold
        ):
            reason = (
                f"complaint rate {stats.complaint_rate:.2%} ({stats.complaints}/{stats.sent})"
                f" reached the threshold {self.rcfg.complaint_threshold:.2%}"
                f" (reputation.complaint_threshold) over the last {hours:g} h"
            )
        if reason is None:
            return False
        done = await q.suspend(
            self.store,
            account_id,
            reason,
            {
                "bad_rate": stats.bad_rate,
                "complaint_rate": stats.complaint_rate,
                "sample": stats.total,
            },
        )
        if done:
            log.warning("account suspended account=%s reason=%r", state.name, reason)
        return done

    # ------------------------------------------------------------------ unsubscribe

    async def unsubscribe(self, recipient_id: int, via: str) -> Unsubscribed | None:
        ref = await q.recipient_ref(self.store, recipient_id)
        if ref is None:
            return None
        dom = domain_of(ref.mail_from)
        new = await q.suppression_add(
            self.store,
            dom,
            ref.address,
            "unsubscribe",
            account_id=ref.account_id,
            message_id=ref.message_id,
            data={"via": via},
        )
        return Unsubscribed(dom, ref.address.lower(), new)

    # ------------------------------------------------------------------ inbound mail

    async def process_inbound(self, mail_from: str, rcpts: Sequence[str], data: bytes) -> str:
        """Handle one mail for our bounce/unsubscribe addresses; return the SMTP reply.

        The mail is stored whatever it holds (parsed or not) before 250 is answered."""
        try:
            kind, summary = await self._process(mail_from, rcpts, data)
            await q.store_report(self.store, kind, mail_from, ",".join(rcpts), summary, data)
        except StoreUnavailable:
            return "451 4.3.0 Temporary failure storing the report, try again later"
        log.info(
            "inbound report kind=%s from=<%s> rcpts=%s summary=%r",
            kind,
            mail_from,
            ",".join(rcpts),
            summary[:200],
        )
        return f"250 2.0.0 Ok: {kind} report received"

    async def _ref_from(self, pairs: Sequence[tuple[str, str]]) -> q.RecipientRef | None:
        for tag, token in pairs:
            kind = TokenKind.UNSUBSCRIBE if tag == "unsubscribe" else TokenKind.BOUNCE
            rid = await self.read(kind, token)
            if rid is not None:
                ref = await q.recipient_ref(self.store, rid)
                if ref is not None:
                    return ref
        return None

    async def _process(self, mail_from: str, rcpts: Sequence[str], data: bytes) -> tuple[str, str]:
        parts = [split_local(r) for r in rcpts]
        unsub = [(tag, tok) for tag, tok, _ in parts if tag == "unsubscribe" and tok]
        if unsub:
            done = []
            for _tag, tok in unsub:
                rid = await self.read(TokenKind.UNSUBSCRIBE, tok)
                res = None if rid is None else await self.unsubscribe(rid, "mailto")
                if res is not None:
                    done.append(f"{res.address} from {res.domain}")
            if done:
                return "unsubscribe", "unsubscribed " + ", ".join(done)
            return "unparsed", "unsubscribe mail with an invalid token"
        verp = [(tag, tok) for tag, tok, _ in parts if tok]
        arf = await _off_loop(parse_arf, data)
        if arf is not None:
            ref = await self._ref_from([*arf.tokens, *verp])
            address = ref.address if ref else arf.original_rcpt_to
            dom = domain_of(ref.mail_from) if ref else domain_of(arf.original_from.strip(" >"))
            if not address or not dom:
                return "unparsed", f"ARF {arf.feedback_type} report naming no recipient"
            await q.suppression_add(
                self.store,
                dom,
                address,
                "complaint",
                account_id=ref.account_id if ref else None,
                message_id=ref.message_id if ref else None,
                kind=EventKind.COMPLAINED,
                data={"feedback_type": arf.feedback_type, "user_agent": arf.user_agent},
            )
            if ref is not None:
                await self.evaluate(ref.account_id)
            return "arf", f"{arf.feedback_type} complaint for {address} from {dom}"
        dsn = await _off_loop(parse_dsn, data)
        if dsn is None:
            return "unparsed", "neither a DSN nor an ARF report"
        ref = await self._ref_from(verp)
        bounces: list[q.Bounce] = []
        notes = []
        for r in dsn.recipients:
            if r.action not in ("failed", "delayed"):
                continue
            address = ref.address if ref is not None and len(dsn.recipients) == 1 else r.address
            hard = r.hard
            cls = r.bounce_class if hard else None
            await self.store.add_event(
                EventKind.BOUNCED,
                account_id=ref.account_id if ref else None,
                message_id=ref.message_id if ref else None,
                rcpt=address,
                data={
                    "class": "hard" if hard else "soft",
                    "bounce_class": cls.value if cls else None,
                    "status": r.status,
                    "diagnostic": r.diagnostic,
                    "source": "dsn",
                    "standard": dsn.standard,
                },
            )
            notes.append(f"{address} {r.status} {'hard' if hard else 'soft'}")
            if hard and cls is not None:
                bounces.append(
                    q.Bounce(
                        address,
                        cls.value,
                        r.diagnostic or f"DSN status {r.status}",
                        "dsn",
                        ref.account_id if ref else None,
                        ref.message_id if ref else None,
                    )
                )
        await q.record_bounces(self.store, bounces, self.rcfg.blocklist_days)
        if ref is not None and bounces:
            await self.evaluate(ref.account_id)
        return "dsn", "; ".join(notes) or "DSN without failed recipients"
