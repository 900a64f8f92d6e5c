"""One writer at a time across the processes sharing a SQLite file, woken by the kernel.

SQLite lets one process write at a time; a writer that finds the lock taken gets
SQLITE_BUSY and its busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries. With
listener processes (relay/processes.py) committing beside delivery, those sleeps put
p99 accept latency above a second (issue 9: 2 listener processes, 20 sessions, p99
1,087 ms). An flock(2) on a file beside the database is released to the next waiter
the moment its holder lets go. Each process still batches its own writers into one
transaction (groupcommit.py); this lock orders the batches of different processes.

The lock is taken without blocking when it is free (one syscall on the loop), and by a
thread when it is not, so the event loop never waits on it. Group-commit thread jobs
take it on the SQLite thread itself (``hold_on_thread``), right around BEGIN ... COMMIT:
held from the loop, the lock also covered the hops to and from that thread and however
long a busy event loop took to run the release (issue 9: the listener's accepts waited
p50 1.6 ms for delivery's batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager


class WriteLock:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._opening = threading.Lock()  # the loop and a database thread may both open

    def _file(self) -> int:
        if self._fd is None:
            with self._opening:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    @contextlib.contextmanager
    def hold_on_thread(self) -> Iterator[None]:
        """The lock, blocking: only on a database thread, never on the event loop."""
        fd = self._file()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            self._release(fd)

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        fd = self._file()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting = asyncio.ensure_future(asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX))
            try:
                await asyncio.shield(waiting)
            except asyncio.CancelledError:
                # The thread may still get the lock after we gave up: let it go then.
                waiting.add_done_callback(lambda f: f.cancelled() or self._release(fd))
                raise
        try:
            yield
        finally:
            self._release(fd)

    @staticmethod
    def _release(fd: int) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
