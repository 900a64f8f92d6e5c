"""The accept's one statement (a view's trigger) and its batch form against their
definitions: GCRA (gcra_next), a limited counter's sum, and the accept as the statements
it replaced, one after another."""

from __future__ import annotations

import random
import sqlite3
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa

from relay.queue.dialect import gcra_next
from relay.queue.sqlite_onetrip import (
    AcceptRefused,
    AcceptRows,
    Bucket,
    Count,
    Refusal,
    accept_job,
    accept_many,
)
from relay.queue.tables import metadata

_SUM = 'SELECT coalesce(sum(value), 0) FROM counter WHERE "key" = ? AND window_start >= ?'
_TAT = 'SELECT value FROM limit_state WHERE "key" = ?'

# The accept as it was written before the trigger, statement by statement: the
# definition both faster forms are held to.
_GCRA_TAKE = (
    'INSERT INTO limit_state ("key", value) SELECT :key, :now + :inc WHERE 0 <= :tol'
    ' ON CONFLICT ("key") DO UPDATE SET value = max(limit_state.value, :now) + :inc'
    " WHERE max(limit_state.value, :now) - :now <= :tol"
)
_ADDS_UP = (
    ' ON CONFLICT ("key", window_start) DO UPDATE'
    " SET value = counter.value + excluded.value, expires_at = excluded.expires_at"
)
_COUNTER_ADD = (
    'INSERT INTO counter ("key", window_start, value, expires_at) VALUES (?, ?, ?, ?)' + _ADDS_UP
)
_COUNTER_ADD_WITHIN = (
    'INSERT INTO counter ("key", window_start, value, expires_at)'
    " SELECT :key, :window, :amount, :expires"
    " WHERE (SELECT coalesce(sum(value), 0) FROM counter"
    ' WHERE "key" = :key AND window_start >= :since) + :amount <= :limit' + _ADDS_UP
)


def _insert(table: str, row: dict[str, Any]) -> str:
    names = ", ".join(f'"{c}"' for c in row)
    return f"INSERT INTO {table} ({names}) VALUES ({', '.join(':' + c for c in row)})"


def _by_statements(raw: sqlite3.Connection, rows: AcceptRows) -> None:
    b = rows.bucket
    if b is not None:
        take = {"key": b.key, "now": b.now, "inc": b.amount * b.interval, "tol": b.tolerance}
        if raw.execute(_GCRA_TAKE, take).rowcount != 1:
            found = raw.execute(_TAT, (b.key,)).fetchone()
            tat = None if found is None else float(found[0])
            wait, _ = gcra_next(tat, b.now, b.interval, b.tolerance, b.amount)
            raise Refusal(AcceptRefused(wait=wait))
    raw.execute(_insert("message", rows.message), rows.message)
    raw.executemany(_insert("recipient", rows.recipients[0]), rows.recipients)
    raw.executemany(_insert("event", rows.events[0]), rows.events)
    for i, c in enumerate(rows.counts):
        if c.limit is None:
            raw.execute(_COUNTER_ADD, (c.key, c.window, c.amount, c.expires_at))
            continue
        add = {
            "key": c.key,
            "window": c.window,
            "amount": c.amount,
            "expires": c.expires_at,
            "since": c.since,
            "limit": c.limit,
        }
        if raw.execute(_COUNTER_ADD_WITHIN, add).rowcount != 1:
            raise Refusal(AcceptRefused(count=i))


def _tables() -> tuple[sa.Engine, sqlite3.Connection]:
    engine = sa.create_engine("sqlite://")
    metadata.create_all(engine)
    raw = engine.raw_connection().driver_connection
    assert isinstance(raw, sqlite3.Connection)
    raw.isolation_level = None
    return engine, raw


def _plain(rng: random.Random, n: int, now: float) -> AcceptRows:
    """An accept with no bucket and no counts (the tests below add their own)."""
    return replace(_random_accept(rng, n, now), bucket=None, counts=[])


def test_the_accept_takes_the_rate_and_stores_exactly_what_gcra_next_computes() -> None:
    engine, raw = _tables()
    rng = random.Random(11)
    model: dict[str, float] = {}
    now = 1_800_000_000.0
    for n in range(3000):
        key = rng.choice(["rate:1", "rate:2", "rate:3"])
        now += rng.choice([0.0, 0.001, 0.05, 0.5, 3.0])
        interval = rng.choice([0.05, 0.1, 1.0 / 3])
        tolerance = rng.choice([0.0, 0.5, 2.0, -0.1])
        amount = rng.randint(1, 30)
        wait, new_tat = gcra_next(model.get(key), now, interval, tolerance, amount)
        rows = replace(_plain(rng, n, now), bucket=Bucket(key, now, interval, tolerance, amount))
        try:
            accept_job(raw, rows)
        except Refusal as exc:
            assert wait > 0.0 and exc.refused == AcceptRefused(wait=wait)
        else:
            assert wait == 0.0, (key, now, model.get(key), tolerance)
            model[key] = new_tat
        stored = raw.execute(_TAT, (key,)).fetchone()
        assert (None if stored is None else stored[0]) == model.get(key)
        found = raw.execute("SELECT count(*) FROM message WHERE id = ?", (f"m{n}",)).fetchone()
        assert found[0] == (1 if wait == 0.0 else 0)  # a refused accept writes nothing
    engine.dispose()


