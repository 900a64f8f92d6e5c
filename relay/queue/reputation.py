"""SQL of the reputation area: blocklist, suppression, bounce log, inbound reports and the
suspension window. Each function is one transaction on the Store (``_write``/``_read``)
and writes its events in that same transaction (outbox).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from relay.model import AccountStatus, EventKind, RecipientStatus
from relay.queue import meta
from relay.queue.limits import COUNTER_WINDOWS, windows_of
from relay.queue.store import Store
from relay.queue.tables import (
    account,
    account_reputation,
    blocklist,
    bounce_log,
    event,
    inbound_report,
    message,
    recipient,
    suppression,
)

_SECRET_KEY = "reputation_token_secret"
DAY = 86400.0
# due_at of mail held by a suspension: never due by itself (year 3000), so no scheduler
# releases it; only resume() does.
SUSPENDED_DUE = 32503680000.0


@dataclass(frozen=True, slots=True)
class BlockEntry:
    address: str
    reason: str
    source: str
    account_id: int | None
    account_name: str | None
    message_id: str | None
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class Suppression:
    domain: str
    address: str
    reason: str
    account_id: int | None
    created_at: float


@dataclass(frozen=True, slots=True)
class Bounce:
    """One hard bounce to log (and to blocklist when ``bounce_class`` is recipient)."""

    address: str
    bounce_class: str
    reply: str
    source: str
    account_id: int | None = None
    message_id: str | None = None
    mx: str | None = None


@dataclass(frozen=True, slots=True)
class RecipientRef:
    """What a VERP/unsubscribe token's recipient id points at."""

    recipient_id: int
    address: str
    message_id: str
    account_id: int
    mail_from: str


@dataclass(frozen=True, slots=True)
class WindowStats:
    since: float
    sent: int
    refused: int
    hard: int
    complaints: int

    @property
    def total(self) -> int:
        return self.sent + self.refused

    @property
    def bad_rate(self) -> float:
        return (self.hard + self.refused) / self.total if self.total else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.sent if self.sent else 0.0


@dataclass(frozen=True, slots=True)
class AccountState:
    account_id: int
    name: str
    status: AccountStatus
    suspended_at: float | None
    suspended_reason: str | None
    window_reset_at: float


# ---------------------------------------------------------------------- token secret


async def token_secret(store: Store) -> bytes:
    """The HMAC key kept in the database, made on first use (every node reads the same)."""
    return (await meta.shared_secret(store, _SECRET_KEY)).encode()


# ---------------------------------------------------------------------- blocklist


def _norm(address: str) -> str:
    return address.strip().strip("<>").lower()


async def _block(conn: Any, store: Store, b: Bounce, days: float, now: float) -> None:
    addr = _norm(b.address)
    values = {
        "reason": b.reply[:2000],
        "source": b.source,
        "account_id": b.account_id,
        "message_id": b.message_id,
        "created_at": now,
        "expires_at": now + days * DAY,
    }
    res = await conn.execute(blocklist.update().where(blocklist.c.address == addr).values(values))
    if res.rowcount == 0:
        await conn.execute(blocklist.insert().values(address=addr, **values))
    await conn.execute(
        event.insert().values(
            store._event_row(
                EventKind.BLOCKLISTED,
                now,
                b.account_id,
                b.message_id,
                addr,
                {"reason": b.reply, "source": b.source, "expires_at": now + days * DAY},
            )
        )
    )


async def blocklist_add(
    store: Store,
    address: str,
    reason: str,
    days: float,
    *,
    source: str = "manual",
    account_id: int | None = None,
) -> float:
    """Add or refresh an entry; return its expiry time."""
    now = store.clock()
    async with store._write() as conn:
        await _block(
            conn, store, Bounce(address, "recipient", reason, source, account_id), days, now
        )
    return now + days * DAY


