"""The stuck-queue commands on a running relay: where mail waits and why, then retry or
drop one destination's mail (qshape, postqueue -s, postsuper -d)."""

from __future__ import annotations

import asyncio

from tests.support.dnsserver import DNSServer
from tests.support.relayproc import MakeRelay, RelayProcess, send_one
from tests.support.sink import SMTPSink

GREYLIST = "451 4.7.1 Greylisted: this server defers first-time senders, please retry"


async def _wait_deferred(relay: RelayProcess, n: int) -> None:
    out = ""
    for _ in range(100):
        out = relay.cli("queue", "list", "--status", "deferred").stdout
        if out.count(" deferred ") == n:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"never {n} deferred:\n{out}")


async def test_summary_shows_where_and_why_mail_waits_and_a_domain_is_retried_or_dropped(
    make_relay: MakeRelay, sink: SMTPSink, dns_server: DNSServer
) -> None:
    for domain in ("slow.example.net", "dead.example.net"):
        dns_server.add(domain, "MX", "10 mx.example.org.")
    slow = [f"s{i}@slow.example.net" for i in range(3)]
    for i, rcpt in enumerate(slow):
        sink.set_rcpt_reply(rcpt, f"{GREYLIST} (id {i}{i}{i})")  # one cause, three texts
    sink.set_rcpt_reply("gone@dead.example.net", "421 4.4.2 dead.example.net closing")
    # Deferred mail would wait an hour: only `queue retry` can bring it back in this test.
    relay = make_relay({"delivery": {"retry_first": 3600, "retry_max": 3600}})
    relay.setup()
    relay.start()
    for rcpt in slow:
        await send_one(relay, rcpt)
    dead = await send_one(relay, "gone@dead.example.net")
    await send_one(relay, "b@example.org")
    sink.wait_for(1)
    await _wait_deferred(relay, 4)

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

    for rcpt in slow:
        sink.set_rcpt_reply(rcpt, None)
    out = relay.cli("queue", "retry", "--domain", "slow.example.net").stdout
    assert "3 waiting recipient(s) at slow.example.net due now" in out
    got = sink.wait_for(4, timeout=30)
    assert sorted(r for m in got for r in m.rcpt_tos if "slow" in r) == slow
    assert relay.cli("queue", "summary").stdout.strip() == "queue: nothing waiting"
    # The mail dropped by domain never went out.
    assert not [m for m in got if "gone@dead.example.net" in m.rcpt_tos]
