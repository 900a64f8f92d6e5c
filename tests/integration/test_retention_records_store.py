"""Record retention on both dialects: old finished messages and loose rows are deleted,
and the statistics of their days stay exactly as they were."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

import pytest
import sqlalchemy as sa

from relay.config import DatabaseConfig
from relay.errors import NotFound, NotMigrated
from relay.model import EventKind, Outcome, RecipientStatus
from relay.queue import events as q
from relay.queue import holds, mtasts, retention, rollup
from relay.queue.store import NewMessage, NewRecipient, OutcomeUpdate, Store
from relay.queue.tables import (
    bounce_log,
    delivery_hold,
    event,
    inbound_report,
    mta_sts_policy,
    stats_day,
    webhook_delivery,
)
from tests.support.store import clock_of

DAY = 86400.0
BODY = b"Subject: counted\r\n\r\nhello\r\n"


@pytest.fixture
def store(dialect_store: Store) -> Store:
    return dialect_store


async def _accept(store: Store, account_id: int, mid: str, sender: str, rcpts: int = 1) -> None:
    await store.accept(
        NewMessage(
            id=mid,
            account_id=account_id,
            mail_from=sender,
            body=BODY,
            recipients=tuple(NewRecipient(f"r{j}@example.org") for j in range(rcpts)),
        )
    )


async def _outcomes(store: Store, status_of: dict[str, RecipientStatus]) -> None:
    """Record an outcome for every due recipient of the named messages."""
    updates = []
    for c in await store.claim_due("w", 60, 10_000):
        status = status_of.get(c.message_id)
        if status is None:
            continue
        retry = clock_of(store).now + 600 if status is RecipientStatus.DEFERRED else None
        updates.append(OutcomeUpdate(c.recipient_id, Outcome(status, "reply"), retry))
    await store.record_outcomes("w", updates)


async def _stats(store: Store, since: float, until: float, **kw: object) -> list[dict[str, object]]:
    return [asdict(d) for d in await q.daily_stats(store, since, until, **kw)]


async def _count(store: Store, table: sa.Table) -> int:
    async with store._read() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def _a_quarter_of_mail(store: Store) -> tuple[int, int]:
    """Two accounts' mail over two days, in every state the statistics count."""
    alice = (await store.add_account("alice", "x")).id
    bob = (await store.add_account("bob", "x")).id
    day0 = clock_of(store).now
    await _accept(store, alice, "delivered", "news@a.example", rcpts=2)
    await _accept(store, alice, "other-domain", "ops@b.example")
    await _accept(store, alice, "bounced", "news@a.example")
    await _accept(store, bob, "deferred-then-delivered", "bob@c.example")
    await _accept(store, bob, "in-flight", "bob@c.example")
    await _outcomes(
        store,
        {
            "delivered": RecipientStatus.DELIVERED,
            "other-domain": RecipientStatus.DELIVERED,
            "bounced": RecipientStatus.BOUNCED,
            "deferred-then-delivered": RecipientStatus.DEFERRED,
            "in-flight": RecipientStatus.DEFERRED,
        },
    )
    await q.add_rejected(
        store,
        alice,
        stage="rcpt",
        mail_from="news@a.example",
        rcpt="x@example.org",
        code=550,
        enhanced="5.7.1",
        text="blocklisted",
        reason="blocklist",
    )
    async with store._write() as conn:
        await conn.execute(
            bounce_log.insert().values(
                at=day0,
                account_id=alice,
                message_id="bounced",
                address="r0@example.org",
                bounce_class="recipient",
                source="smtp",
            )
        )
        await conn.execute(
            inbound_report.insert().values(at=day0, kind="dsn", summary="s", body=b"x" * 100)
        )
        for mid, event_id in (("delivered", 1), (None, 2)):
            await conn.execute(
                webhook_delivery.insert().values(
                    webhook_id=1,
                    event_id=event_id,
                    message_id=mid,
                    status="done",
                    due_at=day0,
                    created_at=day0,
                    updated_at=day0,
                )
            )
    # The next day: a retry delivers; an open of a day-0 message.
    clock_of(store).now += DAY
    await _outcomes(store, {"deferred-then-delivered": RecipientStatus.DELIVERED})
    await store.add_event(
        EventKind.OPENED,
        account_id=alice,
        message_id="other-domain",
        rcpt="r0@example.org",
        data={"unique": True, "count": 1, "bot": False},
    )
    return alice, bob


