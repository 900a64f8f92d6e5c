"""SQL for sender domains beyond the basic row: capped creation, extra and rotation keys,
stored DNS check results (with their event in the same transaction), re-check claims,
removal.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from relay.errors import Conflict, NotFound
from relay.model import Domain, DomainStatus, EventKind, RecipientStatus
from relay.queue.store import Store
from relay.queue.tables import domain, domain_key, event, message, recipient

_OPEN_STATUSES = [
    s.value
    for s in RecipientStatus
    if s
    not in (
        RecipientStatus.DELIVERED,
        RecipientStatus.BOUNCED,
        RecipientStatus.EXPIRED,
        RecipientStatus.DELETED,
    )
]


@dataclass(frozen=True, slots=True)
class KeyRow:
    id: int
    selector: str
    algorithm: str
    private_key: str
    status: str  # pending | extra | retired


@dataclass(frozen=True, slots=True)
class NewKey:
    selector: str
    algorithm: str
    private_key: str
    status: str


async def add_domain_capped(
    store: Store,
    name: str,
    account_id: int,
    main: NewKey,
    extra: list[NewKey],
    *,
    cap: int,
    verified: bool,
    warmup: bool,
) -> Domain:
    """Insert the domain and its extra keys, refusing the (cap+1)-th domain of the account.

    Counting and inserting in one write transaction keeps two concurrent adds from both
    slipping under the cap.
    """
    now = store.clock()
    status = DomainStatus.VERIFIED if verified else DomainStatus.PENDING
    try:
        async with store._write() as conn:
            count = (
                await conn.execute(
                    sa.select(sa.func.count())
                    .select_from(domain)
                    .where(domain.c.account_id == account_id)
                )
            ).scalar_one()
            if count >= cap:
                raise Conflict(
                    f"account already has {count} domains, the limit is {cap}"
                    " (domains.max_domains_per_account, or the account's max_domains"
                    " setting): remove one first"
                )
            res = await conn.execute(
                domain.insert()
                .values(
                    name=name,
                    account_id=account_id,
                    status=status.value,
                    dkim_selector=main.selector,
                    dkim_private_key=main.private_key,
                    dkim_algorithm=main.algorithm,
                    warmup=warmup,
                    created_at=now,
                    verified_at=now if verified else None,
                )
                .returning(domain.c.id)
            )
            domain_id = int(res.scalar_one())
            for k in extra:
                await conn.execute(domain_key.insert().values(_key_values(domain_id, k, now)))
    except IntegrityError as exc:
        raise Conflict(f"domain {name!r} exists already") from exc
    return Domain(
        id=domain_id,
        name=name,
        account_id=account_id,
        status=status,
        dkim_selector=main.selector,
        dkim_private_key=main.private_key,
        dkim_algorithm=main.algorithm,
        warmup=warmup,
    )


def _key_values(domain_id: int, k: NewKey, now: float) -> dict[str, Any]:
    return {
        "domain_id": domain_id,
        "selector": k.selector,
        "algorithm": k.algorithm,
        "private_key": k.private_key,
        "status": k.status,
        "created_at": now,
        "changed_at": now,
    }


async def keys_of(store: Store, domain_id: int, statuses: tuple[str, ...]) -> list[KeyRow]:
    async with store._read() as conn:
        rows = (
            await conn.execute(
                sa.select(domain_key)
                .where(domain_key.c.domain_id == domain_id, domain_key.c.status.in_(statuses))
                .order_by(domain_key.c.id)
            )
        ).all()
    return [KeyRow(r.id, r.selector, r.algorithm, r.private_key, r.status) for r in rows]


async def selectors_in_use(store: Store, domain_id: int) -> set[str]:
    async with store._read() as conn:
        rows = (
            await conn.execute(
                sa.select(domain_key.c.selector).where(domain_key.c.domain_id == domain_id)
            )
        ).all()
        main = (
            await conn.execute(sa.select(domain.c.dkim_selector).where(domain.c.id == domain_id))
        ).scalar()
    return {r.selector for r in rows} | ({main} if main else set())


async def add_key(store: Store, domain_id: int, key: NewKey) -> None:
    async with store._write() as conn:
        if key.status == "pending":
            pending = (
                await conn.execute(
                    sa.select(domain_key.c.selector).where(
                        domain_key.c.domain_id == domain_id, domain_key.c.status == "pending"
                    )
                )
            ).scalar()
            if pending is not None:
                raise Conflict(
                    f"a rotation to selector {pending!r} is already waiting for its DNS record:"
                    " publish it and run `relay domain verify`"
                )
        await conn.execute(domain_key.insert().values(_key_values(domain_id, key, store.clock())))


async def promote_key(store: Store, d: Domain, key_id: int) -> None:
    """Finish a rotation: the pending key becomes the signing key, the old one retires."""
    now = store.clock()
    async with store._write() as conn:
        row = (
            await conn.execute(
                sa.select(domain_key).where(
                    domain_key.c.id == key_id, domain_key.c.status == "pending"
                )
            )
        ).first()
        if row is None:
            return
        await conn.execute(
            domain_key.insert().values(
                _key_values(
                    d.id,
                    NewKey(d.dkim_selector, d.dkim_algorithm, d.dkim_private_key, "retired"),
                    now,
                )
            )
        )
        await conn.execute(
            domain.update()
            .where(domain.c.id == d.id)
            .values(
                dkim_selector=row.selector,
                dkim_private_key=row.private_key,
                dkim_algorithm=row.algorithm,
            )
        )
        await conn.execute(domain_key.delete().where(domain_key.c.id == key_id))


async def stored_checks(store: Store, name: str) -> dict[str, Any]:
    async with store._read() as conn:
        text = (
            await conn.execute(sa.select(domain.c.checks).where(domain.c.name == name.lower()))
        ).scalar()
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


async def save_check(
    store: Store,
    d: Domain,
    status: DomainStatus,
    checks: dict[str, Any],
    event_kind: EventKind | None,
    event_data: dict[str, Any],
) -> None:
    """Store one verification's results and status; its event in the same transaction."""
    now = store.clock()
    values: dict[str, Any] = {
        "status": status.value,
        "checks": json.dumps(checks, sort_keys=True),
        "last_check_at": now,
    }
    if status is DomainStatus.VERIFIED and d.status is not DomainStatus.VERIFIED:
        values["verified_at"] = now
    async with store._write() as conn:
        res = await conn.execute(domain.update().where(domain.c.id == d.id).values(values))
        if res.rowcount == 0:
            raise NotFound(f"no domain named {d.name!r}")
        if event_kind is not None:
            await conn.execute(
                event.insert().values(
                    store._event_row(event_kind, now, d.account_id, None, None, event_data)
                )
            )


