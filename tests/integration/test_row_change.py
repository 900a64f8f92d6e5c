"""row_change.generation (migration 0005): every write to a table the row cache holds
moves it once committed, whoever writes, on both dialects; it is how a suspension from
the CLI reaches every process's cache within cache.CHECK_EVERY."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from relay.config import DatabaseConfig
from relay.model import AccountStatus
from relay.queue import limits as q
from relay.queue import meta
from relay.queue import reputation as rq
from relay.queue.cache import CACHED_TABLES, CHECK_EVERY
from relay.queue.store import Store


async def test_every_cached_table_has_the_triggers_that_move_the_generation(
    dialect_store: Store,
) -> None:
    if dialect_store.dialect == "postgresql":
        query = "SELECT tgname FROM pg_trigger WHERE tgname LIKE 'row_change_%'"
        expected = {f"row_change_{t}" for t in CACHED_TABLES}
    else:
        query = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        expected = {
            f"row_change_{t}_{v}" for t in CACHED_TABLES for v in ("insert", "update", "delete")
        }
    async with dialect_store._read() as conn:
        names = {str(r[0]) for r in (await conn.execute(sa.text(query))).all()}
    assert expected <= names


async def test_a_committed_write_moves_the_generation_and_an_open_one_does_not(
    dialect_store: Store, other_node: Store
) -> None:
    acct = await dialect_store.add_account("alice", "x")
    before = await dialect_store._row_generation()
    async with other_node._write() as conn:
        await conn.execute(
            sa.text("UPDATE account SET status = 'suspended' WHERE id = :id"), {"id": acct.id}
        )
        # Not committed: no other process may drop its cache and read the old row again.
        assert await dialect_store._row_generation() == before
    assert await dialect_store._row_generation() > before
    moved = await dialect_store._row_generation()
    # Writes to other tables leave it alone (the queue's writes are not cache changes).
    async with other_node._write() as conn:
        await meta.put(conn, other_node, "some_mark", "1")
    assert await dialect_store._row_generation() == moved


async def test_a_suspension_by_another_process_reaches_the_cache_within_the_check(
    db_url: str, dialect_store: Store, other_node: Store
) -> None:
    # A TTL of a minute: only the generation can show the change this soon.
    server = Store.open(
        DatabaseConfig(url=db_url, cache_seconds=60), node_id="s", clock=dialect_store.clock
    )
    try:
        acct = await server.add_account("alice", "x")
        now = [100.0]
        server.cache.clock = lambda: now[0]
        state = await rq.account_state(server, acct.id)
        assert state is not None and state.status is AccountStatus.ACTIVE
        assert await rq.suspend(other_node, acct.id, "credentials leaked", {"by": "operator"})
        now[0] += CHECK_EVERY
        state = await rq.account_state(server, acct.id)
        assert state is not None and state.status is AccountStatus.SUSPENDED
    finally:
        await server.close()


async def test_two_processes_writing_cached_rows_at_once_all_commit(
    dialect_store: Store, other_node: Store
) -> None:
    await dialect_store.add_account("alice", "x")
    before = await dialect_store._row_generation()
    await asyncio.gather(
        *(
            q.set_override(store, "account", "alice", f"k{i}", str(i))
            for i in range(10)
            for store in (dialect_store, other_node)
        )
    )
    assert len(await q.get_overrides(other_node, "account", "alice")) == 10
    assert await dialect_store._row_generation() >= before + 10
