"""The webhook outbox, opens and statistics against a real SQLite database, with a real
HTTP receiver on 127.0.0.1 and an injected clock (no waiting for retry delays)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relay.config import DatabaseConfig, WebhooksConfig
from relay.events.webhooks import SIGNATURE_HEADER, WebhookDispatcher, verify
from relay.intake import new_queue_id
from relay.model import EventKind, Outcome, RecipientStatus
from relay.queue import events as q
from relay.queue.store import NewMessage, NewRecipient, OutcomeUpdate, Store
from tests.support.hooks import HookReceiver
from tests.support.store import Clock

DAY0 = 1_700_006_400.0  # 2023-11-15 00:00:00 UTC


@pytest.fixture
def clock() -> Clock:
    return Clock(DAY0 + 3600)


@pytest.fixture
async def store(db_url: str, clock: Clock) -> AsyncIterator[Store]:
    s = Store.open(DatabaseConfig(url=db_url), "n1", clock)
    await s.migrate()
    yield s
    await s.close()


@pytest.fixture
def receiver() -> AsyncIterator[HookReceiver]:
    with HookReceiver() as r:
        yield r  # type: ignore[misc]


async def _message(
    store: Store, account_id: int, rcpts: list[str], mail_from: str = "a@example.com"
) -> str:
    qid = new_queue_id(store.clock())
    await store.accept(
        NewMessage(
            id=qid,
            account_id=account_id,
            mail_from=mail_from,
            body=b"Subject: x\r\n\r\nhi\r\n",
            recipients=tuple(NewRecipient(a) for a in rcpts),
        )
    )
    return qid


async def _deliver_all(store: Store, status: RecipientStatus = RecipientStatus.DELIVERED) -> None:
    claims = await store.claim_due("w", 60, 100)
    code = 250 if status is RecipientStatus.DELIVERED else 550
    await store.record_outcomes(
        "w",
        [
            OutcomeUpdate(c.recipient_id, Outcome(status, f"{code} ok", "mx.example.org", True))
            for c in claims
        ],
    )


def _cfg(**kw: Any) -> WebhooksConfig:
    base: dict[str, Any] = {"retry_first": 30.0, "retry_max": 3600.0, "timeout": 5.0}
    base.update(kw)
    return WebhooksConfig(**base)


async def _drain(d: WebhookDispatcher) -> None:
    """Run dispatcher rounds until a round finds nothing and no POST is in flight."""
    # On PostgreSQL events younger than the settle time are not fanned out yet.
    d.clock.now += d._settle  # type: ignore[attr-defined]
    for _ in range(200):
        busy = await d.step()
        if d._tasks:
            await asyncio.gather(*d._tasks)
            continue
        if not busy:
            return
    raise AssertionError("dispatcher never went idle")


async def _dispatcher(store: Store, clock: Clock, owner: str = "o1", **kw: Any) -> Any:
    import aiohttp

    d = WebhookDispatcher(store, _cfg(**kw), owner, clock=clock)
    d._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    return d


async def test_account_webhook_gets_every_event_signed_in_message_order(
    store: Store, clock: Clock, receiver: HookReceiver
) -> None:
    acct = await store.add_account("alice", "x")
    hook, created = await q.set_webhook(store, "alice", receiver.url)
    assert created
    qid = await _message(store, acct.id, ["b@example.org", "c@example.org"])
    clock.now += 5
    await _deliver_all(store)
    d = await _dispatcher(store, clock)
    try:
        await _drain(d)
    finally:
        await d.stop()
    kinds = [(e["event"], e["recipient"]) for e in receiver.events()]
    assert kinds == [
        ("accepted", "b@example.org"),
        ("accepted", "c@example.org"),
        ("delivered", "b@example.org"),
        ("delivered", "c@example.org"),
    ]
    for h in receiver.received:
        assert h.json["message_id"] == qid and h.json["account"] == "alice"
        assert verify(hook.secret, h.headers[SIGNATURE_HEADER], h.body, now=clock.now)
    assert [e["id"] for e in receiver.events()] == sorted(e["id"] for e in receiver.events())


async def test_later_event_of_a_message_waits_while_an_earlier_one_is_pending(
    store: Store, clock: Clock, receiver: HookReceiver
) -> None:
    acct = await store.add_account("alice", "x")
    await q.set_webhook(store, "alice", receiver.url)
    first = await _message(store, acct.id, ["b@example.org"])
    clock.now += 1
    await _deliver_all(store)
    second = await _message(store, acct.id, ["c@example.org"], mail_from="z@example.com")
    assert await q.fan_out(store) == 3
    claimed = await q.claim_deliveries(store, "o1", 60, 10)
    # first's 'accepted' and second's 'accepted'; first's 'delivered' waits its turn
    assert sorted((c.event.message_id, c.event.kind) for c in claimed) == sorted(
        [(first, "accepted"), (second, "accepted")]
    )
    assert await q.claim_deliveries(store, "o1", 60, 10) == []


async def test_receiver_down_is_retried_with_backoff_then_delivered(
    store: Store, clock: Clock, receiver: HookReceiver
) -> None:
    acct = await store.add_account("alice", "x")
    await q.set_webhook(store, "alice", receiver.url)
    await _message(store, acct.id, ["b@example.org"])
    receiver.status = 503
    d = await _dispatcher(store, clock)
    try:
        await _drain(d)
        log = await q.delivery_log(store, failures_only=True)
        assert [(r.status, r.attempts, r.last_code) for r in log] == [("pending", 1, 503)]
        await _drain(d)  # not due yet: nothing is sent
        assert receiver.attempts == 1
        receiver.status = 200
        clock.now += 3600
        await _drain(d)
    finally:
        await d.stop()
    assert [e["event"] for e in receiver.events()] == ["accepted"]
    (row,) = await q.delivery_log(store)
    assert (row.status, row.attempts, row.last_code) == ("done", 2, 200)


async def test_post_is_given_up_after_retry_for_and_the_next_event_proceeds(
    store: Store, clock: Clock, receiver: HookReceiver
) -> None:
    acct = await store.add_account("alice", "x")
    await q.set_webhook(store, "alice", receiver.url)
    await _message(store, acct.id, ["b@example.org"])
    receiver.status = 500
    d = await _dispatcher(store, clock, retry_for=86400.0)
    try:
        for _ in range(40):  # fail at every retry until retry_for is used up
            await _drain(d)
            clock.now += 3600
        (row,) = await q.delivery_log(store)
        assert row.status == "failed" and row.last_code == 500 and row.attempts > 5
        await _deliver_all(store)
        receiver.status = 200
        await _drain(d)
    finally:
        await d.stop()
    assert [e["event"] for e in receiver.events()] == ["delivered"]
    states = {r.kind: r.status for r in await q.delivery_log(store)}
    assert states == {"accepted": "failed", "delivered": "done"}


async def test_a_lease_left_by_a_crashed_dispatcher_is_delivered_once_by_another(
    store: Store, clock: Clock, receiver: HookReceiver
) -> None:
    acct = await store.add_account("alice", "x")
    await q.set_webhook(store, "alice", receiver.url)
    await _message(store, acct.id, ["b@example.org"])
    await q.fan_out(store)
    assert len(await q.claim_deliveries(store, "dead-node", 60, 10)) == 1  # then it dies
    d = await _dispatcher(store, clock, owner="o2")
    try:
        await _drain(d)
        assert receiver.events() == []  # still leased
        clock.now += 61
        await _drain(d)
        await _drain(d)
    finally:
        await d.stop()
    assert [e["event"] for e in receiver.events()] == ["accepted"]


async def test_sender_webhook_and_kind_filter_get_only_their_events(
    store: Store, clock: Clock, receiver: HookReceiver
) -> None:
    acct = await store.add_account("alice", "x")
    hook, _ = await q.set_webhook(
        store, "alice", receiver.url, sender="News@example.com", events=["delivered"]
    )
    other = await store.add_account("bob", "x")
    await _message(store, acct.id, ["b@example.org"], mail_from="news@example.com")
    await _message(store, acct.id, ["c@example.org"], mail_from="other@example.com")
    await _message(store, other.id, ["d@example.org"], mail_from="news@example.com")
    await _deliver_all(store)
    d = await _dispatcher(store, clock)
    try:
        await _drain(d)
    finally:
        await d.stop()
    assert [(e["event"], e["recipient"]) for e in receiver.events()] == [
        ("delivered", "b@example.org")
    ]
    again, created = await q.set_webhook(
        store, "alice", receiver.url + "2", sender="news@example.com"
    )
    assert not created and again.id == hook.id and again.secret == hook.secret


async def test_open_within_bot_window_is_marked_and_unique_counts_once(
    store: Store, clock: Clock
) -> None:
    acct = await store.add_account("alice", "x")
    qid = await _message(store, acct.id, ["b@example.org"])
    await _deliver_all(store)
    rid = (await store.message_view(qid)).recipients[0].id
    clock.now += 2
    bot = await q.record_open(store, rid, qid, bot_window=10, client="scanner")
    clock.now += 600
    first = await q.record_open(store, rid, qid, bot_window=10, client="mua")
    again = await q.record_open(store, rid, qid, bot_window=10, client="mua")
    assert bot and bot.bot and not bot.unique
    assert first and first.unique and not first.bot and first.count == 2
    assert again and not again.unique and again.count == 3
    assert await q.record_open(store, rid + 99, qid, bot_window=10, client="x") is None
    assert (await q.opens_for(store, qid))["b@example.org"][0] == 2


async def test_stats_for_a_scripted_day_equal_the_hand_counts(store: Store, clock: Clock) -> None:
    acct = await store.add_account("alice", "x")
    clock.now = DAY0 + 100
    m1 = await _message(store, acct.id, ["d1@example.org", "d2@example.org"])
    clock.now += 1
    await _deliver_all(store)  # 2 delivered
    clock.now += 1
    m2 = await _message(store, acct.id, ["b1@example.org"], mail_from="x@other.com")
    await _deliver_all(store, RecipientStatus.BOUNCED)  # 1 bounced (other.com)
    clock.now += 1
    await _message(store, acct.id, ["s1@example.org"])
    for _ in range(2):  # one recipient deferred twice counts once
        clock.now += 1
        (c,) = await store.claim_due("w", 60, 10)
        await store.record_outcomes(
            "w", [OutcomeUpdate(c.recipient_id, Outcome(RecipientStatus.DEFERRED, "451"), 0)]
        )
    await q.add_rejected(
        store,
        acct.id,
        stage="rcpt",
        mail_from="a@example.com",
        rcpt="r@example.org",
        code=550,
        enhanced="5.7.1",
        text="no",
        reason="blocklisted",
    )
    view = await store.message_view(m1)
    clock.now += 3600
    await q.record_open(store, view.recipients[0].id, m1, bot_window=10, client="mua")
    await q.record_open(store, view.recipients[0].id, m1, bot_window=10, client="mua")
    await store.add_event(
        EventKind.UNSUBSCRIBED, account_id=acct.id, message_id=m1, rcpt="d2@example.org"
    )
    clock.now = DAY0 + 86400 + 5  # the next day
    await store.add_event(
        EventKind.COMPLAINED, account_id=acct.id, message_id=m2, rcpt="b1@example.org"
    )

    days = await q.daily_stats(store, DAY0, DAY0 + 2 * 86400, account_id=acct.id)
    assert [d.day for d in days] == ["2023-11-15", "2023-11-16"]
    d0 = days[0].as_dict()
    assert {
        k: d0[k]
        for k in (
            "requests",
            "accepted",
            "rejected",
            "delivered",
            "deferred",
            "bounced",
            "opened",
            "unsubscribed",
            "complained",
        )
    } == {
        "requests": 5,
        "accepted": 4,
        "rejected": 1,
        "delivered": 2,
        "deferred": 1,
        "bounced": 1,
        "opened": 1,
        "unsubscribed": 1,
        "complained": 0,
    }
    assert d0["delivery_rate"] == 0.5 and d0["open_rate"] == 0.5
    assert days[1].complained == 1
    only = await q.daily_stats(store, DAY0, DAY0 + 86400, domain="other.com")
    assert (only[0].accepted, only[0].bounced, only[0].rejected) == (1, 1, 0)
    assert json.dumps([d.as_dict() for d in days])  # JSON-serialisable for the API
