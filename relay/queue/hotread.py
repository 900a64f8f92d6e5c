"""The per-message reads on SQLite (counter windows, blocklist, suppression; delivery's
message bodies), on threads with plain sqlite3 connections of their own.

Through SQLAlchemy each read checked a connection out of the async pool, crossed into a
greenlet and then to aiosqlite's thread: ~0.13 ms of CPU per read beyond the query, two
reads per message in the listener (issue 9). Here a read is one hop to a reader thread
and back. The connections are opened read-only (``query_only``) with the pragmas the
store's own use, and read in WAL mode, so they never block a writer nor see a half-done
transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# (SQL, its parameters: named in a dict or positional in a sequence)
Read = tuple[str, dict[str, Any] | Sequence[Any]]


def fetch_all(raw: sqlite3.Connection, reads: Sequence[Read]) -> list[list[Any]]:
    """The rows of each read, on the connection's own thread. Each SELECT on its own
    snapshot, as separate reads were (no BEGIN)."""
    cur = raw.cursor()
    try:
        return [cur.execute(sql, params).fetchall() for sql, params in reads]
    finally:
        cur.close()


class HotReader:
    def __init__(self, path: str, threads: int = 2) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="sqlite-read")
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA query_only=ON")
            # SQLite's default 2 MB page cache: these read small rows and bodies read
            # once; a 32 MB cache each only held old bodies (peak memory at 100 KB).
            conn.execute("PRAGMA cache_size=-2000")
            conn.execute("PRAGMA mmap_size=268435456")
            self._local.conn = conn
            with self._lock:
                self._opened.append(conn)
        return conn

    def _fetch(self, reads: Sequence[Read]) -> list[list[Any]]:
        return fetch_all(self._connection(), reads)

    async def fetch(self, reads: Sequence[Read]) -> list[list[Any]]:
        """The rows of each (SQL, parameters) read, in one trip to a reader thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._fetch, reads)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()
