"""Integration fixtures shared by every area.

``db_url`` runs a test once per database dialect: a fresh SQLite file, and (when the test
command started PostgreSQL and exported RELAY_TEST_PG_URL) a fresh PostgreSQL database.
Adopt it by passing the URL to the relay::

    def test_x(make_relay, db_url):
        relay = make_relay({"database": {"url": db_url}})

``clock`` and ``stores``: in-process store tests' clock (a Monday, 2026-03-02, 00:00 UTC;
modules may define their own) and the server's store with a second one on the same
SQLite file standing in for the CLI.

``pg_cluster`` is a PostgreSQL server of the test's own (initdb in tmp_path, a free loopback
port) that the test may stop and start: for "the database went away" tests, which must not
take down the shared server.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from relay.config import DatabaseConfig
from relay.queue.store import Store
from tests.support.net import LOOPBACK, free_port, port_accepts
from tests.support.store import Clock, server_and_cli

MONDAY = dt.datetime(2026, 3, 2, tzinfo=dt.UTC).timestamp()


@pytest.fixture
def clock() -> Clock:
    return Clock(MONDAY)


@pytest.fixture
async def stores(tmp_path: Path, clock: Clock) -> AsyncIterator[tuple[Store, Store]]:
    """The server's store (row cache on) and a second one on the same file: the CLI."""
    async with server_and_cli(tmp_path / "relay.db", clock) as pair:
        yield pair


@pytest.fixture
async def dialect_store(db_url: str) -> AsyncIterator[Store]:
    """A migrated Store on ``db_url`` (each dialect), node "t", on a Clock of its own
    (``store.clock``, which the test moves)."""
    s = Store.open(DatabaseConfig(url=db_url), node_id="t", clock=Clock())
    try:
        await s.migrate()
        yield s
    finally:
        await s.close()


@pytest.fixture
async def other_node(db_url: str, dialect_store: Store) -> AsyncIterator[Store]:
    """A second process on dialect_store's database (another node, or the CLI): node
    "u", no row cache, the same clock."""
    s = Store.open(DatabaseConfig(url=db_url), node_id="u", clock=dialect_store.clock)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLAlchemy URL of an empty database, once per dialect (SQLite, PostgreSQL)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


def _pg_bindir() -> Path | None:
    roots = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    for cand in reversed(roots):
        if (cand / "initdb").exists():
            return cand
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PGCluster:
    """A throwaway PostgreSQL cluster (trust auth, loopback only) that can be stopped."""

    def __init__(self, base: Path) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bin = bindir
        self.base = base
        self.data = base / "data"
        self.port = free_port()
        # initdb refuses to run as root: run the server as the `postgres` user then.
        self.as_user = "postgres" if os.geteuid() == 0 else None
        base.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            shutil.chown(base, self.as_user)
        self._run(f"{self.bin}/initdb -D {self.data} -U postgres --auth=trust")
        self.running = False

    def _run(self, cmd: str) -> None:
        argv = ["su", self.as_user, "-c", cmd] if self.as_user else ["sh", "-c", cmd]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{cmd!r} failed: {result.stdout}\n{result.stderr}")

    @property
    def admin_url(self) -> str:
        return f"postgresql+asyncpg://postgres@{LOOPBACK}:{self.port}/postgres"

    def url(self, database: str = "relay") -> str:
        return f"postgresql+asyncpg://postgres@{LOOPBACK}:{self.port}/{database}"

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.base} -c listen_addresses={LOOPBACK}"
        self._run(f"{self.bin}/pg_ctl -D {self.data} -o '{opts}' -l {self.base}/log -w start")
        deadline = time.monotonic() + 30
        while not port_accepts(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.running = True

    def stop(self) -> None:
        """Fast shutdown: open connections are terminated, as when a server goes away."""
        self._run(f"{self.bin}/pg_ctl -D {self.data} -m fast -w stop")
        self.running = False

    def create_database(self, name: str = "relay") -> str:
        from tests.conftest import _pg_admin

        _pg_admin(self.admin_url, f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(RuntimeError):
                self._run(f"{self.bin}/pg_ctl -D {self.data} -m immediate -w stop")
            self.running = False


@pytest.fixture
def pg_cluster() -> Iterator[PGCluster]:
    """A PostgreSQL server of this test's own, started, with an empty database "relay"
    (``pg_cluster.url()``); removed at teardown."""
    # Not under tmp_path: pytest's base dir is private to its user, and the server may run
    # as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="relay-pg-"))
    base.chmod(0o755)
    try:
        cluster = PGCluster(base / "pg")
        try:
            cluster.start()
            cluster.create_database("relay")
            yield cluster
        finally:
            cluster.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
