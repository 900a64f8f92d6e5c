"""Operator holds on a running relay: a paused destination's mail waits untried, other
mail flows, and the hold ends by release or by its own time (relay/queue/holds.py)."""

from __future__ import annotations

import time

from tests.integration.test_api_auth import ADMIN, call
from tests.integration.test_delivery_destinations import other_destination
from tests.support.dnsserver import DNSServer
from tests.support.relayproc import MakeRelay, send_one, wait_status
from tests.support.sink import SMTPSink


async def test_a_held_domain_gets_no_attempt_while_others_flow_until_it_is_released(
    make_relay: MakeRelay, sink: SMTPSink, dns_server: DNSServer
) -> None:
    other = other_destination(sink, dns_server)
    relay = make_relay({"api": {"admin_key": ADMIN}})
    relay.setup()
    relay.start()
    try:
        out = relay.cli("queue", "hold", "--domain", "Example.ORG", "--reason", "asked to pause")
        assert "held: example.org since " in out.stdout
        assert "until released  asked to pause" in out.stdout
        held = await send_one(relay, "a@example.org")
        await send_one(relay, "b@other.example")
        other.wait_for(1)  # other destinations are not held up
        relay.wait_for_log(
            r"delivery to example\.org held by the operator \(asked to pause\): 1 recipients"
            r" wait until released"
        )
        assert sink.connections == 0 and sink.messages == []
        # What the operator sees: untried (no attempt counted), and why it waits.
        shown = relay.cli("status", held).stdout
        assert "queued" in shown and "attempts=0" in shown
        assert "held: example.org" in relay.cli("queue", "summary").stdout
        assert "held: example.org" in relay.cli("queue", "hold").stdout
        retried = relay.cli("queue", "retry", "--domain", "example.org").stdout
        assert "example.org is held: its mail still waits" in retried
        status, body = call(relay, "GET", "/api/v1/queue", ADMIN)
        assert status == 200
        (hold,) = body["held"]
        assert hold["domain"] == "example.org" and hold["reason"] == "asked to pause"
        assert hold["until"] is None and hold["since"].endswith("Z")
        assert sink.connections == 0  # the retry did not get past the hold

        status, body = call(
            relay, "POST", "/api/v1/queue/release", ADMIN, {"domain": "example.org"}
        )
        assert status == 200 and body["released"] == "example.org"
        # 1, or 0 when the retry above had it claimed and being given back just then: the
        # give-back then finds no hold and makes it due (test_queue_holds_store.py).
        assert body["due_now"] in (0, 1)
        sink.wait_for(1)
        assert "attempts=1" in wait_status(relay, held, "delivered")
        status, body = call(
            relay, "POST", "/api/v1/queue/release", ADMIN, {"domain": "example.org"}
        )
        assert status == 404 and "not held" in body["error"]["message"]
        again = relay.cli("queue", "release", "--domain", "example.org", check=False)
        assert again.returncode == 1 and "was not held" in again.stdout
    finally:
        other.stop()


async def test_a_hold_for_a_time_ends_by_itself_and_bad_requests_are_refused(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay({"api": {"admin_key": ADMIN}})
    relay.setup()
    relay.start()
    for bad in (
        {},
        {"domain": "example.org", "seconds": 0},
        {"domain": "example.org", "seconds": "1h"},
        {"domain": "example.org", "reason": 5},
        {"domain": "nodot"},
    ):
        status, body = call(relay, "POST", "/api/v1/queue/hold", ADMIN, bad)
        assert status == 400, bad
    bad_cli = relay.cli("queue", "hold", "--domain", "example.org", "--for", "soon", check=False)
    assert bad_cli.returncode == 2 and "not a duration: 'soon'" in bad_cli.stderr

    status, body = call(
        relay, "POST", "/api/v1/queue/hold", ADMIN, {"domain": "example.org", "seconds": 4}
    )
    assert status == 200 and body == {"held": "example.org", "waiting": 0}
    held_at = time.monotonic()
    qid = await send_one(relay, "a@example.org")
    relay.wait_for_log(r"delivery to example\.org held by the operator \(no reason given\): 1")
    sink.wait_for(1, timeout=20)
    assert time.monotonic() - held_at >= 3.5  # not before the hold's end
    assert "attempts=1" in wait_status(relay, qid, "delivered")
    status, body = call(relay, "GET", "/api/v1/queue", ADMIN)
    assert body["held"] == []