# Read per RCPT: built once (issue 9). The address is the primary key: one row at most.
_BLOCKLIST_GET = (
    sa.select(
        blocklist.c.address,
        blocklist.c.reason,
        blocklist.c.source,
        blocklist.c.account_id,
        account.c.name.label("account_name"),
        blocklist.c.message_id,
        blocklist.c.created_at,
        blocklist.c.expires_at,
    )
    .select_from(blocklist.outerjoin(account, account.c.id == blocklist.c.account_id))
    .where(
        blocklist.c.expires_at > sa.bindparam("now"),
        blocklist.c.address == sa.bindparam("address"),
    )
)


def _block_entry(r: Any) -> BlockEntry:
    """A blocklist row joined with its account's name, as a value."""
    return BlockEntry(
        r.address,
        r.reason,
        r.source,
        r.account_id,
        r.account_name,
        r.message_id,
        r.created_at,
        r.expires_at,
    )


async def blocklist_get(store: Store, address: str) -> BlockEntry | None:
    params = {"now": store.clock(), "address": _norm(address)}
    rows = await store._read_rows(_BLOCKLIST_GET, params)
    return BlockEntry(*rows[0]) if rows else None  # the columns in BlockEntry's order


async def blocklist_list(
    store: Store,
    *,
    search: str | None = None,
    account_id: int | None = None,
    exact: str | None = None,
    limit: int = 1000,
) -> list[BlockEntry]:
    q = (
        sa.select(blocklist, account.c.name.label("account_name"))
        .select_from(blocklist.outerjoin(account, account.c.id == blocklist.c.account_id))
        .where(blocklist.c.expires_at > store.clock())
        .order_by(blocklist.c.created_at.desc())
        .limit(limit)
    )
    if exact is not None:
        q = q.where(blocklist.c.address == exact)
    if search:
        q = q.where(blocklist.c.address.contains(search.lower(), autoescape=True))
    if account_id is not None:
        q = q.where(blocklist.c.account_id == account_id)
    async with store._read(single=True) as conn:
        rows = (await conn.execute(q)).all()
    return [_block_entry(r) for r in rows]


async def blocklist_remove(store: Store, address: str) -> bool:
    async with store._write() as conn:
        res = await conn.execute(blocklist.delete().where(blocklist.c.address == _norm(address)))
    return bool(res.rowcount)


async def prune_blocklist(store: Store) -> int:
    async with store._write() as conn:
        res = await conn.execute(blocklist.delete().where(blocklist.c.expires_at <= store.clock()))
    return int(res.rowcount)


async def record_bounces(store: Store, bounces: Sequence[Bounce], blocklist_days: float) -> None:
    """Log hard bounces; recipient-class ones also go on the blocklist (one transaction)."""
    if not bounces:
        return
    now = store.clock()
    async with store._write() as conn:
        for b in bounces:
            await conn.execute(
                bounce_log.insert().values(
                    at=now,
                    account_id=b.account_id,
                    message_id=b.message_id,
                    address=_norm(b.address),
                    bounce_class=b.bounce_class,
                    source=b.source,
                    reply=b.reply[:2000],
                    mx=b.mx,
                )
            )
            if b.bounce_class == "recipient":
                await _block(conn, store, b, blocklist_days, now)


async def add_event(
    store: Store,
    kind: EventKind,
    account_id: int | None,
    message_id: str | None,
    rcpt: str | None,
    data: dict[str, Any],
) -> None:
    await store.add_event(kind, account_id=account_id, message_id=message_id, rcpt=rcpt, data=data)


# ---------------------------------------------------------------------- suppression


