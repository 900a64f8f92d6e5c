"""SQL for the events area: webhooks and their delivery outbox, API keys, tracking
secret, opens, rejected events, message search and daily statistics.

Every function takes the ``Store`` and uses its transaction helpers and clock, so this
module follows the same rules as store.py (one transaction per call).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from relay.errors import NotFound
from relay.model import EventKind, RecipientStatus
from relay.queue import meta, rollup
from relay.queue.rollup import DAY
from relay.queue.store import EventView, Store, _event_view
from relay.queue.tables import (
    account,
    api_key,
    event,
    message,
    recipient,
    webhook,
    webhook_delivery,
)


class DeliveryStatus:
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Webhook:
    id: int
    account_id: int
    account: str
    sender: str | None
    url: str
    secret: str
    events: tuple[str, ...]
    created_at: float

    def wants(self, kind: str, mail_from: str | None) -> bool:
        if self.events and kind not in self.events:
            return False
        if self.sender is not None:
            return mail_from is not None and mail_from.lower() == self.sender
        return True


@dataclass(frozen=True, slots=True)
class DeliveryClaim:
    """One leased webhook POST: the webhook, the event and its account name."""

    id: int
    webhook_id: int
    url: str
    secret: str
    attempts: int
    event: EventView
    account: str | None


@dataclass(frozen=True, slots=True)
class DeliveryLog:
    id: int
    webhook_id: int
    url: str
    event_id: int
    kind: str
    message_id: str | None
    status: str
    attempts: int
    last_code: int | None
    last_error: str | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class DayStats:
    day: str
    accepted: int = 0
    rejected: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    expired: int = 0
    opened: int = 0
    unsubscribed: int = 0
    complained: int = 0

    @property
    def requests(self) -> int:
        return self.accepted + self.rejected

    @property
    def delivery_rate(self) -> float | None:
        return self.delivered / self.accepted if self.accepted else None

    @property
    def open_rate(self) -> float | None:
        return self.opened / self.delivered if self.delivered else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "day": self.day,
            "requests": self.requests,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "delivered": self.delivered,
            "deferred": self.deferred,
            "bounced": self.bounced,
            "expired": self.expired,
            "opened": self.opened,
            "unsubscribed": self.unsubscribed,
            "complained": self.complained,
            "delivery_rate": self.delivery_rate,
            "open_rate": self.open_rate,
        }


def _webhook(row: Any) -> Webhook:
    return Webhook(
        id=row.id,
        account_id=row.account_id,
        account=row.account_name,
        sender=row.sender,
        url=row.url,
        secret=row.secret,
        events=tuple(k for k in (row.events or "").split(",") if k),
        created_at=row.created_at,
    )


def _account_id(conn_row: Any, name: str) -> int:
    if conn_row is None:
        raise NotFound(f"no account named {name!r}")
    return int(conn_row)


# ---------------------------------------------------------------------------- webhooks


async def set_webhook(
    store: Store,
    account_name: str,
    url: str,
    *,
    sender: str | None = None,
    events: Sequence[str] = (),
) -> tuple[Webhook, bool]:
    """Create or replace the account's webhook for ``sender`` (None = account-level).

    The seeds allow one account-level and one per-sender callback, so setting again
    replaces URL and filter but keeps id and secret. Returns (webhook, created).
    """
    now = store.clock()
    sender = sender.lower() if sender else None
    async with store._write() as conn:
        acct = _account_id(
            (
                await conn.execute(sa.select(account.c.id).where(account.c.name == account_name))
            ).scalar(),
            account_name,
        )
        same = webhook.c.sender.is_(None) if sender is None else webhook.c.sender == sender
        existing = (
            await conn.execute(sa.select(webhook.c.id).where(webhook.c.account_id == acct, same))
        ).scalar()
        kinds = ",".join(events)
        if existing is not None:
            await conn.execute(
                webhook.update().where(webhook.c.id == existing).values(url=url, events=kinds)
            )
            hook_id, created = int(existing), False
        else:
            newest = (await conn.execute(sa.select(sa.func.max(event.c.id)))).scalar() or 0
            hook_id = (
                await conn.execute(
                    webhook.insert()
                    .values(
                        account_id=acct,
                        sender=sender,
                        url=url,
                        secret=secrets.token_hex(32),
                        events=kinds,
                        cursor=newest,
                        created_at=now,
                    )
                    .returning(webhook.c.id)
                )
            ).scalar_one()
            created = True
    return await get_webhook(store, int(hook_id)), created


def _webhook_select() -> Any:
    return sa.select(webhook, account.c.name.label("account_name")).join(
        account, account.c.id == webhook.c.account_id
    )


async def get_webhook(store: Store, hook_id: int, account_id: int | None = None) -> Webhook:
    q = _webhook_select().where(webhook.c.id == hook_id)
    if account_id is not None:
        q = q.where(webhook.c.account_id == account_id)
    async with store._read() as conn:
        row = (await conn.execute(q)).first()
    if row is None:
        raise NotFound(f"no webhook {hook_id}")
    return _webhook(row)


async def list_webhooks(store: Store, account_id: int | None = None) -> list[Webhook]:
    q = _webhook_select().order_by(webhook.c.id)
    if account_id is not None:
        q = q.where(webhook.c.account_id == account_id)
    async with store._read() as conn:
        rows = (await conn.execute(q)).all()
    return [_webhook(r) for r in rows]


async def remove_webhook(store: Store, hook_id: int, account_id: int | None = None) -> None:
    """Delete the webhook; its undelivered POSTs are marked failed (kept for the log)."""
    now = store.clock()
    async with store._write() as conn:
        q = webhook.delete().where(webhook.c.id == hook_id)
        if account_id is not None:
            q = q.where(webhook.c.account_id == account_id)
        res = await conn.execute(q)
        if res.rowcount == 0:
            raise NotFound(f"no webhook {hook_id}")
        await conn.execute(
            webhook_delivery.update()
            .where(
                webhook_delivery.c.webhook_id == hook_id,
                webhook_delivery.c.status.in_([DeliveryStatus.PENDING, DeliveryStatus.SENDING]),
            )
            .values(status=DeliveryStatus.FAILED, last_error="webhook removed", updated_at=now)
        )


async def fan_out(store: Store, limit: int = 500, settle: float = 0.0) -> int:
    """Turn new event rows into webhook_delivery rows for every matching webhook.

    Each webhook's ``cursor`` advances past the events it has seen, in the same
    transaction as the rows it creates, so a crash never loses or doubles one. ``settle``
    skips events younger than that many seconds: on PostgreSQL ids are taken before
    commit, so a younger id may still become visible below the cursor.
    """
    now = store.clock()
    # Idle check on a read transaction: the dispatcher polls, and on SQLite every write
    # transaction takes the database's one write lock that mail delivery also needs.
    async with store._read() as conn:
        low_cursor = (await conn.execute(sa.select(sa.func.min(webhook.c.cursor)))).scalar()
        newest = (await conn.execute(sa.select(sa.func.max(event.c.id)))).scalar()
    if low_cursor is None or newest is None or newest <= low_cursor:
        return 0
    async with store._write() as conn:
        hooks = [
            _webhook(r)
            for r in (await conn.execute(_webhook_select().with_for_update(of=webhook))).all()
        ]
        if not hooks:
            return 0
        cursors = {
            int(r.id): int(r.cursor)
            for r in (await conn.execute(sa.select(webhook.c.id, webhook.c.cursor))).all()
        }
        low = min(cursors.values())
        q = (
            sa.select(
                event.c.id,
                event.c.kind,
                event.c.account_id,
                event.c.message_id,
                event.c.data,
                message.c.mail_from,
            )
            .select_from(event.outerjoin(message, message.c.id == event.c.message_id))
            .where(event.c.id > low)
            .order_by(event.c.id)
            .limit(limit)
        )
        if settle > 0:
            q = q.where(event.c.at <= now - settle)
        rows = (await conn.execute(q)).all()
        if not rows:
            return 0
        new: list[dict[str, Any]] = []
        for r in rows:
            mail_from = r.mail_from
            if mail_from is None and r.data:
                mail_from = json.loads(r.data).get("mail_from")
            for h in hooks:
                if r.id <= cursors[h.id] or r.account_id != h.account_id:
                    continue
                if h.wants(r.kind, mail_from):
                    new.append(
                        {
                            "webhook_id": h.id,
                            "event_id": r.id,
                            "message_id": r.message_id,
                            "status": DeliveryStatus.PENDING,
                            "attempts": 0,
                            "due_at": now,
                            "created_at": now,
                            "updated_at": now,
                        }
                    )
        if new:
            await conn.execute(webhook_delivery.insert(), new)
        top = rows[-1].id
        await conn.execute(webhook.update().where(webhook.c.cursor < top).values(cursor=top))
    return len(new)


async def claim_deliveries(
    store: Store, owner: str, lease_seconds: float, limit: int
) -> list[DeliveryClaim]:
    """Lease due webhook POSTs whose earlier same-message POSTs are all finished."""
    now = store.clock()
    earlier = webhook_delivery.alias("earlier")
    blocked = (
        sa.select(earlier.c.id)
        .where(
            earlier.c.webhook_id == webhook_delivery.c.webhook_id,
            earlier.c.message_id == webhook_delivery.c.message_id,
            earlier.c.event_id < webhook_delivery.c.event_id,
            earlier.c.status.in_([DeliveryStatus.PENDING, DeliveryStatus.SENDING]),
        )
        .exists()
    )
    async with store._read() as conn:
        due = (
            await conn.execute(
                sa.select(webhook_delivery.c.id)
                .where(
                    webhook_delivery.c.status.in_([DeliveryStatus.PENDING, DeliveryStatus.SENDING]),
                    webhook_delivery.c.due_at <= now,
                )
                .limit(1)
            )
        ).first()
    if due is None:
        return []
    async with store._write() as conn:
        ids = [
            r.id
            for r in (
                await conn.execute(
                    sa.select(webhook_delivery.c.id)
                    .where(
                        webhook_delivery.c.status.in_(
                            [DeliveryStatus.PENDING, DeliveryStatus.SENDING]
                        ),
                        webhook_delivery.c.due_at <= now,
                        ~blocked,
                    )
                    .order_by(webhook_delivery.c.event_id)
                    .limit(limit)
                    .with_for_update(skip_locked=True, of=webhook_delivery)
                )
            ).all()
        ]
        if not ids:
            return []
        await conn.execute(
            webhook_delivery.update()
            .where(webhook_delivery.c.id.in_(ids))
            .values(
                status=DeliveryStatus.SENDING,
                lease_owner=owner,
                due_at=now + lease_seconds,
                updated_at=now,
            )
        )
        rows = (
            await conn.execute(
                sa.select(
                    webhook_delivery.c.id.label("delivery_id"),
                    webhook_delivery.c.webhook_id,
                    webhook_delivery.c.attempts,
                    webhook.c.url,
                    webhook.c.secret,
                    account.c.name.label("account_name"),
                    event,
                )
                .select_from(
                    webhook_delivery.join(webhook, webhook.c.id == webhook_delivery.c.webhook_id)
                    .join(event, event.c.id == webhook_delivery.c.event_id)
                    .outerjoin(account, account.c.id == event.c.account_id)
                )
                .where(webhook_delivery.c.id.in_(ids))
                .order_by(webhook_delivery.c.event_id)
            )
        ).all()
    return [
        DeliveryClaim(
            id=r.delivery_id,
            webhook_id=r.webhook_id,
            url=r.url,
            secret=r.secret,
            attempts=r.attempts,
            event=_event_view(r),
            account=r.account_name,
        )
        for r in rows
    ]


async def record_delivery(
    store: Store,
    owner: str,
    delivery_id: int,
    *,
    ok: bool,
    code: int | None,
    error: str | None,
    next_due: float | None,
) -> None:
    """Store one POST's result: done, pending again at ``next_due``, or failed (None)."""
    now = store.clock()
    if ok:
        status = DeliveryStatus.DONE
    elif next_due is not None:
        status = DeliveryStatus.PENDING
    else:
        status = DeliveryStatus.FAILED
    values: dict[str, Any] = {
        "status": status,
        "attempts": webhook_delivery.c.attempts + 1,
        "last_code": code,
        "last_error": error,
        "lease_owner": None,
        "updated_at": now,
    }
    if next_due is not None and not ok:
        values["due_at"] = next_due
    async with store._write() as conn:
        await conn.execute(
            webhook_delivery.update()
            .where(
                webhook_delivery.c.id == delivery_id,
                webhook_delivery.c.lease_owner == owner,
                webhook_delivery.c.status == DeliveryStatus.SENDING,
            )
            .values(values)
        )


