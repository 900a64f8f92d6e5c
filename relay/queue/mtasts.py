"""SQL of MTA-STS: each recipient domain's last fetched policy (relay/delivery/mtasts.py).

RFC 8461 §5.1: a cached policy stays in force until it expires, whatever happens to the
TXT record or the policy host meanwhile. Kept in the database, that holds across a
restart and is shared by the nodes of one PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from relay.queue import dialect
from relay.queue.store import Store
from relay.queue.tables import mta_sts_policy


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    policy_id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    expires_at: float


async def load(store: Store, domain: str) -> StoredPolicy | None:
    """The domain's policy if one is kept and has not expired."""
    async with store._read() as conn:
        row = (
            await conn.execute(
                sa.select(mta_sts_policy).where(
                    mta_sts_policy.c.domain == domain,
                    mta_sts_policy.c.expires_at > store.clock(),
                )
            )
        ).first()
    if row is None:
        return None
    mx = tuple(m for m in row.mx.split("\n") if m)
    return StoredPolicy(row.policy_id, row.mode, mx, int(row.max_age), float(row.expires_at))


async def save(store: Store, domain: str, policy: StoredPolicy) -> None:
    """Keep (or replace) the domain's policy."""
    values = {
        "policy_id": policy.policy_id,
        "mode": policy.mode,
        "mx": "\n".join(policy.mx),
        "max_age": policy.max_age,
        "fetched_at": store.clock(),
        "expires_at": policy.expires_at,
    }
    async with store._write() as conn:
        stmt = dialect.upsert_insert(store.dialect, mta_sts_policy).values(domain=domain, **values)
        await conn.execute(stmt.on_conflict_do_update(index_elements=["domain"], set_=values))
