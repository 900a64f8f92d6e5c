"""The accept's one-statement rate take and quota check against their definitions."""

from __future__ import annotations

import random
import sqlite3

import sqlalchemy as sa

from relay.queue.dialect import gcra_next
from relay.queue.sqlite_onetrip import _COUNTER_ADD_WITHIN, _GCRA_TAKE
from relay.queue.tables import counter, limit_state

_SUM = 'SELECT coalesce(sum(value), 0) FROM counter WHERE "key" = ? AND window_start >= ?'


def _db() -> tuple[sa.Engine, sqlite3.Connection]:
    engine = sa.create_engine("sqlite://")
    with engine.begin() as conn:
        limit_state.create(conn)
        counter.create(conn)
    raw = engine.raw_connection().driver_connection
    assert isinstance(raw, sqlite3.Connection)
    return engine, raw


def test_the_gcra_take_allows_and_stores_exactly_what_gcra_next_computes() -> None:
    engine, raw = _db()
    rng = random.Random(11)
    model: dict[str, float] = {}
    now = 1_800_000_000.0
    for _ in range(3000):
        key = rng.choice(["rate:1", "rate:2", "rate:3"])
        now += rng.choice([0.0, 0.001, 0.05, 0.5, 3.0])
        interval = rng.choice([0.05, 0.1, 1.0 / 3])
        tolerance = rng.choice([0.0, 0.5, 2.0, -0.1])
        amount = rng.randint(1, 30)
        wait, new_tat = gcra_next(model.get(key), now, interval, tolerance, amount)
        take = {"key": key, "now": now, "inc": amount * interval, "tol": tolerance}
        changed = raw.execute(_GCRA_TAKE, take).rowcount
        assert (changed == 1) == (wait == 0.0), (key, now, model.get(key), tolerance)
        if wait == 0.0:
            model[key] = new_tat
        stored = raw.execute('SELECT value FROM limit_state WHERE "key" = ?', (key,)).fetchone()
        assert (None if stored is None else stored[0]) == model.get(key)
    engine.dispose()


def test_a_limited_counter_is_added_only_while_the_sum_stays_within_the_limit() -> None:
    engine, raw = _db()
    rng = random.Random(5)
    hour = 3600.0
    for _ in range(2000):
        key = rng.choice(["daily:1", "daily:2"])
        window = rng.randint(0, 30) * hour
        since = window - rng.randint(0, 23) * hour  # never after the window added to
        amount, limit = rng.randint(1, 40), rng.randint(0, 200)
        before = raw.execute(_SUM, (key, since)).fetchone()[0]
        add = {
            "key": key,
            "window": window,
            "amount": amount,
            "expires": window + 2 * hour,
            "since": since,
            "limit": limit,
        }
        changed = raw.execute(_COUNTER_ADD_WITHIN, add).rowcount
        after = raw.execute(_SUM, (key, since)).fetchone()[0]
        if before + amount <= limit:
            assert changed == 1 and after == before + amount
        else:
            assert changed == 0 and after == before
    engine.dispose()