async def release_deliveries(store: Store, owner: str, ids: Sequence[int]) -> None:
    if not ids:
        return
    now = store.clock()
    async with store._write() as conn:
        await conn.execute(
            webhook_delivery.update()
            .where(
                webhook_delivery.c.id.in_(list(ids)),
                webhook_delivery.c.lease_owner == owner,
                webhook_delivery.c.status == DeliveryStatus.SENDING,
            )
            .values(status=DeliveryStatus.PENDING, due_at=now, lease_owner=None)
        )


async def delivery_log(
    store: Store,
    *,
    account_id: int | None = None,
    webhook_id: int | None = None,
    failures_only: bool = False,
    limit: int = 50,
) -> list[DeliveryLog]:
    q = (
        sa.select(
            webhook_delivery,
            webhook.c.url,
            webhook.c.account_id,
            event.c.kind,
        )
        .select_from(
            webhook_delivery.join(webhook, webhook.c.id == webhook_delivery.c.webhook_id).join(
                event, event.c.id == webhook_delivery.c.event_id
            )
        )
        .order_by(webhook_delivery.c.updated_at.desc(), webhook_delivery.c.id.desc())
        .limit(limit)
    )
    if account_id is not None:
        q = q.where(webhook.c.account_id == account_id)
    if webhook_id is not None:
        q = q.where(webhook_delivery.c.webhook_id == webhook_id)
    if failures_only:
        q = q.where(
            sa.or_(
                webhook_delivery.c.status == DeliveryStatus.FAILED,
                webhook_delivery.c.last_error.is_not(None),
            )
        )
    async with store._read() as conn:
        rows = (await conn.execute(q)).all()
    return [
        DeliveryLog(
            id=r.id,
            webhook_id=r.webhook_id,
            url=r.url,
            event_id=r.event_id,
            kind=r.kind,
            message_id=r.message_id,
            status=r.status,
            attempts=r.attempts,
            last_code=r.last_code,
            last_error=r.last_error,
            updated_at=r.updated_at,
        )
        for r in rows
    ]


