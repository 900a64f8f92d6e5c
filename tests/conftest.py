"""Shared fixtures: a loopback DNS server, an SMTP sink as the recipients' MX, and the
relay itself as a subprocess (configured to use both).

    def test_delivery(relay, sink):
        relay.setup()
        relay.start()
        submit_sync(relay.submission_port, sender="a@example.com",
                    recipients=["bob@example.org"], data=make_message(...))
        sink.wait_for(1)

Tests marked ``postgres`` are skipped unless RELAY_TEST_PG_URL is set (the test command
sets it); the ``pg_url`` fixture gives each such test a database of its own.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # `tests.support` importable however pytest is run
    sys.path.insert(0, str(PROJECT_ROOT))

from tests.support.dnsserver import DNSServer  # noqa: E402
from tests.support.relayproc import MakeRelay, RelayProcess  # noqa: E402
from tests.support.sink import SMTPSink  # noqa: E402

PG_ENV = "RELAY_TEST_PG_URL"
RECIPIENT_DOMAIN = "example.org"
RECIPIENT_MX = "mx.example.org"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(PG_ENV):
        return
    skip_pg = pytest.mark.skip(reason=f"{PG_ENV} is not set (run `bash scripts/test.sh`)")
    for item in items:
        if item.get_closest_marker("postgres") is not None:
            item.add_marker(skip_pg)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Keep each phase's report on the item so fixtures can tell whether the test failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


@pytest.fixture
def sink() -> Iterator[SMTPSink]:
    with SMTPSink() as server:
        yield server


@pytest.fixture
def make_relay(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    dns_server: DNSServer,
    sink: SMTPSink,
) -> Iterator[MakeRelay]:
    """Factory: ``make_relay(extra_config=None, *, sink_port=None, name=None)``.

    Each call makes a RelayProcess (not set up, not started) in its own directory under
    tmp_path ("relay", "relay2", ... or ``name``), delivering to the sink via the test
    DNS server, where example.org has MX mx.example.org -> 127.0.0.1. Every relay made
    is killed at teardown; if the test failed, the end of each log is printed.
    """
    dns_server.add(RECIPIENT_DOMAIN, "MX", f"10 {RECIPIENT_MX}.")
    dns_server.add(RECIPIENT_MX, "A", "127.0.0.1")
    made: list[RelayProcess] = []

    def factory(
        extra_config: Mapping[str, Any] | None = None,
        *,
        sink_port: int | None = None,
        name: str | None = None,
    ) -> RelayProcess:
        dirname = name or ("relay" if not made else f"relay{len(made) + 1}")
        proc = RelayProcess(
            tmp_path / dirname,
            dns_server,
            sink.port if sink_port is None else sink_port,
            extra_config,
        )
        made.append(proc)
        return proc

    yield factory
    for proc in made:
        proc.close()
    if _failed(request):
        for proc in made:
            print(f"\n{proc.log_tail(200)}")


@pytest.fixture
def relay(make_relay: MakeRelay) -> RelayProcess:
    """The default relay (not set up, not started): call ``.setup()`` then ``.start()``."""
    return make_relay()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test (dropped afterwards), as a
    SQLAlchemy URL ``postgresql+asyncpg://...``. Skips when RELAY_TEST_PG_URL is unset."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set (run `bash scripts/test.sh`)")
    name = f"relay_t_{uuid.uuid4().hex[:12]}"
    _pg_admin(base, f'CREATE DATABASE "{name}"')
    parts = urlsplit(base)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        _pg_admin(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_admin(sqlalchemy_url: str, statement: str) -> None:
    import asyncpg  # type: ignore[import-untyped,unused-ignore]

    dsn = sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=30)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())
