"""Sending limits against a real SQLite database with an injected clock.

The checks, the accept plan (Intake) and the held-mail scheduler run in-process on one
Store whose clock the test moves: days and hours pass without sleeping.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from relay.config import LimitsConfig, WarmupStep
from relay.delivery.scheduler import HeldScheduler
from relay.intake import Intake, parse
from relay.model import Account, RecipientStatus, Stage
from relay.policy.engine import Request
from relay.policy.limits import DailyQuota, Limits, PerRecipientHourly, RateLimit, SubjectLimit
from relay.queue import limits as q
from relay.queue.store import CounterLimitExceeded, NewRecipient, Store
from tests.support.store import Clock, open_store

# 2026-03-02 00:00:00 UTC: a Monday, the start of an hour and a day.
T0 = dt.datetime(2026, 3, 2, tzinfo=dt.UTC).timestamp()


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[Store]:
    s = await open_store(tmp_path / "relay.db", clock)
    yield s
    await s.close()


async def setup_sender(store: Store, warmup: bool) -> Account:
    acct = await store.add_account("alice", "x")
    await store.add_domain("example.com", acct.id, "relay", "k", verified=True, warmup=warmup)
    return acct


def message(subject: str = "hello") -> bytes:
    return f"From: a@example.com\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


async def submit(intake: Intake, acct: Account, rcpts: list[str], subject: str = "hi") -> str:
    return await intake.accept(
        account_id=acct.id,
        mail_from="a@example.com",
        recipients=[NewRecipient(a) for a in rcpts],
        parsed=parse(message(subject)),
        helo="client",
        client_ip="127.0.0.1",
        protocol="ESMTPSA",
    )


def intake_for(store: Store, limits: Limits) -> Intake:
    intake = Intake(store, "relay.test", clock=store.clock)
    intake.planner = limits
    return intake


async def statuses(store: Store) -> dict[str, int]:
    return await store.queue_counts()


# ---------------------------------------------------------------------- subject


async def test_subject_of_998_characters_passes_and_999_gets_554(store: Store) -> None:
    acct = await setup_sender(store, warmup=False)
    check = SubjectLimit(Limits(LimitsConfig(), store))

    def req(subject: str) -> Request:
        return Request(
            Stage.DATA,
            "submission",
            "127.0.0.1",
            acct,
            "a@example.com",
            headers=parse(message(subject)).headers,
        )

    assert await check(req("x" * 998)) is None
    verdict = await check(req("x" * 999))
    assert verdict is not None
    assert (verdict.code, verdict.enhanced) == (554, "5.6.0")
    assert "999 characters, the limit is 998" in verdict.text


async def test_subject_that_is_not_valid_utf8_gets_554(store: Store) -> None:
    acct = await setup_sender(store, warmup=False)
    check = SubjectLimit(Limits(LimitsConfig(), store))
    headers = parse(b"From: a@example.com\r\nSubject: =?utf-8?b?/w==?=\r\n\r\nx\r\n").headers
    verdict = await check(Request(Stage.DATA, "submission", "127.0.0.1", acct, headers=headers))
    assert verdict is not None and verdict.reply.startswith("554 5.6.0 Subject is not valid UTF-8")


# ---------------------------------------------------------------------- per recipient


async def test_tenth_message_to_an_address_passes_and_the_eleventh_gets_450(
    store: Store, clock: Clock
) -> None:
    acct = await setup_sender(store, warmup=False)
    limits = Limits(LimitsConfig(), store)
    intake, check = intake_for(store, limits), PerRecipientHourly(limits)

    def rcpt(address: str) -> Request:
        return Request(Stage.RCPT, "submission", "127.0.0.1", acct, "a@example.com", address)

    for _ in range(10):
        assert await check(rcpt("c@example.org")) is None
        await submit(intake, acct, ["c@example.org"])
        clock.now += 30
    verdict = await check(rcpt("C@example.org"))
    assert verdict is not None
    assert (verdict.code, verdict.enhanced) == (450, "4.2.1")
    assert "<C@example.org>: at most 10 per hour" in verdict.text
    assert "retry after 2026-03-02 01:00:00Z" in verdict.text
    assert await check(rcpt("d@example.org")) is None  # only that recipient is refused
    clock.now = T0 + 3600 + 1  # the first message leaves the rolling hour
    assert await check(rcpt("c@example.org")) is None


# ---------------------------------------------------------------------- daily quota


async def test_daily_quota_500th_recipient_passes_and_501st_gets_451(
    store: Store, clock: Clock
) -> None:
    acct = await setup_sender(store, warmup=False)
    limits = Limits(LimitsConfig(), store)
    intake, check = intake_for(store, limits), DailyQuota(limits)

    def data(n: int) -> Request:
        rcpts = tuple(f"r{i}@example.org" for i in range(n))
        return Request(
            Stage.DATA, "submission", "127.0.0.1", acct, "a@example.com", recipients=rcpts
        )

    for batch in range(10):
        clock.now = T0 + batch * 60
        assert await check(data(50)) is None
        await submit(intake, acct, [f"u{batch}-{i}@example.org" for i in range(49)] + ["z@x.org"])
    verdict = await check(data(1))
    assert verdict is not None
    assert (verdict.code, verdict.enhanced) == (451, "4.7.1")
    assert "500 of 500 recipients used in the last 24 h" in verdict.text
    assert "frees up from 2026-03-03 00:00:00Z" in verdict.text
    clock.now = T0 + 86400 + 1
    assert await check(data(1)) is None


async def test_counters_survive_a_restart(tmp_path: Path, clock: Clock) -> None:
    store = await open_store(tmp_path / "r.db", clock)
    acct = await setup_sender(store, warmup=False)
    await submit(intake_for(store, Limits(LimitsConfig(), store)), acct, ["a@example.org"] * 1)
    await store.close()
    again = await open_store(tmp_path / "r.db", clock)
    try:
        assert (await Limits(LimitsConfig(), again).daily_usage(acct.id)).used == 1
    finally:
        await again.close()


async def test_two_stores_on_one_database_never_exceed_the_quota_together(
    tmp_path: Path, clock: Clock
) -> None:
    one = await open_store(tmp_path / "shared.db", clock)
    two = await open_store(tmp_path / "shared.db", clock)
    try:
        acct = await setup_sender(one, warmup=False)
        cfg = LimitsConfig(daily=30)
        intakes = [intake_for(s, Limits(cfg, s)) for s in (one, two)]

        async def send(i: int) -> bool:
            try:
                await submit(intakes[i % 2], acct, [f"x{i}@example.org"])
            except CounterLimitExceeded:
                return False
            return True

        results = await asyncio.gather(*(send(i) for i in range(60)))
        assert sum(results) == 30
        assert (await Limits(cfg, two).daily_usage(acct.id)).used == 30
    finally:
        await one.close()
        await two.close()


async def test_queue_over_quota_accepts_and_holds_then_releases_when_quota_frees(
    store: Store, clock: Clock
) -> None:
    acct = await setup_sender(store, warmup=False)
    await q.set_override(store, "account", "alice", "queue_over_quota", "true")
    limits = Limits(LimitsConfig(daily=5), store)
    assert (
        await DailyQuota(limits)(
            Request(Stage.DATA, "submission", "127.0.0.1", acct, recipients=("a@b.c",) * 9)
        )
        is None
    )
    await submit(intake_for(store, limits), acct, [f"h{i}@example.org" for i in range(8)])
    assert await statuses(store) == {"queued": 5, "held": 3}
    held = await store.queue_list(RecipientStatus.HELD)
    assert all(r.reason and r.reason.startswith("quota") for r in held)
    sched = HeldScheduler(limits, 5.0)
    assert await sched.tick() == 0
    clock.now = T0 + 86400 + 1
    assert await sched.tick() == 3
    assert await statuses(store) == {"queued": 8}


# ---------------------------------------------------------------------- rate


async def test_rate_bucket_allows_20_recipients_a_second_then_451_with_retry(
    store: Store, clock: Clock
) -> None:
    acct = await setup_sender(store, warmup=False)
    check = RateLimit(Limits(LimitsConfig(), store))
    one = Request(Stage.DATA, "submission", "127.0.0.1", acct, recipients=("x@y.z",))
    for _ in range(20):
        assert await check(one) is None
    verdict = await check(one)
    assert verdict is not None and (verdict.code, verdict.enhanced) == (451, "4.7.1")
    assert "at most 20 recipients per second" in verdict.text and "retry in 0.05 s" in verdict.text
    clock.now += 0.05
    assert await check(one) is None


# ---------------------------------------------------------------------- warm-up


async def test_warmup_day_one_sends_1000_spaced_at_200_an_hour_and_day_two_releases_1500(
    store: Store, clock: Clock
) -> None:
    acct = await setup_sender(store, warmup=True)
    cfg = LimitsConfig(daily=100000, levels=(100000,))
    limits = Limits(cfg, store)
    intake = intake_for(store, limits)
    await submit(intake, acct, [f"w{i}@example.org" for i in range(3000)])
    assert await statuses(store) == {"queued": 200, "held": 2800}
    queued = sorted(r.due_at for r in await store.queue_list(RecipientStatus.QUEUED, 5000))
    assert queued[0] == T0 and queued[-1] == T0 + 199 * 18  # spaced, not a burst
    events = await store.events_for((await store.queue_list(RecipientStatus.HELD, 1))[0].message_id)
    assert any(e.kind == "held" and "warmup" in str(e.data.get("reason")) for e in events)

    sched = HeldScheduler(limits, 5.0)
    released_per_hour = []
    for hour in range(24):
        clock.now = T0 + hour * 3600 + 1
        released_per_hour.append(await sched.tick())
        clock.now += 1800
        assert await sched.tick() == 0  # nothing more inside the same hour
    assert released_per_hour[:5] == [0, 200, 200, 200, 200]  # hour 0 was spent at accept
    assert sum(released_per_hour) == 800  # day 1: 1,000 in all
    counts = await statuses(store)
    assert counts["held"] == 2000

    due_day2 = []
    for hour in range(24):
        clock.now = T0 + 86400 + hour * 3600 + 1
        await sched.tick()
    for r in await store.queue_list(RecipientStatus.QUEUED, 5000):
        if r.due_at >= T0 + 86400:
            due_day2.append(r.due_at)
    assert len(due_day2) == 1500  # day 2 budget
    assert (await statuses(store))["held"] == 500
    due_day2.sort()
    per_hour: dict[int, int] = {}
    for t in due_day2:
        per_hour[int((t - T0) // 3600)] = per_hour.get(int((t - T0) // 3600), 0) + 1
    assert max(per_hour.values()) <= 200
    assert min(b - a for a, b in itertools.pairwise(due_day2)) >= 18


async def test_warmup_releases_oldest_first(store: Store, clock: Clock) -> None:
    acct = await setup_sender(store, warmup=True)
    table = (WarmupStep(1, 30, 2, 2, None, None),)
    limits = Limits(replace(LimitsConfig(), warmup=table), store)
    intake = intake_for(store, limits)
    first = await submit(intake, acct, ["a@example.org", "b@example.org", "c@example.org"])
    clock.now += 60
    second = await submit(intake, acct, ["d@example.org", "e@example.org"])
    clock.now = T0 + 86400 + 1
    assert await HeldScheduler(limits, 5.0).tick() == 2
    queued = {(r.message_id, r.address) for r in await store.queue_list(RecipientStatus.QUEUED)}
    assert {(first, "c@example.org"), (second, "d@example.org")} <= queued
    held = [(r.message_id, r.address) for r in await store.queue_list(RecipientStatus.HELD)]
    assert held == [(second, "e@example.org")]


async def test_warmup_applies_only_to_domains_with_warmup_on(store: Store) -> None:
    acct = await setup_sender(store, warmup=False)
    limits = Limits(LimitsConfig(daily=100000), store)
    await submit(intake_for(store, limits), acct, [f"n{i}@example.org" for i in range(300)])
    assert await statuses(store) == {"queued": 300}


# ---------------------------------------------------------------------- reputation


async def test_reputation_level_rises_after_a_clean_week_and_falls_after_bounces(
    store: Store, clock: Clock
) -> None:
    acct = await setup_sender(store, warmup=False)
    cfg = LimitsConfig()
    limits = Limits(cfg, store)
    await limits.ensure_level(acct.id)
    intake = intake_for(store, limits)
    for day in range(7):
        clock.now = T0 + day * 86400 + 3600
        await submit(intake, acct, [f"d{day}-{i}@example.org" for i in range(450)])
    clock.now = T0 + 7 * 86400 + 3600
    await limits.ensure_level(acct.id)
    assert (await limits.for_account(acct)).daily == 2000
    # a bad week: everything sent bounces
    ids = [r.id for r in await store.queue_list(RecipientStatus.QUEUED, 10000)]
    claims = await store.claim_due("w", 60, len(ids))
    from relay.model import Outcome
    from relay.queue.store import OutcomeUpdate

    await store.record_outcomes(
        "w",
        [
            OutcomeUpdate(c.recipient_id, Outcome(RecipientStatus.BOUNCED, "550 5.1.1 no"))
            for c in claims
        ],
    )
    clock.now += 86400
    await limits.ensure_level(acct.id)
    assert (await limits.for_account(acct)).daily == 500
