"""queue/hotread.py: reads on their own threads see every commit and can write nothing."""

from __future__ import annotations

import sqlite3
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
