"""Reputation checks: suspended accounts (MAIL), blocklisted recipients and per-domain
suppressions (RCPT), and the one exception to "no relay without AUTH": our own bounce and
unsubscribe addresses on port 25.

A refused RCPT refuses only that recipient; the others of the message go through.
``rejected`` events are written by the SMTP handler's on_refusal (relay/events/emit.py).
"""

from __future__ import annotations

import time

from relay.model import AccountStatus, Stage, Verdict
from relay.policy.checks import RequireAuth, domain_of
from relay.policy.engine import Request
from relay.queue import reputation as q
from relay.queue.store import Store
from relay.reputation.service import Reputation


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


class RequireAuthOrInbound(RequireAuth):
    """No open relay, except mail to our bounce/unsubscribe addresses (port 25 only)."""

    def __init__(self, reputation: Reputation) -> None:
        self.reputation = reputation

    async def __call__(self, request: Request) -> Verdict | None:
        if (
            request.account is None
            and request.listener == "smtp"
            and request.rcpt is not None
            and await self.reputation.is_inbound(request.rcpt)
        ):
            return None
        return await super().__call__(request)


class AccountSuspended:
    """Seeds: sending stops automatically when too much of it bounces or is reported."""

    name = "account_suspended"
    stages = frozenset({Stage.MAIL})

    def __init__(self, store: Store) -> None:
        self.store = store

    async def __call__(self, request: Request) -> Verdict | None:
        if request.account is None:
            return None
        state = await q.account_state(self.store, request.account.id)
        if state is None or state.status is not AccountStatus.SUSPENDED:
            return None
        since = f" since {_day(state.suspended_at)}" if state.suspended_at else ""
        why = state.suspended_reason or q.BY_OPERATOR
        return Verdict(
            550,
            "5.7.1",
            f"Account {state.name} is suspended{since}: {why};"
            f" `relay account resume {state.name}` lifts it",
            self.name,
        )


class Blocklisted:
    """RCPT to an address that hard-bounced recently: 550 5.1.1, with when, why and how to
    get it off the list. The handler's on_refusal writes the ``rejected`` event (reason
    ``blocklisted``), which the suspension window counts."""

    name = "blocklisted"
    stages = frozenset({Stage.RCPT})

    def __init__(self, store: Store) -> None:
        self.store = store

    async def __call__(self, request: Request) -> Verdict | None:
        if request.account is None or request.rcpt is None:
            return None
        return self.verdict(await q.blocklist_get(self.store, request.rcpt))

    def verdict(self, entry: q.BlockEntry | None) -> Verdict | None:
        if entry is None:
            return None
        reason = " ".join(entry.reason.split())[:200]
        verdict = Verdict(
            550,
            "5.1.1",
            f"<{entry.address}> is on the blocklist since {_day(entry.created_at)}"
            f" (reason: {reason}) until {_day(entry.expires_at)};"
            f" if the address works again: `relay blocklist remove {entry.address}`",
            self.name,
        )
        return verdict


class Suppressed:
    """RCPT to an address that unsubscribed from (or complained about) the sender domain."""

    name = "suppressed"
    stages = frozenset({Stage.RCPT})

    def __init__(self, store: Store) -> None:
        self.store = store

    async def __call__(self, request: Request) -> Verdict | None:
        if request.account is None or request.rcpt is None or not request.mail_from:
            return None
        dom = domain_of(request.mail_from)
        return self.verdict(dom, await q.suppression_get(self.store, dom, request.rcpt))

    def verdict(self, dom: str, entry: q.Suppression | None) -> Verdict | None:
        if entry is None:
            return None
        what = "reported mail from" if entry.reason == "complaint" else "unsubscribed from"
        verdict = Verdict(
            550,
            "5.7.1",
            f"<{entry.address}> {what} {dom} on {_day(entry.created_at)}: {dom} may not send"
            f" to it any more (`relay suppression remove {entry.address} --domain {dom}`)",
            self.name,
        )
        return verdict
