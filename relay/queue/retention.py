"""SQL of retention: dropping the bodies of finished messages, then their whole records
(docs/operations.md).

A body is needed only while a recipient of its message may still be tried: delivery is
its one reader, and a recipient never leaves a final status (delivered, bounced, expired,
deleted) again. Past that, the bytes only grow the database: 2 KB-100 KB a message,
against well under 1 KB for its message, recipient and event rows, which the status
query and the statistics read and which stay.

A sweep walks the messages accepted before the cut in (created_at, id) order and empties
the body of each whose recipients are all final, in short writes. A mark in
``schema_meta`` remembers where the walk may start next time: the first message it found
still in flight (or the last one it saw), so a sweep reads only what is new, plus what
lies behind a message kept in flight longer than the retention period (a ``max_age``
above it).

Records (``purge_records``) go later, after ``retention.records``: a message with its
recipients and events once every recipient is final and its last event is older than the
cut; events of no message (refusals), the bounce log, inbound reports and webhook POSTs
by their age; MTA-STS policies and operator holds once past their end. The cut is a UTC
day boundary, and every day before it is first counted into stats_day (rollup.py), so
the statistics of a day survive its rows.
A message with an event after the cut (an open weeks later) waits until that one ages
too: deleting it earlier would take a day's count away after the day was counted.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from relay.model import WAITING_STATUSES
from relay.queue import meta, rollup
from relay.queue.rollup import DAY
from relay.queue.store import Store
from relay.queue.tables import (
    bounce_log,
    delivery_hold,
    event,
    inbound_report,
    message,
    mta_sts_policy,
    recipient,
    webhook_delivery,
)

MARK_KEY = "retention.bodies_mark"
# Messages read per step of the walk.
BATCH = 100
# Bytes of body emptied per write (at least one message): freeing pages costs by the
# byte, and every accept waits for the write lock meanwhile. A write (commit included)
# of 100 messages took a median 3 / 13 / 42 ms (max 191) on SQLite with 2 / 20 / 100 KB
# bodies; with this budget 4.0 / 2.8 / 2.2 ms, about one accept's commit.
WRITE_BYTES = 512 * 1024

# SQLite: a body up to ~4 KB lies in the row itself, and a larger one keeps up to ~4 KB
# there, so a 2 KB message fills half a table page and a 20 KB one a whole page. Emptying
# the body in place frees the overflow pages but leaves that page one row thin: an UPDATE
# never merges pages, and 8,000 purged 2 KB messages still took 4,000 pages (measured,
# SQLite 3.40). Giving the row a new rowid makes SQLite delete it where it was (a delete
# does merge thin pages) and insert it at the table's end, packed ~160 rows a page. Only
# message.id is ever referenced (recipient, event), never the rowid; the accept that
# follows takes the next rowid as usual (max + 1), and the write lock is held throughout.
_SQLITE_EMPTY = sa.text(
    "UPDATE message SET body = x'', rowid = (SELECT max(rowid) FROM message) + 1"
    " WHERE id = :mid AND length(body) > 0"
)
_WAITING = [s.value for s in WAITING_STATUSES]


Key = tuple[float, str]  # (created_at, id): the walk's order, unique


@dataclass(frozen=True, slots=True)
class BodySweep:
    """What one sweep did."""

    scanned: int  # messages accepted before the cut that it looked at
    purged: int  # bodies it emptied
    in_flight: int  # messages it kept because a recipient may still be tried
    mark: Key  # where the next sweep starts (that message included)


async def _read_mark(store: Store) -> Key:
    async with store._read() as conn:
        value = await meta.get(conn, MARK_KEY)
    try:
        at, message_id = json.loads(value) if value is not None else (0.0, "")
        return float(at), str(message_id)
    except (ValueError, TypeError):
        return 0.0, ""  # a hand-edited mark: walk from the start, which is only slower


async def _write_mark(store: Store, mark: Key) -> None:
    async with store._write() as conn:
        await meta.put(conn, store, MARK_KEY, json.dumps(list(mark)))


def _from(key: Key, inclusive: bool) -> sa.ColumnElement[bool]:
    at, message_id = key
    same = message.c.id >= message_id if inclusive else message.c.id > message_id
    return sa.or_(message.c.created_at > at, sa.and_(message.c.created_at == at, same))


async def _walk_step(conn: Any, cut: float, key: Key, inclusive: bool) -> list[Any]:
    """The next BATCH messages accepted before ``cut``, from ``key`` on, in walk order."""
    rows = await conn.execute(
        sa.select(message.c.id, message.c.created_at, message.c.size)
        .where(message.c.created_at < cut, _from(key, inclusive))
        .order_by(message.c.created_at, message.c.id)
        .limit(BATCH)
    )
    return list(rows.all())


async def _in_flight(conn: Any, ids: list[str]) -> set[str]:
    """Those of these messages with a recipient that may still be tried."""
    found = await conn.execute(
        sa.select(recipient.c.message_id)
        .where(recipient.c.message_id.in_(ids), recipient.c.status.in_(_WAITING))
        .distinct()
    )
    return set(found.scalars())


def _by_bytes(rows: list[Any]) -> list[list[dict[str, str]]]:
    """The rows' ids in consecutive writes of about WRITE_BYTES of body each."""
    writes: list[list[dict[str, str]]] = []
    size = WRITE_BYTES
    for r in rows:
        if size + r.size > WRITE_BYTES:
            writes.append([])
            size = 0
        writes[-1].append({"mid": r.id})
        size += r.size
    return writes


