"""The store: every SQL statement relay runs lives here (and in dialect.py).

One ``Store`` per process wraps an async SQLAlchemy engine. Each public method is one
transaction. Writers on SQLite take the write lock up front (BEGIN IMMEDIATE, see
dialect.py); on PostgreSQL claims use ``FOR UPDATE SKIP LOCKED`` so any number of nodes
share one queue.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import InterfaceError as SAInterfaceError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from relay.config import DatabaseConfig
from relay.errors import Conflict, NotFound, NotMigrated, StorageFull, StoreUnavailable
from relay.model import (
    CLAIMABLE_STATUSES,
    RETRYABLE_STATUSES,
    WAITING_STATUSES,
    Account,
    AccountStatus,
    Claim,
    Domain,
    DomainStatus,
    EventKind,
    Outcome,
    RecipientStatus,
)
from relay.queue import dialect, sqlite_driver, sqlite_onetrip
from relay.queue.cache import RowCache
from relay.queue.checkpoint import BACKSTOP_PAGES, CHECKPOINT_EVERY, Checkpointer
from relay.queue.groupcommit import GroupCommitter, Many
from relay.queue.hotread import HotReader, fetch_all
from relay.queue.tables import (
    SCHEMA_HEAD,
    account,
    counter,
    domain,
    event,
    message,
    recipient,
    row_change,
)
from relay.queue.writelock import WriteLock

Clock = Callable[[], float]
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class NewRecipient:
    address: str
    status: RecipientStatus = RecipientStatus.QUEUED
    due_at: float | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class NewMessage:
    """Everything the accept transaction writes."""

    id: str
    account_id: int
    mail_from: str
    body: bytes
    recipients: tuple[NewRecipient, ...]
    header_from: str = ""
    subject: str = ""
    message_id_header: str = ""
    client: str = ""
    # RFC 8689 "TLS-Required: No": delivered without MTA-STS or require_tls (Claim).
    tls_optional: bool = False
    # Counters incremented inside the accept transaction (rate windows, quotas, warm-up).
    counters: tuple[CounterAdd, ...] = ()
    # The rate-limit tokens, taken inside the accept transaction (one commit, not two).
    rate: RateTake | None = None


@dataclass(frozen=True, slots=True)
class RateTake:
    """GCRA tokens the accept transaction takes (dialect.gcra_take); when the bucket is
    in debt the accept fails with RateLimited and nothing is committed."""

    key: str
    interval: float
    tolerance: float
    amount: int
    # The refusal text; "{wait}" becomes the seconds to wait.
    limit_text: str = ""


class RateLimited(Exception):
    """The accept's rate take found the bucket in debt; nothing was committed."""

    def __init__(self, text: str, wait: float) -> None:
        super().__init__(text)
        self.text = text
        self.wait = wait


def _rate_limited(take: RateTake | None, wait: float) -> NoReturn:
    assert take is not None
    raise RateLimited(take.limit_text.replace("{wait}", f"{max(wait, 0.001):.2f}"), wait)


@dataclass(frozen=True, slots=True)
class CounterAdd:
    """One counter increment; with ``limit``, the transaction fails (CounterLimitExceeded)
    when the sum of ``key`` over windows >= ``since`` would pass it: a quota is checked
    and counted atomically even with several processes on one database."""

    key: str
    window: float
    amount: int
    expires_at: float
    limit: int | None = None
    since: float = 0.0
    limit_text: str = ""


class CounterLimitExceeded(Exception):
    """A limited counter increment would pass its limit; nothing was committed."""


@dataclass(frozen=True, slots=True)
class OutcomeUpdate:
    """The result of one attempt for one leased recipient."""

    recipient_id: int
    outcome: Outcome
    next_due: float | None = None  # for deferred
    # The message's account (from the Claim): saves a read per outcome when known.
    account_id: int | None = None


@dataclass(frozen=True, slots=True)
class RecipientView:
    id: int
    message_id: str
    address: str
    status: RecipientStatus
    attempts: int
    due_at: float
    last_reply: str | None
    last_mx: str | None
    last_tls: bool | None
    lease_owner: str | None
    reason: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class EventView:
    id: int
    at: float
    kind: str
    account_id: int | None
    message_id: str | None
    recipient: str | None
    data: dict[str, Any]
    node_id: str


@dataclass(frozen=True, slots=True)
class MessageView:
    id: str
    account_id: int
    mail_from: str
    header_from: str
    subject: str
    message_id_header: str
    size: int
    client: str
    node_id: str
    created_at: float
    recipients: tuple[RecipientView, ...] = ()
    events: tuple[EventView, ...] = field(default=())
    # False once the retention sweep emptied the body (queue/retention.py).
    body_kept: bool = True


# Hot-path statements built once (issue 9: building one and its cache key per call cost
# more CPU than running it).
_MESSAGE_FOR_DELIVERY = sa.select(message.c.body, message.c.mail_from, message.c.account_id).where(
    message.c.id == sa.bindparam("id")
)

_MESSAGES_FOR_DELIVERY = sa.select(
    message.c.id, message.c.body, message.c.mail_from, message.c.account_id
).where(message.c.id.in_(sa.bindparam("ids", expanding=True)))

_MESSAGES_FOR_DELIVERY_SQL = "SELECT id, body, mail_from, account_id FROM message WHERE id IN ({})"

# Account lookups (per session and per message; cached, but the WHERE was built before
# the cache was asked: issue 9).
_ACCOUNT_BY_NAME = sa.select(account).where(account.c.name == sa.bindparam("v"))
_ACCOUNT_BY_ID = sa.select(account).where(account.c.id == sa.bindparam("v"))
# Per AUTH and per warming-up message: prebuilt for the hot read path (_read_rows).
_CREDENTIALS = sa.select(
    account.c.id, account.c.name, account.c.status, account.c.settings, account.c.password_hash
).where(account.c.name == sa.bindparam("v"))
# Per cache.CHECK_EVERY while cached rows are read: other processes' writes to them.
_ROW_GENERATION = sa.select(row_change.c.generation).where(row_change.c.id == 1)
_COUNTER_SUM = sa.select(sa.func.coalesce(sa.func.sum(counter.c.value), 0)).where(
    counter.c.key == sa.bindparam("key"), counter.c.window_start >= sa.bindparam("since")
)