# ---------------------------------------------------------------------------- API keys


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_api_key(store: Store, account_name: str) -> str:
    """A new bearer token for the account; only its hash is stored."""
    token = "rk_" + secrets.token_urlsafe(32)
    async with store._write() as conn:
        acct = _account_id(
            (
                await conn.execute(sa.select(account.c.id).where(account.c.name == account_name))
            ).scalar(),
            account_name,
        )
        await conn.execute(
            api_key.insert().values(
                account_id=acct,
                prefix=token[:10],
                token_hash=hash_token(token),
                created_at=store.clock(),
            )
        )
    return token


async def account_for_token(store: Store, token: str) -> tuple[int, str] | None:
    """(account id, account name) owning the bearer token, or None."""
    async with store._read() as conn:
        row = (
            await conn.execute(
                sa.select(account.c.id, account.c.name)
                .join(api_key, api_key.c.account_id == account.c.id)
                .where(api_key.c.token_hash == hash_token(token))
            )
        ).first()
    return None if row is None else (int(row.id), str(row.name))


# ---------------------------------------------------------------------------- tracking


async def tracking_secret(store: Store) -> bytes:
    """The HMAC key of pixel tokens: made once, kept in the database so every node and
    every restart signs and checks the same tokens."""
    return bytes.fromhex(await meta.shared_secret(store, "tracking_secret"))


