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
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Sequence
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
    """Reader threads fed by one queue; each answers on the asking loop.

    Not a ThreadPoolExecutor: its submit (two locks, a concurrent Future, a work item)
    and asyncio's wrapping of that future (callbacks chained both ways) were ~5% of the
    listener's Python time for one read per recipient (issue 9). Here a read is a
    SimpleQueue put, and the answer one call_soon_threadsafe.
    """

    def __init__(self, path: str, threads: int = 2) -> None:
        self.path = path
        self._count = threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA query_only=ON")
        # SQLite's default 2 MB page cache: these read small rows and bodies read
        # once; a 32 MB cache each only held old bodies (peak memory at 100 KB).
        conn.execute("PRAGMA cache_size=-2000")
        conn.execute("PRAGMA mmap_size=268435456")
        return conn

    def _serve(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while (job := self._jobs.get()) is not None:
                loop, future, reads = job
                try:
                    if conn is None:
                        conn = self._open()
                    rows: list[list[Any]] | BaseException = fetch_all(conn, reads)
                except Exception as exc:
                    rows = exc
                # RuntimeError: the loop closed meanwhile, so no one is waiting.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_answer, future, rows)
        finally:
            if conn is not None:
                conn.close()

    async def fetch(self, reads: Sequence[Read]) -> list[list[Any]]:
        """The rows of each (SQL, parameters) read, in one trip to a reader thread."""
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._serve, name=f"sqlite-read-{i}", daemon=True)
                for i in range(self._count)
            ]
            for t in self._threads:
                t.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[list[Any]]] = loop.create_future()
        self._jobs.put((loop, future, reads))
        return await future

    def close(self) -> None:
        """Stop the threads once the reads queued before have been answered."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads = []


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[list[list[Any]]]", Sequence[Read]]


def _answer(future: asyncio.Future[list[list[Any]]], rows: list[list[Any]] | BaseException) -> None:
    if future.cancelled():  # the reader gave up (its session ended): nothing to tell
        return
    if isinstance(rows, BaseException):
        future.set_exception(rows)
    else:
        future.set_result(rows)
