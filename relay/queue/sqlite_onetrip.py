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
# An increment of a counter window: the one ON CONFLICT clause of every counter upsert.
_COUNTER_ADDS_UP = (
    ' ON CONFLICT ("key", window_start) DO UPDATE'
    " SET value = counter.value + excluded.value, expires_at = excluded.expires_at"
)
_COUNTER_INSERT = 'INSERT INTO counter ("key", window_start, value, expires_at)'
_COUNTER_ADD = _COUNTER_INSERT + " VALUES (?, ?, ?, ?)" + _COUNTER_ADDS_UP

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
    _COUNTER_INSERT + " SELECT :key, :window, :amount, :expires"
    " WHERE (SELECT coalesce(sum(value), 0) FROM counter"
    ' WHERE "key" = :key AND window_start >= :since) + :amount <= :limit' + _COUNTER_ADDS_UP
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


# Several accepts at once (accept_many): SQLite's default limits are 32,766 parameters
# a statement (since 3.32) and 2,000 result columns; stay well below both.
_MAX_PARAMS = 30_000
_MAX_ROWS = 500
_MAX_LOOKUPS = 500
_TAT_OF = f"({_GCRA_SELECT})"
_SUM_SINCE = '(SELECT coalesce(sum(value), 0) FROM counter WHERE "key" = ? AND window_start >= ?)'


@functools.lru_cache(maxsize=64)
def _lookup_sql(tats: int, sums: int) -> str:
    """One row: the TAT of each of ``tats`` keys, then the sum of each of ``sums``
    (key, since) pairs, as scalar subqueries (one row costs one step on this thread)."""
    return "SELECT " + ", ".join([_TAT_OF] * tats + [_SUM_SINCE] * sums)


@functools.lru_cache(maxsize=256)
def _values_sql(head: str, width: int, rows: int, tail: str = "") -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return f"{head} VALUES {', '.join([one] * rows)}{tail}"