async def purge_bodies(store: Store, cut: float, pause: float = 0.01) -> BodySweep:
    """Empty the body of every message accepted before ``cut`` whose recipients are all
    final. Each write is short (WRITE_BYTES), and ``pause`` seconds after each leave the
    write lock to the accepts."""
    mark = await _read_mark(store)
    key, inclusive = mark, True
    first_in_flight: Key | None = None
    scanned = purged = in_flight = 0
    while True:
        async with store._read() as conn:
            rows = await _walk_step(conn, cut, key, inclusive)
            if not rows:
                break
            open_ids = await _in_flight(conn, [r.id for r in rows])
        # No recipient returns from a final status, so what was final when read is final
        # when written: the read needs no write lock.
        for done in _by_bytes([r for r in rows if r.id not in open_ids]):
            async with store._write() as conn:
                if store.dialect == "sqlite":
                    res = await conn.execute(_SQLITE_EMPTY, done)
                else:  # one statement: asyncpg reports no row count for executemany
                    res = await conn.execute(
                        message.update()
                        .where(
                            message.c.id.in_([d["mid"] for d in done]),
                            sa.func.length(message.c.body) > 0,
                        )
                        .values(body=b"")
                    )
            purged += int(res.rowcount)
            await asyncio.sleep(pause)
        if first_in_flight is None:
            first_in_flight = next(((r.created_at, r.id) for r in rows if r.id in open_ids), None)
        scanned += len(rows)
        in_flight += len(open_ids)
        key, inclusive = (rows[-1].created_at, rows[-1].id), False
        if len(rows) < BATCH:
            break
    # The next walk starts at the first message still in flight, or at the last one seen.
    new_mark = first_in_flight or key
    if new_mark != mark:
        await _write_mark(store, new_mark)
    return BodySweep(scanned, purged, in_flight, new_mark)


# ---------------------------------------------------------------------------- records

# Rows deleted per write where a row is small (events, the bounce log, webhook POSTs),
# and where it holds a whole inbound report (up to the size limit).
LOOSE_ROWS = 1000
REPORT_ROWS = 50


@dataclass(frozen=True, slots=True)
class RecordSweep:
    """What one record sweep did."""

    days_rolled: int  # days counted into stats_day
    messages: int  # messages deleted with their recipients and events
    kept: int  # messages before the cut kept: in flight, or with a later event
    loose: dict[str, int]  # table -> rows deleted by age (events: of no message kept)


