"""SQLite: the accept transaction's writes in one trip to the connection's thread.

Through SQLAlchemy every statement is a trip to aiosqlite's thread and back (a thread
switch, a wake-up of the event loop, SQLAlchemy's execution machinery). The accept
transaction ran seven of them per message: the rate bucket read and write, the
message, recipients and events, the counter upserts (issue 9: 14 statements per
message in a listener process, about 0.3 ms of CPU each). Here one function does them
all on the thread, the same checks in the same order, as a group-commit thread job
(groupcommit.py runs a batch of them in one trip): one accept is one statement
(``accept_job``, a view's INSTEAD OF trigger), several are a few multi-row statements
(``accept_many``). PostgreSQL keeps the portable path in ``Store.accept``: there a
statement is a network round trip anyway.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from relay.queue.dialect import gcra_next

T = TypeVar("T")

_GCRA_SELECT = 'SELECT value FROM limit_state WHERE "key" = ?'
# An increment of a counter window: the one ON CONFLICT clause of every counter upsert.
_COUNTER_ADDS_UP = (
    ' ON CONFLICT ("key", window_start) DO UPDATE'
    " SET value = counter.value + excluded.value, expires_at = excluded.expires_at"
)
_COUNTER_INSERT = 'INSERT INTO counter ("key", window_start, value, expires_at)'


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


# The accept as ONE statement (issue 9: half-rate p99). Each statement on this thread
# lets go of the GIL and must take it back from the event loop, which may hold it for up
# to the 5 ms switch interval: a lone accept made nine such waits (BEGIN, the rate take,
# message, recipient, event, two counters, COMMIT, and a reset or two). Here an INSERT
# into a TEMP view runs an INSTEAD OF trigger that makes the same checks in the same
# order and writes the same rows; a refusal is a RAISE(ABORT), which undoes that
# statement's writes alone (statement atomicity), so the job needs no SAVEPOINT of its
# own. Recipients, events and counts travel as JSON arrays (json_each): a JSON number
# comes back as the same double, checked in the tests.
_REFUSED = "relay: accept refused by a limit"


@dataclass(frozen=True, slots=True)
class _AcceptStatement:
    view: str
    insert: str
    ddl: tuple[str, ...]


@functools.lru_cache(maxsize=8)
def _accept_statement(
    message: tuple[str, ...], recipient: tuple[str, ...], event: tuple[str, ...]
) -> _AcceptStatement:
    """The view, its trigger and the INSERT for rows with these columns (one set per
    process in practice; the view's name tells the sets apart)."""
    digest = hashlib.sha1(repr((message, recipient, event)).encode()).hexdigest()[:12]
    view = f"relay_accept_{digest}"
    params = [f"m{i}" for i in range(len(message))]
    params += ["rcpts", "events", "counts", "bkey", "bnow", "binc", "btol"]

    def names(columns: tuple[str, ...]) -> str:
        return ", ".join(f'"{c}"' for c in columns)

    def each(i: int, source: str = "value") -> str:
        return f"json_extract({source}, '$[{i}]')"

    # counts: [key, window, amount, expires_at, limit, since], in lock order.
    ck, cl, cs = each(0, "c.value"), each(4, "c.value"), each(5, "c.value")
    dk, dw, da = (each(i, "d.value") for i in range(3))
    trigger = f"""CREATE TEMP TRIGGER {view}_do INSTEAD OF INSERT ON {view} BEGIN
  SELECT RAISE(ABORT, '{_REFUSED}') WHERE NEW.bkey IS NOT NULL AND coalesce(
    (SELECT max(value, NEW.bnow) FROM limit_state WHERE "key" = NEW.bkey), NEW.bnow)
    - NEW.bnow > NEW.btol;
  SELECT RAISE(ABORT, '{_REFUSED}') FROM json_each(NEW.counts) AS c
   WHERE {cl} IS NOT NULL
     AND (SELECT coalesce(sum(counter.value), 0) FROM counter
           WHERE counter."key" = {ck} AND counter.window_start >= {cs})
       + (SELECT sum({da}) FROM json_each(NEW.counts) AS d
           WHERE d."key" <= c."key" AND {dk} = {ck} AND {dw} >= {cs}) > {cl};
  INSERT INTO limit_state ("key", value) SELECT NEW.bkey, NEW.bnow + NEW.binc
   WHERE NEW.bkey IS NOT NULL
   ON CONFLICT ("key") DO UPDATE SET value = max(limit_state.value, NEW.bnow) + NEW.binc;
  INSERT INTO message ({names(message)})
   VALUES ({", ".join("NEW." + p for p in params[: len(message)])});
  INSERT INTO recipient ({names(recipient)})
   SELECT {", ".join(each(i) for i in range(len(recipient)))} FROM json_each(NEW.rcpts) WHERE true;
  INSERT INTO event ({names(event)})
   SELECT {", ".join(each(i) for i in range(len(event)))} FROM json_each(NEW.events) WHERE true;
  {_COUNTER_INSERT} SELECT {each(0)}, {each(1)}, {each(2)}, {each(3)}
   FROM json_each(NEW.counts) WHERE true{_COUNTER_ADDS_UP};
END"""
    nulls = ", ".join("NULL" for _ in params)
    return _AcceptStatement(
        view=view,
        insert=f"INSERT INTO temp.{view} VALUES ({', '.join('?' for _ in params)})",
        ddl=(f"CREATE TEMP VIEW {view} ({', '.join(params)}) AS SELECT {nulls}", trigger),
    )


def accept_job(raw: sqlite3.Connection, rows: AcceptRows) -> None:
    """A group-commit thread job (groupcommit.py), on the SQLite thread: the accept in
    one statement, or Refusal (nothing of it written)."""
    rcpt_columns, event_columns = tuple(rows.recipients[0]), tuple(rows.events[0])
    st = _accept_statement(tuple(rows.message), rcpt_columns, event_columns)
    b = rows.bucket
    params = [
        *rows.message.values(),
        json.dumps([[r[c] for c in rcpt_columns] for r in rows.recipients]),
        json.dumps([[e[c] for c in event_columns] for e in rows.events]),
        json.dumps(
            [[c.key, c.window, c.amount, c.expires_at, c.limit, c.since] for c in rows.counts]
        ),
        *(
            (None, None, None, None)
            if b is None
            else (b.key, b.now, b.amount * b.interval, b.tolerance)
        ),
    ]
    cur = raw.cursor()
    try:
        try:
            cur.execute(st.insert, params)
        except sqlite3.OperationalError as exc:
            # A connection's TEMP objects are its own, and a rolled-back transaction
            # takes back those it made: (re)made on first use, one statement a time.
            if st.view not in str(exc):
                raise
            for ddl in st.ddl:
                cur.execute(ddl)
            cur.execute(st.insert, params)
    except sqlite3.IntegrityError as exc:
        if str(exc) != _REFUSED:
            raise
        refused = _refusal(cur, rows)
        if refused is None:
            raise
        raise Refusal(refused) from None
    finally:
        cur.close()


def _refusal(cur: sqlite3.Cursor, rows: AcceptRows) -> AcceptRefused | None:
    """Which limit refused ``rows`` (the trigger says only that one did), read the way
    accept_many reads it."""
    tat_keys = [] if rows.bucket is None else [rows.bucket.key]
    sum_keys = list(dict.fromkeys((c.key, c.since) for c in rows.counts if c.limit is not None))
    if not tat_keys and not sum_keys:
        return None
    tats, sums = _lookup(cur, tat_keys, sum_keys)
    return _verdict(rows, tats, sums, {})[0]


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
