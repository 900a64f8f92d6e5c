"""Dialect-specific SQL, in one place: SQLite pragmas and transaction start, upserts.

Everything else in the store is portable SQLAlchemy Core.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relay.queue.tables import counter, limit_state


def configure_sqlite(engine: AsyncEngine, autocheckpoint: int | None = None) -> None:
    """WAL with synchronous=FULL, and BEGIN IMMEDIATE for writing transactions.

    synchronous=FULL: in WAL mode every commit fsyncs the WAL, so a transaction that
    returned from COMMIT survives power loss (NORMAL would only keep the database
    consistent and may lose the last commits). We only answer 250 after COMMIT returns.

    BEGIN IMMEDIATE takes the write lock at the start, so two writers never deadlock on a
    lock upgrade (which busy_timeout cannot resolve). Read-only work passes
    ``execution_options(readonly=True)`` and gets a plain deferred BEGIN.
    """

    @sa.event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Speed without touching durability (issue 9): a 32 MB page cache per connection
        # (default 2 MB), temp b-trees in memory, and reads through a 256 MB memory map
        # (WAL writes still go through write() and the fsync of synchronous=FULL).
        cursor.execute("PRAGMA cache_size=-32000")
        cursor.execute("PRAGMA temp_store=MEMORY")
        cursor.execute("PRAGMA mmap_size=268435456")
        if autocheckpoint is not None:
            # relay serve: a thread does most checkpointing (checkpoint.py).
            cursor.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint)}")
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        options = conn.get_execution_options()
        if options.get("single"):
            # One SELECT: SQLite runs it on one snapshot by itself; no BEGIN, no COMMIT
            # (Store._read(single=True)); saves two trips to the SQLite thread per read.
            return
        if options.get("readonly"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def gcra_next(
    tat: float | None, now: float, interval: float, tolerance: float, amount: int
) -> tuple[float, float]:
    """GCRA step: (seconds to wait, 0.0 when the tokens are taken; the new TAT)."""
    start = max(float(tat or 0.0), now)
    if start - now > tolerance:
        return start - now - tolerance, float(tat or 0.0)
    return 0.0, start + amount * interval


async def gcra_take(
    conn: AsyncConnection,
    dialect_name: str,
    key: str,
    now: float,
    interval: float,
    tolerance: float,
    amount: int,
) -> float:
    """Token bucket as GCRA inside the caller's write transaction: 0.0 if ``amount``
    tokens were taken, else the seconds to wait (nothing written then).

    The state is one "theoretical arrival time" (TAT) per key. A request is allowed while
    the bucket is not in debt by more than ``tolerance`` (burst); a large message may then
    overdraw it, and later ones wait until the debt is repaid, so the average rate holds.
    The transaction holds the write lock (SQLite BEGIN IMMEDIATE) or the row lock
    (PostgreSQL SELECT ... FOR UPDATE), so processes sharing the database agree.
    """
    if dialect_name == "postgresql":
        await conn.execute(_GCRA_ENSURE_PG, {"key": key, "value": 0.0})
    q = _GCRA_SELECT_PG if dialect_name == "postgresql" else _GCRA_SELECT
    tat = (await conn.execute(q, {"k": key})).scalar()
    wait, new_tat = gcra_next(tat, now, interval, tolerance, amount)
    if wait > 0:
        return wait
    if tat is None:
        await conn.execute(_GCRA_INSERT, {"key": key, "value": new_tat})
    else:
        await conn.execute(_GCRA_UPDATE, {"k": key, "v": new_tat})
    return 0.0


# Statements run per message, built once (issue 9: building a statement and its cache key
# per call cost more CPU than running it on SQLite).
_GCRA_ENSURE_PG = postgresql.insert(limit_state).on_conflict_do_nothing(
    index_elements=[limit_state.c.key]
)
_GCRA_SELECT = sa.select(limit_state.c.value).where(limit_state.c.key == sa.bindparam("k"))
_GCRA_SELECT_PG = _GCRA_SELECT.with_for_update()
_GCRA_INSERT = limit_state.insert()
_GCRA_UPDATE = (
    limit_state.update()
    .where(limit_state.c.key == sa.bindparam("k"))
    .values(value=sa.bindparam("v"))
)


def upsert_insert(dialect_name: str, table: sa.Table) -> Any:
    """The dialect's own INSERT, the one with on_conflict_do_nothing/do_update."""
    return postgresql.insert(table) if dialect_name == "postgresql" else sqlite.insert(table)


def insert_ignoring_duplicates(dialect_name: str, table: sa.Table, key: list[str]) -> Any:
    """INSERT ... ON CONFLICT (key) DO NOTHING."""
    return upsert_insert(dialect_name, table).on_conflict_do_nothing(index_elements=key)


def _counter_add_stmt(dialect_name: str) -> Any:
    stmt = upsert_insert(dialect_name, counter).values(
        key=sa.bindparam("c_key"),
        window_start=sa.bindparam("c_window"),
        value=sa.bindparam("c_amount"),
        expires_at=sa.bindparam("c_expires"),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[counter.c.key, counter.c.window_start],
        set_={
            "value": counter.c.value + stmt.excluded.value,
            "expires_at": stmt.excluded.expires_at,
        },
    )
    return stmt.returning(counter.c.value)


_COUNTER_ADD = {name: _counter_add_stmt(name) for name in ("sqlite", "postgresql")}


async def counter_add(
    conn: AsyncConnection, dialect_name: str, key: str, window: float, amount: int, expires: float
) -> int:
    """``counter_upsert`` with a statement built once: the new value of (key, window)."""
    params = {"c_key": key, "c_window": window, "c_amount": amount, "c_expires": expires}
    res = await conn.execute(_COUNTER_ADD[dialect_name], params)
    return int(res.scalar_one())


def counter_upsert(dialect_name: str, key: str, window: float, amount: int, expires: float) -> Any:
    """INSERT ... ON CONFLICT DO UPDATE value = value + amount, returning the new value.

    A single statement, so concurrent processes on one database never lose an increment.
    """
    stmt = upsert_insert(dialect_name, counter).values(
        key=key, window_start=window, value=amount, expires_at=expires
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[counter.c.key, counter.c.window_start],
        set_={"value": counter.c.value + stmt.excluded.value, "expires_at": expires},
    )
    return stmt.returning(counter.c.value)
