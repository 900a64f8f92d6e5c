"""Issue 9 (performance): the row cache, the rate take inside the accept transaction, and
the remembered AUTH verification, against a real SQLite database."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from relay.config import LimitsConfig, SMTPConfig
from relay.intake import Intake, parse
from relay.model import Account, AccountStatus, DomainStatus
from relay.passwords import hash_password
from relay.policy.limits import Limits, RateLimit
from relay.queue import limits as q
from relay.queue import reputation as rq
from relay.queue.cache import CHECK_EVERY
from relay.queue.store import NewRecipient, RateLimited, Store
from relay.smtp.auth import Authenticator


async def sender(store: Store) -> Account:
    acct = await store.add_account("alice", hash_password("secret-1"))
    await store.add_domain("example.com", acct.id, "relay", "k", verified=True, warmup=False)
    return acct


async def test_repeated_reads_are_served_from_the_cache_and_own_writes_show_at_once(
    stores: tuple[Store, Store],
) -> None:
    server, _cli = stores
    acct = await sender(server)
    assert await q.get_overrides(server, "account", "alice") == {}
    misses = server.cache.misses
    for _ in range(5):
        assert await q.get_overrides(server, "account", "alice") == {}
        assert (await server.get_account_by_id(acct.id)).name == "alice"
    assert server.cache.misses == misses + 1  # the account; the overrides were cached
    await q.set_override(server, "account", "alice", "rate", "3")
    assert await q.get_overrides(server, "account", "alice") == {"rate": "3"}


async def test_another_process_change_shows_within_the_generation_check(
    stores: tuple[Store, Store],
) -> None:
    server, cli = stores
    await sender(server)
    now = [100.0]
    server.cache.clock = lambda: now[0]
    assert await q.get_overrides(server, "account", "alice") == {}
    await q.set_override(cli, "account", "alice", "rate", "3")
    now[0] += CHECK_EVERY / 2
    assert await q.get_overrides(server, "account", "alice") == {}  # not looked yet
    now[0] += CHECK_EVERY / 2
    # Long before the TTL (cache_seconds 5): row_change.generation moved.
    assert await q.get_overrides(server, "account", "alice") == {"rate": "3"}


async def test_a_row_changed_in_the_database_shell_reaches_the_cache(
    stores: tuple[Store, Store], tmp_path: Path
) -> None:
    server, _cli = stores
    acct = await sender(server)
    now = [100.0]
    server.cache.clock = lambda: now[0]
    state = await rq.account_state(server, acct.id)
    assert state is not None and state.status is AccountStatus.ACTIVE
    # An operator's UPDATE in the sqlite3 shell: no relay code runs, the trigger does.
    with sqlite3.connect(tmp_path / "relay.db") as shell:
        shell.execute("UPDATE account SET status = 'suspended' WHERE id = ?", (acct.id,))
    now[0] += CHECK_EVERY
    state = await rq.account_state(server, acct.id)
    assert state is not None and state.status is AccountStatus.SUSPENDED


async def test_a_load_that_raced_a_clear_is_not_kept(stores: tuple[Store, Store]) -> None:
    server, _cli = stores
    cache = server.cache
    started = asyncio.Event()
    go_on = asyncio.Event()

    async def slow_old_row() -> str:
        started.set()
        await go_on.wait()
        return "read before the change"

    loading = asyncio.create_task(cache.fetch("k", slow_old_row))
    await started.wait()
    cache.clear()  # a change committed while the load was under way
    go_on.set()
    assert await loading == "read before the change"  # this caller gets what it read...
    assert await cache.fetch("k", _fresh) == "fresh"  # ...but it was not kept


async def _fresh() -> str:
    return "fresh"


async def test_verifying_a_domain_or_resuming_an_account_elsewhere_applies_at_once(
    stores: tuple[Store, Store],
) -> None:
    server, cli = stores
    acct = await server.add_account("bob", "x")
    await server.add_domain("pending.example", acct.id, "relay", "k")
    d = await server.get_domain("pending.example")
    assert d is not None and d.status is DomainStatus.PENDING
    await cli.set_domain_status("pending.example", DomainStatus.VERIFIED)
    d = await server.get_domain("pending.example")
    assert d is not None and d.status is DomainStatus.VERIFIED

    assert await rq.suspend(cli, acct.id, "bounce rate", {})
    state = await rq.account_state(server, acct.id)
    assert state is not None and state.status is AccountStatus.SUSPENDED
    await rq.resume(cli, acct.id)
    state = await rq.account_state(server, acct.id)
    assert state is not None and state.status is AccountStatus.ACTIVE


async def test_rate_tokens_are_taken_in_the_accept_transaction_and_a_refusal_commits_nothing(
    stores: tuple[Store, Store],
) -> None:
    server, _cli = stores
    acct = await sender(server)
    limits = Limits(LimitsConfig(), server)
    check = RateLimit(limits, in_accept=True)
    intake = Intake(server, "relay.test", clock=server.clock)
    intake.planner = limits

    async def take(account_id: int, n: int) -> object:
        return await check.take(await server.get_account_by_id(account_id), n)

    intake.rate = take  # type: ignore[assignment]

    async def submit() -> str:
        return await intake.accept(
            account_id=acct.id,
            mail_from="a@example.com",
            recipients=[NewRecipient("x@example.org")],
            parsed=parse(b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n"),
            helo="client",
            client_ip="127.0.0.1",
            protocol="ESMTPSA",
        )

    for _ in range(20):  # the default 20 per second, one second of burst
        await submit()
    with pytest.raises(RateLimited) as exc:
        await submit()
    assert "at most 20 recipients per second" in exc.value.text
    assert "retry in 0.05 s" in exc.value.text
    assert await server.queue_counts() == {"queued": 20}
    server.clock.now += 0.05  # type: ignore[attr-defined]
    await submit()
    assert await server.queue_counts() == {"queued": 21}


async def test_auth_remembers_a_verified_password_until_it_changes(
    stores: tuple[Store, Store],
) -> None:
    server, cli = stores
    await sender(server)
    auth = Authenticator(server, SMTPConfig())
    assert (await auth.verify("alice", "secret-1", "127.0.0.1")).ok
    assert len(auth._verified) == 1
    assert (await auth.verify("alice", "secret-1", "127.0.0.1")).ok
    assert not (await auth.verify("alice", "wrong", "127.0.0.1")).ok
    await cli.set_password("alice", hash_password("secret-2"))
    assert not (await auth.verify("alice", "secret-1", "127.0.0.1")).ok
    assert (await auth.verify("alice", "secret-2", "127.0.0.1")).ok


async def test_one_trip_driver_reports_rows_rowcount_lastrowid_and_errors(
    stores: tuple[Store, Store],
) -> None:
    import sqlalchemy as sa
    from sqlalchemy.exc import IntegrityError

    from relay.queue.sqlite_driver import OneTripCursor

    server, _cli = stores
    async with server._write() as conn:
        raw = await conn.get_raw_connection()
        assert getattr(raw.dbapi_connection, "_cursor_cls", None) is OneTripCursor
        await conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)"))
        res = await conn.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), [{"v": "a"}, {"v": "b"}])
        assert res.rowcount == 2
        res = await conn.execute(sa.text("INSERT INTO t (v) VALUES ('c')"))
        assert res.lastrowid == 3
        res = await conn.execute(sa.text("UPDATE t SET v = v || 'x' WHERE id < 3"))
        assert res.rowcount == 2
        res = await conn.execute(sa.text("UPDATE t SET v = 'z' WHERE id = 3 RETURNING id, v"))
        assert [tuple(r) for r in res] == [(3, "z")]
    async with server._read() as conn:
        rows = (await conn.execute(sa.text("SELECT id, v FROM t ORDER BY id"))).all()
        assert [tuple(r) for r in rows] == [(1, "ax"), (2, "bx"), (3, "z")]
        assert (await conn.execute(sa.text("SELECT v FROM t WHERE id = 9"))).first() is None
    with pytest.raises(IntegrityError):
        async with server._write() as conn:
            await conn.execute(sa.text("INSERT INTO t (v) VALUES ('z')"))
    # A failed block returns before its batch's writer has finished; the next write
    # waits for it, so the store closes with every connection back in the pool.
    async with server._write() as conn:
        await conn.execute(sa.text("INSERT INTO t (v) VALUES ('w')"))