def test_a_limited_counter_is_added_only_while_the_sum_stays_within_the_limit() -> None:
    engine, raw = _tables()
    rng = random.Random(5)
    hour = 3600.0
    for n in range(2000):
        key = rng.choice(["daily:1", "daily:2"])
        window = rng.randint(0, 30) * hour
        since = window - rng.randint(0, 23) * hour  # never after the window added to
        amount, limit = rng.randint(1, 40), rng.randint(0, 200)
        before = raw.execute(_SUM, (key, since)).fetchone()[0]
        count = Count(key, window, amount, window + 2 * hour, limit, since)
        try:
            accept_job(raw, replace(_plain(rng, n, 1e9), counts=[count]))
        except Refusal as exc:
            assert exc.refused == AcceptRefused(count=0)
            refused = True
        else:
            refused = False
        after = raw.execute(_SUM, (key, since)).fetchone()[0]
        if before + amount <= limit:
            assert not refused and after == before + amount
        else:
            assert refused and after == before
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


def _one_by_one(
    raw: sqlite3.Connection, batch: list[AcceptRows], job: Any = accept_job
) -> list[object]:
    """Each accept in its SAVEPOINT, as the group commit runs jobs one by one."""
    out: list[object] = []
    for i, rows in enumerate(batch):
        raw.execute(f"SAVEPOINT j{i}")
        try:
            job(raw, rows)
        except Refusal as exc:
            raw.execute(f"ROLLBACK TO j{i}")
            out.append(exc.refused)
        else:
            out.append(None)
    return out


def _dump(raw: sqlite3.Connection) -> dict[str, list[tuple[object, ...]]]:
    tables = ("limit_state", "counter", "message", "recipient", "event")
    return {t: raw.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}


def test_the_accept_statement_and_accept_many_decide_and_write_what_the_statements_did() -> None:
    rng = random.Random(17)
    engines, raws = zip(*(_tables() for _ in range(3)), strict=True)
    reference, one, many = raws
    now, n = 1_800_000_000.0, 0
    reasons: set[str] = set()
    for _ in range(150):
        batch = []
        for _ in range(rng.randint(1, 12)):
            now += rng.choice([0.0, 0.001, 0.05, 0.3, 700.0])
            batch.append(_random_accept(rng, n, now))
            n += 1
        for raw in raws:
            raw.execute("BEGIN")
        expected = _one_by_one(reference, batch, _by_statements)
        got_one = _one_by_one(one, batch)
        got_many = [
            None if ok else value.refused  # type: ignore[union-attr]
            for ok, value in accept_many(many, batch)
        ]
        for raw in raws:
            raw.execute("COMMIT")
        assert got_one == expected
        assert got_many == expected
        reasons.update("rate" if x.count is None else "count" for x in expected if x is not None)
        assert _dump(one) == _dump(reference)
        assert _dump(many) == _dump(reference)
    # The batches had refusals of both kinds among the accepts.
    assert reasons == {"rate", "count"}
    for engine in engines:
        engine.dispose()


def test_times_and_text_pass_through_the_accept_statement_unchanged() -> None:
    # Recipients, events and counts reach the trigger as JSON: a double must come back
    # as the same double, and text as the same text.
    engine, raw = _tables()
    rng = random.Random(23)
    for n in range(300):
        rows = _plain(rng, n, rng.uniform(1e9, 2e9))
        at = rng.uniform(0, 2e9)
        recipients = [
            {**r, "due_at": at, "reason": 'quota: 5/24h \u00e9 "q"'} for r in rows.recipients
        ]
        count = Count(f"k{n}", rng.uniform(0, 1e9), 1, rng.uniform(0, 2e9), None, 0.0)
        accept_job(raw, replace(rows, recipients=recipients, counts=[count]))
        stored = raw.execute(
            "SELECT due_at, reason, created_at FROM recipient WHERE message_id = ?", (f"m{n}",)
        ).fetchall()
        assert stored == [(at, recipients[0]["reason"], rows.message["created_at"])] * len(
            recipients
        )
        kept = raw.execute(
            'SELECT window_start, expires_at FROM counter WHERE "key" = ?', (count.key,)
        ).fetchone()
        assert kept == (count.window, count.expires_at)
    engine.dispose()


def test_the_accept_view_is_made_again_after_a_rollback_took_it_back() -> None:
    # TEMP objects made inside a transaction go with its ROLLBACK; the next accept on
    # that connection makes them again instead of failing with "no such table".
    engine, raw = _tables()
    rng = random.Random(29)
    raw.execute("BEGIN")
    accept_job(raw, _plain(rng, 0, 1e9))
    raw.execute("ROLLBACK")
    accept_job(raw, _plain(rng, 1, 1e9))
    assert raw.execute("SELECT id FROM message").fetchall() == [("m1",)]
    engine.dispose()


def test_a_broken_constraint_that_is_not_a_limit_is_raised_as_it_is() -> None:
    engine, raw = _tables()
    rng = random.Random(31)
    accept_job(raw, _plain(rng, 0, 1e9))
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        accept_job(raw, _plain(rng, 0, 1e9))  # the same message id again
    assert raw.execute("SELECT count(*) FROM recipient").fetchone()[0] == len(
        _plain(random.Random(31), 0, 1e9).recipients
    )
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
