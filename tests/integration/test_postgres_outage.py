"""PostgreSQL goes away for a few seconds under two running nodes.

While it is gone, SMTP never answers 250 (every submission gets a 4xx: ``451 4.3.0`` for a
session already authenticated, ``454 4.7.0`` at AUTH), and delivery pauses; when it comes
back both nodes resume by themselves, and every message acknowledged before is delivered
exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import aiosmtplib
import pytest

from tests.integration.conftest import PGCluster
from tests.integration.test_nodes_delivery import node, seqs, submit_many, wait_all_final
from tests.support.relayproc import (
    DEFAULT_ACCOUNT,
    DEFAULT_PASSWORD,
    MakeRelay,
    make_message,
    unverified_ssl_context,
)
from tests.support.sink import SMTPSink

pytestmark = pytest.mark.postgres

SENDER = "a@example.com"


async def authenticated(port: int) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        start_tls=True,
        validate_certs=False,
        tls_context=unverified_ssl_context(),
        timeout=30,
    )
    await client.connect()
    await client.login(DEFAULT_ACCOUNT, DEFAULT_PASSWORD)
    return client


async def refused_codes(port: int, client: aiosmtplib.SMTP, tag: str) -> list[str]:
    """Try to submit on an open authenticated session and on a fresh one; the replies."""
    rcpt = f"{tag}@example.org"
    data = make_message(SENDER, [rcpt], headers={"X-Seq": tag})
    replies: list[str] = []
    for attempt in ("open-session", "new-session"):
        try:
            if attempt == "new-session":
                client = await authenticated(port)
            await client.sendmail(SENDER, [rcpt], data)
            replies.append("250 accepted while the database was down")
        except aiosmtplib.SMTPRecipientsRefused as exc:
            replies.extend(f"{r.code} {r.message}" for r in exc.recipients)
        except aiosmtplib.SMTPResponseException as exc:
            replies.append(f"{exc.code} {exc.message}")
        finally:
            with contextlib.suppress(Exception):
                await client.quit()
    return replies


async def submit_until_accepted(ports: Sequence[int], tag: str, within: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            await submit_many(ports, [tag])
            return
        except (aiosmtplib.SMTPException, OSError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_database_outage_gives_4xx_loses_nothing_and_both_nodes_resume(
    make_relay: MakeRelay, sink: SMTPSink, pg_cluster: PGCluster
) -> None:
    db_url = pg_cluster.url()
    n1 = node(make_relay, db_url, "node-1")
    n2 = node(make_relay, db_url, "node-2")
    n1.setup()
    n1.start()
    n2.start()
    ports = [n1.submission_port, n2.submission_port]
    before = [f"before{i}" for i in range(20)]
    await submit_many(ports, before)
    sessions = [await authenticated(p) for p in ports]

    pg_cluster.stop()
    during: list[str] = []
    for i, (port, client) in enumerate(zip(ports, sessions, strict=True)):
        during += await refused_codes(port, client, f"during{i}")
    assert not [r for r in during if not r.startswith("4")], during
    assert any(r.startswith("451 4.3.0") for r in during), during
    await asyncio.sleep(2)  # both delivery loops hit the outage
    assert n1.running and n2.running

    pg_cluster.start()
    # Each node accepts again by itself (its pool reconnects: pool_pre_ping).
    await submit_until_accepted([n1.submission_port], "back1")
    await submit_until_accepted([n2.submission_port], "back2")
    after = [f"after{i}" for i in range(20)]
    await submit_many(ports, after)

    expected = {*before, "back1", "back2", *after}
    await wait_all_final(db_url, len(expected))
    await sink.wait_for_async(len(expected), timeout=60)
    got = seqs(sink)
    assert set(got) == expected, "every acknowledged message was delivered, nothing more"
    assert max(got.values()) == 1, "no message was delivered twice"
    assert "database unavailable" in n1.log_text() + n2.log_text()
