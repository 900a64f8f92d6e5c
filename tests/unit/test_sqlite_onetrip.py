"""The accept's one-statement rate take and quota check against their definitions."""

from __future__ import annotations

import random
import sqlite3

import sqlalchemy as sa

from relay.queue.dialect import gcra_next
from relay.queue.sqlite_onetrip import (
    _COUNTER_ADD_WITHIN,
    _GCRA_TAKE,
    AcceptRows,
    Bucket,
    Count,
    Refusal,
    accept_job,
    accept_many,
)
from relay.queue.tables import metadata

_SUM = 'SELECT coalesce(sum(value), 0) FROM counter WHERE "key" = ? AND window_start >= ?'


def _tables() -> tuple[sa.Engine, sqlite3.Connection]:
    engine = sa.create_engine("sqlite://")
    metadata.create_all(engine)
    raw = engine.raw_connection().driver_connection
    assert isinstance(raw, sqlite3.Connection)
    raw.isolation_level = None
    return engine, raw


def test_the_gcra_take_allows_and_stores_exactly_what_gcra_next_computes() -> None:
    engine, raw = _tables()
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
    engine, raw = _tables()
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


def _random_accept(rng: random.Random, n: int, now: float) -> AcceptRows:
    hour = 3600.0
    mid = f"m{n}"
    rcpts = [f"r{rng.randint(0, 3)}@example.org" for _ in range(rng.randint(1, 3))]
    counts = []
    for key in sorted({"daily:1", *(f"rcpt:1:{r}" for r in rcpts)}):
        window = now // hour * hour - rng.choice([0, 0, 0, hour])
        limit = rng.choice([None, rng.randint(0, 12)])
        since = window - rng.choice([0, hour, 5 * hour])
        counts.append(
            Count(key, window, rng.randint(1, 3), window + rng.randint(1, 9), limit, since)
        )
    bucket = None
    if rng.random() < 0.8:
        tolerance = rng.choice([0.0, 0.5, 2.0, -0.1])
        bucket = Bucket(rng.choice(["rate:1", "rate:2"]), now, 0.1, tolerance, len(rcpts))
    return AcceptRows(
        message={
            "id": mid,
            "account_id": 1,
            "mail_from": "a@example.com",
            "header_from": "a@example.com",
            "subject": f"s{n}",
            "message_id_header": f"<{mid}@x>",
            "size": 3,
            "body": b"abc",
            "client": "127.0.0.1",
            "node_id": "n",
            "created_at": now,
        },
        recipients=[
            {
                "message_id": mid,
                "address": r,
                "rcpt_domain": "example.org",
                "status": "queued",
                "due_at": now,
                "reason": None,
                "created_at": now,
                "updated_at": now,
            }
            for r in rcpts
        ],
        events=[
            {
                "at": now,
                "kind": "accepted",
                "account_id": 1,
                "message_id": mid,
                "recipient": r,
                "data": "{}",
                "node_id": "n",
            }
            for r in rcpts
        ],
        bucket=bucket,
        counts=counts,
    )


def _one_by_one(raw: sqlite3.Connection, batch: list[AcceptRows]) -> list[object]:
    """What the group commit did before accept_many: each job in its SAVEPOINT."""
    out: list[object] = []
    for i, rows in enumerate(batch):
        raw.execute(f"SAVEPOINT j{i}")
        try:
            accept_job(raw, rows)
        except Refusal as exc:
            raw.execute(f"ROLLBACK TO j{i}")
            out.append(exc.refused)
        else:
            out.append(None)
    return out


def _dump(raw: sqlite3.Connection) -> dict[str, list[tuple[object, ...]]]:
    tables = ("limit_state", "counter", "message", "recipient", "event")
    return {t: raw.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}


def test_accept_many_decides_and_writes_exactly_what_accept_job_does_one_by_one() -> None:
    rng = random.Random(17)
    engines, (one, many) = zip(*(_tables() for _ in range(2)), strict=True)
    now, n = 1_800_000_000.0, 0
    reasons: set[str] = set()
    for _ in range(150):
        batch = []
        for _ in range(rng.randint(1, 12)):
            now += rng.choice([0.0, 0.001, 0.05, 0.3, 700.0])
            batch.append(_random_accept(rng, n, now))
            n += 1
        one.execute("BEGIN")
        many.execute("BEGIN")
        expected = _one_by_one(one, batch)
        got = [
            None if ok else value.refused  # type: ignore[union-attr]
            for ok, value in accept_many(many, batch)
        ]
        one.execute("COMMIT")
        many.execute("COMMIT")
        assert got == expected
        reasons.update("rate" if x.count is None else "count" for x in got if x is not None)
        assert _dump(many) == _dump(one)
    # The batches had refusals of both kinds among the accepts.
    assert reasons == {"rate", "count"}
    for engine in engines:
        engine.dispose()


def test_accept_many_inserts_bodies_in_statements_of_power_of_two_rows() -> None:
    # SQLite keeps a cached statement's last bound values, bodies included: one statement
    # per batch size kept up to 128 batches' bodies (issue 9). Only 1, 2, 4 ... here.
    rng = random.Random(3)
    engine, raw = _tables()
    rows_per_insert: list[int] = []

    def trace(sql: str) -> None:
        if sql.startswith("INSERT INTO message "):
            rows_per_insert.append(sql.count("), (") + 1)

    raw.set_trace_callback(trace)
    now, n = 1_800_000_000.0, 0
    for size in range(1, 40):
        batch = []
        for _ in range(size):
            # No limits: every accept is taken, so the batch inserts ``size`` bodies.
            rows = _random_accept(rng, n, now)
            batch.append(AcceptRows(rows.message, rows.recipients, rows.events, None, []))
            n += 1
        before = len(rows_per_insert)
        raw.execute("BEGIN")
        assert all(ok for ok, _ in accept_many(raw, batch))
        raw.execute("COMMIT")
        sizes = rows_per_insert[before:]
        assert sum(sizes) == size
        assert all(s & (s - 1) == 0 for s in sizes), sizes
        assert len(sizes) == bin(size).count("1")
    assert len(set(rows_per_insert)) == 6  # 1, 2, 4, 8, 16, 32
    assert raw.execute("SELECT count(*) FROM message").fetchone()[0] == n
    engine.dispose()