_INSERT_MESSAGE = message.insert()
_INSERT_RECIPIENT = recipient.insert()
_INSERT_EVENT = event.insert()
# Alembic's own table: the revision(s) `relay migrate` brought the database to.
_ALEMBIC_VERSION = sa.text("SELECT version_num FROM alembic_version")
# Due recipients of one status, oldest first: walks ix_recipient_status_due in order, and
# each row's message by primary key (a join, not a second "id IN (...)" query: on
# PostgreSQL that one's plan, made while the message table was small, scanned all of it
# at 100,000 messages: 280 ms a claim, bench/queue_depth.py).
_CLAIM_DUE = (
    sa.select(
        recipient.c.id,
        recipient.c.message_id,
        recipient.c.address,
        recipient.c.rcpt_domain,
        recipient.c.attempts,
        recipient.c.due_at,
        message.c.account_id,
        message.c.mail_from,
        message.c.created_at,
        message.c.size,
        message.c.tls_optional,
    )
    .select_from(recipient.join(message, message.c.id == recipient.c.message_id))
    # Status and limit are written into the SQL (literal_execute): PostgreSQL then plans
    # each status on its own instead of reusing one generic plan.
    .where(
        recipient.c.status == sa.bindparam("status", literal_execute=True),
        recipient.c.due_at <= sa.bindparam("now"),
    )
    .order_by(recipient.c.due_at)
    .limit(sa.bindparam("n", type_=sa.Integer, literal_execute=True))
    .with_for_update(of=recipient, skip_locked=True)
)
# An attempt's result; only the row we still lease (lease_owner, status sending).
_OUTCOME = (
    recipient.update()
    .where(
        recipient.c.id == sa.bindparam("o_id"),
        recipient.c.lease_owner == sa.bindparam("o_owner"),
        recipient.c.status == RecipientStatus.SENDING.value,
    )
    .values(
        status=sa.bindparam("o_status"),
        attempts=recipient.c.attempts + 1,
        last_reply=sa.bindparam("o_reply"),
        last_mx=sa.bindparam("o_mx"),
        last_tls=sa.bindparam("o_tls"),
        updated_at=sa.bindparam("o_now"),
        lease_owner=None,
    )
    .returning(recipient.c.message_id, recipient.c.address, recipient.c.attempts)
)
_OUTCOME_DUE = _OUTCOME.values(due_at=sa.bindparam("o_due"))

_TRANSIENT = (OperationalError, SAInterfaceError, OSError, ConnectionError)

# PostgreSQL SQLSTATEs that mean "not now" rather than "wrong": class 08 connection
# exception, 53 insufficient resources (too many connections), 57P0x admin/crash
# shutdown and "cannot connect now" (a server starting or stopping), 57014 statement
# timeout, 40001/40P01 serialization failure and deadlock, 55P03 lock not available.
# asyncpg reports most of them as a plain DBAPIError, which must not escape as a bug.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57P")
_TRANSIENT_SQLSTATES = frozenset({"57014", "40001", "40P01", "55P03"})


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, IntegrityError):
        return False
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        code = str(getattr(exc.orig, "sqlstate", None) or "")
        return code in _TRANSIENT_SQLSTATES or code.startswith(_TRANSIENT_SQLSTATE_CLASSES)
    return False


def _full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL or PostgreSQL's disk_full (53100), bare or wrapped."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, sqlite3.Error):
        return getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return str(getattr(orig, "sqlstate", None) or "") == "53100"


def _unavailable(exc: Exception) -> StoreUnavailable | None:
    """The StoreUnavailable a database error means ("not now", 451), or None: re-raise."""
    if isinstance(exc, StoreUnavailable):
        return None
    if _full(exc):
        return StorageFull(f"database disk full: {exc.__class__.__name__}")
    if isinstance(exc, sqlite3.OperationalError):  # locked, I/O: from a thread job
        return StoreUnavailable(f"database unavailable: {exc}")
    if _transient(exc):
        return StoreUnavailable(f"database unavailable: {exc.__class__.__name__}")
    return None


@contextmanager
def _translated() -> Iterator[None]:
    """Database errors that mean "not now" leave as StoreUnavailable (see _unavailable)."""
    try:
        yield
    except Exception as exc:
        if (unavailable := _unavailable(exc)) is None:
            raise
        raise unavailable from exc


def _by_rcpt(u: OutcomeUpdate) -> int:
    return u.recipient_id


@dataclass(frozen=True, slots=True)
class _OutcomeStep:
    """One outcome to write: the guarded UPDATE and what its event will say."""

    statement: Any
    params: dict[str, Any]
    account_id: int | None
    kind: EventKind
    at: float
    data: dict[str, Any]
    node_id: str

    def event(
        self, account_id: int | None, message_id: str, rcpt: str, attempts: int
    ) -> dict[str, Any]:
        return {
            "at": self.at,
            "kind": self.kind.value,
            "account_id": account_id,
            "message_id": message_id,
            "recipient": rcpt,
            "data": json.dumps({**self.data, "attempt": attempts}, sort_keys=True),
            "node_id": self.node_id,
        }


def _sqlite_sql(statement: Any) -> tuple[str, dict[str, Any]]:
    """SQLite SQL text with :named parameters, and the values bound into it."""
    compiled = statement.compile(dialect=_SQLITE_NAMED)
    return str(compiled), dict(compiled.params)


_SQLITE_NAMED = sqlite_dialect.dialect(paramstyle="named")
_OUTCOME_SQL = {id(stmt): _sqlite_sql(stmt) for stmt in (_OUTCOME, _OUTCOME_DUE)}
_ACCOUNT_OF_MESSAGE_SQL = "SELECT account_id FROM message WHERE id = ?"
_EVENT_COLUMNS = ("at", "kind", "account_id", "message_id", "recipient", "data", "node_id")
_INSERT_EVENT_SQL = sqlite_onetrip.insert_sql("event", _EVENT_COLUMNS)


# claim_due on SQLite, as one thread job (see _claim_on_thread). Same query as
# _CLAIM_DUE per status, without PostgreSQL's FOR UPDATE.
_CLAIM_DUE_SQL = (
    "SELECT recipient.id, recipient.message_id, recipient.address, recipient.rcpt_domain,"
    " recipient.attempts, recipient.due_at, message.account_id, message.mail_from,"
    " message.created_at, message.size, message.tls_optional"
    " FROM recipient JOIN message ON message.id = recipient.message_id"
    " WHERE recipient.status = ? AND recipient.due_at <= ? ORDER BY recipient.due_at LIMIT ?"
)
_LEASE_SQL = (
    "UPDATE recipient SET status = ?, lease_owner = ?, due_at = ?, updated_at = ? WHERE id IN ({})"
)


