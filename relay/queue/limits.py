"""SQL of the sending limits (issue 4): overrides, the rate bucket, reputation levels,
warm-up day 1, and the held-recipient queries the scheduler releases from.

Counters themselves go through ``Store.incr_counter`` / ``Store.counter_sum`` and the
``counters`` of the accept transaction (atomic upserts). Every function is one
transaction and takes its time from the caller (the store's injected clock).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from relay.model import EventKind, RecipientStatus
from relay.queue import dialect
from relay.queue.store import CounterAdd, Store
from relay.queue.tables import (
    account_level,
    counter,
    domain,
    event,
    limit_override,
    message,
    recipient,
    warmup_start,
)

# ------------------------------------------------------------------ overrides


async def get_overrides(store: Store, scope: str, name: str) -> dict[str, str]:
    # A copy, so a caller editing it cannot change the cache.
    return dict(await cached_overrides(store, scope, name))


async def cached_overrides(store: Store, scope: str, name: str) -> Mapping[str, str]:
    """The overrides as cached (not a copy): the same object until the cache drops it,
    so a caller may memoize what it derives from it by identity. Never modify it."""

    async def load() -> dict[str, str]:
        async with store._read() as conn:
            rows = (
                await conn.execute(
                    sa.select(limit_override.c.key, limit_override.c.value).where(
                        limit_override.c.scope == scope, limit_override.c.name == name
                    )
                )
            ).all()
        return {r.key: r.value for r in rows}

    # Cached (relay/queue/cache.py): `relay limits set` from the CLI applies within
    # cache.CHECK_EVERY.
    return await store.cache.fetch(("limit_override", scope, name), load)


async def set_override(store: Store, scope: str, name: str, key: str, value: str | None) -> None:
    """Set (or with None, remove) one override."""
    async with store._write() as conn:
        await conn.execute(
            limit_override.delete().where(
                limit_override.c.scope == scope,
                limit_override.c.name == name,
                limit_override.c.key == key,
            )
        )
        if value is not None:
            await conn.execute(
                limit_override.insert().values(
                    scope=scope, name=name, key=key, value=value, updated_at=store.clock()
                )
            )


async def set_domain_warmup(store: Store, name: str, enabled: bool) -> int:
    async with store._write() as conn:
        res = await conn.execute(
            domain.update().where(domain.c.name == name).values(warmup=enabled)
        )
    return int(res.rowcount)


# ------------------------------------------------------------------ rate (GCRA)


async def take_tokens(
    store: Store, key: str, now: float, interval: float, tolerance: float, amount: int
) -> float:
    """Token bucket as GCRA (dialect.gcra_take) in a write transaction of its own: 0.0 if
    ``amount`` tokens were taken, else seconds to wait. The SMTP path takes its tokens in
    the accept transaction instead (NewMessage.rate), saving one commit per message."""
    async with store._write() as conn:
        # ``now`` was read before waiting for the write lock; under contention that wait
        # can exceed the burst tolerance, and a stale ``now`` then refuses a sender far
        # below its rate. The lock holder's clock is the one that orders the bucket.
        now = max(now, store.clock())
        return await dialect.gcra_take(conn, store.dialect, key, now, interval, tolerance, amount)


# ------------------------------------------------------------------ counters


# Read per message (daily quota) and per RCPT (per-recipient rate): built once, not per
# call (issue 9: building a statement and its cache key costs more than running it).
COUNTER_WINDOWS = (
    sa.select(counter.c.window_start, counter.c.value)
    .where(counter.c.key == sa.bindparam("key"), counter.c.window_start >= sa.bindparam("since"))
    .order_by(counter.c.window_start)
)


async def counter_windows(store: Store, key: str, since: float) -> list[tuple[float, int]]:
    """(window_start, value) of one key since ``since``, oldest first."""
    return windows_of(await store._read_rows(COUNTER_WINDOWS, {"key": key, "since": since}))


def windows_of(rows: Sequence[tuple[Any, ...]]) -> list[tuple[float, int]]:
    """COUNTER_WINDOWS rows as (window_start, value)."""
    return [(float(w), int(v)) for w, v in rows]


async def top_counters(
    store: Store, prefix: str, since: float, limit: int = 5
) -> list[tuple[str, int]]:
    """The busiest keys under ``prefix`` since ``since`` (for `relay limits show`)."""
    total = sa.func.sum(counter.c.value).label("total")
    async with store._read() as conn:
        rows = (
            await conn.execute(
                sa.select(counter.c.key, total)
                .where(counter.c.key.like(f"{prefix}%"), counter.c.window_start >= since)
                .group_by(counter.c.key)
                .order_by(total.desc())
                .limit(limit)
            )
        ).all()
    return [(r.key[len(prefix) :], int(r.total)) for r in rows]


# ------------------------------------------------------------------ reputation levels


@dataclass(frozen=True, slots=True)
class LevelRow:
    level: int
    changed_at: float
    evaluated_day: str
    why: str


async def get_level(store: Store, account_id: int) -> LevelRow | None:
    async def load() -> LevelRow | None:
        async with store._read() as conn:
            row = (
                await conn.execute(
                    sa.select(account_level).where(account_level.c.account_id == account_id)
                )
            ).first()
        if row is None:
            return None
        return LevelRow(row.level, row.changed_at, row.evaluated_day, row.why)

    return await store.cache.fetch(("account_level", account_id), load)


async def set_level(
    store: Store, account_id: int, level: int, changed_at: float, day: str, why: str
) -> None:
    async with store._write() as conn:
        res = await conn.execute(
            account_level.update()
            .where(account_level.c.account_id == account_id)
            .values(level=level, changed_at=changed_at, evaluated_day=day, why=why)
        )
        if res.rowcount == 0:
            await conn.execute(
                account_level.insert().values(
                    account_id=account_id,
                    level=level,
                    changed_at=changed_at,
                    evaluated_day=day,
                    why=why,
                )
            )


async def delivery_stats(store: Store, account_id: int, since: float) -> tuple[int, int, int]:
    """(delivered, bounced, complaints) of an account's recipients since ``since``."""
    async with store._read() as conn:
        rows = (
            await conn.execute(
                sa.select(recipient.c.status, sa.func.count())
                .join(message, message.c.id == recipient.c.message_id)
                .where(
                    message.c.account_id == account_id,
                    recipient.c.updated_at >= since,
                    recipient.c.status.in_(
                        [RecipientStatus.DELIVERED.value, RecipientStatus.BOUNCED.value]
                    ),
                )
                .group_by(recipient.c.status)
            )
        ).all()
        complaints = (
            await conn.execute(
                sa.select(sa.func.count()).where(
                    event.c.account_id == account_id,
                    event.c.kind == EventKind.COMPLAINED.value,
                    event.c.at >= since,
                )
            )
        ).scalar()
    counts = {r[0]: int(r[1]) for r in rows}
    return (
        counts.get(RecipientStatus.DELIVERED.value, 0),
        counts.get(RecipientStatus.BOUNCED.value, 0),
        int(complaints or 0),
    )


