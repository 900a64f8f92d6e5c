"""schema_meta: small named values kept beside the schema (marks of the retention walks,
delivery's flush requests, secrets every node shares). One row per key, text values."""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.queue import dialect
from relay.queue.store import Store
from relay.queue.tables import schema_meta


async def get(conn: AsyncConnection, key: str) -> str | None:
    """The value of ``key``, or None when it was never set."""
    found = await conn.execute(sa.select(schema_meta.c.value).where(schema_meta.c.key == key))
    value = found.scalar()
    return None if value is None else str(value)


async def put(conn: AsyncConnection, store: Store, key: str, value: str) -> None:
    """Set ``key`` to ``value``, inside the caller's write."""
    stmt = dialect.upsert_insert(store.dialect, schema_meta).values(key=key, value=value)
    await conn.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={"value": value}))


async def shared_secret(store: Store, key: str) -> str:
    """A random hex secret under ``key``, made on first use; every node and every restart
    reads the same one (two nodes making it at once: the first insert wins)."""
    async with store._read() as conn:
        found = await get(conn, key)
    if found is not None:
        return found
    # Insert-if-absent and read back in one write: a block that made it first may share
    # our group-commit batch (not yet committed, so a read outside would miss it) or be
    # another node's (committed before our write began). Either way it is what we read.
    stmt = dialect.upsert_insert(store.dialect, schema_meta).values(
        key=key, value=secrets.token_hex(32)
    )
    async with store._write() as conn:
        await conn.execute(stmt.on_conflict_do_nothing(index_elements=["key"]))
        made = await get(conn, key)
    assert made is not None  # inserted, or present, in this very transaction
    return made
