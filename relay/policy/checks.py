"""The spine's policy checks: no open relay, sender identity, recipient count.

Each check is a small class with a name and the stages it runs at, so later checks
(limits, blocklist, suppression) slot into the ordered list without touching SMTP code.
"""

from __future__ import annotations

import asyncio
import time

from relay.config import DatabaseConfig
from relay.health import free_space, room_for
from relay.model import DomainStatus, Stage, Verdict
from relay.policy.engine import Request
from relay.queue.store import Store


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


class RequireAuth:
    """No open relay: unauthenticated sessions never get mail relayed."""

    name = "relay_denied"
    stages = frozenset({Stage.RCPT})

    async def __call__(self, request: Request) -> Verdict | None:
        if request.account is None:
            return Verdict(
                550, "5.7.1", "Relay access denied: authenticate to send mail", self.name
            )
        return None


class SenderDomain:
    """MAIL FROM and the From: header must be a verified domain of the account."""

    name = "sender_domain"
    stages = frozenset({Stage.MAIL, Stage.DATA})

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _verdict(self, address: str, what: str, request: Request) -> Verdict | None:
        account = request.account
        if account is None:
            return None
        dom = domain_of(address)
        if not dom or "@" not in address:
            return Verdict(553, "5.1.7", f"{what} <{address}> is not a valid address", "bad_sender")
        d = await self.store.get_domain(dom)
        if d is None or d.account_id != account.id:
            return Verdict(
                550,
                "5.7.1",
                f"{what} domain {dom} is not a domain of account {account.name}:"
                f" add it with `relay domain add {dom} --account {account.name}`",
                self.name,
            )
        if d.status is DomainStatus.FAILED:
            broken = await _broken_records(self.store, dom)
            return Verdict(
                550,
                "5.7.1",
                f"{what} domain {dom} of account {account.name} failed its DNS check:"
                f" {broken}; fix it and run `relay domain verify {dom}`",
                self.name,
            )
        if d.status is not DomainStatus.VERIFIED:
            return Verdict(
                550,
                "5.7.1",
                f"{what} domain {dom} of account {account.name} is not verified"
                f" (status {d.status.value}): publish its DNS records and run"
                f" `relay domain verify {dom}`",
                self.name,
            )
        return None

    async def __call__(self, request: Request) -> Verdict | None:
        if request.stage is Stage.MAIL:
            if not request.mail_from:
                # The null reverse-path is for bounces (RFC 5321 §4.5.5), not submissions.
                return Verdict(550, "5.7.1", "The null sender <> may not submit mail", self.name)
            return await self._verdict(request.mail_from, "Sender", request)
        header_from = request.headers.get("from_address", "")
        if not header_from:
            return Verdict(550, "5.6.0", "The message has no valid From: header", "no_from")
        return await self._verdict(header_from, "From: header", request)


async def _broken_records(store: Store, name: str) -> str:
    """The broken record(s) from the domain's last stored DNS check, in plain words."""
    from relay.domains.service import broken_summary
    from relay.domains.verify import DomainCheck
    from relay.queue.domains import stored_checks

    check = DomainCheck.from_json(name, await stored_checks(store, name))
    summary = broken_summary(check) if check is not None else ""
    # RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets, code and CRLF included.
    if len(summary) > 300:
        summary = summary[:297] + "..."
    return summary or "see `relay domain records " + name + "`"


class QueueSpace:
    """MAIL: refuse while the disk under the SQLite queue is nearly full (Postfix's
    queue_minfree): 452 4.3.1 at MAIL, so the client keeps the message and tries later,
    instead of sending a body the disk cannot take (RFC 1870 §6.2 with SIZE=)."""

    name = "queue_space"
    stages = frozenset({Stage.MAIL})

    def __init__(self, db: DatabaseConfig, min_free: int, every: float = 1.0) -> None:
        self.db = db
        self.min_free = min_free
        self.every = every
        self._free: int | None = None
        self._at = -every

    async def free(self) -> int | None:
        """Free bytes, read again (on a thread) at most every ``every`` seconds."""
        now = time.monotonic()
        if now - self._at >= self.every:
            self._at = now  # sessions arriving meanwhile use the last reading
            self._free = await asyncio.to_thread(free_space, self.db)
        return self._free

    async def __call__(self, request: Request) -> Verdict | None:
        if self.min_free <= 0:
            return None
        free = await self.free()
        if free is None or room_for(free, self.min_free, request.size):
            return None
        mb = 1024 * 1024
        declared = f" for {request.size} bytes declared (SIZE)" if request.size else ""
        return Verdict(
            452,
            "4.3.1",
            f"Insufficient system storage{declared}: {free // mb} MB free for the queue,"
            f" {self.min_free // mb} MB kept free (smtp.min_free_space); try again later",
            self.name,
        )


class MaxRecipients:
    """RFC 5321 §4.5.3.1.8: refuse extra RCPTs with 452, the client sends them later."""

    name = "max_recipients"
    stages = frozenset({Stage.RCPT})

    def __init__(self, limit: int) -> None:
        self.limit = limit

    async def __call__(self, request: Request) -> Verdict | None:
        if len(request.recipients) >= self.limit:
            return Verdict(
                452,
                "4.5.3",
                f"Too many recipients: at most {self.limit} per message (max_recipients);"
                " send the rest in another message",
                self.name,
            )
        return None