@dataclass(frozen=True, slots=True)
class _ClaimStep:
    owner: str
    now: float
    lease_until: float
    limit: int


def _claim_on_thread(raw: sqlite3.Connection, step: _ClaimStep) -> list[Claim]:
    """claim_due on the SQLite thread (a group-commit thread job): the selects and the
    lease UPDATE in one trip, so the cross-process write lock is held for the SQLite work
    alone, not across event-loop turns of a busy delivery process (issue 9: listener
    accepts waited behind claims)."""
    found: list[Any] = []
    for status in CLAIMABLE_STATUSES:
        found += raw.execute(_CLAIM_DUE_SQL, (status.value, step.now, step.limit)).fetchall()
    rows = sorted(found, key=lambda r: float(r[5]))[: step.limit]
    if not rows:
        return []
    ids = [r[0] for r in rows]
    raw.execute(
        _LEASE_SQL.format(",".join("?" * len(ids))),
        (RecipientStatus.SENDING.value, step.owner, step.lease_until, step.now, *ids),
    )
    return [
        Claim(
            recipient_id=r[0],
            message_id=r[1],
            account_id=r[6],
            mail_from=r[7],
            address=r[2],
            rcpt_domain=r[3],
            attempts=r[4],
            created_at=r[8],
            size=r[9],
            tls_optional=bool(r[10]),
        )
        for r in rows
    ]


# id(statement) -> (statement, its SQLite SQL, bound values): compiled once per
# statement (the callers pass module-level constants; the identity check keeps a
# recycled id from finding another statement's SQL).
_HOT_SQL: dict[int, tuple[Any, str, dict[str, Any]]] = {}


def _hot_sql(statement: Any) -> tuple[str, dict[str, Any]]:
    found = _HOT_SQL.get(id(statement))
    if found is None or found[0] is not statement:
        found = _HOT_SQL[id(statement)] = (statement, *_sqlite_sql(statement))
    return found[1], found[2]


def _outcomes_on_thread(raw: sqlite3.Connection, steps: list[_OutcomeStep]) -> int:
    """record_outcomes on the SQLite thread (a group-commit thread job)."""
    written = 0
    cur = raw.cursor()
    try:
        for step in steps:
            sql, bound = _OUTCOME_SQL[id(step.statement)]
            row = cur.execute(sql, {**bound, **step.params}).fetchone()
            if row is None:
                continue
            written += 1
            message_id, address, attempts = row
            acct = step.account_id
            if acct is None:
                acct = cur.execute(_ACCOUNT_OF_MESSAGE_SQL, (message_id,)).fetchone()[0]
            cur.execute(_INSERT_EVENT_SQL, step.event(acct, message_id, address, attempts))
    finally:
        cur.close()
    return written


def give_back(owner: str, ids: Sequence[int], due_at: float) -> sa.Update:
    """The UPDATE that gives ``owner``'s leased rows back untried, due at ``due_at``; a
    row tried before goes back to deferred, so its last reply still says why it waits."""
    status = sa.case(
        (recipient.c.attempts > 0, RecipientStatus.DEFERRED.value),
        else_=RecipientStatus.QUEUED.value,
    )
    return (
        recipient.update()
        .where(
            recipient.c.id.in_(list(ids)),
            recipient.c.lease_owner == owner,
            recipient.c.status == RecipientStatus.SENDING.value,
        )
        .values(status=status, due_at=due_at, lease_owner=None)
    )


