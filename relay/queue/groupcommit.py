"""Group commit: concurrent write transactions of one process share one COMMIT.

A commit costs an fsync (about 5 ms on our machines with synchronous=FULL), and SQLite
has one writer at a time, so one commit per write capped the whole process at a couple
of hundred transactions a second. Here every ``Store._write()`` block queues as a job;
one writer task opens a transaction, runs each waiting job's block in its own SAVEPOINT
(so a failing job rolls back alone), commits once, and only then lets every job's
``async with`` exit. Durability is unchanged: no caller proceeds (and no SMTP session
answers 250) before the COMMIT that holds its writes has returned.

A block that opens another ``_write()`` inside itself joins the same transaction through
a nested savepoint instead of queueing behind itself.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncConnection

# The connection of the write block the current task is inside, if any.
_current: contextvars.ContextVar[AsyncConnection | None] = contextvars.ContextVar(
    "relay_write_conn", default=None
)

BeginWrite = Callable[[], AbstractAsyncContextManager[AsyncConnection]]


@dataclass(eq=False)
class _Job:
    granted: asyncio.Future[AsyncConnection]
    finished: asyncio.Future[BaseException | None]
    committed: asyncio.Future[None]


@dataclass(eq=False)
class GroupCommitter:
    """One per Store and event loop."""

    begin_write: BeginWrite
    max_batch: int = 256
    # False on PostgreSQL: writers run concurrently there, and one transaction shared by
    # unrelated writers holds every row lock until the batch commits, so two nodes'
    # batches lock counter and lease rows in opposite orders and deadlock (seen with two
    # nodes: a deadlock aborts only the savepoint, the batch keeps its locks).
    batch: bool = True
    _queue: deque[_Job] = field(default_factory=deque)
    _task: asyncio.Task[None] | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    @asynccontextmanager
    async def write(self, urgent: bool = False) -> AsyncIterator[AsyncConnection]:
        outer = _current.get()
        if outer is not None:
            async with outer.begin_nested():
                yield outer
            return
        if not self.batch:
            async with self.begin_write() as conn:
                token = _current.set(conn)
                try:
                    yield conn
                finally:
                    _current.reset(token)
            return
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A store used from a new event loop (CLI runs, tests) gets a fresh writer.
            self._loop, self._task, self._queue = loop, None, deque()
        job = _Job(loop.create_future(), loop.create_future(), loop.create_future())
        if urgent:
            # Delivery outcomes go first: the time between an MX's 250 and our COMMIT of
            # "delivered" is the window in which a crash makes us deliver again.
            self._queue.appendleft(job)
        else:
            self._queue.append(job)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        try:
            conn = await job.granted
        except BaseException as exc:
            if not job.granted.done():
                job.granted.cancel()
            elif not job.granted.cancelled() and job.granted.exception() is None:
                # Granted just as we were cancelled: release the writer, write nothing.
                job.finished.set_result(exc)
            raise
        token = _current.set(conn)
        try:
            yield conn
        except BaseException as exc:
            job.finished.set_result(exc)
            raise
        else:
            job.finished.set_result(None)
        finally:
            _current.reset(token)
        # The block is done; its writes are durable only once the batch commits.
        await asyncio.shield(job.committed)

    async def _run(self) -> None:
        while self._queue:
            batch: list[_Job] = []
            try:
                async with self.begin_write() as conn:
                    while self._queue and len(batch) < self.max_batch:
                        job = self._queue.popleft()
                        if job.granted.done():  # its caller was cancelled while waiting
                            continue
                        savepoint = await conn.begin_nested()
                        job.granted.set_result(conn)
                        batch.append(job)
                        error = await asyncio.shield(job.finished)
                        if error is None:
                            await savepoint.commit()
                        elif savepoint.is_active:
                            await savepoint.rollback()
                        if not self._queue:
                            # Let sessions that are about to write join this commit.
                            await asyncio.sleep(0)
            except BaseException as exc:
                # The batch failed as a whole (commit error, lost connection): every job in
                # it learns so; jobs still queued get a fresh transaction next round.
                for job in batch:
                    if not job.committed.done():
                        job.committed.set_exception(exc)
                        job.committed.exception()  # retrieved: the caller may be gone
                if not batch:
                    for job in list(self._queue):
                        self._queue.remove(job)
                        if not job.granted.done():
                            job.granted.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for job in batch:
                if not job.committed.done():
                    job.committed.set_result(None)
