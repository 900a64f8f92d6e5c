"""Retention on both dialects: bodies of finished messages go, everything else stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import DatabaseConfig
from relay.model import Claim, Outcome, RecipientStatus
from relay.queue import retention
from relay.queue.store import NewMessage, NewRecipient, OutcomeUpdate, Store
from tests.support.store import Clock, clock_of

DAY = 86400.0
BODY = b"Subject: kept until done\r\n\r\n" + b"x" * 5000 + b"\r\n"


@pytest.fixture
def store(dialect_store: Store) -> Store:
    return dialect_store


async def _accept(store: Store, account_id: int, mid: str, rcpts: int = 1) -> None:
    await store.accept(
        NewMessage(
            id=mid,
            account_id=account_id,
            mail_from="a@example.com",
            body=BODY,
            recipients=tuple(NewRecipient(f"r{j}@example.org") for j in range(rcpts)),
        )
    )


async def _claim(store: Store) -> dict[str, list[Claim]]:
    """Lease every due recipient, by message."""
    by_message: dict[str, list[Claim]] = {}
    for c in await store.claim_due("w", 60, 10_000):
        by_message.setdefault(c.message_id, []).append(c)
    return by_message


async def _finish(
    store: Store, claims: list[Claim], status: RecipientStatus, only: int | None = None
) -> None:
    """Record ``status`` for the claimed recipients (``only``: that many; the rest are
    deferred)."""
    updates = []
    for i, c in enumerate(claims):
        if only is None or i < only:
            updates.append(OutcomeUpdate(c.recipient_id, Outcome(status, "250 ok")))
        else:
            deferred = Outcome(RecipientStatus.DEFERRED, "451 later")
            updates.append(OutcomeUpdate(c.recipient_id, deferred, clock_of(store).now + 300))
    await store.record_outcomes("w", updates)


async def _body(store: Store, mid: str) -> bytes:
    return (await store.message_for_delivery(mid))[0]


async def test_only_bodies_of_old_messages_with_every_recipient_final_are_emptied(
    store: Store,
) -> None:
    acct = await store.add_account("alice", "x")
    await _accept(store, acct.id, "delivered", rcpts=2)
    await _accept(store, acct.id, "bounced")
    await _accept(store, acct.id, "half", rcpts=2)  # one delivered, one deferred
    claims = await _claim(store)
    await _finish(store, claims["delivered"], RecipientStatus.DELIVERED)
    await _finish(store, claims["bounced"], RecipientStatus.BOUNCED)
    await _finish(store, claims["half"], RecipientStatus.DELIVERED, only=1)
    await _accept(store, acct.id, "queued")
    clock_of(store).now += 60
    await _accept(store, acct.id, "young")
    await _finish(store, (await _claim(store))["young"], RecipientStatus.DELIVERED)

    # Cut between the first four and "young".
    swept = await retention.purge_bodies(store, cut=clock_of(store).now - 30, pause=0)

    assert (swept.scanned, swept.purged, swept.in_flight) == (4, 2, 2)
    assert await _body(store, "delivered") == b""
    assert await _body(store, "bounced") == b""
    assert await _body(store, "half") == BODY
    assert await _body(store, "queued") == BODY
    assert await _body(store, "young") == BODY
    view = await store.message_view("delivered")
    assert not view.body_kept and view.size == len(BODY)
    assert [r.status for r in view.recipients] == [RecipientStatus.DELIVERED] * 2
    assert [e.kind for e in view.events].count("delivered") == 2
    assert (await store.message_view("half")).body_kept


async def test_the_mark_skips_what_was_swept_and_waits_at_the_first_message_in_flight(
    store: Store,
) -> None:
    acct = await store.add_account("alice", "x")
    for i in range(5):
        await _accept(store, acct.id, f"m{i}")
        clock_of(store).now += 1
    claims = await _claim(store)
    for i in (0, 1, 3, 4):
        await _finish(store, claims[f"m{i}"], RecipientStatus.DELIVERED)
    first = await retention.purge_bodies(store, cut=clock_of(store).now, pause=0)
    assert (first.scanned, first.purged, first.in_flight) == (5, 4, 1)

    # The next sweep starts at m2, the one still in flight: it re-reads m2..m4 only.
    again = await retention.purge_bodies(store, cut=clock_of(store).now, pause=0)
    assert (again.scanned, again.purged, again.in_flight) == (3, 0, 1)

    await _finish(store, claims["m2"], RecipientStatus.DELIVERED)
    last = await retention.purge_bodies(store, cut=clock_of(store).now, pause=0)
    assert (last.scanned, last.purged, last.in_flight) == (3, 1, 0)
    assert await _body(store, "m2") == b""
    # Nothing in flight behind it: the mark moved to the last message seen.
    done = await retention.purge_bodies(store, cut=clock_of(store).now, pause=0)
    assert (done.scanned, done.purged) == (1, 0)

    # A message accepted later and finished is swept once the cut passes it.
    clock_of(store).now += 10
    await _accept(store, acct.id, "later")
    await _finish(store, (await _claim(store))["later"], RecipientStatus.EXPIRED)
    clock_of(store).now += 1
    assert (await retention.purge_bodies(store, cut=clock_of(store).now, pause=0)).purged == 1
    assert await _body(store, "later") == b""


async def test_a_sweep_walks_every_batch(store: Store) -> None:
    acct = await store.add_account("alice", "x")
    n = retention.BATCH * 2 + 7
    for i in range(n):
        await _accept(store, acct.id, f"m{i:04d}")  # all at the same instant: ties on id
    await store.delete_message("m0005")
    for claims in (await _claim(store)).values():
        await _finish(store, claims, RecipientStatus.DELIVERED)
    clock_of(store).now += DAY
    swept = await retention.purge_bodies(store, cut=clock_of(store).now - 1, pause=0)
    assert (swept.scanned, swept.purged, swept.in_flight) == (n, n, 0)
    assert {await _body(store, f"m{i:04d}") for i in range(n)} == {b""}


async def test_on_sqlite_the_space_of_purged_bodies_takes_the_next_mail(tmp_path: Path) -> None:
    # 2 KB bodies lie inside their table rows: emptying them in place would free no page
    # (retention._SQLITE_EMPTY), so the file would grow by the next mail all the same.
    store = Store.open(
        DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"), node_id="t", clock=Clock()
    )
    await store.migrate()
    acct = await store.add_account("alice", "x")

    async def send_and_deliver(first: int) -> None:
        body = b"Subject: s\r\n\r\n" + b"y" * 2048 + b"\r\n"
        for i in range(first, first + 400):
            await store.accept(
                NewMessage(f"m{i:05d}", acct.id, "a@example.com", body, (NewRecipient("r@x.org"),))
            )
        for claims in (await _claim(store)).values():
            await _finish(store, claims, RecipientStatus.DELIVERED)

    async def pages() -> tuple[int, int]:
        async with store.engine.connect() as conn:
            total = (await conn.exec_driver_sql("PRAGMA page_count")).scalar_one()
            free = (await conn.exec_driver_sql("PRAGMA freelist_count")).scalar_one()
        return int(total), int(free)

    try:
        await send_and_deliver(0)
        grown, _ = await pages()
        clock_of(store).now += 8 * DAY
        assert (await retention.purge_bodies(store, clock_of(store).now - 7 * DAY, 0)).purged == 400
        total, free = await pages()
        assert free > 200  # the 400 bodies' pages went back to SQLite
        await send_and_deliver(400)
        # The next 400 messages lived in those pages: the file grew by far less than the
        # first 400 took.
        assert (await pages())[0] - total < (grown - total + free) / 4
    finally:
        await store.close()
