"""queue/hotread.py: reads on their own threads see every commit and can write nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from relay.queue.hotread import HotReader


async def test_reads_see_each_commit_of_another_connection_and_never_write(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (x INTEGER)")
    reader = HotReader(path, threads=2)
    try:
        for i in range(1, 20):
            writer.execute("INSERT INTO t VALUES (?)", (i,))
            rows, named = await reader.fetch(
                [("SELECT count(*) FROM t", ()), ("SELECT max(x) FROM t WHERE x < :n", {"n": 5})]
            )
            assert rows == [(i,)] and named == [(min(i, 4),)]
        with pytest.raises(sqlite3.OperationalError):
            await reader.fetch([("INSERT INTO t VALUES (0)", ())])
    finally:
        reader.close()
        writer.close()


async def test_a_cancelled_read_leaves_the_threads_serving_and_close_stops_them(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "h.db")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (x INTEGER)")
    writer.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(20000)])
    reader = HotReader(path, threads=1)
    slow = "SELECT count(*) FROM t a, t b WHERE a.x < 300 AND b.x < 300"
    task = asyncio.ensure_future(reader.fetch([(slow, ())]))
    await asyncio.sleep(0)  # queued on the one reader thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    try:
        assert await reader.fetch([("SELECT count(*) FROM t", ())]) == [[(20000,)]]
    finally:
        reader.close()
        writer.close()
    assert not any(t.name.startswith("sqlite-read") for t in threading.enumerate())
