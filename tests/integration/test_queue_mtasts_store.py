"""MTA-STS policies kept in the database, on both dialects (relay/queue/mtasts.py)."""

from __future__ import annotations

from relay.queue import mtasts
from relay.queue.store import Store
from tests.support.store import clock_of


async def test_a_kept_policy_is_read_back_until_it_expires_and_a_new_one_replaces_it(
    dialect_store: Store,
) -> None:
    store = dialect_store
    clock = clock_of(store)
    assert await mtasts.load(store, "example.net") is None
    first = mtasts.StoredPolicy(
        "a1", "enforce", ("mx1.example.net", "*.example.net"), 86400, clock.now + 86400
    )
    await mtasts.save(store, "example.net", first)
    assert await mtasts.load(store, "example.net") == first
    assert await mtasts.load(store, "other.example") is None

    second = mtasts.StoredPolicy("b2", "testing", ("mx9.example.net",), 600, clock.now + 600)
    await mtasts.save(store, "example.net", second)
    assert await mtasts.load(store, "example.net") == second
    clock.now += 600
    assert await mtasts.load(store, "example.net") is None  # expired: as if none
