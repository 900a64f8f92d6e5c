"""SQL of RFC 8460 reporting (relay/queue/tlsrpt.py) on both dialects: counts add up over
flushes and nodes, and each day is taken for its reports exactly once."""

from __future__ import annotations

import asyncio

from relay.config import DatabaseConfig
from relay.queue import tlsrpt as sql
from relay.queue.store import Store
from relay.queue.tlsrpt import SessionCount

DAY = 20_000


def _count(day: int, domain: str = "example.net", result: str = "", n: int = 1) -> SessionCount:
    return SessionCount(
        day=day,
        policy_domain=domain,
        policy_type="no-policy-found",
        policy='{"policy-string": [], "mx-host": []}',
        result=result,
        mx="mx.example.net" if result else "",
        n=n,
    )


async def test_counts_of_several_flushes_and_nodes_add_up(
    dialect_store: Store, other_node: Store
) -> None:
    await sql.add(dialect_store, [_count(DAY, n=3), _count(DAY, result="starttls-not-supported")])
    await sql.add(other_node, [_count(DAY, n=2)])
    await sql.add(other_node, [_count(DAY, result="starttls-not-supported", n=4)])
    totals = {(c.result, c.n) for c in await sql.pending(dialect_store)}
    assert totals == {("", 5), ("starttls-not-supported", 5)}


async def test_a_day_is_taken_once_with_its_counts_and_later_ones_wait(
    dialect_store: Store,
) -> None:
    await sql.add(dialect_store, [_count(DAY - 1), _count(DAY, n=2), _count(DAY + 1, n=7)])
    taken = await sql.take_through(dialect_store, DAY)
    assert taken is not None
    assert sorted((c.day, c.n) for c in taken) == [(DAY - 1, 1), (DAY, 2)]
    assert await sql.take_through(dialect_store, DAY) is None
    assert [(c.day, c.n) for c in await sql.pending(dialect_store)] == [(DAY + 1, 7)]


async def test_counts_that_arrive_for_a_reported_day_are_dropped_not_reported_twice(
    dialect_store: Store,
) -> None:
    await sql.add(dialect_store, [_count(DAY)])
    assert await sql.take_through(dialect_store, DAY) is not None
    await sql.add(dialect_store, [_count(DAY, n=9), _count(DAY + 1)])  # a node flushed late
    assert [c.day for c in await sql.pending(dialect_store)] == [DAY + 1]
    taken = await sql.take_through(dialect_store, DAY + 1)
    assert taken is not None and [(c.day, c.n) for c in taken] == [(DAY + 1, 1)]
    assert await sql.pending(dialect_store) == []


async def test_nodes_taking_the_same_day_at_once_get_it_once(
    db_url: str, dialect_store: Store
) -> None:
    nodes = [
        Store.open(DatabaseConfig(url=db_url), node_id=f"n{i}", clock=dialect_store.clock)
        for i in range(6)
    ]
    try:
        for day in range(DAY, DAY + 5):  # several rounds: the race must show if it can
            await sql.add(dialect_store, [_count(day, domain=f"d{i}.example") for i in range(20)])
            takes = await asyncio.gather(*(sql.take_through(n, day) for n in nodes))
            got = [t for t in takes if t]
            assert len(got) == 1 and len(got[0]) == 20
    finally:
        for n in nodes:
            await n.close()
