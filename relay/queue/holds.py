"""SQL of operator holds: recipient domains whose delivery is paused (``relay queue hold
--domain D``), as KumoMTA's admin suspend and Postfix's hold queue (``postsuper -h``).

A held domain's mail stays in the queue, untried and with no attempt counted, until the
hold ends (``until``) or is released. Accepting is not affected. Holding moves the
domain's waiting recipients' next attempt to the hold's end at once; what delivery claims
for a held domain afterwards (new mail, or a row due meanwhile) it gives back the same way
(relay/delivery/worker.py). A hold without an end moves them by RECHECK at a time, so
that a hold row removed by any other means than release cannot park mail for good.
Releasing makes them due now. Kept in the database, so every node honours it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from relay.model import RETRYABLE_STATUSES
from relay.queue import dialect, operate
from relay.queue.operate import domain_key
from relay.queue.store import Store, give_back
from relay.queue.tables import delivery_hold, recipient

# A hold without an end parks mail this long at a time (see above).
RECHECK = 3600.0


@dataclass(frozen=True, slots=True)
class Hold:
    domain: str
    reason: str
    until: float | None  # wall-clock end; None: until released
    since: float

    def due(self, now: float) -> float:
        """When mail of the held domain is next looked at."""
        return self.until if self.until is not None else now + RECHECK


async def hold(store: Store, domain: str, reason: str, until: float | None) -> int:
    """Hold ``domain`` (replacing a hold it had); the number of its waiting recipients
    moved to the hold's end. Rows being delivered right now finish their attempt."""
    now = store.clock()
    name = domain_key(domain)
    values = {"reason": reason, "until": until, "created_at": now}
    due = Hold(name, reason, until, now).due(now)
    stmt = dialect.upsert_insert(store.dialect, delivery_hold).values(domain=name, **values)
    async with store._write() as conn:
        await conn.execute(stmt.on_conflict_do_update(index_elements=["domain"], set_=values))
        # Expired holds go when a new one is set: there are a handful at most.
        await conn.execute(
            delivery_hold.delete().where(
                delivery_hold.c.until.is_not(None), delivery_hold.c.until <= now
            )
        )
        res = await conn.execute(
            recipient.update()
            .where(
                recipient.c.status.in_([s.value for s in RETRYABLE_STATUSES]),
                recipient.c.rcpt_domain == name,
                recipient.c.due_at < due,
            )
            .values(due_at=due)
        )
    return int(res.rowcount)


async def postpone(store: Store, owner: str, domain: str, ids: Sequence[int]) -> Hold | None:
    """Give ``owner``'s leased rows at ``domain`` back untried (no attempt counted), due
    when its hold is looked at next; the hold, or None when it has none any more (they
    are then due now). The hold is read in the same write, so a release that committed
    first is never undone by a worker that read the hold before it (its rows would
    otherwise wait RECHECK)."""
    now = store.clock()
    async with store._write() as conn:
        row = (
            await conn.execute(
                sa.select(delivery_hold).where(
                    delivery_hold.c.domain == domain_key(domain), _in_force(now)
                )
            )
        ).first()
        found = None if row is None else _hold(row)
        await conn.execute(give_back(owner, ids, now if found is None else found.due(now)))
    return found


def _in_force(now: float) -> sa.ColumnElement[bool]:
    return sa.or_(delivery_hold.c.until.is_(None), delivery_hold.c.until > now)


def _hold(row: sa.Row[Any]) -> Hold:
    until = None if row.until is None else float(row.until)
    return Hold(row.domain, row.reason, until, float(row.created_at))


async def release(store: Store, domain: str) -> bool:
    """End the hold of ``domain``; whether it had one. Its mail stays where the hold put
    it: see lift."""
    async with store._write() as conn:
        res = await conn.execute(
            delivery_hold.delete().where(delivery_hold.c.domain == domain_key(domain))
        )
    return bool(res.rowcount)


async def lift(store: Store, domain: str) -> int | None:
    """What ``relay queue release`` does: end the hold of ``domain`` and make its waiting
    mail due now; how many recipients that made due (None: it was not held)."""
    if not await release(store, domain):
        return None
    return await operate.retry_domain(store, domain)


async def active(store: Store) -> dict[str, Hold]:
    """Every hold in force now, by domain."""
    async with store._read() as conn:
        rows = (await conn.execute(sa.select(delivery_hold).where(_in_force(store.clock())))).all()
    return {r.domain: _hold(r) for r in rows}