@dataclass(frozen=True, slots=True)
class OpenResult:
    unique: bool
    count: int
    bot: bool


async def record_open(
    store: Store, recipient_id: int, message_id: str, *, bot_window: float, client: str
) -> OpenResult | None:
    """Write an ``opened`` event for the recipient; None if no such recipient.

    ``unique`` is true for the first human open only; an open within ``bot_window``
    seconds of delivery is a prefetcher (mail security scanners fetch every image as
    the message arrives) and never counts as unique.
    """
    now = store.clock()
    async with store._write() as conn:
        row = (
            await conn.execute(
                sa.select(recipient.c.address, recipient.c.status, message.c.account_id)
                .join(message, message.c.id == recipient.c.message_id)
                .where(recipient.c.id == recipient_id, recipient.c.message_id == message_id)
            )
        ).first()
        if row is None:
            return None
        delivered_at = (
            await conn.execute(
                sa.select(sa.func.max(event.c.at)).where(
                    event.c.message_id == message_id,
                    event.c.recipient == row.address,
                    event.c.kind == EventKind.DELIVERED.value,
                )
            )
        ).scalar()
        before = (
            await conn.execute(
                sa.select(event.c.data).where(
                    event.c.message_id == message_id,
                    event.c.recipient == row.address,
                    event.c.kind == EventKind.OPENED.value,
                )
            )
        ).all()
        bot = delivered_at is not None and now - float(delivered_at) < bot_window
        had_unique = any(json.loads(b.data or "{}").get("unique") for b in before)
        unique = not bot and not had_unique
        result = OpenResult(unique=unique, count=len(before) + 1, bot=bot)
        await conn.execute(
            event.insert().values(
                store._event_row(
                    EventKind.OPENED,
                    now,
                    row.account_id,
                    message_id,
                    row.address,
                    {"unique": unique, "count": result.count, "bot": bot, "client": client},
                )
            )
        )
    return result


