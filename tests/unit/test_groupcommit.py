"""Group commit: many write blocks, one COMMIT; a failing block rolls back alone."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from relay.config import DatabaseConfig
from relay.queue.store import Store

T = sa.Table("t", sa.MetaData(), sa.Column("x", sa.Integer, primary_key=True))


async def _store(tmp_path: Path) -> tuple[Store, list[str]]:
    store = Store.open(DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/g.db"))
    seen: list[str] = []

    @sa.event.listens_for(store.engine.sync_engine, "commit")
    def _on_commit(conn: sa.Connection) -> None:
        seen.append("commit")

    async with store.engine.begin() as conn:
        await conn.run_sync(T.metadata.create_all)
    seen.clear()
    return store, seen


async def test_concurrent_writes_share_commits_and_all_are_durable(tmp_path: Path) -> None:
    store, commits = await _store(tmp_path)

    async def one(i: int) -> None:
        async with store._write() as conn:
            await conn.execute(T.insert().values(x=i))

    await asyncio.gather(*(one(i) for i in range(100)))
    async with store._read() as conn:
        count = (await conn.execute(sa.select(sa.func.count()).select_from(T))).scalar()
    assert count == 100
    assert 1 <= len(commits) < 100
    await store.close()


async def test_a_failing_block_rolls_back_alone(tmp_path: Path) -> None:
    store, _ = await _store(tmp_path)

    async def good(i: int) -> None:
        async with store._write() as conn:
            await conn.execute(T.insert().values(x=i))

    async def bad() -> None:
        async with store._write() as conn:
            await conn.execute(T.insert().values(x=1000))
            raise ValueError("policy says no")

    results = await asyncio.gather(good(1), bad(), good(2), return_exceptions=True)
    assert isinstance(results[1], ValueError)
    async with store._read() as conn:
        xs = sorted((await conn.execute(sa.select(T.c.x))).scalars())
    assert xs == [1, 2]
    await store.close()


async def test_nested_write_joins_the_outer_transaction(tmp_path: Path) -> None:
    store, _ = await _store(tmp_path)
    async with store._write() as conn:
        await conn.execute(T.insert().values(x=1))
        async with store._write() as inner:
            assert inner is conn
            await inner.execute(T.insert().values(x=2))
    async with store._read() as conn:
        assert sorted((await conn.execute(sa.select(T.c.x))).scalars()) == [1, 2]
    await store.close()


async def test_integrity_error_reaches_its_own_caller(tmp_path: Path) -> None:
    store, _ = await _store(tmp_path)
    async with store._write() as conn:
        await conn.execute(T.insert().values(x=1))
    with pytest.raises(sa.exc.IntegrityError):
        async with store._write() as conn:
            await conn.execute(T.insert().values(x=1))
    async with store._write() as conn:
        await conn.execute(T.insert().values(x=3))
    await store.close()


def _insert(raw: object, x: int) -> int:
    """A thread job: runs on the SQLite thread with the raw sqlite3 connection."""
    raw.execute("INSERT INTO t (x) VALUES (?)", (x,))  # type: ignore[attr-defined]
    if x < 0:
        raise ValueError("negative")
    return x * 10


async def _count(store: Store) -> list[int]:
    async with store._read() as conn:
        return [r[0] for r in (await conn.execute(sa.select(T.c.x).order_by(T.c.x))).all()]


async def test_thread_jobs_share_a_commit_and_return_their_values(tmp_path: Path) -> None:
    store, commits = await _store(tmp_path)
    values = await asyncio.gather(*(store._committer.run(_insert, i) for i in range(1, 51)))
    assert values == [i * 10 for i in range(1, 51)]
    assert await _count(store) == list(range(1, 51))
    assert 1 <= len(commits) < 50
    await store.close()


async def test_a_failing_thread_job_is_undone_alone_beside_blocks(tmp_path: Path) -> None:
    store, _ = await _store(tmp_path)

    async def block(i: int) -> None:
        async with store._write() as conn:
            await conn.execute(T.insert().values(x=i))

    results = await asyncio.gather(
        store._committer.run(_insert, 1),
        store._committer.run(_insert, -5),  # inserts, then raises: must not commit
        block(2),
        store._committer.run(_insert, 3),
        return_exceptions=True,
    )
    assert results[0] == 10 and results[3] == 30
    assert isinstance(results[1], ValueError)
    assert await _count(store) == [1, 2, 3]
    await store.close()


async def test_a_failing_thread_job_alone_is_undone_with_its_transaction(tmp_path: Path) -> None:
    store, _ = await _store(tmp_path)
    # Alone in its batch (no SAVEPOINT): it inserts, then raises; nothing may commit.
    with pytest.raises(ValueError):
        await store._committer.run(_insert, -5)
    assert await store._committer.run(_insert, 6) == 60
    # A job alone beside nothing else succeeds and commits as before.
    assert await _count(store) == [6]
    await store.close()


async def test_a_cancelled_thread_job_writes_nothing(tmp_path: Path) -> None:
    store, _ = await _store(tmp_path)

    async def hold() -> None:
        async with store._write() as conn:
            await conn.execute(T.insert().values(x=1))
            await asyncio.sleep(0.2)  # the batch is busy: the next job waits in the queue

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.05)
    job = asyncio.create_task(store._committer.run(_insert, 7))
    await asyncio.sleep(0.05)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    await holder
    assert await store._committer.run(_insert, 9) == 90
    assert await _count(store) == [1, 9]
    await store.close()


def _synchronous(raw: object, _: None) -> int:
    """A thread job reporting the connection's PRAGMA synchronous (1 NORMAL, 2 FULL)."""
    return int(raw.execute("PRAGMA synchronous").fetchone()[0])  # type: ignore[attr-defined]


