"""SQL of the statistics rollup: whole UTC days counted into stats_day before their event
rows are deleted (record retention, relay/queue/retention.py).

The statistics are computed from event rows (events.daily_stats), so deleting old events
would silently rewrite last quarter's numbers. Before the retention deletes anything of a
day, that day is counted here exactly as daily_stats counts it, per account and sender
domain (the two filters the statistics take), and a mark in ``schema_meta`` says which
days are now read from stats_day: daily_stats reads the rollup up to the mark and event
rows only after it, so a day is never counted twice, whether or not its rows are gone yet.

The days rolled up are the retention period old, so no event is added to them any more:
counting needs no write lock, and the write is short (the counts and the mark). Several
nodes on one PostgreSQL may sweep at once: the mark moves by compare-and-set in the same
transaction as the counts, so a day is written by one of them only.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from relay.model import EventKind
from relay.queue import dialect, meta
from relay.queue.store import Store
from relay.queue.tables import event, message, schema_meta, stats_day

MARK_KEY = "retention.rolled_through"
DAY = 86400
PAGE = 5000  # message-less events read per step

# What the statistics count (events.daily_stats): the same kinds, the same rules.
STAT_KINDS = (
    EventKind.ACCEPTED,
    EventKind.REJECTED,
    EventKind.DELIVERED,
    EventKind.DEFERRED,
    EventKind.BOUNCED,
    EventKind.EXPIRED,
    EventKind.OPENED,
    EventKind.UNSUBSCRIBED,
    EventKind.COMPLAINED,
)
# An opened event counts only when it was the recipient's unique (first human) open.
UNIQUE_OPEN = '%"unique": true%'

Key = tuple[int, str, str]  # (account_id, sender domain, kind)


class _LostRace(Exception):
    """another node rolled this day up first"""


@dataclass(frozen=True, slots=True)
class Rollup:
    """What one call of roll_up_through did."""

    days: int  # days with events counted into stats_day
    through: int | None  # the mark afterwards: last day read from stats_day


def stat_filter() -> sa.ColumnElement[bool]:
    """The events the statistics count (kind, and unique opens only)."""
    return sa.and_(
        event.c.kind.in_([k.value for k in STAT_KINDS]),
        sa.or_(event.c.kind != EventKind.OPENED.value, event.c.data.like(UNIQUE_OPEN)),
    )


def sender_domain(mail_from: str) -> str:
    return mail_from.rpartition("@")[2].lower()


def _data_domain(data: str | None) -> str:
    try:
        parsed = json.loads(data or "{}")
    except ValueError:
        return ""
    return str(parsed.get("sender_domain") or "").lower() if isinstance(parsed, dict) else ""


async def rolled_through(store: Store) -> int | None:
    """The last day (days since the epoch) whose statistics are in stats_day, if any."""
    async with store._read() as conn:
        value = await meta.get(conn, MARK_KEY)
    return None if value is None else int(value)


async def count_day(store: Store, day: int) -> dict[Key, int]:
    """The statistics of one UTC day from its event rows, per account and sender domain."""
    in_day = sa.and_(event.c.at >= day * DAY, event.c.at < (day + 1) * DAY, stat_filter())
    counts: dict[Key, int] = defaultdict(int)
    async with store._read() as conn:
        # Events of a message: grouped by its full sender address (few per account), so
        # the distinct count of deferred recipients adds up across addresses of a domain.
        rows = await conn.execute(
            sa.select(
                event.c.account_id,
                message.c.mail_from,
                event.c.kind,
                sa.func.count().label("n"),
                sa.func.count(
                    sa.distinct(event.c.message_id + "|" + sa.func.coalesce(event.c.recipient, ""))
                ).label("distinct_rcpt"),
            )
            .select_from(event.join(message, message.c.id == event.c.message_id))
            .where(in_day)
            .group_by(event.c.account_id, message.c.mail_from, event.c.kind)
        )
        for r in rows:
            n = r.distinct_rcpt if r.kind == EventKind.DEFERRED.value else r.n
            counts[(r.account_id or 0, sender_domain(r.mail_from), r.kind)] += int(n)
        # Events with no message row (refusals at SMTP time; late ones whose message is
        # gone): the sender domain is in the event's data, as daily_stats reads it. Read
        # in pages, so that a day of many refusals is never all in memory.
        deferred: dict[Key, set[str]] = defaultdict(set)
        after = 0
        while True:
            page = (
                await conn.execute(
                    sa.select(
                        event.c.id,
                        event.c.account_id,
                        event.c.kind,
                        event.c.data,
                        event.c.message_id,
                        event.c.recipient,
                    )
                    .select_from(event.outerjoin(message, message.c.id == event.c.message_id))
                    .where(in_day, message.c.id.is_(None), event.c.id > after)
                    .order_by(event.c.id)
                    .limit(PAGE)
                )
            ).all()
            for r in page:
                key = (r.account_id or 0, _data_domain(r.data), r.kind)
                if r.kind == EventKind.DEFERRED.value:
                    deferred[key].add(f"{r.message_id or ''}|{r.recipient or ''}")
                else:
                    counts[key] += 1
            if len(page) < PAGE:
                break
            after = page[-1].id
    for key, seen in deferred.items():
        counts[key] += len(seen)
    return dict(counts)


async def _next_day_with_events(store: Store, after: int | None, through: int) -> int | None:
    start = 0.0 if after is None else (after + 1) * DAY
    async with store._read() as conn:
        first = (
            await conn.execute(
                sa.select(sa.func.min(event.c.at)).where(
                    event.c.at >= start, event.c.at < (through + 1) * DAY
                )
            )
        ).scalar()
    return None if first is None else int(first // DAY)


async def _advance(store: Store, old: int | None, new: int, counts: dict[Key, int]) -> None:
    """Move the mark from ``old`` to ``new`` and write ``counts`` (day ``new``'s), in one
    transaction; _LostRace if the mark was no longer ``old``."""
    async with store._write() as conn:
        if old is None:
            res = await conn.execute(
                dialect.upsert_insert(store.dialect, schema_meta)
                .values(key=MARK_KEY, value=str(new))
                .on_conflict_do_nothing(index_elements=["key"])
            )
        else:
            res = await conn.execute(
                schema_meta.update()
                .where(schema_meta.c.key == MARK_KEY, schema_meta.c.value == str(old))
                .values(value=str(new))
            )
        if res.rowcount != 1:
            raise _LostRace()
        if counts:
            await conn.execute(
                stats_day.insert(),
                [
                    {"day": new, "account_id": a, "sender_domain": d, "kind": k, "n": n}
                    for (a, d, k), n in sorted(counts.items())
                ],
            )


async def roll_up_through(store: Store, through: int) -> Rollup:
    """Count every day up to ``through`` (days since the epoch) not yet in stats_day."""
    mark = await rolled_through(store)
    days = 0
    while mark is None or mark < through:
        day = await _next_day_with_events(store, mark, through)
        # Days without events have nothing to count: the mark jumps over them.
        target = through if day is None else day
        counts = {} if day is None else await count_day(store, day)
        try:
            await _advance(store, mark, target, counts)
        except _LostRace:
            pass  # another node wrote it: carry on from where it left the mark
        else:
            days += day is not None
        mark = await rolled_through(store)
    return Rollup(days, mark)


async def rolled_stats(
    store: Store,
    first_day: int,
    last_day: int,
    *,
    account_id: int | None = None,
    domain: str | None = None,
) -> dict[int, dict[str, int]]:
    """day -> kind -> count from stats_day, for days first_day..last_day inclusive."""
    q: Any = (
        sa.select(stats_day.c.day, stats_day.c.kind, sa.func.sum(stats_day.c.n).label("n"))
        .where(stats_day.c.day >= first_day, stats_day.c.day <= last_day)
        .group_by(stats_day.c.day, stats_day.c.kind)
    )
    if account_id is not None:
        q = q.where(stats_day.c.account_id == account_id)
    if domain:
        q = q.where(stats_day.c.sender_domain == domain.lower())
    async with store._read() as conn:
        rows = (await conn.execute(q)).all()
    out: dict[int, dict[str, int]] = {}
    for r in rows:
        out.setdefault(int(r.day), {})[r.kind] = int(r.n)
    return out
