"""Dialect-specific SQL, in one place: SQLite pragmas and transaction start, upserts.

Everything else in the store is portable SQLAlchemy Core.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relay.queue.tables import counter, limit_state


def configure_sqlite(engine: AsyncEngine) -> None:
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
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        if conn.get_execution_options().get("readonly"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


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
        await conn.execute(
            postgresql.insert(limit_state)
            .values(key=key, value=0.0)
            .on_conflict_do_nothing(index_elements=[limit_state.c.key])
        )
    q = sa.select(limit_state.c.value).where(limit_state.c.key == key)
    if dialect_name == "postgresql":
        q = q.with_for_update()
    tat = (await conn.execute(q)).scalar()
    start = max(float(tat or 0.0), now)
    if start - now > tolerance:
        return start - now - tolerance
    new_tat = start + amount * interval
    if tat is None:
        await conn.execute(limit_state.insert().values(key=key, value=new_tat))
    else:
        await conn.execute(
            limit_state.update().where(limit_state.c.key == key).values(value=new_tat)
        )
    return 0.0


def counter_upsert(dialect_name: str, key: str, window: float, amount: int, expires: float) -> Any:
    """INSERT ... ON CONFLICT DO UPDATE value = value + amount, returning the new value.

    A single statement, so concurrent processes on one database never lose an increment.
    """
    ins: Any
    ins = postgresql.insert(counter) if dialect_name == "postgresql" else sqlite.insert(counter)
    stmt = ins.values(key=key, window_start=window, value=amount, expires_at=expires)
    stmt = stmt.on_conflict_do_update(
        index_elements=[counter.c.key, counter.c.window_start],
        set_={"value": counter.c.value + stmt.excluded.value, "expires_at": expires},
    )
    return stmt.returning(counter.c.value)