async def claim_due_checks(store: Store, interval: float, limit: int = 20) -> list[str]:
    """Names of domains whose last check is older than ``interval``, claimed for this node.

    A domain never checked counts from when it was verified or added, so a fresh domain is
    not looked up the moment a server starts. The claim is a compare-and-set on
    last_check_at, so nodes sharing the database do not check the same domain twice.
    """
    now = store.clock()
    last = sa.func.coalesce(domain.c.last_check_at, domain.c.verified_at, domain.c.created_at)
    async with store._read() as conn:
        rows = (
            await conn.execute(
                sa.select(domain.c.id, domain.c.name, domain.c.last_check_at)
                .where(
                    last <= now - interval,
                    domain.c.status.in_([DomainStatus.VERIFIED.value, DomainStatus.FAILED.value]),
                )
                .order_by(last)
                .limit(limit)
            )
        ).all()
    claimed = []
    for r in rows:
        async with store._write() as conn:
            same = (
                domain.c.last_check_at.is_(None)
                if r.last_check_at is None
                else domain.c.last_check_at == r.last_check_at
            )
            res = await conn.execute(
                domain.update().where(domain.c.id == r.id, same).values(last_check_at=now)
            )
        if res.rowcount:
            claimed.append(r.name)
    return claimed


async def queued_messages_from(store: Store, name: str) -> list[str]:
    """Ids of messages from ``name`` (envelope sender) with recipients not yet final."""
    async with store._read() as conn:
        rows = (
            await conn.execute(
                sa.select(message.c.id)
                .distinct()
                .join(recipient, recipient.c.message_id == message.c.id)
                .where(
                    sa.func.lower(message.c.mail_from).like(f"%@{name.lower()}"),
                    recipient.c.status.in_(_OPEN_STATUSES),
                )
            )
        ).all()
    return [r.id for r in rows]


async def delete_domain(store: Store, d: Domain) -> None:
    async with store._write() as conn:
        await conn.execute(domain_key.delete().where(domain_key.c.domain_id == d.id))
        await conn.execute(domain.delete().where(domain.c.id == d.id))


async def count_domains(store: Store, account_id: int) -> int:
    async with store._read() as conn:
        return int(
            (
                await conn.execute(
                    sa.select(sa.func.count())
                    .select_from(domain)
                    .where(domain.c.account_id == account_id)
                )
            ).scalar_one()
        )


async def extra_signers(store: Store, d: Domain) -> list[Domain]:
    """``d`` as it signs with each extra key (dual signing: RSA and Ed25519, RFC 8463 §3)."""
    return [
        dataclasses.replace(
            d, dkim_selector=k.selector, dkim_private_key=k.private_key, dkim_algorithm=k.algorithm
        )
        for k in await keys_of(store, d.id, ("extra",))
    ]