async def suppression_add(
    store: Store,
    domain: str,
    address: str,
    reason: str,
    *,
    account_id: int | None = None,
    message_id: str | None = None,
    kind: EventKind = EventKind.UNSUBSCRIBED,
    data: dict[str, Any] | None = None,
) -> bool:
    """Suppress ``address`` for sender ``domain``; False when it already was (idempotent)."""
    now = store.clock()
    dom, addr = domain.lower().rstrip("."), _norm(address)
    async with store._write() as conn:
        found = (
            await conn.execute(
                sa.select(suppression.c.reason).where(
                    suppression.c.domain == dom, suppression.c.address == addr
                )
            )
        ).first()
        if found is not None:
            return False
        await conn.execute(
            suppression.insert().values(
                domain=dom,
                address=addr,
                reason=reason,
                account_id=account_id,
                message_id=message_id,
                created_at=now,
            )
        )
        await conn.execute(
            event.insert().values(
                store._event_row(
                    kind,
                    now,
                    account_id,
                    message_id,
                    addr,
                    {"domain": dom, "reason": reason, **(data or {})},
                )
            )
        )
    return True


# Read per RCPT: built once (issue 9). (domain, address) is the primary key.
_SUPPRESSION_GET = sa.select(
    suppression.c.domain,
    suppression.c.address,
    suppression.c.reason,
    suppression.c.account_id,
    suppression.c.created_at,
).where(
    suppression.c.domain == sa.bindparam("domain"),
    suppression.c.address == sa.bindparam("address"),
)


async def suppression_get(store: Store, domain: str, address: str) -> Suppression | None:
    params = {"domain": domain.lower().rstrip("."), "address": _norm(address)}
    rows = await store._read_rows(_SUPPRESSION_GET, params)
    return Suppression(*rows[0]) if rows else None  # the columns in Suppression's order


@dataclass(frozen=True, slots=True)
class RcptLookup:
    """What the RCPT checks read about one recipient, in one trip (``rcpt_lookup``)."""

    blocked: BlockEntry | None
    suppressed: Suppression | None  # None too when no sender domain was asked
    windows: list[tuple[float, int]]  # (window_start, value) of the counter, oldest first
    # The windows of ``also`` (another counter read in the same trip), when asked.
    also_windows: list[tuple[float, int]] | None = None


async def rcpt_lookup(
    store: Store,
    address: str,
    sender_domain: str | None,
    counter_key: str,
    since: float,
    also: tuple[str, float] | None = None,
) -> RcptLookup:
    """``blocklist_get``, ``suppression_get`` (when ``sender_domain``) and
    ``limits.counter_windows(counter_key, since)`` in one trip to the database instead of
    three: the RCPT stage's reads (issue 9). Each is the same statement as on its own.
    ``also``: one more counter's (key, since), read in the same trip (the daily quota)."""
    reads: list[tuple[Any, dict[str, Any]]] = [
        (_BLOCKLIST_GET, {"now": store.clock(), "address": _norm(address)}),
        (COUNTER_WINDOWS, {"key": counter_key, "since": since}),
    ]
    if also is not None:
        reads.append((COUNTER_WINDOWS, {"key": also[0], "since": also[1]}))
    if sender_domain is not None:
        params = {"domain": sender_domain.lower().rstrip("."), "address": _norm(address)}
        reads.append((_SUPPRESSION_GET, params))
    found = await store._read_many(reads)
    blocked, windows = found[0], found[1]
    extra = found[2] if also is not None else None
    suppressed = found[-1] if sender_domain is not None else []
    return RcptLookup(
        BlockEntry(*blocked[0]) if blocked else None,
        Suppression(*suppressed[0]) if suppressed else None,
        windows_of(windows),
        None if extra is None else windows_of(extra),
    )


async def suppression_list(
    store: Store,
    *,
    domain: str | None = None,
    search: str | None = None,
    exact: str | None = None,
    limit: int = 1000,
) -> list[Suppression]:
    q = sa.select(suppression).order_by(suppression.c.created_at.desc()).limit(limit)
    if domain is not None:
        q = q.where(suppression.c.domain == domain.lower().rstrip("."))
    if exact is not None:
        q = q.where(suppression.c.address == exact)
    if search:
        q = q.where(suppression.c.address.contains(search.lower(), autoescape=True))
    async with store._read(single=True) as conn:
        rows = (await conn.execute(q)).all()
    return [Suppression(r.domain, r.address, r.reason, r.account_id, r.created_at) for r in rows]


