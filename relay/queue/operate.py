"""SQL of the operator's whole-queue commands: the queue's shape by destination, and
retrying or deleting what waits for one destination (``relay queue summary | retry |
delete --domain``).

Postfix's answers to "the queue is stuck" are qshape (where does mail wait, and since
when), ``postqueue -f`` / ``postqueue -s SITE`` (try now) and ``postsuper -d`` (drop).
These are the same three over the recipient table. Every function is one statement or
one short transaction per chunk, and takes its time from the store's clock.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.model import RETRYABLE_STATUSES, WAITING_STATUSES, RecipientStatus
from relay.queue import meta
from relay.queue.store import Store
from relay.queue.tables import message, recipient

#: Age columns of the summary (seconds since acceptance), as qshape's but fewer.
AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<5m", 300.0),
    ("<1h", 3600.0),
    ("<6h", 6 * 3600.0),
    ("<1d", 86400.0),
    (">=1d", float("inf")),
)
# A reply is grouped by its first characters: servers put a per-attempt id at the end
# ("... (ab12cd - gsmtp)"), which would make every deferral its own group.
REPLY_PREFIX = 60
# Rows changed per transaction by a bulk delete, each with its event row: the CLI holds
# the write lock that the server's accepts also wait for meanwhile. 200 rows held it a
# median 13 ms on SQLite (commit included); 100 is about one accept batch's hold.
DELETE_CHUNK = 100


@dataclass
class DomainShape:
    """The waiting recipients of one destination domain."""

    domain: str
    total: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_age: list[int] = field(default_factory=lambda: [0] * len(AGE_BUCKETS))
    top_reply: str = ""  # the commonest last reply of its deferred recipients
    top_reply_count: int = 0


async def shape(store: Store) -> list[DomainShape]:
    """Waiting recipients by destination domain, largest first. Counted in the database
    (two GROUP BYs over the waiting rows), so a backlog of millions costs the CLI no
    memory."""
    now = store.clock()
    waiting = recipient.c.status.in_([s.value for s in WAITING_STATUSES])
    # Age bucket index: accepted after now - limit, for the first limit that holds.
    bucket = sa.case(
        *(
            (recipient.c.created_at > now - limit, i)
            for i, (_, limit) in enumerate(AGE_BUCKETS[:-1])
        ),
        else_=len(AGE_BUCKETS) - 1,
    ).label("bucket")
    reply = sa.func.substr(recipient.c.last_reply, 1, REPLY_PREFIX).label("reply")
    async with store._read() as conn:
        counts = (
            await conn.execute(
                sa.select(recipient.c.rcpt_domain, recipient.c.status, bucket, sa.func.count())
                .where(waiting)
                .group_by(recipient.c.rcpt_domain, recipient.c.status, bucket)
            )
        ).all()
        replies = (
            await conn.execute(
                sa.select(recipient.c.rcpt_domain, reply, sa.func.count())
                .where(
                    recipient.c.status == RecipientStatus.DEFERRED.value,
                    recipient.c.last_reply.is_not(None),
                )
                .group_by(recipient.c.rcpt_domain, reply)
            )
        ).all()
    domains: dict[str, DomainShape] = {}
    for name, status, i, n in counts:
        d = domains.get(name)
        if d is None:
            d = domains[name] = DomainShape(name)
        d.total += n
        d.by_status[status] += n
        d.by_age[int(i)] += n
    for name, text, n in replies:
        d = domains.get(name)
        if d is not None and n > d.top_reply_count:
            d.top_reply, d.top_reply_count = text, n
    return sorted(domains.values(), key=lambda d: (-d.total, d.domain))


def domain_key(name: str) -> str:
    """A recipient domain as the queue keeps it (rcpt_domain): lower case, no final dot."""
    return name.lower().rstrip(".")


def _domain_is(name: str) -> sa.ColumnElement[bool]:
    return recipient.c.rcpt_domain == domain_key(name)


async def retry_domain(store: Store, domain: str | None) -> int:
    """Make every queued, held or deferred recipient (of ``domain``; None: all) due now:
    delivery's next poll takes them. Leased rows (being delivered) are left alone."""
    now = store.clock()
    cond: sa.ColumnElement[bool] = recipient.c.status.in_([s.value for s in RETRYABLE_STATUSES])
    if domain is not None:
        cond = sa.and_(cond, _domain_is(domain))
    async with store._write() as conn:
        res = await conn.execute(
            recipient.update().where(cond, recipient.c.due_at > now).values(due_at=now)
        )
        await _mark_flush(conn, store, "*" if domain is None else domain_key(domain), now)
    return int(res.rowcount)


