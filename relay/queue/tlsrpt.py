"""SQL of SMTP TLS reporting (RFC 8460): sessions' TLS outcomes counted per UTC day and
recipient domain (relay/delivery/tlsrpt.py), taken once per day to be reported.

Every node adds its counts (one upsert per distinct outcome, a minute's worth at a
time); the day's reports are made by whichever node takes the day first: the take reads
the mark of the last day reported, the day's rows and deletes them in one write, so two
nodes never report a day twice. Counts that arrive for a day already reported (a node
that flushed late) are deleted by the next take, unreported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from relay.queue import dialect, meta
from relay.queue.store import Store
from relay.queue.tables import schema_meta, tls_report_count

# schema_meta key: the last UTC day (days since the epoch) whose reports were made.
MARK_KEY = "tlsrpt_reported_through"


# What tells one outcome from another (besides the day): the key is a digest of these.
_COLUMNS = (
    "policy_domain",
    "policy_type",
    "policy",
    "result",
    "mx",
    "sending_ip",
    "receiving_ip",
    "detail",
)


@dataclass(frozen=True, slots=True)
class SessionCount:
    """``n`` sessions to ``policy_domain`` on ``day`` had this outcome."""

    day: int
    policy_domain: str
    policy_type: str
    policy: str  # JSON: the policy-string and mx-host of the report's policy object
    result: str  # "": success; else an RFC 8460 §4.3 result type
    mx: str = ""
    sending_ip: str = ""
    receiving_ip: str = ""
    detail: str = ""
    n: int = 1

    @property
    def key(self) -> str:
        fields = (getattr(self, c) for c in _COLUMNS)
        return hashlib.sha256("\0".join(fields).encode()).hexdigest()


def _row(c: SessionCount) -> dict[str, object]:
    return {"day": c.day, "key": c.key, "n": c.n, **{k: getattr(c, k) for k in _COLUMNS}}


def _count(row: sa.Row[tuple[object, ...]]) -> SessionCount:
    m = row._mapping
    return SessionCount(day=int(m["day"]), n=int(m["n"]), **{k: str(m[k]) for k in _COLUMNS})


async def add(store: Store, counts: Sequence[SessionCount]) -> None:
    """Add ``counts`` to the day's totals (one write)."""
    if not counts:
        return
    stmt = dialect.upsert_insert(store.dialect, tls_report_count)
    stmt = stmt.on_conflict_do_update(
        index_elements=[tls_report_count.c.day, tls_report_count.c.key],
        set_={"n": tls_report_count.c.n + stmt.excluded.n},
    )
    async with store._write() as conn:
        await conn.execute(stmt, [_row(c) for c in counts])


async def _mark(conn: AsyncConnection) -> int | None:
    found = await meta.get(conn, MARK_KEY)
    return int(found) if found else None


async def _locked_mark(conn: AsyncConnection, store: Store) -> int | None:
    """The mark, its row locked until this write commits (PostgreSQL: a second node's
    take waits here, then reads the mark the first one moved; SQLite: the write lock
    already serializes). The row is made first ("": none yet) so there is one to lock."""
    await conn.execute(
        dialect.insert_ignoring_duplicates(store.dialect, schema_meta, ["key"]).values(
            key=MARK_KEY, value=""
        )
    )
    found = await conn.execute(
        sa.select(schema_meta.c.value).where(schema_meta.c.key == MARK_KEY).with_for_update()
    )
    value = found.scalar()
    return int(value) if value else None


async def pending(store: Store) -> list[SessionCount]:
    """The counts not reported yet, oldest day first (``relay tls-report show``)."""
    async with store._read() as conn:
        mark = await _mark(conn)
        query = sa.select(tls_report_count).order_by(
            tls_report_count.c.day, tls_report_count.c.policy_domain, tls_report_count.c.result
        )
        if mark is not None:
            query = query.where(tls_report_count.c.day > mark)
        return [_count(r) for r in (await conn.execute(query)).all()]


async def take_through(store: Store, day: int) -> list[SessionCount] | None:
    """The counts of the days not reported yet up to ``day``, deleted, and the mark moved
    to ``day``; None when ``day`` was taken already (by this node or another)."""
    async with store._write() as conn:
        mark = await _locked_mark(conn, store)
        if mark is not None and mark >= day:
            return None
        query = sa.select(tls_report_count).where(tls_report_count.c.day <= day)
        if mark is not None:
            query = query.where(tls_report_count.c.day > mark)
        rows = [_count(r) for r in (await conn.execute(query)).all()]
        await conn.execute(tls_report_count.delete().where(tls_report_count.c.day <= day))
        await meta.put(conn, store, MARK_KEY, str(day))
    return rows
