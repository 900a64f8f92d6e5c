"""Named values beside the schema (relay/queue/meta.py), on both dialects."""

from __future__ import annotations

import asyncio

from relay.queue import meta
from relay.queue.store import Store


async def test_a_shared_secret_is_made_once_when_many_ask_at_once_in_one_commit_batch(
    dialect_store: Store,
) -> None:
    store = dialect_store
    release = asyncio.Event()

    async def hold_a_write() -> None:
        async with store._write():
            await release.wait()

    # Delivery's first sessions all ask for the token secret at once. On SQLite their
    # writes then queue behind a write in progress and share the next commit batch, where
    # the losers' inserts failed before the winner's row was committed, and a read back
    # outside the batch found nothing (an AssertionError in every session but one).
    holder = asyncio.create_task(hold_a_write())
    await asyncio.sleep(0.05)
    asking = [asyncio.create_task(meta.shared_secret(store, "test.secret")) for _ in range(6)]
    await asyncio.sleep(0.1)
    release.set()
    secrets = await asyncio.gather(*asking)
    await holder
    assert len(set(secrets)) == 1 and len(secrets[0]) == 64
    assert await meta.shared_secret(store, "test.secret") == secrets[0]  # kept
    assert await meta.shared_secret(store, "other.secret") != secrets[0]
