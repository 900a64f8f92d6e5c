"""Issue 9, third round: the hot per-message reads run without BEGIN/COMMIT on SQLite,
read transactions and writes keep theirs, and the prebuilt lookups find what the
general listings find."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from relay.config import DatabaseConfig
from relay.queue import reputation as rq
from relay.queue.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store.open(DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"), "t")
    await s.migrate()
    yield s
    await s.close()


def record_statements(store: Store) -> list[str]:
    seen: list[str] = []

    @sa.event.listens_for(store.engine.sync_engine, "before_cursor_execute")
    def _seen(_c: Any, _cur: Any, statement: str, *_rest: Any) -> None:
        seen.append(statement.split()[0].upper())

    return seen


async def test_single_statement_read_runs_without_begin(store: Store) -> None:
    seen = record_statements(store)
    async with store._read(single=True) as conn:
        assert (await conn.execute(sa.text("SELECT 7"))).scalar() == 7
    assert seen == ["SELECT"]


async def test_read_transaction_and_write_keep_their_begin(store: Store) -> None:
    seen = record_statements(store)
    async with store._read() as conn:
        await conn.execute(sa.text("SELECT 1"))
        await conn.execute(sa.text("SELECT 2"))
    assert seen == ["BEGIN", "SELECT", "SELECT"]
    seen.clear()
    async with store._write() as conn:
        await conn.execute(sa.text("SELECT 3"))
    assert seen[0] == "BEGIN" and "SELECT" in seen


async def test_blocklist_and_suppression_lookups_match_the_listings(store: Store) -> None:
    await rq.blocklist_add(store, "Bob@Example.org", "hard bounce", 3)
    await rq.suppression_add(store, "example.com", "carol@example.org", "unsubscribe")
    got = await rq.blocklist_get(store, "bob@example.org")
    assert got is not None
    assert got == (await rq.blocklist_list(store, exact="bob@example.org"))[0]
    assert await rq.blocklist_get(store, "nobody@example.org") is None
    sup = await rq.suppression_get(store, "Example.COM.", "Carol@example.org")
    assert sup is not None and sup.address == "carol@example.org"
    assert await rq.suppression_get(store, "example.net", "carol@example.org") is None
