"""Bottom-level values shared by every layer: statuses, event kinds, verdicts.

Nothing here imports from the rest of the package, so every module may import it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RecipientStatus(enum.StrEnum):
    """Where one recipient of one message stands.

    queued -> sending -> delivered
                      -> deferred -> sending -> ... -> expired (max_age reached)
                      -> bounced (5xx, null MX)
    held: accepted but waiting for a budget (warm-up, quota) before it is due.
    sending is a lease: a worker owns the row until ``due_at`` passes, after which any
    worker may claim it again (crash recovery).
    """

    QUEUED = "queued"
    HELD = "held"
    SENDING = "sending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    DELETED = "deleted"

    @property
    def final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {
        RecipientStatus.DELIVERED,
        RecipientStatus.BOUNCED,
        RecipientStatus.EXPIRED,
        RecipientStatus.DELETED,
    }
)
#: statuses of mail not yet done, in the enum's order: the queue (final ones are history)
WAITING_STATUSES = tuple(s for s in RecipientStatus if s not in FINAL_STATUSES)
#: waiting statuses an operator's retry makes due now (a ``sending`` row is being delivered)
RETRYABLE_STATUSES = (RecipientStatus.QUEUED, RecipientStatus.HELD, RecipientStatus.DEFERRED)
#: statuses a worker may claim once ``due_at`` has passed
CLAIMABLE_STATUSES = (RecipientStatus.QUEUED, RecipientStatus.DEFERRED, RecipientStatus.SENDING)


class DomainStatus(enum.StrEnum):
    PENDING = "pending"
    VERIFIED = "verified"
    FAILED = "failed"


class AccountStatus(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class EventKind(enum.StrEnum):
    """The closed set of events relay reports (see docs/events.md)."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    HELD = "held"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    OPENED = "opened"
    UNSUBSCRIBED = "unsubscribed"
    COMPLAINED = "complained"
    BLOCKLISTED = "blocklisted"
    SUSPENDED = "suspended"
    DELETED = "deleted"
    DOMAIN_VERIFIED = "domain_verified"
    DOMAIN_FAILED = "domain_failed"


class Stage(enum.StrEnum):
    """SMTP transaction stages at which policy is asked."""

    CONNECT = "connect"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A policy answer: an SMTP reply code, its RFC 3463 enhanced code and text.

    ``reason`` is a short stable name (e.g. ``sender_domain``) used in events and
    metric labels, so the reply, the event and the metric say the same thing.
    """

    code: int
    enhanced: str
    text: str
    reason: str = "ok"

    @property
    def ok(self) -> bool:
        return self.code < 400

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


ACCEPT = Verdict(250, "2.0.0", "OK")


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    name: str
    status: AccountStatus
    settings: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Domain:
    id: int
    name: str
    account_id: int
    status: DomainStatus
    dkim_selector: str
    dkim_private_key: str
    dkim_algorithm: str = "rsa-sha256"
    warmup: bool = True


@dataclass(frozen=True, slots=True)
class Claim:
    """One recipient row a delivery worker has leased."""

    recipient_id: int
    message_id: str
    account_id: int
    mail_from: str
    address: str
    rcpt_domain: str
    attempts: int
    created_at: float
    # The message's size in bytes (message.size): delivery prepares a session's
    # messages a bounded number of bytes ahead of what it sends (worker.py).
    size: int = 0
    # The message said "TLS-Required: No" (RFC 8689): no MTA-STS, no require_tls.
    tls_optional: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt did for one recipient."""

    status: RecipientStatus
    reply: str
    mx: str | None = None
    tls: bool = False
    code: int | None = None