async def opens_for(store: Store, message_id: str) -> dict[str, tuple[int, float | None]]:
    """recipient address -> (human opens, first human open time)."""
    async with store._read() as conn:
        rows = (
            await conn.execute(
                sa.select(event.c.recipient, event.c.at, event.c.data)
                .where(event.c.message_id == message_id, event.c.kind == EventKind.OPENED.value)
                .order_by(event.c.id)
            )
        ).all()
    out: dict[str, tuple[int, float | None]] = {}
    for r in rows:
        if json.loads(r.data or "{}").get("bot"):
            continue
        n, first = out.get(r.recipient, (0, None))
        out[r.recipient] = (n + 1, first if first is not None else r.at)
    return out


# ---------------------------------------------------------------------------- rejected


async def add_rejected(
    store: Store,
    account_id: int,
    *,
    stage: str,
    mail_from: str | None,
    rcpt: str | None,
    code: int,
    enhanced: str,
    text: str,
    reason: str,
) -> None:
    domain = (mail_from or "").rpartition("@")[2].lower()
    await store.add_event(
        EventKind.REJECTED,
        account_id=account_id,
        rcpt=rcpt,
        data={
            "stage": stage,
            "mail_from": mail_from,
            "sender_domain": domain,
            "code": code,
            "enhanced": enhanced,
            "reply": f"{code} {enhanced} {text}",
            "reason": reason,
        },
    )


# ---------------------------------------------------------------------------- search


@dataclass(frozen=True, slots=True)
class MessageSummary:
    id: str
    account_id: int
    mail_from: str
    subject: str
    created_at: float
    recipients: tuple[tuple[str, str], ...]  # (address, status)


async def search_messages(
    store: Store,
    *,
    account_id: int | None,
    since: float | None = None,
    until: float | None = None,
    sender: str | None = None,
    rcpt: str | None = None,
    status: RecipientStatus | None = None,
    after: str | None = None,
    limit: int = 100,
) -> list[MessageSummary]:
    """Messages newest first; ``after`` is the last id of the previous page (queue ids
    sort by acceptance time, so id order is time order)."""
    q = sa.select(
        message.c.id,
        message.c.account_id,
        message.c.mail_from,
        message.c.subject,
        message.c.created_at,
    ).order_by(message.c.id.desc())
    if account_id is not None:
        q = q.where(message.c.account_id == account_id)
    if since is not None:
        q = q.where(message.c.created_at >= since)
    if until is not None:
        q = q.where(message.c.created_at < until)
    if sender:
        q = q.where(sa.func.lower(message.c.mail_from) == sender.lower())
    if after:
        q = q.where(message.c.id < after)
    if rcpt or status is not None:
        sub = sa.select(recipient.c.message_id)
        if rcpt:
            sub = sub.where(sa.func.lower(recipient.c.address) == rcpt.lower())
        if status is not None:
            sub = sub.where(recipient.c.status == status.value)
        q = q.where(message.c.id.in_(sub))
    q = q.limit(limit)
    async with store._read() as conn:
        msgs = (await conn.execute(q)).all()
        ids = [m.id for m in msgs]
        rcpts = (
            (
                await conn.execute(
                    sa.select(recipient.c.message_id, recipient.c.address, recipient.c.status)
                    .where(recipient.c.message_id.in_(ids))
                    .order_by(recipient.c.id)
                )
            ).all()
            if ids
            else []
        )
    by_msg: dict[str, list[tuple[str, str]]] = {}
    for r in rcpts:
        by_msg.setdefault(r.message_id, []).append((r.address, r.status))
    return [
        MessageSummary(
            id=m.id,
            account_id=m.account_id,
            mail_from=m.mail_from,
            subject=m.subject,
            created_at=m.created_at,
            recipients=tuple(by_msg.get(m.id, ())),
        )
        for m in msgs
    ]


