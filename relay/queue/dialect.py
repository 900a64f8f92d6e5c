"""Dialect-specific SQL, in one place: SQLite pragmas and transaction start, upserts.

Everything else in the store is portable SQLAlchemy Core.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.queue.tables import counter


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
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        if conn.get_execution_options().get("readonly"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


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