async def _deletable(store: Store, rows: list[Any], edge: float) -> tuple[list[Any], int]:
    """Of these messages (accepted before ``edge``), those whose recipients are all
    final and whose last event is before ``edge``; and how many are kept."""
    ids = [r.id for r in rows]
    async with store._read() as conn:
        keep = await _in_flight(conn, ids)
        keep.update(
            (
                await conn.execute(
                    sa.select(event.c.message_id)
                    .where(event.c.message_id.in_(ids), event.c.at >= edge)
                    .distinct()
                )
            ).scalars()
        )
    return [r for r in rows if r.id not in keep], len(keep)


async def _delete_messages(store: Store, ids: list[str]) -> int:
    # Their webhook POSTs go in the by-age pass (webhook_delivery.created_at is indexed;
    # no index leads with message_id there, so deleting by it would read the whole table
    # for every chunk). They were made with the events, all before the cut.
    async with store._write() as conn:
        await conn.execute(event.delete().where(event.c.message_id.in_(ids)))
        await conn.execute(recipient.delete().where(recipient.c.message_id.in_(ids)))
        res = await conn.execute(message.delete().where(message.c.id.in_(ids)))
    return int(res.rowcount)


async def _delete_loose(
    store: Store, table: sa.Table, where: sa.ColumnElement[bool], rows: int, pause: float
) -> int:
    """Delete the rows of ``table`` matching ``where``, ``rows`` per write."""
    deleted = 0
    while True:
        chunk = sa.select(table.c.id).where(where).limit(rows).scalar_subquery()
        async with store._write() as conn:
            n = int((await conn.execute(table.delete().where(table.c.id.in_(chunk)))).rowcount)
        deleted += n
        if n < rows:
            return deleted
        await asyncio.sleep(pause)


async def purge_records(store: Store, cut: float, pause: float = 0.01) -> RecordSweep:
    """Delete what is older than ``cut`` (rounded down to a UTC day), once its days are
    counted into stats_day. Short writes, ``pause`` seconds apart."""
    day_cut = int(cut // DAY)
    rolled = await rollup.roll_up_through(store, day_cut - 1)
    edge = float(day_cut * DAY)
    messages = kept = 0
    key: Key = (0.0, "")
    inclusive = True
    while True:
        async with store._read() as conn:
            rows = await _walk_step(conn, edge, key, inclusive)
        if not rows:
            break
        done, held = await _deletable(store, rows, edge)
        kept += held
        for chunk in _by_bytes(done):
            messages += await _delete_messages(store, [d["mid"] for d in chunk])
            await asyncio.sleep(pause)
        key, inclusive = (rows[-1].created_at, rows[-1].id), False
        if len(rows) < BATCH:
            break
    no_message = ~sa.exists().where(message.c.id == event.c.message_id)
    loose = {
        "event": await _delete_loose(
            store, event, sa.and_(event.c.at < edge, no_message), LOOSE_ROWS, pause
        ),
        "webhook_delivery": await _delete_loose(
            store, webhook_delivery, webhook_delivery.c.created_at < edge, LOOSE_ROWS, pause
        ),
        "bounce_log": await _delete_loose(
            store, bounce_log, bounce_log.c.at < edge, LOOSE_ROWS, pause
        ),
        "inbound_report": await _delete_loose(
            store, inbound_report, inbound_report.c.at < edge, REPORT_ROWS, pause
        ),
        # Delivery's own state, kept only while in force: one row per destination.
        "mta_sts_policy": await _delete_expired(store, mta_sts_policy.c.expires_at),
        "delivery_hold": await _delete_expired(store, delivery_hold.c.until),
    }
    return RecordSweep(rolled.days, messages, kept, loose)


async def _delete_expired(store: Store, end: sa.Column[Any]) -> int:
    """Delete the rows of ``end``'s table whose end has passed (now, not the cut: past its
    end a row is never read again). One write: a row per destination, a few thousand at
    most."""
    async with store._write() as conn:
        res = await conn.execute(end.table.delete().where(end < store.clock()))
    return int(res.rowcount)