# ---------------------------------------------------------------------------- stats


def day_of(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d")


async def daily_stats(
    store: Store,
    since: float,
    until: float,
    *,
    account_id: int | None = None,
    domain: str | None = None,
) -> list[DayStats]:
    """Per UTC day counts computed from the event rows, so they always add up.

    deferred counts recipients deferred at least once that day (not attempts); opened
    counts recipients with a unique (first, non-prefetch) open that day. Days up to the
    rollup's mark (older than the record retention) come from stats_day as whole days:
    such a day counts whole when the range starts or ends inside it.
    """
    mark = await rollup.rolled_through(store)
    first_day, last_day = int(since // DAY), math.ceil(until / DAY) - 1
    counts: dict[int, dict[str, int]] = {}
    if mark is not None and first_day <= mark:
        counts = await rollup.rolled_stats(
            store, first_day, min(last_day, mark), account_id=account_id, domain=domain
        )
        since = max(since, (mark + 1) * DAY)
    # SQLite's CAST truncates (times are positive, so that is floor); PostgreSQL's rounds.
    day_expr: Any = (
        sa.func.floor(event.c.at / 86400)
        if store.dialect == "postgresql"
        else sa.cast(event.c.at / 86400, sa.Integer)
    )
    day = sa.cast(day_expr, sa.BigInteger).label("day")
    q = (
        sa.select(
            day,
            event.c.kind,
            sa.func.count().label("n"),
            sa.func.count(
                sa.distinct(
                    sa.func.coalesce(event.c.message_id, "")
                    + "|"
                    + sa.func.coalesce(event.c.recipient, "")
                )
            ).label("distinct_rcpt"),
        )
        .select_from(event.outerjoin(message, message.c.id == event.c.message_id))
        .where(
            event.c.at >= since,
            event.c.at < until,
            rollup.stat_filter(),
        )
        .group_by(day, event.c.kind)
    )
    if account_id is not None:
        q = q.where(event.c.account_id == account_id)
    if domain:
        d = domain.lower()
        q = q.where(
            sa.or_(
                sa.func.lower(message.c.mail_from).like(f"%@{d}"),
                sa.and_(
                    event.c.message_id.is_(None),
                    event.c.data.like(f'%"sender_domain": "{d}"%'),
                ),
            )
        )
    rows: Sequence[Any] = ()
    if since < until:
        async with store._read() as conn:
            rows = (await conn.execute(q)).all()
    for r in rows:
        n = int(r.distinct_rcpt) if r.kind == EventKind.DEFERRED.value else int(r.n)
        counts.setdefault(int(r.day), {})[r.kind] = n
    out = []
    for d_num in sorted(counts):
        c = counts[d_num]
        out.append(
            DayStats(
                day=day_of(d_num * 86400.0),
                accepted=c.get("accepted", 0),
                rejected=c.get("rejected", 0),
                delivered=c.get("delivered", 0),
                deferred=c.get("deferred", 0),
                bounced=c.get("bounced", 0),
                expired=c.get("expired", 0),
                opened=c.get("opened", 0),
                unsubscribed=c.get("unsubscribed", 0),
                complained=c.get("complained", 0),
            )
        )
    return out


async def recent_events(
    store: Store, account_id: int | None, after_id: int = 0, limit: int = 100
) -> list[EventView]:
    q = sa.select(event).where(event.c.id > after_id).order_by(event.c.id).limit(limit)
    if account_id is not None:
        q = q.where(event.c.account_id == account_id)
    async with store._read() as conn:
        rows = (await conn.execute(q)).all()
    return [_event_view(r) for r in rows]
