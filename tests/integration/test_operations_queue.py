"""The stuck-queue commands on a running relay: where mail waits and why, then retry or
drop one destination's mail (qshape, postqueue -s, postsuper -d)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.integration.test_api_auth import ADMIN, call
from tests.support.dnsserver import DNSServer
from tests.support.relayproc import MakeRelay, RelayProcess, send_one
from tests.support.sink import SMTPSink

GREYLIST = "451 4.7.1 Greylisted: this server defers first-time senders, please retry"


async def _until(done: Callable[[], bool]) -> None:
    """Poll ``done`` for up to 20 s (what the relay does next happens on its own time)."""
    for _ in range(100):
        if done():
            return
        await asyncio.sleep(0.2)
    raise AssertionError("not within 20 s")


def _deferred(relay: RelayProcess) -> int:
    return relay.cli("queue", "list", "--status", "deferred").stdout.count(" deferred ")


async def _stuck(
    make_relay: MakeRelay,
    sink: SMTPSink,
    dns_server: DNSServer,
    extra: dict[str, Any] | None = None,
) -> tuple[RelayProcess, list[str], str]:
    """A relay whose mail waits: three recipients greylisted at slow.example.net (one
    cause, three texts), one refused at dead.example.net, one delivered. Retries are an
    hour apart, so only a retry command can bring deferred mail back within a test."""
    for domain in ("slow.example.net", "dead.example.net"):
        dns_server.add(domain, "MX", "10 mx.example.org.")
    slow = [f"s{i}@slow.example.net" for i in range(3)]
    for i, rcpt in enumerate(slow):
        sink.set_rcpt_reply(rcpt, f"{GREYLIST} (id {i}{i}{i})")
    sink.set_rcpt_reply("gone@dead.example.net", "421 4.4.2 dead.example.net closing")
    relay = make_relay({"delivery": {"retry_first": 3600, "retry_max": 3600}, **(extra or {})})
    relay.setup()
    relay.start()
    for rcpt in slow:
        await send_one(relay, rcpt)
    dead = await send_one(relay, "gone@dead.example.net")
    await send_one(relay, "b@example.org")
    sink.wait_for(1)
    await _until(lambda: _deferred(relay) == 4)
    for rcpt in slow:
        sink.set_rcpt_reply(rcpt, None)  # the cause is gone; the backoff still waits
    return relay, slow, dead


async def test_summary_shows_where_and_why_mail_waits_and_a_domain_is_retried_or_dropped(
    make_relay: MakeRelay, sink: SMTPSink, dns_server: DNSServer
) -> None:
    relay, slow, dead = await _stuck(make_relay, sink, dns_server)
    summary = relay.cli("queue", "summary").stdout
    lines = {line.split()[0]: line for line in summary.splitlines() if line.strip()}
    assert lines["slow.example.net"].split()[1:2] == ["3"]
    assert f"{GREYLIST[:60]} (3)" in lines["slow.example.net"]
    assert lines["dead.example.net"].split()[1:2] == ["1"]
    assert "example.org" not in lines  # delivered: nothing waits there
    assert lines["TOTAL"].split() == ["TOTAL", "4"]

    listed = relay.cli("queue", "list", "--domain", "dead.example.net").stdout
    assert "gone@dead.example.net" in listed and "slow.example.net" not in listed
    out = relay.cli("queue", "delete", "--domain", "dead.example.net").stdout
    assert "1 waiting recipient(s) at dead.example.net deleted" in out
    shown = relay.cli("queue", "show", dead).stdout
    assert " deleted " in shown.split("events:")[0]
    assert "deleted" in shown.split("events:")[1]

    out = relay.cli("queue", "retry", "--domain", "slow.example.net").stdout
    assert "3 waiting recipient(s) at slow.example.net due now" in out
    got = sink.wait_for(4, timeout=30)
    assert sorted(r for m in got for r in m.rcpt_tos if "slow" in r) == slow
    await _until(lambda: relay.cli("queue", "summary").stdout.strip() == "queue: nothing waiting")
    # The mail dropped by domain never went out.
    assert not [m for m in got if "gone@dead.example.net" in m.rcpt_tos]


async def test_the_admin_api_reads_the_queue_shape_and_retries_or_drops_a_domain(
    make_relay: MakeRelay, sink: SMTPSink, dns_server: DNSServer
) -> None:
    relay, slow, _ = await _stuck(make_relay, sink, dns_server, {"api": {"admin_key": ADMIN}})
    alice = relay.cli("apikey", "create", "alice").stdout.split()[0]
    status, body = call(relay, "GET", "/api/v1/queue", alice)
    assert (status, body["error"]["code"]) == (403, "forbidden")  # every account's mail

    status, body = call(relay, "GET", "/api/v1/queue", ADMIN)
    assert status == 200 and body["total"] == 4
    first = body["domains"][0]
    assert (first["domain"], first["total"], first["statuses"]["deferred"]) == (
        "slow.example.net",
        3,
        3,
    )
    assert first["ages"]["<5m"] == 3
    assert first["top_deferral"] == {"reply": GREYLIST[:60], "count": 3}

    for bad in ({}, {"all": True, "domain": "slow.example.net"}, {"domain": 7}):
        status, body = call(relay, "POST", "/api/v1/queue/retry", ADMIN, bad)
        assert (status, body["error"]["code"]) == (400, "bad_request"), bad
    bad_status = {"domain": "dead.example.net", "status": "delivered"}
    status, body = call(relay, "POST", "/api/v1/queue/delete", ADMIN, bad_status)
    assert status == 400 and "status: expected one of" in body["error"]["message"]

    status, body = call(
        relay, "POST", "/api/v1/queue/delete", ADMIN, {"domain": "dead.example.net"}
    )
    assert (status, body) == (200, {"deleted": 1})
    status, body = call(relay, "POST", "/api/v1/queue/retry", ADMIN, {"domain": "slow.example.net"})
    assert (status, body) == (200, {"due_now": 3})
    got = sink.wait_for(4, timeout=30)
    assert sorted(r for m in got for r in m.rcpt_tos if "slow" in r) == slow
    # The sink has the mail; the relay records the outcomes just after.
    await _until(lambda: call(relay, "GET", "/api/v1/queue", ADMIN)[1]["total"] == 0)