class Store:
    def __init__(
        self,
        engine: AsyncEngine,
        node_id: str = "",
        clock: Clock = time.time,
        cache_seconds: float = 0.0,
    ) -> None:
        self.engine = engine
        self.node_id = node_id
        self.clock = clock
        self.dialect = engine.dialect.name
        # Engines with the read options preset (same pool and listeners): setting them per
        # connection cost a greenlet switch per read (issue 9).
        self._reads = engine.execution_options(readonly=True)
        self._single_reads = engine.execution_options(readonly=True, single=True)
        # SQLite has one writer at a time and each COMMIT costs an fsync: writers of this
        # process queue (FIFO, no busy_timeout polling) and share commits. Other
        # processes (CLI, other nodes) still meet busy_timeout / row locks.
        self._committer = GroupCommitter(
            self._begin_write,
            batch=self.dialect == "sqlite",
            on_thread=sqlite_onetrip.run_on_thread,
            connect_write=self._connect_write,
        )
        # ... and batches of different processes (listener processes, the CLI) take
        # turns on an flock instead of SQLite's sleeping busy handler (writelock.py).
        database = engine.url.database
        self._write_lock = (
            WriteLock(f"{database}-wlock")
            if self.dialect == "sqlite" and database and database != ":memory:"
            else None
        )
        if self._write_lock is not None:
            self._committer.thread_lock = self._write_lock.hold_on_thread
        # The connection every thread batch writes on (_connect_write).
        self._writer: AsyncConnection | None = None
        self._writer_loop: asyncio.AbstractEventLoop | None = None
        # The per-message reads' own threads and connections (hotread.py).
        self._hot = HotReader(database) if self._write_lock is not None and database else None
        self._checkpointer: Checkpointer | None = None
        # Slow-changing rows read per message (accounts, domains, limits): see cache.py.
        self.cache = RowCache(cache_seconds)
        if self.cache.enabled:
            self.cache.watch(engine)
            self.cache.follow(self._row_generation)

    @classmethod
    def open(
        cls,
        db: DatabaseConfig,
        node_id: str = "",
        clock: Clock = time.time,
        own_checkpoints: bool = False,
    ) -> Store:
        """``own_checkpoints`` (relay serve): SQLite's automatic WAL checkpoint only as a
        backstop; the serving process checkpoints on a thread (checkpoint.py)."""
        kwargs: dict[str, Any] = {}
        if db.is_sqlite:
            kwargs["connect_args"] = {"timeout": db.statement_timeout}
            # One trip to aiosqlite's thread per statement, not four (sqlite_driver.py).
            kwargs["module"] = sqlite_driver.dbapi()
            # Every pooled connection is a thread of aiosqlite's. SQLAlchemy's default
            # (5 kept, 10 overflow closed on return) opened and closed a connection, its
            # thread and its PRAGMAs every few messages under 20+ sessions (issue 9):
            # keep three times pool_size: cheap here (no server process behind them).
            kwargs["pool_size"] = db.pool_size * 3
            kwargs["max_overflow"] = db.pool_size
        else:
            kwargs["pool_size"] = db.pool_size
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {
                "timeout": 10,
                "command_timeout": db.statement_timeout,
                "server_settings": {
                    "statement_timeout": str(int(db.statement_timeout * 1000)),
                },
            }
        engine = create_async_engine(db.url, **kwargs)
        if db.is_sqlite:
            dialect.configure_sqlite(engine, BACKSTOP_PAGES if own_checkpoints else None)
        return cls(engine, node_id=node_id, clock=clock, cache_seconds=db.cache_seconds)

    def start_checkpoints(self, every: float = CHECKPOINT_EVERY) -> None:
        """SQLite file: WAL checkpoints on a thread from now on (checkpoint.py), for the
        serving process; its store opened with ``own_checkpoints``."""
        if self._write_lock is not None and self._checkpointer is None:
            assert self.engine.url.database
            self._checkpointer = Checkpointer(self.engine.url.database, every)
            self._checkpointer.start()

    async def close(self) -> None:
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)
            self._checkpointer = None
        if self._writer is not None and self._writer_loop is asyncio.get_running_loop():
            await self._writer.close()
        self._writer = None
        await self.engine.dispose()
        if self._hot is not None:
            await asyncio.to_thread(self._hot.close)
        if self._write_lock is not None:
            self._write_lock.close()

    # ------------------------------------------------------------------ transactions

    @asynccontextmanager
    async def _write(self, urgent: bool = False) -> AsyncIterator[AsyncConnection]:
        """One write block; concurrent blocks share a COMMIT (see groupcommit.py)."""
        try:
            with _translated():
                async with self._committer.write(urgent) as conn:
                    yield conn
        finally:
            # After COMMIT: drop cached rows this block (or its batch) changed.
            self.cache.after_write()

    def _locked(self) -> AbstractAsyncContextManager[None]:
        """The cross-process write lock (SQLite files), or nothing to wait for."""
        return self._write_lock.held() if self._write_lock is not None else nullcontext()

    @asynccontextmanager
    async def _begin_write(self) -> AsyncIterator[AsyncConnection]:
        # Errors reach the caller through _write / _thread_job, which translate them.
        async with self._locked(), self.engine.begin() as conn:
            yield conn

    async def _thread_job(
        self,
        fn: Callable[[sqlite3.Connection, T], R],
        arg: T,
        urgent: bool = False,
        durable: bool = True,
        many: Many | None = None,
    ) -> R:
        """SQLite: ``fn(raw_connection, arg)`` as a group-commit thread job; its result once
        committed. Database errors become StoreUnavailable, as ``_write`` does."""
        with _translated():
            return await self._committer.run(fn, arg, urgent, durable, many)

    @asynccontextmanager
    async def _connect_write(self) -> AsyncIterator[AsyncConnection]:
        """A connection with no transaction open: for a batch of thread jobs that takes the
        write lock and runs BEGIN ... COMMIT itself on the SQLite thread (groupcommit.py).

        Always the same one (batches run one at a time): taken from the pool per batch,
        every pooled connection in turn wrote message bodies and filled its own 32 MB page
        cache with them, ~15 caches in a listener process (issue 9: 100 KB messages at
        100 sessions, peak memory 2x Postfix's)."""
        loop = asyncio.get_running_loop()
        conn = self._writer
        if conn is None or self._writer_loop is not loop or conn.closed:
            conn = self._writer = await self.engine.connect()
            self._writer_loop = loop
        try:
            yield conn
        except BaseException:
            # A broken connection must not be handed to the next batch.
            self._writer = None
            await asyncio.shield(conn.close())
            raise

    @asynccontextmanager
    async def _read(self, single: bool = False) -> AsyncIterator[AsyncConnection]:
        """A read transaction. ``single=True``: the block runs exactly one statement,
        which on SQLite then runs without BEGIN/COMMIT (one statement reads one snapshot
        anyway); the hot per-message reads use it (issue 9)."""
        engine = self._single_reads if single else self._reads
        with _translated():
            async with engine.connect() as conn, conn.begin():
                yield conn

    async def _row_generation(self) -> int:
        """row_change.generation: moves when any process's write to a cached table commits."""
        rows = await self._read_rows(_ROW_GENERATION, {})
        return int(rows[0][0]) if rows else 0

    async def _read_rows(self, statement: Any, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The rows of one prebuilt SELECT of the per-message hot path (see _read_many)."""
        return (await self._read_many(((statement, params),)))[0]

    async def _read_many(
        self, reads: Sequence[tuple[Any, dict[str, Any]]]
    ) -> list[list[tuple[Any, ...]]]:
        """The rows of each prebuilt, module-level SELECT of the per-message hot path
        (counter windows, blocklist, suppression), as plain tuples in column order.

        SQLite: the statements' SQL, compiled once, runs straight on the sqlite3
        connection in one trip to its thread, each statement without BEGIN (one
        statement reads one snapshot, as ``_read(single=True)``; the statements are as
        independent as separate reads were) and without SQLAlchemy's execution and result
        machinery, which cost as much CPU as the read itself (issue 9: 0.25 -> 0.13 ms
        per blocklist lookup). Other databases: one read transaction.
        """
        if self.dialect != "sqlite":
            async with self._read(single=len(reads) == 1) as conn:
                return [
                    [tuple(r) for r in (await conn.execute(stmt, params)).all()]
                    for stmt, params in reads
                ]
        compiled = []
        for stmt, params in reads:
            sql, bound = _hot_sql(stmt)
            compiled.append((sql, {**bound, **params}))
        with _translated():
            if self._hot is not None:
                return await self._hot.fetch(compiled)
            # ":memory:" has no file for the hot readers to open: its own connection.
            async with self._single_reads.connect() as conn:
                return await sqlite_onetrip.run_on_thread(conn, fetch_all, compiled)

    # ------------------------------------------------------------------ schema

    async def migrate(self) -> str:
        """Apply pending Alembic migrations (relay/migrations). Idempotent."""
        from relay.queue import migrate

        return ", ".join(await migrate.upgrade(self))

    async def check_schema(self) -> None:
        """Raise NotMigrated unless the database is at this code's Alembic head.

        The usual answer (it is) is one read of alembic_version against SCHEMA_HEAD:
        Alembic itself (~6 MB of modules, and its script directory read) is loaded only
        to explain a mismatch or a missing table (issue 9: every process and every CLI
        command checks)."""
        try:
            async with self._read(single=True) as conn:
                found = (await conn.execute(_ALEMBIC_VERSION)).scalars().all()
            if tuple(sorted(found)) == SCHEMA_HEAD:
                return
        except (StoreUnavailable, sa.exc.DBAPIError):
            pass  # no alembic_version table, say: migrate.check says what is wrong
        from relay.queue import migrate

        try:
            await migrate.check(self)
        except StoreUnavailable as exc:
            if "no such table" in str(exc.__cause__):
                raise NotMigrated() from exc
            raise

    async def ping(self) -> bool:
        try:
            async with self._read() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except StoreUnavailable:
            return False
        return True

    # ------------------------------------------------------------------ accounts

    @staticmethod
    def _account(row: Any) -> Account:
        return Store._account_of(row.id, row.name, row.status, row.settings)

    @staticmethod
    def _account_of(account_id: int, name: str, status: str, settings: str | None) -> Account:
        return Account(
            id=account_id,
            name=name,
            status=AccountStatus(status),
            settings=json.loads(settings or "{}"),
        )

    async def add_account(self, name: str, password_hash: str) -> Account:
        try:
            async with self._write() as conn:
                res = await conn.execute(
                    account.insert()
                    .values(name=name, password_hash=password_hash, created_at=self.clock())
                    .returning(account.c.id)
                )
                account_id = res.scalar_one()
        except IntegrityError as exc:
            raise Conflict(f"account {name!r} exists already") from exc
        return Account(id=account_id, name=name, status=AccountStatus.ACTIVE)

    async def account_credentials(self, name: str) -> tuple[Account, str] | None:
        rows = await self._read_rows(_CREDENTIALS, {"v": name})
        if not rows:
            return None
        *fields, password_hash = rows[0]
        return self._account_of(*fields), password_hash

    async def get_account(self, name: str) -> Account:
        found = await self._cached_account(("account", name), _ACCOUNT_BY_NAME, {"v": name})
        if found is None:
            raise NotFound(f"no account named {name!r}")
        return found

    async def get_account_by_id(self, account_id: int) -> Account:
        found = await self._cached_account(
            ("account_id", account_id), _ACCOUNT_BY_ID, {"v": account_id}
        )
        if found is None:
            raise NotFound(f"no account with id {account_id}")
        return found

    async def _cached_account(
        self, key: tuple[str, object], statement: sa.Select[Any], params: dict[str, Any]
    ) -> Account | None:
        async def load() -> Account | None:
            async with self._read(single=True) as conn:
                row = (await conn.execute(statement, params)).first()
            return None if row is None else self._account(row)

        # Only active accounts are cached: a resume from the CLI applies at once.
        return await self.cache.fetch(key, load, _active)

    async def list_accounts(self) -> list[Account]:
        async with self._read() as conn:
            rows = (await conn.execute(sa.select(account).order_by(account.c.name))).all()
        return [self._account(r) for r in rows]

    async def set_password(self, name: str, password_hash: str) -> None:
        async with self._write() as conn:
            res = await conn.execute(
                account.update().where(account.c.name == name).values(password_hash=password_hash)
            )
        if res.rowcount == 0:
            raise NotFound(f"no account named {name!r}")

    # ------------------------------------------------------------------ domains

    @staticmethod
    def _domain(row: Any) -> Domain:
        return Domain(
            id=row.id,
            name=row.name,
            account_id=row.account_id,
            status=DomainStatus(row.status),
            dkim_selector=row.dkim_selector,
            dkim_private_key=row.dkim_private_key,
            dkim_algorithm=row.dkim_algorithm,
            warmup=bool(row.warmup),
        )

    async def add_domain(
        self,
        name: str,
        account_id: int,
        selector: str,
        private_key_pem: str,
        *,
        verified: bool = False,
        warmup: bool = True,
        algorithm: str = "rsa-sha256",
    ) -> Domain:
        now = self.clock()
        status = DomainStatus.VERIFIED if verified else DomainStatus.PENDING
        try:
            async with self._write() as conn:
                res = await conn.execute(
                    domain.insert()
                    .values(
                        name=name,
                        account_id=account_id,
                        status=status.value,
                        dkim_selector=selector,
                        dkim_private_key=private_key_pem,
                        dkim_algorithm=algorithm,
                        warmup=warmup,
                        created_at=now,
                        verified_at=now if verified else None,
                    )
                    .returning(domain.c.id)
                )
                domain_id = res.scalar_one()
        except IntegrityError as exc:
            raise Conflict(f"domain {name!r} exists already") from exc
        return Domain(
            id=domain_id,
            name=name,
            account_id=account_id,
            status=status,
            dkim_selector=selector,
            dkim_private_key=private_key_pem,
            dkim_algorithm=algorithm,
            warmup=warmup,
        )

    async def get_domain(self, name: str) -> Domain | None:
        async def load() -> Domain | None:
            async with self._read(single=True) as conn:
                row = (
                    await conn.execute(sa.select(domain).where(domain.c.name == name.lower()))
                ).first()
            return None if row is None else self._domain(row)

        # Only verified domains are cached: `relay domain verify` in another process
        # lets a pending domain send with the very next message.
        return await self.cache.fetch(("domain", name.lower()), load, _verified)

    async def list_domains(self) -> list[tuple[Domain, str, float | None]]:
        """Every domain with its account name and last check time."""
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    sa.select(domain, account.c.name.label("account_name"))
                    .join(account, account.c.id == domain.c.account_id)
                    .order_by(domain.c.name)
                )
            ).all()
        return [(self._domain(r), r.account_name, r.last_check_at) for r in rows]

    async def set_domain_status(self, name: str, status: DomainStatus) -> None:
        now = self.clock()
        values: dict[str, Any] = {"status": status.value, "last_check_at": now}
        if status is DomainStatus.VERIFIED:
            values["verified_at"] = now
        async with self._write() as conn:
            res = await conn.execute(domain.update().where(domain.c.name == name).values(values))
        if res.rowcount == 0:
            raise NotFound(f"no domain named {name!r}")

    # ------------------------------------------------------------------ accept

    async def accept(self, msg: NewMessage) -> None:
        """The accept transaction: message, one row per recipient, events, all or nothing."""
        now = self.clock()
        message_row = {
            "id": msg.id,
            "account_id": msg.account_id,
            "mail_from": msg.mail_from,
            "header_from": msg.header_from,
            "subject": msg.subject,
            "message_id_header": msg.message_id_header,
            "size": len(msg.body),
            "body": msg.body,
            "client": msg.client,
            "node_id": self.node_id,
            "created_at": now,
            "tls_optional": msg.tls_optional,
        }
        recipient_rows = [
            {
                "message_id": msg.id,
                "address": r.address,
                "rcpt_domain": r.address.rpartition("@")[2].lower(),
                "status": r.status.value,
                "due_at": now if r.due_at is None else r.due_at,
                "reason": r.reason,
                "created_at": now,
                "updated_at": now,
            }
            for r in msg.recipients
        ]
        events = []
        for r in msg.recipients:
            accepted = {"size": len(msg.body), "mail_from": msg.mail_from}
            events.append(
                self._event_row(
                    EventKind.ACCEPTED, now, msg.account_id, msg.id, r.address, accepted
                )
            )
            if r.status is RecipientStatus.HELD:
                held = {"reason": r.reason, "until": r.due_at}
                events.append(
                    self._event_row(EventKind.HELD, now, msg.account_id, msg.id, r.address, held)
                )
        # One lock order for every transaction (PostgreSQL row locks): two accepts
        # touching the same counters then queue up instead of deadlocking.
        counters = sorted(msg.counters, key=lambda c: (c.key, c.window))
        if self.dialect == "sqlite":
            await self._accept_sqlite(msg, message_row, recipient_rows, events, counters, now)
            return
        async with self._write() as conn:
            # The lock holder's clock orders the bucket (see limits.take_tokens).
            taken_at = max(now, self.clock())
            if msg.rate is not None:
                take = msg.rate
                wait = await dialect.gcra_take(
                    conn,
                    self.dialect,
                    take.key,
                    taken_at,
                    take.interval,
                    take.tolerance,
                    take.amount,
                )
                if wait > 0:
                    _rate_limited(take, wait)
            await conn.execute(_INSERT_MESSAGE, message_row)
            await conn.execute(_INSERT_RECIPIENT, recipient_rows)
            await conn.execute(_INSERT_EVENT, events)
            for c in counters:
                await dialect.counter_add(
                    conn, self.dialect, c.key, c.window, c.amount, c.expires_at
                )
                if c.limit is not None:
                    total = (
                        await conn.execute(_COUNTER_SUM, {"key": c.key, "since": c.since})
                    ).scalar()
                    if int(total or 0) > c.limit:
                        raise CounterLimitExceeded(c.limit_text or f"{c.key} over {c.limit}")

    async def _accept_sqlite(
        self,
        msg: NewMessage,
        message_row: dict[str, Any],
        recipient_rows: list[dict[str, Any]],
        events: list[dict[str, Any]],
        counters: list[CounterAdd],
        now: float,
    ) -> None:
        """The accept as one group-commit thread job (sqlite_onetrip.py)."""
        rate = msg.rate
        rows = sqlite_onetrip.AcceptRows(
            message=message_row,
            recipients=recipient_rows,
            events=events,
            # The bucket is read and written under the write lock; its clock is ours.
            bucket=None
            if rate is None
            else sqlite_onetrip.Bucket(
                rate.key, max(now, self.clock()), rate.interval, rate.tolerance, rate.amount
            ),
            counts=[
                sqlite_onetrip.Count(c.key, c.window, c.amount, c.expires_at, c.limit, c.since)
                for c in counters
            ],
        )
        try:
            await self._thread_job(sqlite_onetrip.accept_job, rows, many=sqlite_onetrip.accept_many)
        except sqlite_onetrip.Refusal as exc:
            if exc.refused.count is None:
                _rate_limited(rate, exc.refused.wait)
            c = counters[exc.refused.count]
            raise CounterLimitExceeded(c.limit_text or f"{c.key} over {c.limit}") from None

    # ------------------------------------------------------------------ events

    def _event_row(
        self,
        kind: EventKind,
        at: float,
        account_id: int | None,
        message_id: str | None,
        rcpt: str | None,
        data: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "at": at,
            "kind": kind.value,
            "account_id": account_id,
            "message_id": message_id,
            "recipient": rcpt,
            "data": json.dumps(data, sort_keys=True),
            "node_id": self.node_id,
        }

    async def add_event(
        self,
        kind: EventKind,
        *,
        account_id: int | None = None,
        message_id: str | None = None,
        rcpt: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        async with self._write() as conn:
            await conn.execute(
                event.insert().values(
                    self._event_row(kind, self.clock(), account_id, message_id, rcpt, data or {})
                )
            )

    async def events_for(self, message_id: str) -> list[EventView]:
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    sa.select(event).where(event.c.message_id == message_id).order_by(event.c.id)
                )
            ).all()
        return [_event_view(r) for r in rows]

    # ------------------------------------------------------------------ claims

    async def claim_due(self, owner: str, lease_seconds: float, limit: int) -> list[Claim]:
        """Lease up to ``limit`` due recipients to ``owner``.

        A row is due when it is queued/deferred and its time has come, or when it is
        ``sending`` and its lease has run out (its worker died): that is crash recovery.
        """
        now = self.clock()
        if self.dialect == "sqlite":
            # Not fsynced on its own, as outcomes: a lease lost to a power cut makes the
            # row claimable again, which is what a lease is for.
            step = _ClaimStep(owner, now, now + lease_seconds, limit)
            return await self._thread_job(_claim_on_thread, step, durable=False)
        async with self._write() as conn:
            # One ordered index range per status, merged here: "status IN (...) ORDER BY
            # due_at" sorted every due row per claim (SQLite: a temp B-tree), so a claim
            # slowed as the queue grew (bench/queue_depth.py, issue 9).
            found: list[Any] = []
            for status in CLAIMABLE_STATUSES:
                params = {"status": status.value, "now": now, "n": limit}
                found += (await conn.execute(_CLAIM_DUE, params)).all()
            rows = sorted(found, key=lambda r: float(r.due_at))[:limit]
            if not rows:
                return []
            ids = [r.id for r in rows]
            await conn.execute(
                recipient.update()
                .where(recipient.c.id.in_(ids))
                .values(
                    status=RecipientStatus.SENDING.value,
                    lease_owner=owner,
                    due_at=now + lease_seconds,
                    updated_at=now,
                )
            )
        return [
            Claim(
                recipient_id=r.id,
                message_id=r.message_id,
                account_id=r.account_id,
                mail_from=r.mail_from,
                address=r.address,
                rcpt_domain=r.rcpt_domain,
                attempts=r.attempts,
                created_at=r.created_at,
                size=r.size,
                tls_optional=bool(r.tls_optional),
            )
            for r in rows
        ]

    async def renew_leases(self, owner: str, ids: Sequence[int], lease_seconds: float) -> int:
        if not ids:
            return 0
        now = self.clock()
        # SKIP LOCKED (PostgreSQL): a row locked right now is having its outcome recorded
        # by this node; waiting for it would deadlock against record_outcomes, which locks
        # the same rows in another order. SQLite ignores the clause (one writer anyway).
        mine = (
            sa.select(recipient.c.id)
            .where(
                recipient.c.id.in_(list(ids)),
                recipient.c.lease_owner == owner,
                recipient.c.status == RecipientStatus.SENDING.value,
            )
            .with_for_update(skip_locked=True)
        )
        async with self._write() as conn:
            res = await conn.execute(
                recipient.update()
                .where(recipient.c.id.in_(mine.scalar_subquery()))
                .values(due_at=now + lease_seconds)
            )
        return int(res.rowcount)

    async def release_leases(
        self, owner: str, ids: Sequence[int], due_at: float | None = None
    ) -> None:
        """Give rows back with no attempt counted (graceful shutdown before an attempt
        started), due at ``due_at`` (None: now); see give_back."""
        if not ids:
            return
        async with self._write() as conn:
            await conn.execute(give_back(owner, ids, self.clock() if due_at is None else due_at))

    async def message_for_delivery(self, message_id: str) -> tuple[bytes, str, int]:
        """(body, mail_from, account_id) of a message."""
        async with self._read(single=True) as conn:
            row = (await conn.execute(_MESSAGE_FOR_DELIVERY, {"id": message_id})).first()
        if row is None:
            raise NotFound(f"no message {message_id}")
        return bytes(row.body), row.mail_from, row.account_id

    async def messages_for_delivery(
        self, message_ids: Sequence[str]
    ) -> dict[str, tuple[bytes, str, int]]:
        """message_for_delivery for a claim batch's messages in one read (absent ids are
        left out: the caller treats them as not found)."""
        if not message_ids:
            return {}
        if self._hot is not None:
            marks = ",".join("?" * len(message_ids))
            sql = _MESSAGES_FOR_DELIVERY_SQL.format(marks)
            with _translated():
                (found,) = await self._hot.fetch([(sql, list(message_ids))])
            return {r[0]: (bytes(r[1]), r[2], r[3]) for r in found}
        async with self._read(single=True) as conn:
            rows = (await conn.execute(_MESSAGES_FOR_DELIVERY, {"ids": list(message_ids)})).all()
        return {row.id: (bytes(row.body), row.mail_from, row.account_id) for row in rows}

    async def record_outcomes(self, owner: str, updates: Iterable[OutcomeUpdate]) -> int:
        """Write attempt results and their events; rows whose lease we lost are skipped."""
        now = self.clock()
        # Ascending id: the lock order every multi-row writer of recipient uses.
        steps = [self._outcome_step(owner, u, now) for u in sorted(updates, key=_by_rcpt)]
        if self.dialect == "sqlite":
            # One thread job: a short hold of the write lock the listener processes share.
            # Not fsynced on its own: an outcome lost to a power cut means one more
            # delivery, never a lost message (groupcommit._commit_thread_jobs).
            return await self._thread_job(_outcomes_on_thread, steps, urgent=True, durable=False)
        written = 0
        async with self._write(urgent=True) as conn:
            # PostgreSQL's equivalent: the COMMIT does not wait for the WAL flush; a server
            # crash can lose the last outcomes (at-least-once), never corrupt anything.
            await conn.execute(sa.text("SET LOCAL synchronous_commit = off"))
            for step in steps:
                row = (await conn.execute(step.statement, step.params)).first()
                if row is None:
                    continue
                written += 1
                acct = step.account_id
                if acct is None:
                    acct = (
                        await conn.execute(
                            sa.select(message.c.account_id).where(message.c.id == row.message_id)
                        )
                    ).scalar()
                event_row = step.event(acct, row.message_id, row.address, row.attempts)
                await conn.execute(_INSERT_EVENT, event_row)
        return written

    def _outcome_step(self, owner: str, u: OutcomeUpdate, now: float) -> _OutcomeStep:
        o = u.outcome
        params: dict[str, Any] = {
            "o_id": u.recipient_id,
            "o_owner": owner,
            "o_status": o.status.value,
            "o_reply": o.reply,
            "o_mx": o.mx,
            "o_tls": o.tls,
            "o_now": now,
        }
        if u.next_due is not None:
            params["o_due"] = u.next_due
        kind = {
            RecipientStatus.DELIVERED: EventKind.DELIVERED,
            RecipientStatus.DEFERRED: EventKind.DEFERRED,
            RecipientStatus.BOUNCED: EventKind.BOUNCED,
            RecipientStatus.EXPIRED: EventKind.EXPIRED,
        }.get(o.status, EventKind.DEFERRED)
        data: dict[str, Any] = {"reply": o.reply, "mx": o.mx, "tls": o.tls, "code": o.code}
        if u.next_due is not None and o.status is RecipientStatus.DEFERRED:
            data["next_attempt"] = u.next_due
        return _OutcomeStep(
            statement=_OUTCOME if u.next_due is None else _OUTCOME_DUE,
            params=params,
            account_id=u.account_id,
            kind=kind,
            at=now,
            data=data,
            node_id=self.node_id,
        )

    # ------------------------------------------------------------------ inspection

    async def queue_list(
        self, status: RecipientStatus | None = None, limit: int = 100, domain: str | None = None
    ) -> list[RecipientView]:
        q = sa.select(recipient).order_by(recipient.c.due_at).limit(limit)
        if status is not None:
            q = q.where(recipient.c.status == status.value)
        else:
            q = q.where(recipient.c.status.notin_([s.value for s in _FINAL]))
        if domain is not None:
            q = q.where(recipient.c.rcpt_domain == domain.lower().rstrip("."))
        async with self._read() as conn:
            rows = (await conn.execute(q)).all()
        return [_recipient_view(r) for r in rows]

    async def queue_counts(self) -> dict[str, int]:
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    sa.select(recipient.c.status, sa.func.count()).group_by(recipient.c.status)
                )
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    async def oldest_due(self) -> float | None:
        """created_at of the oldest recipient not yet final (for the queue-age gauge)."""
        async with self._read() as conn:
            oldest: float | None = (
                await conn.execute(
                    sa.select(sa.func.min(recipient.c.created_at)).where(
                        recipient.c.status.in_([s.value for s in WAITING_STATUSES])
                    )
                )
            ).scalar()
        return oldest

    async def message_view(self, message_id: str) -> MessageView:
        async with self._read() as conn:
            m = (
                await conn.execute(
                    # Everything but the body, which a view never shows.
                    sa.select(
                        *(c for c in message.c if c.name != "body"),
                        (sa.func.length(message.c.body) > 0).label("body_kept"),
                    ).where(
                        sa.or_(
                            message.c.id == message_id,
                            message.c.message_id_header == message_id,
                            message.c.message_id_header == f"<{message_id.strip('<>')}>",
                        )
                    )
                )
            ).first()
            if m is None:
                raise NotFound(f"no message {message_id}")
            rcpts = (
                await conn.execute(
                    sa.select(recipient)
                    .where(recipient.c.message_id == m.id)
                    .order_by(recipient.c.id)
                )
            ).all()
            evs = (
                await conn.execute(
                    sa.select(event).where(event.c.message_id == m.id).order_by(event.c.id)
                )
            ).all()
        return MessageView(
            id=m.id,
            account_id=m.account_id,
            mail_from=m.mail_from,
            header_from=m.header_from,
            subject=m.subject,
            message_id_header=m.message_id_header,
            size=m.size,
            client=m.client,
            node_id=m.node_id,
            created_at=m.created_at,
            recipients=tuple(_recipient_view(r) for r in rcpts),
            events=tuple(_event_view(e) for e in evs),
            body_kept=bool(m.body_kept),
        )

    async def retry_now(self, message_id: str) -> int:
        """Make every waiting recipient of a message due now."""
        now = self.clock()
        async with self._write() as conn:
            res = await conn.execute(
                recipient.update()
                .where(
                    recipient.c.message_id == message_id,
                    recipient.c.status.in_([s.value for s in RETRYABLE_STATUSES]),
                )
                .values(due_at=now, updated_at=now)
            )
        return int(res.rowcount)

    async def delete_message(self, message_id: str) -> int:
        """Drop every recipient not yet final; an event records each."""
        async with self._write() as conn:
            n = await self._mark_deleted(
                conn,
                sa.and_(
                    recipient.c.message_id == message_id,
                    recipient.c.status.notin_([s.value for s in _FINAL]),
                ),
                {},
            )
            if not n:
                found = await conn.execute(
                    sa.select(message.c.id).where(message.c.id == message_id)
                )
                if found.first() is None:
                    raise NotFound(f"no message {message_id}")
        return n

    async def _mark_deleted(
        self, conn: AsyncConnection, where: sa.ColumnElement[bool], data: dict[str, Any]
    ) -> int:
        """An operator's drop, inside a write: the recipients matching ``where`` become
        ``deleted`` (a lease on them is void), each with a ``deleted`` event carrying
        ``data`` (relay queue delete, by message here or by domain in operate.py)."""
        now = self.clock()
        rows = (
            await conn.execute(
                recipient.update()
                .where(where)
                .values(status=RecipientStatus.DELETED.value, updated_at=now, lease_owner=None)
                .returning(recipient.c.message_id, recipient.c.address)
            )
        ).all()
        if not rows:
            return 0
        accounts = dict(
            (
                await conn.execute(
                    sa.select(message.c.id, message.c.account_id).where(
                        message.c.id.in_({r.message_id for r in rows})
                    )
                )
            ).all()
        )
        await conn.execute(
            event.insert(),
            [
                self._event_row(
                    EventKind.DELETED,
                    now,
                    accounts.get(r.message_id),
                    r.message_id,
                    r.address,
                    data,
                )
                for r in rows
            ],
        )
        return len(rows)

    # ------------------------------------------------------------------ counters

    async def incr_counter(self, key: str, window: float, amount: int, expires_at: float) -> int:
        """Atomically add ``amount`` to (key, window) and return the new value."""
        async with self._write() as conn:
            res = await conn.execute(
                dialect.counter_upsert(self.dialect, key, window, amount, expires_at)
            )
            return int(res.scalar_one())

    async def counter_sum(self, key: str, since: float) -> int:
        rows = await self._read_rows(_COUNTER_SUM, {"key": key, "since": since})
        return int(rows[0][0] or 0) if rows else 0

    async def prune_counters(self) -> int:
        async with self._write() as conn:
            res = await conn.execute(counter.delete().where(counter.c.expires_at < self.clock()))
        return int(res.rowcount)


def _active(a: Account | None) -> bool:
    return a is not None and a.status is AccountStatus.ACTIVE


def _verified(d: Domain | None) -> bool:
    return d is not None and d.status is DomainStatus.VERIFIED


_FINAL = (
    RecipientStatus.DELIVERED,
    RecipientStatus.BOUNCED,
    RecipientStatus.EXPIRED,
    RecipientStatus.DELETED,
)


def _recipient_view(r: Any) -> RecipientView:
    return RecipientView(
        id=r.id,
        message_id=r.message_id,
        address=r.address,
        status=RecipientStatus(r.status),
        attempts=r.attempts,
        due_at=r.due_at,
        last_reply=r.last_reply,
        last_mx=r.last_mx,
        last_tls=r.last_tls,
        lease_owner=r.lease_owner,
        reason=r.reason,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


def _event_view(r: Any) -> EventView:
    return EventView(
        id=r.id,
        at=r.at,
        kind=r.kind,
        account_id=r.account_id,
        message_id=r.message_id,
        recipient=r.recipient,
        data=json.loads(r.data or "{}"),
        node_id=r.node_id,
    )
