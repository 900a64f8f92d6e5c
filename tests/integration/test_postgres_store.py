"""The store on both dialects: migrations, claims and counters shared by several engines.

Two ``Store`` objects on one database are two nodes as far as the database can tell (each
has its own engine and connection pool).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import sqlalchemy as sa

from relay.config import DatabaseConfig
from relay.errors import NotMigrated
from relay.queue import migrate
from relay.queue.store import NewMessage, NewRecipient, Store
from tests.support.relayproc import MakeRelay, RelayError
from tests.support.store import Clock


@pytest.fixture
def clock() -> Iterator[Clock]:
    yield Clock()


@pytest.fixture
async def stores(db_url: str, clock: Clock) -> AsyncIterator[tuple[Store, Store]]:
    cfg = DatabaseConfig(url=db_url, pool_size=5, statement_timeout=30)
    a = Store.open(cfg, node_id="node-a", clock=clock)
    b = Store.open(cfg, node_id="node-b", clock=clock)
    try:
        await a.migrate()
        yield a, b
    finally:
        await a.close()
        await b.close()


async def _seed(store: Store, messages: int, rcpts: int = 1) -> int:
    acct = await store.add_account("alice", "x")
    for i in range(messages):
        await store.accept(
            NewMessage(
                id=f"m{i:06d}",
                account_id=acct.id,
                mail_from="a@example.com",
                body=b"Subject: x\r\n\r\nbody\r\n",
                recipients=tuple(NewRecipient(f"r{j}@example.org") for j in range(rcpts)),
            )
        )
    return messages * rcpts


async def test_migrate_is_idempotent_and_leaves_the_database_at_head(
    stores: tuple[Store, Store],
) -> None:
    a, b = stores
    assert await a.migrate() == ", ".join(migrate.head_revisions())
    await b.migrate()
    assert await migrate.current_revisions(a) == migrate.head_revisions()
    await a.check_schema()
    await b.check_schema()


async def test_concurrent_migrations_from_two_nodes_both_succeed(db_url: str) -> None:
    cfg = DatabaseConfig(url=db_url)
    nodes = [Store.open(cfg, node_id=f"n{i}") for i in range(3)]
    try:
        results = await asyncio.gather(*(s.migrate() for s in nodes))
        assert set(results) == {", ".join(migrate.head_revisions())}
    finally:
        for s in nodes:
            await s.close()


async def test_check_schema_refuses_a_database_never_migrated(db_url: str) -> None:
    store = Store.open(DatabaseConfig(url=db_url))
    try:
        with pytest.raises(NotMigrated, match="relay migrate"):
            await store.check_schema()
    finally:
        await store.close()


async def test_check_schema_refuses_a_revision_this_relay_does_not_know(
    stores: tuple[Store, Store],
) -> None:
    a, _ = stores
    async with a.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    with pytest.raises(NotMigrated, match=r"ffff9999.*does not know"):
        await a.check_schema()


async def test_two_nodes_claiming_at_once_never_lease_the_same_recipient(
    stores: tuple[Store, Store],
) -> None:
    a, b = stores
    total = await _seed(a, 150, rcpts=2)

    async def drain(store: Store, owner: str) -> list[int]:
        got: list[int] = []
        while True:
            claims = await store.claim_due(owner, 60, 7)
            if not claims:
                return got
            got.extend(c.recipient_id for c in claims)

    runs = await asyncio.gather(drain(a, "a:1"), drain(b, "b:1"), drain(a, "a:2"), drain(b, "b:2"))
    everything = [rid for run in runs for rid in run]
    assert len(everything) == total
    assert len(set(everything)) == total, "a recipient was leased by two owners"


async def test_a_lease_that_runs_out_is_taken_over_by_the_other_node(
    stores: tuple[Store, Store], clock: Clock
) -> None:
    a, b = stores
    await _seed(a, 3)
    first = await a.claim_due("node-a:1:dead", 30, 10)
    assert len(first) == 3
    assert await b.claim_due("node-b:1:x", 30, 10) == []
    clock.now += 31
    taken = await b.claim_due("node-b:1:x", 30, 10)
    assert sorted(c.recipient_id for c in taken) == sorted(c.recipient_id for c in first)
    rows = await b.queue_list()
    assert {r.lease_owner for r in rows} == {"node-b:1:x"}


async def test_counter_increments_from_two_nodes_are_never_lost(
    stores: tuple[Store, Store],
) -> None:
    a, b = stores
    per_node = 60

    async def bump(store: Store) -> list[int]:
        return list(
            await asyncio.gather(
                *(store.incr_counter("daily:1", 0.0, 1, 9e9) for _ in range(per_node))
            )
        )

    seen = (await bump(a)) + (await bump(b))
    both = await asyncio.gather(bump(a), bump(b))
    seen += both[0] + both[1]
    assert await a.counter_sum("daily:1", 0.0) == 4 * per_node
    assert sorted(seen) == list(range(1, 4 * per_node + 1)), "each increment saw its own value"


@pytest.mark.postgres
async def test_claims_on_postgresql_use_for_update_skip_locked(pg_url: str) -> None:
    store = Store.open(DatabaseConfig(url=pg_url), node_id="n")
    statements: list[str] = []

    @sa.event.listens_for(store.engine.sync_engine, "before_cursor_execute")
    def _capture(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    try:
        await store.migrate()
        statements.clear()
        await store.claim_due("n:1:x", 30, 10)
        await store.incr_counter("k", 0.0, 1, 9e9)
    finally:
        await store.close()
    selects = [s for s in statements if "FROM recipient" in s]
    # Only the recipient rows are locked (the message rows come along by a join).
    assert selects and selects[0].rstrip().endswith("FOR UPDATE OF recipient SKIP LOCKED"), selects
    assert any("ON CONFLICT (key, window_start) DO UPDATE" in s for s in statements), statements


def test_serve_refuses_an_unmigrated_database_and_names_relay_migrate(
    make_relay: MakeRelay, db_url: str
) -> None:
    relay = make_relay({"database": {"url": db_url}})
    with pytest.raises(RelayError, match="relay migrate"):
        relay.start()
    assert relay.returncodes and relay.returncodes[-1] != 0
    out = relay.cli("migrate").stdout
    assert ", ".join(migrate.head_revisions()) in out
    relay.cli("queue", "list")  # and now every command accepts the database


@pytest.mark.postgres
async def test_a_warm_up_start_another_node_records_meanwhile_is_taken_not_an_error(
    pg_url: str,
) -> None:
    # Two nodes sending a domain's first message at once: both read "no day one", and
    # the other node's row lands between this node's read and its insert. The insert
    # failed (duplicate key warmup_start_pkey) and the accept answered 451.
    import threading

    from relay.queue.limits import ensure_warmup_start
    from tests.conftest import _pg_admin

    store = Store.open(DatabaseConfig(url=pg_url), node_id="a")
    other_node = (
        "INSERT INTO warmup_start (domain, first_day, started_at)"
        " VALUES ('example.com', '2026-11-20', 0)"
    )
    done: list[str] = []

    @sa.event.listens_for(store.engine.sync_engine, "before_cursor_execute")
    def _meanwhile(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().startswith("INSERT INTO warmup_start") and not done:
            done.append(statement)
            # Its own connection and event loop: the other node, committed before ours.
            t = threading.Thread(target=_pg_admin, args=(pg_url, other_node))
            t.start()
            t.join()

    try:
        await store.migrate()
        assert await ensure_warmup_start(store, "example.com", "2026-11-26") == "2026-11-20"
    finally:
        await store.close()
    assert done, "the insert was never reached"


async def test_a_claim_takes_the_oldest_due_rows_of_every_claimable_status_in_due_order(
    stores: tuple[Store, Store], clock: Clock
) -> None:
    a, _ = stores
    await _seed(a, 7)
    # Statuses and due times (relative to now) that interleave across the three
    # claimable statuses; the last two are not due yet.
    plan = {
        "m000000": ("deferred", -5.0),
        "m000001": ("queued", -4.5),
        "m000002": ("sending", -4.0),  # a lease that ran out: crash recovery
        "m000003": ("queued", -3.25),
        "m000004": ("deferred", -0.125),
        "m000005": ("queued", 10.0),
        "m000006": ("sending", 10.0),  # a lease still held
    }
    async with a.engine.begin() as conn:
        for i, (mid, (status, offset)) in enumerate(plan.items()):
            await conn.execute(
                sa.text(
                    "UPDATE recipient SET status = :s, due_at = :d, address = :addr,"
                    " attempts = :n WHERE message_id = :m"
                ),
                {
                    "s": status,
                    "d": clock.now + offset,
                    "addr": f"ü{i}@example.org",
                    "n": i,
                    "m": mid,
                },
            )
        expected = {
            r.message_id: r
            for r in (
                await conn.execute(
                    sa.text(
                        "SELECT r.id, r.message_id, r.address, r.rcpt_domain, r.attempts,"
                        " m.account_id, m.mail_from, m.created_at, m.size"
                        " FROM recipient r JOIN message m ON m.id = r.message_id"
                    )
                )
            ).all()
        }
    first = await a.claim_due("w", 60, 3)
    assert [c.message_id for c in first] == ["m000000", "m000001", "m000002"]
    rest = await a.claim_due("w", 60, 10)
    assert [c.message_id for c in rest] == ["m000003", "m000004"]
    for c in first + rest:
        row = expected[c.message_id]
        got = (c.recipient_id, c.address, c.rcpt_domain, c.attempts, c.account_id, c.mail_from)
        assert got == (
            row.id,
            row.address,
            row.rcpt_domain,
            row.attempts,
            row.account_id,
            row.mail_from,
        )
        assert (c.created_at, c.size) == (row.created_at, row.size)
    assert await a.claim_due("w", 60, 10) == []
