"""Reputation bookkeeping on a real SQLite store with an injected clock: blocklist expiry,
bounce classification, DSN/ARF/mailto processing, suspension and resume."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.config import Config, DatabaseConfig, ReputationConfig
from relay.domains.keys import generate_rsa
from relay.intake import new_queue_id
from relay.model import (
    Account,
    AccountStatus,
    Claim,
    EventKind,
    Outcome,
    RecipientStatus,
    Stage,
)
from relay.policy.engine import Request
from relay.policy.reputation_checks import (
    AccountSuspended,
    Blocklisted,
    RequireAuthOrInbound,
    Suppressed,
)
from relay.queue import reputation as q
from relay.queue.store import NewMessage, NewRecipient, Store
from relay.reputation.service import Reputation
from relay.reputation.tokens import TokenKind
from tests.support.store import Clock

DSN_DIR = Path(__file__).parent.parent / "unit" / "dsn_samples"
DAY = 86400.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[Store]:
    s = Store.open(DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"), "n1", clock)
    await s.migrate()
    yield s
    await s.close()


def make_cfg(**rep: object) -> Config:
    base = dict(min_sample=10, secret="test-secret", bounce_domain="bounce.relay.test")
    base.update(rep)
    return dataclasses.replace(
        Config(hostname="relay.test"),
        reputation=ReputationConfig(**base),  # type: ignore[arg-type]
    )


async def setup_account(store: Store) -> Account:
    acct = await store.add_account("alice", "x")
    await store.add_domain("example.com", acct.id, "relay", generate_rsa(1024), verified=True)
    await store.add_domain("other.com", acct.id, "relay", generate_rsa(1024), verified=True)
    return acct


async def send(store: Store, acct: Account, rcpts: list[str], sender: str = "a@example.com") -> str:
    qid = new_queue_id(store.clock())
    await store.accept(
        NewMessage(
            qid, acct.id, sender, b"Subject: x\r\n\r\nhi\r\n", tuple(map(NewRecipient, rcpts))
        )
    )
    return qid


async def claims_of(store: Store, qid: str, acct: Account) -> list[Claim]:
    view = await store.message_view(qid)
    return [
        Claim(r.id, qid, acct.id, view.mail_from, r.address, r.address.split("@")[1], 0, 0.0)
        for r in view.recipients
    ]


def bounced(reply: str) -> Outcome:
    return Outcome(RecipientStatus.BOUNCED, reply, "mx.bad.example", True, int(reply[:3]))


def rcpt_request(acct: Account, rcpt: str, sender: str = "a@example.com") -> Request:
    return Request(Stage.RCPT, "submission", "127.0.0.1", acct, sender, rcpt)


async def test_user_unknown_blocklists_and_the_next_rcpt_is_refused_with_date_and_removal(
    store: Store,
) -> None:
    acct = await setup_account(store)
    rep = Reputation(make_cfg(), store)
    qid = await send(store, acct, ["gone@bad.example", "ok@bad.example"])
    claims = await claims_of(store, qid, acct)
    await rep.after_outcomes(
        claims,
        {
            claims[0].recipient_id: bounced("550 5.1.1 <gone@bad.example> user unknown"),
            claims[1].recipient_id: Outcome(RecipientStatus.DELIVERED, "250 ok"),
        },
    )
    [entry] = await q.blocklist_list(store)
    assert entry.address == "gone@bad.example"
    assert entry.account_name == "alice" and "user unknown" in entry.reason
    verdict = await Blocklisted(store)(rcpt_request(acct, "Gone@Bad.Example"))
    assert verdict is not None
    assert (verdict.code, verdict.enhanced) == (550, "5.1.1")
    assert "2027-01-15" in verdict.text  # the date it was added (clock 1.8e9)
    assert "user unknown" in verdict.text
    assert "relay blocklist remove gone@bad.example" in verdict.text
    assert await Blocklisted(store)(rcpt_request(acct, "ok@bad.example")) is None
    kinds = [e.kind for e in await store.events_for(qid)]
    assert EventKind.BLOCKLISTED.value in kinds


async def test_policy_refusal_5_7_1_does_not_blocklist(store: Store) -> None:
    acct = await setup_account(store)
    rep = Reputation(make_cfg(), store)
    qid = await send(store, acct, ["someone@bad.example"])
    [c] = await claims_of(store, qid, acct)
    reply = "550 5.7.1 Service unavailable; client [192.0.2.1] blocked using Spamhaus"
    await rep.after_outcomes([c], {c.recipient_id: bounced(reply)})
    assert await q.blocklist_list(store) == []
    assert await store.counter_sum("reputation_refusal:mx.bad.example", 0) == 1


async def test_blocklist_entries_expire_and_can_be_removed(store: Store, clock: Clock) -> None:
    await q.blocklist_add(store, "x@bad.example", "manual", 14)
    await q.blocklist_add(store, "y@bad.example", "manual", 2)
    assert {e.address for e in await q.blocklist_list(store)} == {"x@bad.example", "y@bad.example"}
    clock.now += 3 * DAY
    assert [e.address for e in await q.blocklist_list(store)] == ["x@bad.example"]
    assert await q.blocklist_get(store, "y@bad.example") is None
    assert await q.blocklist_remove(store, "X@bad.example")
    assert await q.blocklist_list(store) == []
    assert not await q.blocklist_remove(store, "x@bad.example")


async def test_suppression_is_per_sender_domain(store: Store) -> None:
    acct = await setup_account(store)
    assert await q.suppression_add(store, "example.com", "u@example.org", "unsubscribe")
    assert not await q.suppression_add(store, "example.com", "u@example.org", "unsubscribe")
    v = await Suppressed(store)(rcpt_request(acct, "u@example.org", "a@example.com"))
    assert v is not None and (v.code, v.enhanced) == (550, "5.7.1")
    assert "example.com" in v.text
    assert await Suppressed(store)(rcpt_request(acct, "u@example.org", "a@other.com")) is None


async def test_dsn_to_a_verp_address_blocklists_the_recipient(store: Store) -> None:
    acct = await setup_account(store)
    rep = Reputation(make_cfg(), store)
    qid = await send(store, acct, ["nobody@example.org"])
    [c] = await claims_of(store, qid, acct)
    token = await rep.token(TokenKind.BOUNCE, c.recipient_id)
    rcpt = f"bounce+{token}@bounce.relay.test"
    assert await rep.is_inbound(rcpt)
    data = (DSN_DIR / "postfix.eml").read_bytes().replace(b"TOKEN", token.encode())
    reply = await rep.process_inbound("", [rcpt], data.replace(b"\n", b"\r\n"))
    assert reply.startswith("250 ")
    assert [e.address for e in await q.blocklist_list(store)] == ["nobody@example.org"]
    bounce = [e for e in await store.events_for(qid) if e.kind == EventKind.BOUNCED.value]
    assert bounce and bounce[0].data["class"] == "hard" and bounce[0].data["status"] == "5.1.1"
    assert await q.report_counts(store) == {"dsn": 1}


async def test_reputation_dsn_does_not_blocklist_and_mangled_mail_is_kept(store: Store) -> None:
    acct = await setup_account(store)
    rep = Reputation(make_cfg(), store)
    await send(store, acct, ["blocked@outlook.com"])
    data = (DSN_DIR / "microsoft.eml").read_bytes().replace(b"\n", b"\r\n")
    assert (await rep.process_inbound("", ["bounce@bounce.relay.test"], data)).startswith("250")
    assert await q.blocklist_list(store) == []
    mangled = (DSN_DIR / "mangled.eml").read_bytes()
    assert (await rep.process_inbound("x@y", ["bounce@bounce.relay.test"], mangled)).startswith(
        "250"
    )
    assert await q.report_counts(store) == {"dsn": 1, "unparsed": 1}


async def test_arf_complaint_suppresses_for_the_sender_domain(store: Store) -> None:
    acct = await setup_account(store)
    rep = Reputation(make_cfg(min_sample=1000), store)
    qid = await send(store, acct, ["someone@example.net"])
    [c] = await claims_of(store, qid, acct)
    token = await rep.token(TokenKind.BOUNCE, c.recipient_id)
    arf = (Path(__file__).parent.parent / "unit" / "test_reputation_arf.py").read_text()
    body = arf.split('ARF = b"""', 1)[1].split('"""', 1)[0].replace("TOKEN", token)
    reply = await rep.process_inbound("", ["fbl@bounce.relay.test"], body.encode())
    assert reply.startswith("250")
    [s] = await q.suppression_list(store)
    assert (s.domain, s.address, s.reason) == ("example.com", "someone@example.net", "complaint")
    assert EventKind.COMPLAINED.value in [e.kind for e in await store.events_for(qid)]


async def test_mailto_unsubscribe(store: Store) -> None:
    acct = await setup_account(store)
    rep = Reputation(make_cfg(), store)
    qid = await send(store, acct, ["reader@example.org"], sender="news@other.com")
    [c] = await claims_of(store, qid, acct)
    token = await rep.token(TokenKind.UNSUBSCRIBE, c.recipient_id)
    reply = await rep.process_inbound(
        "reader@example.org", [f"unsubscribe+{token}@bounce.relay.test"], b"Subject: x\r\n\r\n"
    )
    assert reply.startswith("250")
    assert await q.suppression_get(store, "other.com", "reader@example.org") is not None
    assert await q.suppression_get(store, "example.com", "reader@example.org") is None
    bad = await rep.process_inbound("", ["unsubscribe+aaaa@bounce.relay.test"], b"\r\n")
    assert bad.startswith("250")
    assert (await q.report_counts(store))["unparsed"] == 1


async def test_port25_accepts_only_our_inbound_addresses(store: Store) -> None:
    await setup_account(store)
    check = RequireAuthOrInbound(Reputation(make_cfg(), store))

    def req(rcpt: str, listener: str = "smtp") -> Request:
        return Request(Stage.RCPT, listener, "127.0.0.1", None, "", rcpt)

    assert await check(req("bounce+abc@bounce.relay.test")) is None
    assert await check(req("unsubscribe+abc@example.com")) is None
    assert await check(req("fbl@relay.test")) is None
    for other in ("b@example.org", "bounce@elsewhere.example", "postmaster@example.com"):
        v = await check(req(other))
        assert v is not None and (v.code, v.enhanced) == (550, "5.7.1")
    v = await check(req("bounce+abc@bounce.relay.test", listener="submission"))
    assert v is not None and v.code == 550


async def test_crossing_eight_percent_suspends_and_resume_restores(
    store: Store, clock: Clock
) -> None:
    acct = await setup_account(store)
    rep = Reputation(make_cfg(min_sample=20), store)
    qid = await send(store, acct, [f"r{i}@example.org" for i in range(25)])
    waiting = await send(store, acct, ["later@example.org"])
    claims = await claims_of(store, qid, acct)
    # 1 of 26 accepted = 3.8%: under the threshold.
    await rep.after_outcomes(claims[:1], {claims[0].recipient_id: bounced("550 5.1.1 unknown")})
    assert (await q.account_state(store, acct.id)).status is AccountStatus.ACTIVE  # type: ignore[union-attr]
    # 2 of 27 (a blocklisted RCPT counts too) = 7.4%: still under.
    await store.add_event(
        EventKind.REJECTED, account_id=acct.id, rcpt="x@y", data={"reason": "blocklisted"}
    )
    assert not await rep.evaluate(acct.id)
    # 3 of 27 = 11.1%: suspended.
    await rep.after_outcomes(claims[1:2], {claims[1].recipient_id: bounced("550 5.1.1 unknown")})
    state = await q.account_state(store, acct.id)
    assert state is not None and state.status is AccountStatus.SUSPENDED
    view = await store.message_view(waiting)
    assert view.recipients[0].status is RecipientStatus.HELD
    assert await store.claim_due("w", 30, 100) == []
    v = await AccountSuspended(store)(
        Request(Stage.MAIL, "submission", "127.0.0.1", acct, "a@example.com")
    )
    assert v is not None and (v.code, v.enhanced) == (550, "5.7.1")
    assert "11.1% (3/27)" in v.text and "8.0%" in v.text and "relay account resume alice" in v.text
    clock.now += 60
    released = await q.resume(store, acct.id)
    assert released >= 1
    state = await q.account_state(store, acct.id)
    assert state is not None and state.status is AccountStatus.ACTIVE
    assert (
        await AccountSuspended(store)(
            Request(Stage.MAIL, "submission", "127.0.0.1", acct, "a@example.com")
        )
        is None
    )
    # The window restarted: the old bounces no longer count.
    assert not await rep.evaluate(acct.id)
    claimed = await store.claim_due("w", 30, 100)
    assert "later@example.org" in [c.address for c in claimed]


async def test_account_setting_turns_the_header_off_and_unrendered_mail_stays_grouped(
    store: Store,
) -> None:
    from relay.delivery.render import Renderer

    acct = await setup_account(store)
    qid = await send(store, acct, ["r1@example.org", "r2@example.org"])
    claims = await claims_of(store, qid, acct)
    body = b"From: a@example.com\r\nSubject: x\r\n\r\nhi\r\n"

    async def secret() -> bytes:
        return b"k"

    on = Renderer(make_cfg(), store, secret, "bounce.relay.test", "http://relay.test")
    parts = await on.render(body, "a@example.com", acct.id, claims)
    assert [len(p.claims) for p in parts] == [1, 1]
    assert all(p.data.startswith(b"List-Unsubscribe: <http://relay.test/u/") for p in parts)

    await q.set_account_setting(store, acct.id, "list_unsubscribe", False)
    off = Renderer(make_cfg(), store, secret, "bounce.relay.test", "http://relay.test")
    parts = await off.render(body, "a@example.com", acct.id, claims)
    assert all(p.data == body and p.mail_from.startswith("bounce+") for p in parts)

    plain = Renderer(make_cfg(verp=False), store, secret, "bounce.relay.test", "http://x")
    [group] = await plain.render(body, "a@example.com", acct.id, claims)
    assert len(group.claims) == 2 and group.mail_from == "a@example.com"
