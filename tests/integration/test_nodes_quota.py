"""A per-account daily quota holds across nodes: N in total, not N per node.

The daily count is a row in the shared counter table, checked and incremented in the
accept transaction, so two nodes accepting at once cannot both take the last unit.
"""

from __future__ import annotations

import asyncio

import aiosmtplib

from tests.integration.test_nodes_delivery import SENDER, node, seqs, wait_all_final
from tests.support.net import LOOPBACK
from tests.support.relayproc import (
    DEFAULT_ACCOUNT,
    DEFAULT_PASSWORD,
    MakeRelay,
    make_message,
    unverified_ssl_context,
)
from tests.support.sink import SMTPSink

QUOTA = 30
OFFERED = 50


async def test_a_daily_quota_allows_that_many_in_total_across_two_nodes(
    make_relay: MakeRelay, sink: SMTPSink, db_url: str
) -> None:
    limits = {"daily": QUOTA}
    n1 = node(make_relay, db_url, "node-1", limits=limits)
    n2 = node(make_relay, db_url, "node-2", limits=limits)
    n1.setup()
    n1.start()
    n2.start()
    ports = [n1.submission_port, n2.submission_port]
    accepted: list[str] = []
    refusals: list[str] = []

    async def session(k: int, sessions: int = 6) -> None:
        client = aiosmtplib.SMTP(
            hostname=LOOPBACK,
            port=ports[k % 2],
            start_tls=True,
            validate_certs=False,
            tls_context=unverified_ssl_context(),
            timeout=30,
        )
        async with client:
            await client.login(DEFAULT_ACCOUNT, DEFAULT_PASSWORD)
            for i in range(k, OFFERED, sessions):
                tag = f"q{i}"
                rcpt = f"{tag}@example.org"
                data = make_message(SENDER, [rcpt], headers={"X-Seq": tag})
                try:
                    await client.sendmail(SENDER, [rcpt], data)
                    accepted.append(tag)
                except aiosmtplib.SMTPResponseException as exc:
                    refusals.append(f"{exc.code} {exc.message}")

    await asyncio.gather(*(session(k) for k in range(6)))
    assert len(accepted) == QUOTA, refusals
    assert len(refusals) == OFFERED - QUOTA
    # Temporary refusals naming the quota: the quota frees up. A node that loses the race
    # for the last unit inside the accept transaction says so too (not a storage failure).
    assert all(r.startswith("451 4.7.1 Daily") for r in refusals), refusals
    assert any(f"of {QUOTA} recipients" in r for r in refusals), refusals
    await wait_all_final(db_url, QUOTA)
    await sink.wait_for_async(QUOTA, timeout=60)
    assert set(seqs(sink)) == set(accepted)
