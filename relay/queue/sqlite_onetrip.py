"""SQLite: the accept transaction's writes in one trip to the connection's thread.

Through SQLAlchemy every statement is a trip to aiosqlite's thread and back (a thread
switch, a wake-up of the event loop, SQLAlchemy's execution machinery). The accept
transaction ran seven of them per message: the rate bucket read and write, the
message, recipients and events, the counter upserts (issue 9: 14 statements per
message in a listener process, about 0.3 ms of CPU each). Here one function does them
all on the thread, the same checks in the same order, as a group-commit thread job
(groupcommit.py runs a batch of them, each in its SAVEPOINT, in one trip); the rate take
and the quota check are one statement each (see _GCRA_TAKE). PostgreSQL
keeps the portable path in ``Store.accept``: there a statement is a network round trip
anyway.
"""

from __future__ import annotations

import functools
import sqlite3
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from relay.queue.dialect import gcra_next

T = TypeVar("T")

_GCRA_SELECT = 'SELECT value FROM limit_state WHERE "key" = ?'
# No RETURNING: nothing reads the new value, and each returned row is one more
# sqlite3_step, one more GIL release and re-take on this thread (issue 9).
_COUNTER_ADD = (
    'INSERT INTO counter ("key", window_start, value, expires_at) VALUES (?, ?, ?, ?)'
    ' ON CONFLICT ("key", window_start) DO UPDATE'
    " SET value = counter.value + excluded.value, expires_at = excluded.expires_at"
)

# Each statement on the SQLite thread gives up the GIL and waits to take it back from the
# event loop, which at full load runs Python nearly all the time: an accept batch of
# ~5 accepts held the write lock for 6.4 ms (p50), mostly waiting for the GIL (issue 9).
# A one-row SELECT costs two such waits (the row, then the end). So the GCRA take and the
# quota check are each one statement that changes no row when it refuses.
#
# GCRA (dialect.gcra_next): the new TAT is max(tat, now) + amount * interval, taken when
# max(tat, now) - now <= tolerance; a new key starts from now (the same test with tat 0).
_GCRA_TAKE = (
    'INSERT INTO limit_state ("key", value) SELECT :key, :now + :inc WHERE 0 <= :tol'
    ' ON CONFLICT ("key") DO UPDATE SET value = max(limit_state.value, :now) + :inc'
    " WHERE max(limit_state.value, :now) - :now <= :tol"
)
# A limited counter: added only when the sum since ``since`` plus the amount stays within
# the limit (the window added to is never before ``since``: Limits builds them so).
_COUNTER_ADD_WITHIN = (
    'INSERT INTO counter ("key", window_start, value, expires_at)'
    " SELECT :key, :window, :amount, :expires"
    " WHERE (SELECT coalesce(sum(value), 0) FROM counter"
    ' WHERE "key" = :key AND window_start >= :since) + :amount <= :limit'
    ' ON CONFLICT ("key", window_start) DO UPDATE'
    " SET value = counter.value + excluded.value, expires_at = excluded.expires_at"
)


@functools.lru_cache(maxsize=16)
def insert_sql(table: str, columns: tuple[str, ...]) -> str:
    """INSERT with one :named parameter per column (sqlite3 takes the row dicts)."""
    names = ", ".join(f'"{c}"' for c in columns)
    return f"INSERT INTO {table} ({names}) VALUES ({', '.join(':' + c for c in columns)})"


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str
    now: float
    interval: float
    tolerance: float
    amount: int


@dataclass(frozen=True, slots=True)
class Count:
    key: str
    window: float
    amount: int
    expires_at: float
    limit: int | None
    since: float


@dataclass(frozen=True, slots=True)
class AcceptRows:
    message: dict[str, Any]
    recipients: Sequence[dict[str, Any]]
    events: Sequence[dict[str, Any]]
    bucket: Bucket | None
    counts: Sequence[Count]  # in lock order (Store.accept sorts them)


@dataclass(frozen=True, slots=True)
class AcceptRefused:
    """Nothing to commit: the rate bucket is in debt (``wait`` s), or the limit of
    ``counts[count]`` would be passed."""

    wait: float = 0.0
    count: int | None = None


class Refusal(Exception):
    """The accept was refused inside its transaction; its writes are undone."""

    def __init__(self, refused: AcceptRefused) -> None:
        super().__init__(refused)
        self.refused = refused


def accept_job(raw: sqlite3.Connection, rows: AcceptRows) -> None:
    """A group-commit thread job (groupcommit.py), on the SQLite thread: the accept, or
    Refusal (the job's SAVEPOINT then undoes what it wrote)."""
    cur = raw.cursor()
    try:
        b = rows.bucket
        if b is not None:
            take = {"key": b.key, "now": b.now, "inc": b.amount * b.interval, "tol": b.tolerance}
            if cur.execute(_GCRA_TAKE, take).rowcount != 1:
                # Refused (nothing written): read the TAT for the time to wait.
                found = cur.execute(_GCRA_SELECT, (b.key,)).fetchone()
                tat = None if found is None else float(found[0])
                wait, _ = gcra_next(tat, b.now, b.interval, b.tolerance, b.amount)
                raise Refusal(AcceptRefused(wait=wait))
        cur.execute(insert_sql("message", tuple(rows.message)), rows.message)
        cur.executemany(insert_sql("recipient", tuple(rows.recipients[0])), rows.recipients)
        cur.executemany(insert_sql("event", tuple(rows.events[0])), rows.events)
        for i, c in enumerate(rows.counts):
            if c.limit is None:
                cur.execute(_COUNTER_ADD, (c.key, c.window, c.amount, c.expires_at))
                continue
            add = {
                "key": c.key,
                "window": c.window,
                "amount": c.amount,
                "expires": c.expires_at,
                "since": c.since,
                "limit": c.limit,
            }
            if cur.execute(_COUNTER_ADD_WITHIN, add).rowcount != 1:
                raise Refusal(AcceptRefused(count=i))
    finally:
        cur.close()


# The driver connection under each AsyncConnection: get_raw_connection() is a greenlet
# switch, and a fresh greenlet maps a 16 KB frame stack (mmap + munmap), ~10 us per
# batch (issue 9). It changes only when the connection is invalidated or closed.
_adapted: weakref.WeakKeyDictionary[AsyncConnection, Any] = weakref.WeakKeyDictionary()


async def run_on_thread(conn: AsyncConnection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(sqlite3_connection, *args)`` on the thread that owns ``conn``'s
    connection, inside whatever transaction ``conn`` has open."""
    adapted: Any = _adapted.get(conn)
    if adapted is None or conn.closed or conn.invalidated:
        fairy = await conn.get_raw_connection()
        adapted = _adapted[conn] = fairy.dbapi_connection
    aio = adapted._connection
    # sqlite3 errors come back as they are; Store._unavailable makes them a 451.
    async with adapted._execute_mutex:
        result: T = await aio._execute(fn, aio._conn, *args)
    return result