# ``queue retry --domain D | --all`` also lifts delivery's suspension of the destination
# (relay/delivery/destinations.py), as ``postqueue -f`` does Postfix's dead sites: the
# operator says the cause is fixed. The command may run in another process than
# delivery, so the request is a row delivery reads: destination ("*": all) -> time.
FLUSH_KEY = "delivery.flush"
FLUSH_KEEP = 86400.0  # a request older than any suspension is forgotten


async def _mark_flush(conn: AsyncConnection, store: Store, name: str, now: float) -> None:
    marks = _flushes(await meta.get(conn, FLUSH_KEY))
    marks = {k: v for k, v in marks.items() if v > now - FLUSH_KEEP}
    marks[name] = now
    await meta.put(conn, store, FLUSH_KEY, json.dumps(marks, sort_keys=True))


def _flushes(value: str | None) -> dict[str, float]:
    try:
        marks = json.loads(value) if value else {}
        return {str(k): float(v) for k, v in marks.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


async def flushed_since(store: Store, name: str, since: float) -> bool:
    """Did an operator ask to retry the destination (or everything) after ``since``?"""
    async with store._read() as conn:
        marks = _flushes(await meta.get(conn, FLUSH_KEY))
    return max(marks.get(name, 0.0), marks.get("*", 0.0)) > since


async def delete_domain(store: Store, domain: str, status: RecipientStatus | None = None) -> int:
    """Drop every waiting recipient of ``domain`` (only ``status``, if given); see
    delete_waiting."""
    return await delete_waiting(store, status, domain=domain)


async def delete_waiting(
    store: Store,
    status: RecipientStatus | None,
    *,
    domain: str | None = None,
    account_id: int | None = None,
) -> int:
    """Drop every waiting recipient at ``domain`` or of ``account_id``'s messages (only
    ``status``, if given) as ``deleted``, each with its event, as ``relay queue delete
    ID`` does for one message. A recipient being delivered right now (leased) is dropped
    too: the attempt's outcome then finds its lease gone and is not recorded (the MX may
    still take the message)."""
    statuses = [status.value] if status is not None else [s.value for s in WAITING_STATUSES]
    which: sa.ColumnElement[bool] = recipient.c.status.in_(statuses)
    by: dict[str, object] = {"by": "operator"}
    if domain is not None:
        which = sa.and_(which, _domain_is(domain))
        by["domain"] = domain
    if account_id is not None:
        mine = sa.select(message.c.id).where(message.c.account_id == account_id)
        which = sa.and_(which, recipient.c.message_id.in_(mine))
        by["account_id"] = account_id
    # One read finds them (through the status index); each write then changes only rows
    # still waiting, so one delivered meanwhile is left as it is.
    async with store._read() as conn:
        ids = list((await conn.execute(sa.select(recipient.c.id).where(which))).scalars())
    total = 0
    for start in range(0, len(ids), DELETE_CHUNK):
        async with store._write() as conn:
            total += await store._mark_deleted(
                conn,
                sa.and_(
                    recipient.c.id.in_(ids[start : start + DELETE_CHUNK]),
                    # status || '': with bound values SQLite chose the status index over
                    # the rowids and walked every waiting row, 27.5 against 3.1 ms a
                    # chunk of 200 among 200,000 waiting (EXPLAIN QUERY PLAN).
                    (recipient.c.status + "").in_(statuses),
                ),
                by,
            )
    return total