async def suppression_remove(store: Store, domain: str, address: str) -> bool:
    async with store._write() as conn:
        res = await conn.execute(
            suppression.delete().where(
                suppression.c.domain == domain.lower().rstrip("."),
                suppression.c.address == _norm(address),
            )
        )
    return bool(res.rowcount)


# ---------------------------------------------------------------------- tokens, reports


async def recipient_ref(store: Store, recipient_id: int) -> RecipientRef | None:
    async with store._read() as conn:
        row = (
            await conn.execute(
                sa.select(
                    recipient.c.id,
                    recipient.c.address,
                    recipient.c.message_id,
                    message.c.account_id,
                    message.c.mail_from,
                )
                .join(message, message.c.id == recipient.c.message_id)
                .where(recipient.c.id == recipient_id)
            )
        ).first()
    if row is None:
        return None
    return RecipientRef(row.id, row.address, row.message_id, row.account_id, row.mail_from)


async def store_report(
    store: Store, kind: str, mail_from: str, rcpt: str, summary: str, body: bytes
) -> int:
    async with store._write() as conn:
        res = await conn.execute(
            inbound_report.insert()
            .values(
                at=store.clock(),
                kind=kind,
                mail_from=mail_from[:512],
                rcpt=rcpt[:512],
                summary=summary[:4000],
                body=body,
            )
            .returning(inbound_report.c.id)
        )
        return int(res.scalar_one())


async def report_counts(store: Store) -> dict[str, int]:
    async with store._read() as conn:
        rows = (
            await conn.execute(
                sa.select(inbound_report.c.kind, sa.func.count()).group_by(inbound_report.c.kind)
            )
        ).all()
    return {r[0]: int(r[1]) for r in rows}


# ---------------------------------------------------------------------- suspension


async def account_state(store: Store, account_id: int) -> AccountState | None:
    # Cached only while not suspended (relay/queue/cache.py): a resume from the CLI
    # applies to the next message; a suspension by another process within the TTL.
    return await store.cache.fetch(
        ("account_state", account_id),
        lambda: _load_account_state(store, account_id),
        lambda s: s is not None and s.status is AccountStatus.ACTIVE,
    )


async def _load_account_state(store: Store, account_id: int) -> AccountState | None:
    async with store._read() as conn:
        row = (
            await conn.execute(
                sa.select(
                    account.c.id,
                    account.c.name,
                    account.c.status,
                    account_reputation.c.suspended_at,
                    account_reputation.c.suspended_reason,
                    account_reputation.c.window_reset_at,
                )
                .select_from(
                    account.outerjoin(
                        account_reputation, account_reputation.c.account_id == account.c.id
                    )
                )
                .where(account.c.id == account_id)
            )
        ).first()
    if row is None:
        return None
    return AccountState(
        row.id,
        row.name,
        AccountStatus(row.status),
        row.suspended_at,
        row.suspended_reason,
        float(row.window_reset_at or 0.0),
    )


async def window_stats(store: Store, account_id: int, window_seconds: float) -> WindowStats:
    state = await account_state(store, account_id)
    since = max(store.clock() - window_seconds, state.window_reset_at if state else 0.0)

    def count_events(kind: EventKind) -> Any:
        return (
            sa.select(sa.func.count())
            .select_from(event)
            .where(
                event.c.account_id == account_id, event.c.kind == kind.value, event.c.at >= since
            )
        )

    async with store._read() as conn:
        sent = (await conn.execute(count_events(EventKind.ACCEPTED))).scalar()
        refused = (
            await conn.execute(
                count_events(EventKind.REJECTED).where(event.c.data.contains('"blocklisted"'))
            )
        ).scalar()
        complaints = (await conn.execute(count_events(EventKind.COMPLAINED))).scalar()
        hard = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(bounce_log)
                .where(
                    bounce_log.c.account_id == account_id,
                    bounce_log.c.at >= since,
                    bounce_log.c.bounce_class == "recipient",
                )
            )
        ).scalar()
    return WindowStats(
        since, int(sent or 0), int(refused or 0), int(hard or 0), int(complaints or 0)
    )


