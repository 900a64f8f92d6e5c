"""Issue 9, fourth round: the RCPT stage's blocklist, suppression and per-recipient reads
in one trip (RecipientChecks) decide exactly as the three checks do one by one; the limits
derived per account and the trusted-network lookups are remembered without going stale."""

from __future__ import annotations

import dataclasses

from relay.config import Config, LimitsConfig
from relay.intake import Intake, parse
from relay.model import Account, Stage, Verdict
from relay.policy.build import build_checks
from relay.policy.engine import Policy, Request
from relay.policy.limits import Limits, PerRecipientHourly
from relay.policy.recipient import RecipientChecks
from relay.policy.reputation_checks import Blocklisted, Suppressed
from relay.queue import limits as q
from relay.queue import reputation as rq
from relay.queue.store import NewRecipient, Store
from relay.smtp.trusted import TrustedNetworks
from tests.support.store import Clock


async def sender(store: Store) -> Account:
    acct = await store.add_account("alice", "x")
    await store.add_domain("example.com", acct.id, "relay", "k", verified=True, warmup=False)
    return acct


def rcpt(
    acct: Account | None, address: str | None, sender: str | None = "a@example.com"
) -> Request:
    return Request(Stage.RCPT, "submission", "127.0.0.1", acct, sender, address)


async def one_by_one(limits: Limits, request: Request) -> Verdict | None:
    """The three checks as separate policy checks, in build_checks' order."""
    for check in (Blocklisted(limits.store), Suppressed(limits.store), PerRecipientHourly(limits)):
        verdict = await check(request)
        if verdict is not None:
            return verdict
    return None


async def submit(intake: Intake, acct: Account, address: str) -> None:
    await intake.accept(
        account_id=acct.id,
        mail_from="a@example.com",
        recipients=[NewRecipient(address)],
        parsed=parse(b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"),
        helo="client",
        client_ip="127.0.0.1",
        protocol="ESMTPA",
    )


async def test_one_read_decides_as_the_three_checks_in_their_order(
    stores: tuple[Store, Store], clock: Clock
) -> None:
    server, cli = stores
    acct = await sender(server)
    limits = Limits(LimitsConfig(per_recipient_hourly=2), server)
    combined = RecipientChecks(limits)
    intake = Intake(server, "relay.test", clock=server.clock)
    intake.planner = limits
    # Written by "the CLI" (another process): the lists are never cached.
    await rq.blocklist_add(cli, "both@example.org", "hard bounce", 3)
    await rq.suppression_add(cli, "example.com", "both@example.org", "unsubscribe")
    await rq.suppression_add(cli, "example.com", "unsub@example.org", "complaint")
    for _ in range(2):
        await submit(intake, acct, "busy@example.org")
        await submit(intake, acct, "both@example.org")
        clock.now += 60
    cases = [
        rcpt(acct, "Both@Example.org"),  # blocklisted, suppressed and over the hour
        rcpt(acct, "unsub@example.org"),  # suppressed only
        rcpt(acct, "unsub@example.org", "a@other.example"),  # another sender domain
        rcpt(acct, "unsub@example.org", None),  # no sender: no suppression check
        rcpt(acct, "unsub@example.org", ""),
        rcpt(acct, "busy@example.org"),  # over the hour only
        rcpt(acct, "free@example.org"),
        rcpt(acct, ""),
        rcpt(None, "both@example.org"),  # unauthenticated: RequireAuth decides
        rcpt(acct, None),
    ]
    reasons = []
    for request in cases:
        expected = await one_by_one(limits, request)
        assert await combined(request) == expected, request
        reasons.append(None if expected is None else expected.reason)
    assert reasons == [
        "blocklisted",
        "suppressed",
        None,
        None,
        None,
        "per_recipient_hourly",
        None,
        None,
        None,
        None,
    ]
    # Entries added or removed elsewhere apply to the next RCPT.
    await rq.blocklist_add(cli, "free@example.org", "hard bounce", 3)
    verdict = await combined(rcpt(acct, "free@example.org"))
    assert verdict is not None and verdict.reason == "blocklisted"
    assert await rq.blocklist_remove(cli, "free@example.org")
    assert await combined(rcpt(acct, "free@example.org")) is None
    # The hour rolls on: the oldest window leaves it.
    clock.now += 3600 - 60
    assert await combined(rcpt(acct, "busy@example.org")) is None


async def test_build_checks_runs_the_recipient_checks_at_rcpt(
    stores: tuple[Store, Store],
) -> None:
    server, cli = stores
    acct = await sender(server)
    cfg = dataclasses.replace(Config(hostname="relay.test"), limits=LimitsConfig())
    policy = Policy(build_checks(cfg, server))
    assert (await policy.check(rcpt(acct, "ok@example.org"))).ok
    await rq.blocklist_add(cli, "gone@example.org", "user unknown", 3)
    verdict = await policy.check(rcpt(acct, "gone@example.org"))
    assert (verdict.code, verdict.enhanced, verdict.reason) == (550, "5.1.1", "blocklisted")
    await rq.suppression_add(cli, "example.com", "left@example.org", "unsubscribe")
    verdict = await policy.check(rcpt(acct, "left@example.org"))
    assert (verdict.code, verdict.reason) == (550, "suppressed")
    relay_denied = await policy.check(rcpt(None, "ok@example.org"))
    assert relay_denied.code == 550 and relay_denied.reason == "relay_denied"


async def test_account_limits_follow_override_and_level_changes(
    stores: tuple[Store, Store],
) -> None:
    server, cli = stores
    acct = await sender(server)
    limits = Limits(LimitsConfig(), server)
    now = [100.0]
    server.cache.clock = lambda: now[0]
    first = await limits.for_account(acct)
    assert await limits.for_account(acct) is first  # same rows, same limits
    await q.set_override(server, "account", "alice", "rate", "3")  # this process: at once
    assert (await limits.for_account(acct)).rate == 3
    await q.set_override(cli, "account", "alice", "daily", "42")  # another: within the TTL
    assert (await limits.for_account(acct)).daily_source != "set for this account"
    now[0] += 5.1
    got = await limits.for_account(acct)
    assert (got.daily, got.daily_source, got.rate) == (42, "set for this account", 3)
    await q.set_level(server, acct.id, 1, 0.0, "2026-03-02", "test")
    got = await limits.for_account(acct)
    assert got.level == 1 and got.daily == 42
    await q.set_override(server, "account", "alice", "daily", None)
    assert (await limits.for_account(acct)).daily == 2000  # level 2 of the default table


async def test_trusted_network_lookup_is_remembered_but_the_account_is_not(
    stores: tuple[Store, Store],
) -> None:
    server, _cli = stores
    acct = await sender(server)
    trusted = TrustedNetworks(server, {"127.0.0.0/8": "alice", "::1/128": "alice"})
    for _ in range(2):
        assert await trusted.account_for("127.0.0.5") == acct
        assert await trusted.account_for("::ffff:127.0.0.5") == acct
        assert await trusted.account_for("192.0.2.1") is None
        assert await trusted.account_for("not an address") is None
    await server.set_password("alice", "y")  # a write to the account table: cache cleared
    assert (await trusted.account_for("127.0.0.5")) == acct