async def test_old_records_go_and_the_statistics_of_their_days_stay(store: Store) -> None:
    start = clock_of(store).now
    alice, bob = await _a_quarter_of_mail(store)
    since, until = start - 3 * DAY, start + 10 * DAY
    views = [
        {},
        {"account_id": alice},
        {"account_id": bob},
        {"domain": "a.example"},
        {"domain": "B.example"},
        {"account_id": alice, "domain": "c.example"},
    ]
    before = [await _stats(store, since, until, **v) for v in views]
    assert sum(d["accepted"] for d in before[0]) == 6  # one a recipient
    assert [d["opened"] for d in before[4]] == [0, 1]  # the open counts on its own day

    # 90 days after day 1 began: the cut is the start of day 1 (the open's).
    clock_of(store).now = start + 91 * DAY
    swept = await retention.purge_records(store, cut=clock_of(store).now - 90 * DAY, pause=0)

    # day 0's "delivered" and "bounced" go with all their rows; "other-domain" waits for
    # its open (day 1), "deferred-then-delivered" for its delivery, "in-flight" for ever.
    assert swept.days_rolled == 1
    assert (swept.messages, swept.kept) == (2, 3)
    assert swept.loose == {
        "event": 1,  # the refusal
        "webhook_delivery": 2,  # "delivered"'s and the loose one: by age
        "bounce_log": 1,
        "inbound_report": 1,
        "mta_sts_policy": 0,
        "delivery_hold": 0,
    }
    for gone in ("delivered", "bounced"):
        with pytest.raises(NotFound):
            await store.message_view(gone)
    for kept in ("other-domain", "deferred-then-delivered", "in-flight"):
        assert (await store.message_view(kept)).id == kept
    assert await _count(store, webhook_delivery) == 0
    async with store._read() as conn:
        left = (await conn.execute(sa.select(event.c.message_id).distinct())).scalars().all()
    assert set(left) == {"other-domain", "deferred-then-delivered", "in-flight"}
    assert await rollup.rolled_through(store) == int(start // DAY)

    # Day 0 is read from stats_day now, and the events still there are not counted again.
    assert [await _stats(store, since, until, **v) for v in views] == before

    # A day later the cut passes day 1: the rest that is final goes, and still the same.
    clock_of(store).now += DAY
    again = await retention.purge_records(store, cut=clock_of(store).now - 90 * DAY, pause=0)
    assert (again.days_rolled, again.messages, again.kept) == (1, 2, 1)
    assert [await _stats(store, since, until, **v) for v in views] == before
    nothing = await retention.purge_records(store, cut=clock_of(store).now - 90 * DAY, pause=0)
    assert (nothing.days_rolled, nothing.messages, nothing.kept) == (0, 0, 1)
    assert not any(nothing.loose.values())


async def test_mta_sts_policies_and_holds_past_their_end_go_and_those_in_force_stay(
    store: Store,
) -> None:
    now = clock_of(store).now
    for name, expires in (("gone.example", now - 1), ("kept.example", now + DAY)):
        await mtasts.save(store, name, mtasts.StoredPolicy("id", "enforce", ("mx",), DAY, expires))
    await holds.hold(store, "over.example", "", now + 60)
    await holds.hold(store, "open.example", "", None)
    await holds.hold(store, "later.example", "", now + DAY)
    clock_of(store).now += 61
    swept = await retention.purge_records(store, cut=now - 90 * DAY, pause=0)
    assert (swept.loose["mta_sts_policy"], swept.loose["delivery_hold"]) == (1, 1)
    assert await mtasts.load(store, "kept.example") is not None
    assert await _count(store, mta_sts_policy) == 1
    assert sorted(await holds.active(store)) == ["later.example", "open.example"]
    assert await _count(store, delivery_hold) == 2


async def test_a_range_ending_inside_a_counted_day_counts_that_day_whole(store: Store) -> None:
    start = clock_of(store).now
    await _a_quarter_of_mail(store)
    clock_of(store).now = start + 95 * DAY
    await retention.purge_records(store, cut=start + 5 * DAY, pause=0)
    day0 = int(start // DAY) * DAY
    whole = await _stats(store, day0, day0 + DAY)
    assert [d["accepted"] for d in whole] == [6]
    assert await _stats(store, start + 3600, start + 7200) == whole
    assert await _stats(store, day0 + DAY, day0 + 2 * DAY) == [
        d for d in await _stats(store, day0, day0 + 2 * DAY) if d["day"] != whole[0]["day"]
    ]


async def test_two_nodes_sweeping_at_once_count_each_day_once(store: Store, db_url: str) -> None:
    start = clock_of(store).now
    alice = (await store.add_account("alice", "x")).id
    for day in range(6):
        clock_of(store).now = start + day * DAY
        for i in range(3):
            await _accept(store, alice, f"d{day}m{i}", "a@a.example")
    expected = await _stats(store, start - DAY, start + 7 * DAY)
    other = Store.open(DatabaseConfig(url=db_url), node_id="u", clock=clock_of(store))
    try:
        clock_of(store).now = start + 100 * DAY
        first, second = await asyncio.gather(
            rollup.roll_up_through(store, int(start // DAY) + 5),
            rollup.roll_up_through(other, int(start // DAY) + 5),
        )
    finally:
        await other.close()
    assert first.days + second.days == 6
    assert await _stats(store, start - DAY, start + 7 * DAY) == expected
    async with store._read() as conn:
        total = (await conn.execute(sa.select(sa.func.sum(stats_day.c.n)))).scalar_one()
    assert total == 18


async def test_relay_migrate_adds_what_came_after_0001_to_a_database_made_before(
    store: Store,
) -> None:
    async with store._write() as conn:
        for ddl in (
            "DROP TABLE stats_day",
            "DROP TABLE mta_sts_policy",
            "DROP TABLE delivery_hold",
            # Before row_change goes: SQLite checks the triggers that name it on ALTER.
            "ALTER TABLE message DROP COLUMN tls_optional",
            "DROP TABLE row_change",
            "DROP TABLE tls_report_count",
            "DROP INDEX ix_bounce_log_at",
            "DROP INDEX ix_webhook_delivery_created",
            "UPDATE alembic_version SET version_num = '0001'",
        ):
            await conn.execute(sa.text(ddl))
    with pytest.raises(NotMigrated, match="relay migrate"):
        await store.check_schema()

    assert await store.migrate() == "0007"
    await store.check_schema()

    def shape(sync_conn: sa.Connection) -> tuple[bool, set[str]]:
        inspector = sa.inspect(sync_conn)
        names = {
            ix["name"]
            for table in ("bounce_log", "webhook_delivery")
            for ix in inspector.get_indexes(table)
        }
        tables = all(
            inspector.has_table(t)
            for t in (
                "stats_day",
                "mta_sts_policy",
                "delivery_hold",
                "row_change",
                "tls_report_count",
            )
        )
        columns = {c["name"] for c in inspector.get_columns("message")}
        return tables and "tls_optional" in columns, {str(n) for n in names}

    async with store._read() as conn:
        has_table, indexes = await conn.run_sync(shape)
    assert has_table
    assert {"ix_bounce_log_at", "ix_webhook_delivery_created"} <= indexes