def _insert_many(
    cur: sqlite3.Cursor,
    head: str,
    width: int,
    rows: Sequence[Sequence[Any]],
    tail: str = "",
    *,
    pow2: bool = False,
) -> None:
    """``head VALUES (...), (...) tail``: many rows in one statement, in order.

    ``pow2``: statements of 1, 2, 4 ... rows only. SQLite keeps a statement's bound
    values until it is bound again (sqlite3_reset does not clear them), and sqlite3
    caches up to 128 statements a connection, one per row count here: each kept a copy
    of the last bodies it inserted. At 100 sessions of 100 KB that was ~110 MB of the
    listener's peak (issue 9). With powers of two at most ~2x the largest batch's
    bodies stay bound, for at most one more statement per set bit of the batch size."""
    per = max(1, min(_MAX_ROWS, _MAX_PARAMS // width))
    start = 0
    while start < len(rows):
        n = min(per, len(rows) - start)
        if pow2:
            n = 1 << (n.bit_length() - 1)
        chunk = rows[start : start + n]
        cur.execute(_values_sql(head, width, n, tail), [v for r in chunk for v in r])
        start += n


def _insert_dicts(
    cur: sqlite3.Cursor, table: str, rows: Sequence[dict[str, Any]], *, pow2: bool = False
) -> None:
    """The row dicts in order; each run of rows with the same columns in one statement
    (``pow2``: see ``_insert_many``)."""
    start = 0
    while start < len(rows):
        columns = tuple(rows[start])
        end = start + 1
        while end < len(rows) and tuple(rows[end]) == columns:
            end += 1
        names = ", ".join(f'"{c}"' for c in columns)
        values = [tuple(r[c] for c in columns) for r in rows[start:end]]
        _insert_many(cur, f"INSERT INTO {table} ({names})", len(columns), values, pow2=pow2)
        start = end


def _lookup(
    cur: sqlite3.Cursor, tat_keys: list[str], sum_keys: list[tuple[str, float]]
) -> tuple[dict[str, float | None], dict[tuple[str, float], int]]:
    tats: dict[str, float | None] = {}
    sums: dict[tuple[str, float], int] = {}
    wanted: list[tuple[str, Any]] = [("tat", k) for k in tat_keys] + [("sum", k) for k in sum_keys]
    for start in range(0, len(wanted), _MAX_LOOKUPS):
        chunk = wanted[start : start + _MAX_LOOKUPS]
        chunk_tats = [k for kind, k in chunk if kind == "tat"]
        chunk_sums = [k for kind, k in chunk if kind == "sum"]
        params: list[Any] = list(chunk_tats)
        for key, since in chunk_sums:
            params += (key, since)
        row = cur.execute(_lookup_sql(len(chunk_tats), len(chunk_sums)), params).fetchone()
        for i, key in enumerate(chunk_tats):
            tats[key] = None if row[i] is None else float(row[i])
        for i, pair in enumerate(chunk_sums, len(chunk_tats)):
            sums[pair] = int(row[i])
    return tats, sums


def accept_many(raw: sqlite3.Connection, batch: list[AcceptRows]) -> list[tuple[bool, Any]]:
    """Several accepts (group-commit ``many``, groupcommit.py): the same checks in the
    same order as ``accept_job`` for each, with the state read once and written once.

    One row of scalar subqueries reads every rate bucket's TAT and every limited
    counter's sum; each accept is then taken or refused in Python exactly as the
    statements of ``accept_job`` decide (``gcra_next``; sum + amount <= limit, counting
    what the accepts before it in the batch added); one multi-row statement per table
    writes what the accepted ones add (the message rows, which carry the bodies, in
    statements of power-of-two rows: see ``_insert_many``). A few statements for the
    batch instead of seven per accept: each statement on this thread waits for the GIL
    (issue 9)."""
    cur = raw.cursor()
    try:
        tat_keys = list(dict.fromkeys(r.bucket.key for r in batch if r.bucket is not None))
        sum_keys = list(
            dict.fromkeys((c.key, c.since) for r in batch for c in r.counts if c.limit is not None)
        )
        tats, sums = _lookup(cur, tat_keys, sum_keys) if tat_keys or sum_keys else ({}, {})
        # What the accepted ones before added: per key, amount by window_start; and
        # each window's expiry, the last add's (as one upsert after another).
        added: dict[str, dict[float, int]] = {}
        expires: dict[tuple[str, float], float] = {}
        taken: dict[str, float] = {}
        accepted: list[AcceptRows] = []
        out: list[tuple[bool, Any]] = []
        for rows in batch:
            refused, tat = _verdict(rows, tats, sums, added)
            if refused is not None:
                out.append((False, Refusal(refused)))
                continue
            if rows.bucket is not None:
                tats[rows.bucket.key] = taken[rows.bucket.key] = tat
            for c in rows.counts:
                windows = added.setdefault(c.key, {})
                windows[c.window] = windows.get(c.window, 0) + c.amount
                expires[(c.key, c.window)] = c.expires_at
            accepted.append(rows)
            out.append((True, None))
        if taken:
            _insert_many(
                cur,
                'INSERT INTO limit_state ("key", value)',
                2,
                list(taken.items()),
                ' ON CONFLICT ("key") DO UPDATE SET value = excluded.value',
            )
        if accepted:
            # The bodies: statement sizes that keep few of them bound (_insert_many).
            _insert_dicts(cur, "message", [r.message for r in accepted], pow2=True)
            _insert_dicts(cur, "recipient", [x for r in accepted for x in r.recipients])
            _insert_dicts(cur, "event", [x for r in accepted for x in r.events])
        if expires:
            rows_added = [(k, w, added[k][w], at) for (k, w), at in expires.items()]
            _insert_many(cur, _COUNTER_INSERT, 4, rows_added, _COUNTER_ADDS_UP)
        return out
    finally:
        cur.close()


def _verdict(
    rows: AcceptRows,
    tats: dict[str, float | None],
    sums: dict[tuple[str, float], int],
    added: dict[str, dict[float, int]],
) -> tuple[AcceptRefused | None, float]:
    """Why ``accept_job`` would refuse this accept after the batch's earlier ones (None:
    it takes it), and its bucket's new TAT when taken (0.0 without a bucket)."""
    tat = 0.0
    b = rows.bucket
    if b is not None:
        wait, tat = gcra_next(tats[b.key], b.now, b.interval, b.tolerance, b.amount)
        if wait > 0.0:
            return AcceptRefused(wait=wait), tat
    mine: list[tuple[str, float, int]] = []  # this accept's own earlier counts
    for i, c in enumerate(rows.counts):
        if c.limit is not None:
            used = sums[(c.key, c.since)]
            used += sum(n for w, n in added.get(c.key, {}).items() if w >= c.since)
            used += sum(n for k, w, n in mine if k == c.key and w >= c.since)
            if used + c.amount > c.limit:
                return AcceptRefused(count=i), tat
        mine.append((c.key, c.window, c.amount))
    return None, tat


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
