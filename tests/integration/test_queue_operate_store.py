"""The whole-queue commands' SQL on both dialects (relay/queue/operate.py)."""

from __future__ import annotations

import pytest

from relay.model import Outcome, RecipientStatus
from relay.queue import operate
from relay.queue.store import NewMessage, NewRecipient, OutcomeUpdate, Store
from tests.support.store import Clock, clock_of

HOUR = 3600.0


@pytest.fixture
def store(dialect_store: Store) -> Store:
    return dialect_store


def _now(store: Store) -> float:
    assert isinstance(store.clock, Clock)
    return store.clock.now


async def _accept(store: Store, account_id: int, mid: str, *rcpts: str) -> None:
    body = b"Subject: s\r\n\r\nx\r\n"
    await store.accept(
        NewMessage(mid, account_id, "a@example.com", body, tuple(map(NewRecipient, rcpts)))
    )


async def _defer_all(store: Store, leave_leased: str = "") -> None:
    """Claim every due row and defer it an hour, except the rows at ``leave_leased``."""
    claims = await store.claim_due("w", 60, 10_000)
    later = Outcome(RecipientStatus.DEFERRED, "451 4.7.1 later")
    await store.record_outcomes(
        "w",
        [
            OutcomeUpdate(c.recipient_id, later, _now(store) + HOUR)
            for c in claims
            if not c.address.endswith(leave_leased) or not leave_leased
        ],
    )


async def test_retry_by_domain_makes_only_that_domains_waiting_rows_due(store: Store) -> None:
    acct = await store.add_account("alice", "x")
    await _accept(store, acct.id, "m1", "a@slow.test", "b@fast.test", "d@busy.test")
    await _accept(store, acct.id, "m2", "c@slow.test")
    await _defer_all(store, leave_leased="@busy.test")

    assert await operate.retry_domain(store, "Slow.Test.") == 2
    due = {r.address: r.due_at for r in await store.queue_list(RecipientStatus.DEFERRED)}
    assert due == {
        "a@slow.test": _now(store),
        "c@slow.test": _now(store),
        "b@fast.test": _now(store) + HOUR,
    }
    # --all: the rest of what waits, but not a row being delivered (leased).
    assert await operate.retry_domain(store, None) == 1
    assert [r.address for r in await store.queue_list(RecipientStatus.SENDING)] == ["d@busy.test"]


async def test_delete_by_domain_drops_waiting_rows_in_chunks_each_with_its_event(
    store: Store,
) -> None:
    acct = await store.add_account("alice", "x")
    n = operate.DELETE_CHUNK + 3
    for i in range(n):
        await _accept(store, acct.id, f"m{i:04d}", f"r{i}@dead.test", f"r{i}@live.test")
    await _defer_all(store)
    await _accept(store, acct.id, "queued", "q@dead.test")

    assert await operate.delete_domain(store, "dead.test", RecipientStatus.QUEUED) == 1
    assert await operate.delete_domain(store, "dead.test") == n
    assert await operate.delete_domain(store, "dead.test") == 0
    counts = await store.queue_counts()
    assert counts == {"deleted": n + 1, "deferred": n}
    view = await store.message_view("m0007")
    assert {r.address: r.status for r in view.recipients} == {
        "r7@dead.test": RecipientStatus.DELETED,
        "r7@live.test": RecipientStatus.DEFERRED,
    }
    deleted = [e for e in view.events if e.kind == "deleted"]
    assert [(e.recipient, e.data["by"]) for e in deleted] == [("r7@dead.test", "operator")]

    shape = await operate.shape(store)
    assert [(d.domain, d.total, d.by_status["deferred"]) for d in shape] == [("live.test", n, n)]
    assert shape[0].by_age[0] == n and shape[0].top_reply == "451 4.7.1 later"


async def test_a_retry_by_domain_or_of_all_is_a_flush_request_delivery_can_see(
    store: Store,
) -> None:
    clock = clock_of(store)
    before = clock.now
    assert not await operate.flushed_since(store, "dead.example", before - 1)
    clock.now += 10
    await operate.retry_domain(store, "Dead.Example.")
    assert await operate.flushed_since(store, "dead.example", before)
    assert not await operate.flushed_since(store, "other.example", before)
    assert not await operate.flushed_since(store, "dead.example", clock.now)  # not since
    clock.now += 10
    await operate.retry_domain(store, None)  # --all: every destination
    assert await operate.flushed_since(store, "other.example", clock.now - 1)
    # A request older than a day is forgotten when the next one is written.
    clock.now += 2 * 86400
    await operate.retry_domain(store, "new.example")
    assert not await operate.flushed_since(store, "dead.example", 0)
    assert await operate.flushed_since(store, "new.example", clock.now - 1)


async def test_delete_by_account_drops_only_that_accounts_waiting_rows(store: Store) -> None:
    alice = await store.add_account("alice", "x")
    bob = await store.add_account("bob", "x")
    await _accept(store, alice.id, "a1", "x@one.test", "y@two.test")
    await _accept(store, bob.id, "b1", "z@one.test")
    await _defer_all(store)
    await _accept(store, alice.id, "a2", "w@one.test")

    assert await operate.delete_waiting(store, RecipientStatus.QUEUED, account_id=alice.id) == 1
    assert await operate.delete_waiting(store, None, account_id=alice.id) == 2
    assert await operate.delete_waiting(store, None, account_id=alice.id) == 0
    assert {r.message_id for r in await store.queue_list(None)} == {"b1"}
    view = await store.message_view("a1")
    assert {e.kind for e in view.events} >= {"deleted"}
    deleted = [e for e in view.events if e.kind == "deleted"]
    assert {e.data["account_id"] for e in deleted} == {alice.id}