# ------------------------------------------------------------------ warm-up


async def get_warmup_start(store: Store, domain_name: str) -> str | None:
    async def load() -> str | None:
        async with store._read() as conn:
            found: str | None = (
                await conn.execute(
                    sa.select(warmup_start.c.first_day).where(warmup_start.c.domain == domain_name)
                )
            ).scalar()
        return found

    # Day 1 never changes once recorded (only `relay limits warmup` resets it).
    return await store.cache.fetch(("warmup_start", domain_name), load, lambda v: v is not None)


async def ensure_warmup_start(store: Store, domain_name: str, today: str) -> str:
    """Day 1 of the domain: the first call records ``today``; later calls return it."""
    found = await get_warmup_start(store, domain_name)
    if found is not None:
        return found
    async with store._write() as conn:
        # Another node may record day one between a read and our insert (PostgreSQL:
        # two nodes sending the domain's first message at once): the insert then does
        # nothing, and the day read back is whichever row was first.
        insert = dialect.insert_ignoring_duplicates(store.dialect, warmup_start, ["domain"])
        await conn.execute(
            insert.values(domain=domain_name, first_day=today, started_at=store.clock())
        )
        found = (
            await conn.execute(
                sa.select(warmup_start.c.first_day).where(warmup_start.c.domain == domain_name)
            )
        ).scalar()
    return str(found) if found is not None else today


