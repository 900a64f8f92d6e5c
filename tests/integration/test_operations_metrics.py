"""GET /metrics after a scripted scenario: the numbers match what happened."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import aiosmtplib
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.net import LOOPBACK, free_port
from tests.support.relayproc import MakeRelay, make_message, submit, unverified_ssl_context
from tests.support.sink import SMTPSink


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


async def test_metrics_count_a_scripted_scenario(make_relay: MakeRelay, sink: SMTPSink) -> None:
    metrics_port = free_port()
    relay = make_relay({"metrics": {"listen": f"{LOOPBACK}:{metrics_port}"}})
    relay.setup()
    relay.start()
    sink.set_rcpt_reply("nobody@example.org", "550 5.1.1 user unknown")
    port = relay.submission_port

    # 1: one message to two recipients, one of which the MX refuses permanently.
    rcpts = ["bob@example.org", "nobody@example.org"]
    await submit(
        port, sender="a@example.com", recipients=rcpts, data=make_message("a@example.com", rcpts)
    )
    # 2: one more message, one recipient.
    await submit(
        port,
        sender="a@example.com",
        recipients=["carol@example.org"],
        data=make_message("a@example.com", ["carol@example.org"]),
    )
    # 3: a sender domain the account does not own: refused at MAIL (reason sender_domain).
    with pytest.raises(aiosmtplib.SMTPSenderRefused):
        await submit(
            port,
            sender="a@not-ours.example",
            recipients=["bob@example.org"],
            data=make_message("a@not-ours.example", ["bob@example.org"]),
        )
    # 4: one AUTH PLAIN with a wrong password.
    client = aiosmtplib.SMTP(
        hostname=LOOPBACK, port=port, start_tls=True, tls_context=unverified_ssl_context()
    )
    async with client:
        await client.ehlo()  # after STARTTLS (RFC 3207 §4.2), AUTH is advertised
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await client.auth_plain("alice", "wrong-password")
        assert refused.value.code == 535
    sink.wait_for(2)
    relay.wait_for_log(r"status=bounced")
    # Outcomes are committed just after the MX answers: wait until none is in flight.
    deadline = time.monotonic() + 20
    m = scrape(f"{relay.http_url}/metrics")
    while time.monotonic() < deadline and (
        value(m, "relay_queue_recipients", status="sending")
        or value(m, "relay_delivery_latency_seconds_count", provider="other") < 2
    ):
        await asyncio.sleep(0.2)
        m = scrape(f"{relay.http_url}/metrics")
    assert value(m, "relay_messages_accepted_total", listener="submission") == 2
    assert value(m, "relay_recipients_accepted_total", listener="submission") == 3
    assert value(m, "relay_smtp_transactions_total", listener="submission", outcome="queued") == 2
    assert value(m, "relay_smtp_transaction_duration_seconds_count", listener="submission") == 2
    assert value(m, "relay_messages_refused_total", reason="sender_domain") == 1
    assert value(m, "relay_smtp_auth_total", outcome="success") == 3
    assert value(m, "relay_smtp_auth_total", outcome="failure") == 1
    # >= : the test harness's own port probe at start is a connection too.
    assert value(m, "relay_smtp_connections_total", listener="submission", outcome="accepted") >= 4
    assert value(m, "relay_smtp_tls_sessions_total", listener="submission", mode="starttls") == 4
    delivered = value(m, "relay_delivery_recipients_total", status="delivered", provider="other")
    assert delivered == 2
    bounced = value(m, "relay_delivery_recipients_total", status="bounced", **{"class": "5.1"})
    assert bounced == 1
    assert value(m, "relay_delivery_latency_seconds_count", provider="other") == 2
    assert value(m, "relay_delivery_connections_total", tls="yes") >= 1
    assert value(m, "relay_delivery_connections_total", tls="no") == 0
    # Queue gauges come from the database at scrape time: everything is final now.
    assert value(m, "relay_queue_scrape_ok") == 1
    assert value(m, "relay_queue_recipients", status="queued") == 0
    assert value(m, "relay_queue_recipients", status="sending") == 0
    assert value(m, "relay_queue_oldest_age_seconds") == 0
    # No label anywhere carries an address or a message id.
    assert not any("@" in v for _n, labels in m for _k, v in labels)

    # The dedicated metrics address serves the same registry.
    own = scrape(f"http://{LOOPBACK}:{metrics_port}/metrics")
    assert value(own, "relay_messages_accepted_total") == 2


async def test_queue_gauges_show_waiting_recipients_and_their_age(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay()
    relay.setup()
    relay.start()
    sink.stop()  # the MX is down: the recipient is deferred and stays in the queue
    rcpts = ["bob@example.org"]
    await submit(
        relay.submission_port,
        sender="a@example.com",
        recipients=rcpts,
        data=make_message("a@example.com", rcpts),
    )
    deadline = time.monotonic() + 30
    while True:
        m = scrape(f"{relay.http_url}/metrics")
        if value(m, "relay_delivery_recipients_total", status="deferred") >= 1:
            break
        assert time.monotonic() < deadline, "no deferred delivery attempt within 30 s"
        await asyncio.sleep(0.2)
    waiting = sum(
        value(m, "relay_queue_recipients", status=s) for s in ("queued", "deferred", "sending")
    )
    assert waiting == 1
    assert value(m, "relay_queue_oldest_age_seconds") > 0
    assert value(m, "relay_delivery_recipients_total", status="deferred", **{"class": "4.4"}) >= 1
