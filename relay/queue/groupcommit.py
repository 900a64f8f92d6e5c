"""Group commit: concurrent write transactions of one process share one COMMIT.

A commit costs an fsync (about 5 ms on our machines with synchronous=FULL), and SQLite
has one writer at a time, so one commit per write capped the whole process at a couple
of hundred transactions a second. Here every ``Store._write()`` block queues as a job;
one writer task opens a transaction, runs each waiting job's block in its own SAVEPOINT
(so a failing job rolls back alone; savepoints of jobs that succeeded are never released,
the COMMIT takes them all), commits once, and only then lets every job's
``async with`` exit. Durability is unchanged: no caller proceeds (and no SMTP session
answers 250) before the COMMIT that holds its writes has returned.

A block that opens another ``_write()`` inside itself joins the same transaction through
a nested savepoint instead of queueing behind itself.

Thread jobs (``run``, SQLite): a function of the raw sqlite3 connection, queued like a
block. Consecutive thread jobs form a batch of their own that runs in ONE trip to the
SQLite thread: BEGIN IMMEDIATE, each job in its own SAVEPOINT, COMMIT. A block is
awaited step by step on the event loop, so while the loop also serves every SMTP
session a batch of 20 blocks held the write lock for up to ~100 ms and the other
process waited (issue 9); a batch of thread jobs holds it for the SQLite work alone
(and costs one trip instead of four per job: BEGIN, SAVEPOINT, job, COMMIT).

A thread job may also name a ``many`` function: consecutive jobs with the same one run
as one call, ``many(raw, [arg, ...])``, which does what each job would do, in order,
with a few multi-row statements instead of several statements per job (the accepts,
sqlite_onetrip.accept_many). If that call raises, or a caller gives up while it runs,
its writes are undone and the jobs run one by one as before, each in its SAVEPOINT: the
outcome of every job is the same either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

T = TypeVar("T")
R = TypeVar("R")

# The connection of the write block the current task is inside, if any.
_current: contextvars.ContextVar[AsyncConnection | None] = contextvars.ContextVar(
    "relay_write_conn", default=None
)

BeginWrite = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
# Runs fn(sqlite3_connection, arg) on the thread of conn's connection (sqlite_onetrip).
OnThread = Callable[[AsyncConnection, Callable[..., Any], Any], Awaitable[Any]]
# Several thread jobs' arguments in, each one's (succeeded, value or exception) out.
Many = Callable[[sqlite3.Connection, list[Any]], list[tuple[bool, Any]]]


@dataclass(eq=False)
class _Job:
    granted: asyncio.Future[AsyncConnection]
    finished: asyncio.Future[BaseException | None]
    committed: asyncio.Future[None]
    # Thread jobs: the function, its argument, and what it returned or raised.
    fn: Callable[[sqlite3.Connection, Any], Any] | None = None
    arg: Any = None
    cancelled: bool = False  # read on the SQLite thread: skip or undo the job
    outcome: tuple[bool, Any] = (False, None)
    # False: the job's writes may wait for the next fsync (see _commit_thread_jobs).
    durable: bool = True
    many: Many | None = None


def _commit_thread_jobs(
    raw: sqlite3.Connection,
    jobs: list[_Job],
    lock: Callable[[], AbstractContextManager[None]] | None = None,
) -> list[tuple[bool, Any]]:
    """On the SQLite thread: one transaction; each job of several in a SAVEPOINT of its
    own, so that a failing one is undone alone (a job alone needs none).

    A batch of only non-durable jobs (delivery outcomes, claims) commits with
    synchronous=NORMAL:
    in WAL mode that COMMIT writes the WAL without an fsync, so the write lock is held
    for the SQLite work alone and the listener's accepts stop queueing behind outcome
    fsyncs (issue 9: half-rate p99). A process crash loses nothing (the data is in the
    file); an OS crash or power loss can lose the outcomes written since the last fsync,
    and the next durable COMMIT from any process fsyncs the WAL with them in it. Losing
    a "delivered" that way means one more delivery: at-least-once, as after a crash
    between the MX's 250 and our COMMIT; losing a claim leaves the row claimable. Accepts
    are always durable (250 = on disk).
    """
    lazy = not any(job.durable for job in jobs)
    if lazy:
        raw.execute("PRAGMA synchronous=NORMAL")
    try:
        # The cross-process write lock (writelock.py), taken here on the thread.
        with lock() if lock is not None else contextlib.nullcontext():
            raw.execute("BEGIN IMMEDIATE")
            try:
                out = _run_thread_jobs(raw, jobs)
                if any(ok for ok, _ in out):
                    raw.execute("COMMIT")
                elif raw.in_transaction:
                    # Nothing to keep: every job failed or was cancelled (a job alone
                    # has no SAVEPOINT to undo, see _run_thread_jobs).
                    raw.execute("ROLLBACK")
            except BaseException:
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
                raise
    finally:
        if lazy:
            raw.execute("PRAGMA synchronous=FULL")
    return out


def _run_thread_jobs(raw: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[bool, Any]]:
    # A job alone needs no SAVEPOINT: if it fails, the whole transaction is undone
    # (_commit_thread_jobs). One statement less under the write lock for the usual
    # batch below full load, where each statement also waits for the GIL (issue 9).
    savepoints = len(jobs) > 1
    out: list[tuple[bool, Any]] = []
    i = 0
    while i < len(jobs):
        many, end = jobs[i].many, i + 1
        if many is not None and savepoints:
            while end < len(jobs) and jobs[end].many is many:
                end += 1
            if end - i > 1:
                together = _run_many(raw, many, jobs[i:end], i)
                if together is not None:
                    out.extend(together)
                    i = end
                    continue
        out.extend(_run_one(raw, job, k, savepoints) for k, job in enumerate(jobs[i:end], i))
        i = end
    return out


def _run_one(raw: sqlite3.Connection, job: _Job, i: int, savepoint: bool) -> tuple[bool, Any]:
    if job.cancelled:
        return (False, None)
    if savepoint:
        raw.execute(f"SAVEPOINT relay_job_{i}")
    try:
        assert job.fn is not None
        value = job.fn(raw, job.arg)
    except Exception as exc:  # the job's own failure: undo it alone
        if savepoint:
            raw.execute(f"ROLLBACK TO relay_job_{i}")
        return (False, exc)
    if job.cancelled:  # its caller gave up while it ran: it must not commit
        if savepoint:
            raw.execute(f"ROLLBACK TO relay_job_{i}")
        return (False, None)
    return (True, value)


def _run_many(
    raw: sqlite3.Connection, many: Many, run: list[_Job], first: int
) -> list[tuple[bool, Any]] | None:
    """The jobs of ``run`` in one ``many`` call; None (its writes undone) when they must
    run one by one instead: the call raised, or a caller gave up while it ran."""
    skipped = [job.cancelled for job in run]  # read once: the loop may set it any time
    live = [job for job, gone in zip(run, skipped, strict=True) if not gone]
    if not live:
        return [(False, None)] * len(run)
    raw.execute(f"SAVEPOINT relay_many_{first}")
    try:
        outcomes = many(raw, [job.arg for job in live])
        if len(outcomes) != len(live) or any(job.cancelled for job in live):
            raise _OneByOne
    except Exception:
        raw.execute(f"ROLLBACK TO relay_many_{first}")
        return None
    done = iter(outcomes)
    return [(False, None) if gone else next(done) for gone in skipped]


class _OneByOne(Exception):
    """The many call's outcomes cannot stand (a caller gave up while its job ran with
    others, or the call answered for a different number of jobs): run them one by one."""


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
    on_thread: OnThread | None = None
    # A connection with no transaction open (Store._connect_write) for thread batches,
    # and the cross-process write lock they take on the thread (None: none needed).
    connect_write: BeginWrite | None = None
    thread_lock: Callable[[], AbstractContextManager[None]] | None = None
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
        loop = self._own(asyncio.get_running_loop())
        job = _Job(loop.create_future(), loop.create_future(), loop.create_future())
        self._enqueue(loop, job, urgent)
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

    async def run(
        self,
        fn: Callable[[sqlite3.Connection, T], R],
        arg: T,
        urgent: bool = False,
        durable: bool = True,
        many: Many | None = None,
    ) -> R:
        """A thread job: ``fn(raw_connection, arg)`` in the next batch; its return value
        once the batch has COMMITted, or what it raised (its writes undone then).
        ``durable=False``: see _commit_thread_jobs. ``many``: see the module's text."""
        assert self.batch and self.on_thread and self.connect_write, "thread jobs: SQLite"
        loop = self._own(asyncio.get_running_loop())
        job = _Job(loop.create_future(), loop.create_future(), loop.create_future(), fn, arg)
        job.durable = durable
        job.many = many
        self._enqueue(loop, job, urgent)
        try:
            await asyncio.shield(job.committed)
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        ok, value = job.outcome
        if not ok:
            raise value
        result: R = value
        return result

    def _own(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        if self._loop is not loop:
            # A store used from a new event loop (CLI runs, tests) gets a fresh writer.
            self._loop, self._task, self._queue = loop, None, deque()
        return loop

    def _enqueue(self, loop: asyncio.AbstractEventLoop, job: _Job, urgent: bool) -> None:
        if urgent:
            # Delivery outcomes go first: the time between an MX's 250 and our COMMIT of
            # "delivered" is the window in which a crash makes us deliver again.
            self._queue.appendleft(job)
        else:
            self._queue.append(job)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while self._queue:
            if self._queue[0].fn is not None:
                await self._thread_batch()
                continue
            batch: list[_Job] = []
            try:
                async with self.begin_write() as conn:
                    while self._queue and len(batch) < self.max_batch:
                        if self._queue[0].fn is not None:
                            break  # thread jobs commit in a batch of their own, next
                        job = self._queue.popleft()
                        if job.granted.done():  # its caller was cancelled while waiting
                            continue
                        savepoint = await conn.begin_nested()
                        job.granted.set_result(conn)
                        batch.append(job)
                        error = await asyncio.shield(job.finished)
                        if error is not None and savepoint.is_active:
                            await savepoint.rollback()
                        # A job that succeeded keeps its savepoint open: the next job's
                        # nests inside it, a later ROLLBACK TO undoes only that job, and
                        # the COMMIT makes them all durable together. A RELEASE per job
                        # was one more trip to the SQLite thread per write (issue 9).
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
                        waiting = job.committed if job.fn is not None else job.granted
                        if not waiting.done():
                            waiting.set_exception(exc)
                            waiting.exception()  # retrieved: the caller may be gone
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for job in batch:
                if not job.committed.done():
                    job.committed.set_result(None)

    async def _thread_batch(self) -> None:
        """The queue's leading thread jobs: one transaction, one trip to the thread."""
        run: list[_Job] = []
        while self._queue and self._queue[0].fn is not None and len(run) < self.max_batch:
            job = self._queue.popleft()
            if not job.cancelled:
                run.append(job)
        if not run:
            return
        assert self.on_thread is not None and self.connect_write is not None
        try:
            async with self.connect_write() as conn:
                commit = functools.partial(_commit_thread_jobs, lock=self.thread_lock)
                outcomes = await self.on_thread(conn, commit, run)
        except BaseException as exc:
            for job in run:  # nothing of the batch was committed
                job.committed.set_exception(exc)
                job.committed.exception()  # retrieved: the caller may be gone
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for job, outcome in zip(run, outcomes, strict=True):
            job.outcome = outcome
            job.committed.set_result(None)