async def set_warmup_start(store: Store, domain_name: str, first_day: str) -> None:
    async with store._write() as conn:
        await conn.execute(warmup_start.delete().where(warmup_start.c.domain == domain_name))
        await conn.execute(
            warmup_start.insert().values(
                domain=domain_name, first_day=first_day, started_at=store.clock()
            )
        )


# ------------------------------------------------------------------ held recipients


@dataclass(frozen=True, slots=True)
class HeldRow:
    id: int
    message_id: str
    account_id: int
    mail_from: str
    reason: str
    created_at: float


async def held_due(store: Store, now: float, limit: int) -> list[HeldRow]:
    """Held recipients whose wait may be over, oldest accepted first."""
    async with store._read() as conn:
        rows = (
            await conn.execute(
                sa.select(
                    recipient.c.id,
                    recipient.c.message_id,
                    message.c.account_id,
                    message.c.mail_from,
                    recipient.c.reason,
                    recipient.c.created_at,
                )
                .join(message, message.c.id == recipient.c.message_id)
                .where(
                    recipient.c.status == RecipientStatus.HELD.value,
                    recipient.c.due_at <= now,
                )
                .order_by(recipient.c.created_at, recipient.c.id)
                .limit(limit)
            )
        ).all()
    return [
        HeldRow(r.id, r.message_id, r.account_id, r.mail_from, r.reason or "", r.created_at)
        for r in rows
    ]


async def release_held(
    store: Store,
    slots: Sequence[tuple[int, float]],
    counters: Sequence[CounterAdd],
    *,
    still_held_reason: str | None = None,
) -> int:
    """Held -> queued (due at its slot) and the budget counters, in one transaction.

    With ``still_held_reason`` the rows stay held (due at the slot) under a new reason:
    a recipient released from the daily quota may still wait for its domain's warm-up.
    """
    if not slots:
        return 0
    now = store.clock()
    released = 0
    async with store._write() as conn:
        for rid, due in slots:
            values: dict[str, object] = {"due_at": due, "updated_at": now}
            if still_held_reason is None:
                values["status"] = RecipientStatus.QUEUED.value
            else:
                values["reason"] = still_held_reason[:64]
            res = await conn.execute(
                recipient.update()
                .where(recipient.c.id == rid, recipient.c.status == RecipientStatus.HELD.value)
                .values(values)
            )
            released += int(res.rowcount)
        for c in counters:
            await conn.execute(
                dialect.counter_upsert(store.dialect, c.key, c.window, c.amount, c.expires_at)
            )
    return released


async def postpone_held(store: Store, ids: Sequence[int], due_at: float, reason: str) -> None:
    if not ids:
        return
    async with store._write() as conn:
        await conn.execute(
            recipient.update()
            .where(recipient.c.id.in_(list(ids)), recipient.c.status == RecipientStatus.HELD.value)
            .values(due_at=due_at, reason=reason[:64], updated_at=store.clock())
        )


async def held_summary(
    store: Store, *, account_id: int | None = None, sender_domain: str | None = None
) -> tuple[int, float | None]:
    """(number of held recipients, earliest due_at) of an account or a sender domain."""
    q = (
        sa.select(sa.func.count(), sa.func.min(recipient.c.due_at))
        .select_from(recipient.join(message, message.c.id == recipient.c.message_id))
        .where(recipient.c.status == RecipientStatus.HELD.value)
    )
    if account_id is not None:
        q = q.where(message.c.account_id == account_id)
    if sender_domain is not None:
        q = q.where(sa.func.lower(message.c.mail_from).like(f"%@{sender_domain.lower()}"))
    async with store._read() as conn:
        row = (await conn.execute(q)).first()
    if row is None:
        return 0, None
    return int(row[0] or 0), (None if row[1] is None else float(row[1]))
