"""Operator holds' SQL on both dialects (relay/queue/holds.py), and leases given back
with no attempt counted (Store.release_leases)."""

from __future__ import annotations

from relay.model import Outcome, RecipientStatus
from relay.queue import holds
from relay.queue.store import NewMessage, NewRecipient, OutcomeUpdate, RecipientView, Store
from tests.support.store import clock_of

HOUR = 3600.0


async def _accept(store: Store, account_id: int, mid: str, *rcpts: str) -> None:
    body = b"Subject: s\r\n\r\nx\r\n"
    await store.accept(
        NewMessage(mid, account_id, "a@example.com", body, tuple(map(NewRecipient, rcpts)))
    )


def _due(rows: list[RecipientView]) -> dict[str, float]:
    return {r.address: r.due_at for r in rows}


async def test_a_hold_moves_its_domains_waiting_mail_to_its_end_and_release_ends_it(
    dialect_store: Store,
) -> None:
    store = dialect_store
    now = clock_of(store).now
    acct = await store.add_account("alice", "x")
    await _accept(store, acct.id, "m1", "a@held.test", "b@free.test")
    await _accept(store, acct.id, "m2", "c@held.test")

    assert await holds.hold(store, "Held.Test.", "receiver asked us to pause", now + HOUR) == 2
    assert _due(await store.queue_list(RecipientStatus.QUEUED)) == {
        "a@held.test": now + HOUR,
        "c@held.test": now + HOUR,
        "b@free.test": now,
    }
    (found,) = (await holds.active(store)).values()
    assert found == holds.Hold("held.test", "receiver asked us to pause", now + HOUR, now)
    # Only the free domain is claimed.
    assert [c.address for c in await store.claim_due("w", 60, 100)] == ["b@free.test"]

    # A hold without an end parks mail RECHECK at a time; a second hold replaces the first.
    assert await holds.hold(store, "held.test", "", None) == 0  # already later than that
    assert (await holds.active(store))["held.test"].until is None
    assert holds.Hold("held.test", "", None, now).due(now) == now + holds.RECHECK

    assert await holds.release(store, "HELD.test") is True
    assert await holds.release(store, "held.test") is False
    assert await holds.active(store) == {}


async def test_a_hold_past_its_end_is_not_in_force_and_goes_when_another_is_set(
    dialect_store: Store,
) -> None:
    store = dialect_store
    clock = clock_of(store)
    await holds.hold(store, "short.test", "", clock.now + 60)
    clock.now += 60
    assert await holds.active(store) == {}
    await holds.hold(store, "other.test", "", None)
    assert list(await holds.active(store)) == ["other.test"]
    assert await holds.release(store, "short.test") is False  # it was deleted


async def test_leases_given_back_are_due_when_asked_with_no_attempt_counted(
    dialect_store: Store,
) -> None:
    store = dialect_store
    now = clock_of(store).now
    acct = await store.add_account("alice", "x")
    await _accept(store, acct.id, "m1", "new@held.test", "old@held.test")
    claims = {c.address: c for c in await store.claim_due("w", 60, 100)}
    # old@ was tried once before: deferred.
    later = Outcome(RecipientStatus.DEFERRED, "451 4.7.1 later")
    await store.record_outcomes(
        "w", [OutcomeUpdate(claims["old@held.test"].recipient_id, later, now)]
    )
    (old,) = await store.claim_due("w", 60, 100)
    ids = [claims["new@held.test"].recipient_id, old.recipient_id]

    await store.release_leases("other-node", ids, now + HOUR)  # not theirs: untouched
    assert {r.status for r in await store.queue_list(None)} == {RecipientStatus.SENDING}
    await store.release_leases("w", ids, now + HOUR)
    rows = {r.address: r for r in await store.queue_list(None)}
    assert rows["new@held.test"].status is RecipientStatus.QUEUED
    assert rows["old@held.test"].status is RecipientStatus.DEFERRED  # still reads as waiting
    assert {r.attempts for r in rows.values()} == {0, 1}  # nothing counted by the give-back
    assert {r.due_at for r in rows.values()} == {now + HOUR}
    assert rows["old@held.test"].last_reply == "451 4.7.1 later"


async def test_postponing_reads_the_hold_with_its_write_so_a_release_is_never_undone(
    dialect_store: Store,
) -> None:
    store = dialect_store
    now = clock_of(store).now
    acct = await store.add_account("alice", "x")
    await _accept(store, acct.id, "m1", "a@held.test", "b@held.test")
    (a, b) = sorted(await store.claim_due("w", 60, 100), key=lambda c: c.address)
    await holds.hold(store, "held.test", "pause", now + HOUR)
    found = await holds.postpone(store, "w", "held.test", [a.recipient_id])
    assert found is not None and found.reason == "pause"
    # Released after the worker read the hold, before it gave the row back: due now.
    await holds.release(store, "held.test")
    assert await holds.postpone(store, "w", "held.test", [b.recipient_id]) is None
    assert _due(await store.queue_list(RecipientStatus.QUEUED)) == {
        "a@held.test": now + HOUR,
        "b@held.test": now,
    }