async def _ensure_rep_row(conn: Any, account_id: int) -> None:
    found = (
        await conn.execute(
            sa.select(account_reputation.c.account_id).where(
                account_reputation.c.account_id == account_id
            )
        )
    ).first()
    if found is None:
        await conn.execute(account_reputation.insert().values(account_id=account_id))


async def suspend(store: Store, account_id: int, reason: str, data: dict[str, Any]) -> bool:
    """Suspend an active account: hold its waiting mail, emit ``suspended``. False if it
    was suspended already."""
    now = store.clock()
    async with store._write() as conn:
        res = await conn.execute(
            account.update()
            .where(account.c.id == account_id, account.c.status == AccountStatus.ACTIVE.value)
            .values(status=AccountStatus.SUSPENDED.value)
        )
        if res.rowcount == 0:
            return False
        await _ensure_rep_row(conn, account_id)
        await conn.execute(
            account_reputation.update()
            .where(account_reputation.c.account_id == account_id)
            .values(suspended_at=now, suspended_reason=reason)
        )
        # Held with reason "suspended": resume puts exactly these rows back in the queue.
        await conn.execute(
            recipient.update()
            .where(
                recipient.c.status.in_(
                    [
                        RecipientStatus.QUEUED.value,
                        RecipientStatus.DEFERRED.value,
                        RecipientStatus.HELD.value,
                    ]
                ),
                recipient.c.message_id.in_(
                    sa.select(message.c.id).where(message.c.account_id == account_id)
                ),
            )
            .values(
                status=RecipientStatus.HELD.value,
                reason="suspended",
                due_at=SUSPENDED_DUE,
                updated_at=now,
            )
        )
        await conn.execute(
            event.insert().values(
                store._event_row(
                    EventKind.SUSPENDED, now, account_id, None, None, {"reason": reason, **data}
                )
            )
        )
    return True


# The reason of a suspension an operator gave none for.
BY_OPERATOR = "suspended by the operator"


async def suspend_by_operator(store: Store, account_id: int, reason: str) -> str | None:
    """``relay account suspend`` and its API: suspend with ``reason`` (or BY_OPERATOR),
    the event saying ``by: operator``. The reason given, or None if it was suspended
    already."""
    why = reason or BY_OPERATOR
    return why if await suspend(store, account_id, why, {"by": "operator"}) else None


async def resume(store: Store, account_id: int) -> int:
    """Lift a suspension, restart the rate window, release held mail; rows released."""
    now = store.clock()
    async with store._write() as conn:
        await conn.execute(
            account.update()
            .where(account.c.id == account_id)
            .values(status=AccountStatus.ACTIVE.value)
        )
        await _ensure_rep_row(conn, account_id)
        await conn.execute(
            account_reputation.update()
            .where(account_reputation.c.account_id == account_id)
            .values(suspended_at=None, suspended_reason=None, window_reset_at=now)
        )
        res = await conn.execute(
            recipient.update()
            .where(
                recipient.c.status == RecipientStatus.HELD.value,
                recipient.c.reason == "suspended",
                recipient.c.message_id.in_(
                    sa.select(message.c.id).where(message.c.account_id == account_id)
                ),
            )
            .values(status=RecipientStatus.QUEUED.value, reason=None, due_at=now, updated_at=now)
        )
    return int(res.rowcount)


async def set_account_setting(store: Store, account_id: int, key: str, value: object) -> None:
    """Set one key of account.settings (read-modify-write in one transaction)."""
    async with store._write() as conn:
        raw = (
            await conn.execute(sa.select(account.c.settings).where(account.c.id == account_id))
        ).scalar()
        settings = json.loads(raw or "{}")
        settings[key] = value
        await conn.execute(
            account.update()
            .where(account.c.id == account_id)
            .values(settings=json.dumps(settings, sort_keys=True))
        )