async def test_only_a_batch_of_non_durable_jobs_skips_the_fsync(tmp_path: Path) -> None:
    store, _ = await _store(tmp_path)
    # Alone, a non-durable job (delivery outcomes, claims) commits with synchronous=NORMAL.
    assert await store._committer.run(_synchronous, None, durable=False) == 1
    # Beside a durable job (an accept) the whole batch is FULL: the 250 waits for fsync.
    mixed = await asyncio.gather(
        store._committer.run(_synchronous, None, durable=False),
        store._committer.run(_synchronous, None),
    )
    assert mixed == [2, 2]
    # And the connection is back to FULL for whatever comes next.
    assert await store._committer.run(_synchronous, None) == 2
    await store.close()


async def test_a_thread_batch_waits_for_another_process_holding_the_write_lock(
    tmp_path: Path,
) -> None:
    import fcntl
    import os

    store, _ = await _store(tmp_path)
    assert store._write_lock is not None
    # Another process's hold: flock on an open file of its own, as a second process has.
    other = os.open(store._write_lock.path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    job = asyncio.create_task(store._committer.run(_insert, 4))
    await asyncio.sleep(0.3)
    assert not job.done(), "the batch committed while another process held the lock"
    fcntl.flock(other, fcntl.LOCK_UN)
    os.close(other)
    assert await asyncio.wait_for(job, 5) == 40
    assert await _count(store) == [4]
    await store.close()


def _connection_id(raw: object, _: None) -> int:
    return id(raw)


async def test_every_thread_batch_writes_on_the_same_connection(tmp_path: Path) -> None:
    # One page cache fills with written bodies, not one per pooled connection.
    store, _ = await _store(tmp_path)
    seen = set()
    for _ in range(5):
        batch = await asyncio.gather(
            *(store._committer.run(_connection_id, None) for _ in range(3)),
            store._read_rows(sa.select(T.c.x), {}),  # reads in between use the pool
        )
        seen.update(batch[:3])
    assert len(seen) == 1
    await store.close()


_many_calls: list[list[int]] = []


def _insert_all(raw: object, xs: list[int]) -> list[tuple[bool, object]]:
    """A ``many`` for _insert: one multi-row statement; raises as a whole if any fails."""
    _many_calls.append(list(xs))
    values = ", ".join("(?)" for _ in xs)
    raw.execute(f"INSERT INTO t (x) VALUES {values}", xs)  # type: ignore[attr-defined]
    return [(True, x * 10) for x in xs]


async def test_consecutive_jobs_with_a_many_run_in_one_call_with_their_own_values(
    tmp_path: Path,
) -> None:
    store, _ = await _store(tmp_path)
    _many_calls.clear()
    jobs = (store._committer.run(_insert, i, many=_insert_all) for i in range(1, 31))
    assert await asyncio.gather(*jobs) == [i * 10 for i in range(1, 31)]
    assert await _count(store) == list(range(1, 31))
    # The first job commits alone (nothing else was queued yet); the rest together.
    assert any(len(xs) > 1 for xs in _many_calls)
    assert sorted(x for xs in _many_calls for x in xs) == list(range(1, 31))
    await store.close()


async def test_when_the_many_call_fails_its_jobs_run_one_by_one_and_only_the_bad_one_fails(
    tmp_path: Path,
) -> None:
    store, _ = await _store(tmp_path)
    async with store._write() as conn:
        await conn.execute(T.insert().values(x=4))
    _many_calls.clear()

    async def hold() -> None:
        async with store._write() as conn:
            await conn.execute(T.insert().values(x=1))
            await asyncio.sleep(0.1)  # the jobs below queue up behind this batch

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.02)
    # 4 is taken: the one statement for 3, 4, 5 fails; one by one, only 4 fails.
    results = await asyncio.gather(
        *(store._committer.run(_insert, x, many=_insert_all) for x in (3, 4, 5)),
        return_exceptions=True,
    )
    await holder
    assert _many_calls == [[3, 4, 5]]
    assert results[0] == 30 and results[2] == 50
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert await _count(store) == [1, 3, 4, 5]
    await store.close()
