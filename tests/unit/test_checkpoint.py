"""WAL checkpoints: relay serve copies the log on a thread, its commits only restart it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import sqlalchemy as sa

from relay.config import DatabaseConfig
from relay.queue.checkpoint import BACKSTOP_PAGES
from relay.queue.store import Store

T = sa.Table(
    "t", sa.MetaData(), sa.Column("x", sa.Integer, primary_key=True), sa.Column("b", sa.LargeBinary)
)
MB = 1024 * 1024


async def _store(tmp_path: Path, own_checkpoints: bool) -> Store:
    url = f"sqlite+aiosqlite:///{tmp_path}/c.db"
    store = Store.open(DatabaseConfig(url=url), own_checkpoints=own_checkpoints)
    async with store.engine.begin() as conn:
        await conn.run_sync(T.metadata.create_all)
    return store


def _insert(raw: object, first: int) -> None:
    """A thread job: 64 rows of 16 KB (1 MB of log)."""
    rows = [(first + i, os.urandom(16 * 1024)) for i in range(64)]
    raw.executemany("INSERT INTO t (x, b) VALUES (?, ?)", rows)  # type: ignore[attr-defined]


async def _write_mb(store: Store, start: int, megabytes: int) -> None:
    for i in range(megabytes):
        await store._committer.run(_insert, (start + i) * 64)
        await asyncio.sleep(0)


def _log_size(tmp_path: Path) -> int:
    return (tmp_path / "c.db-wal").stat().st_size


async def test_outside_relay_serve_sqlite_checkpoints_every_thousand_pages(tmp_path: Path) -> None:
    store = await _store(tmp_path, own_checkpoints=False)
    await _write_mb(store, 0, 12)
    assert _log_size(tmp_path) < 6 * MB
    await store.close()


async def test_relay_serve_copies_the_log_on_its_thread_and_keeps_it_bounded(
    tmp_path: Path,
) -> None:
    store = await _store(tmp_path, own_checkpoints=True)
    await _write_mb(store, 0, 12)
    # No COMMIT checkpointed at SQLite's 1,000 pages: the log holds all 12 MB.
    assert _log_size(tmp_path) > 12 * MB
    grown = _log_size(tmp_path)
    store.start_checkpoints(every=0.02)
    checkpointer = store._checkpointer
    assert checkpointer is not None
    # With no writer about, the first PASSIVE checkpoint copies the whole log; on a busy
    # machine its 12 MB and fsync take longer than any fixed sleep, so wait for it.
    for _ in range(1000):
        if checkpointer.checkpoints > 0:
            break
        await asyncio.sleep(0.02)
    # The thread copied the log, so the next writer started it from the top: 6 MB more
    # did not make the file grow (12 + 6 MB would pass the backstop's 16 MB otherwise).
    await _write_mb(store, 12, 6)
    assert _log_size(tmp_path) <= grown
    # Under steady writing the log stays near the backstop mark, 60 MB later.
    await _write_mb(store, 18, 60)
    assert _log_size(tmp_path) < BACKSTOP_PAGES * 4096 + 8 * MB
    assert checkpointer.checkpoints > 0
    await store.close()
    assert store._checkpointer is None
    again = Store.open(DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/c.db"))
    async with again.engine.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(T))).scalar() == 78 * 64
    await again.close()
