"""Per-destination limits in a running relay: a destination's sessions are capped while
mail to others goes past, and a destination that cannot be reached is suspended."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

from tests.integration.test_api_auth import ADMIN, call
from tests.integration.test_operations_metrics import scrape, value
from tests.support.dnsserver import DNSServer
from tests.support.relayproc import MakeRelay, RelayProcess, send_one, wait_status
from tests.support.sink import SMTPSink


class _Closer:
    """An MX host that takes each connection and closes it at once, counting them."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.2)
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def other_destination(sink: SMTPSink, dns_server: DNSServer) -> SMTPSink:
    """A second destination, other.example, with its own sink (stop it when done)."""
    other = SMTPSink(host="127.0.0.4", port=sink.port).start()
    dns_server.add("other.example", "MX", "10 mx.other.example.")
    dns_server.add("mx.other.example", "A", "127.0.0.4")
    return other


async def test_a_destination_gets_its_sessions_only_and_other_mail_goes_past(
    make_relay: MakeRelay, sink: SMTPSink, dns_server: DNSServer
) -> None:
    other = other_destination(sink, dns_server)
    sink.set_data_delay(0.5)  # example.org is slow: 12 messages, 2 at a time, >= 3 s
    relay = make_relay(
        {
            "delivery": {
                "concurrency": 3,
                "destination_concurrency": 2,
                "messages_per_connection": 1,
                "connection_cache_time": 0,
            }
        }
    )
    relay.setup()
    relay.start()
    try:
        for i in range(12):
            await send_one(relay, f"r{i}@example.org")
        await send_one(relay, "x@other.example")
        # Three workers, two of them on example.org: the third takes other.example's
        # mail while example.org's other ten wait for its two sessions.
        other.wait_for(1)
        assert len(sink.messages) < 8
        assert len(sink.wait_for(12)) == 12
        assert sink.peak_connections == 2
    finally:
        other.stop()


async def test_an_unreachable_destination_is_suspended_and_its_mail_deferred_untried(
    make_relay: MakeRelay, sink: SMTPSink, dns_server: DNSServer
) -> None:
    dns_server.add("dead.example", "MX", "10 mx.dead.example.")
    dns_server.add("mx.dead.example", "A", "127.0.0.3")
    closer = _Closer("127.0.0.3", sink.port)
    # Suspended for retry_first: long enough to see mail deferred without a try.
    relay = make_relay(
        {"delivery": {"retry_first": 20, "retry_max": 40}, "api": {"admin_key": ADMIN}}
    )
    relay.setup()
    relay.start()
    try:
        first = await send_one(relay, "a@dead.example")
        relay.wait_for_log(r"delivery to dead\.example suspended for 20 s: no MX host")
        assert "Connection to mx.dead.example" in wait_status(relay, first, "deferred")
        tried = closer.connections
        assert tried >= 1

        second = await send_one(relay, "b@dead.example")
        shown = wait_status(relay, second, "temporarily suspended")
        assert "Delivery to dead.example temporarily suspended: 4.4.1" in shown
        assert closer.connections == tried  # no connection was made for it
        metrics = scrape(f"{relay.http_url}/metrics")
        assert value(metrics, "relay_delivery_suspended_total") == 1
        assert value(metrics, "relay_delivery_destinations_suspended") == 1
        # What an operator sees at 3 a.m.: which destination, until when, and why.
        status, body = call(relay, "GET", "/api/v1/queue", ADMIN)
        assert status == 200
        (suspended,) = body["suspended"]
        assert suspended["domain"] == "dead.example"
        assert suspended["reason"].startswith("4.4.1 Connection to mx.dead.example")
        assert suspended["until"].endswith("Z")

        # Other destinations are not held up by it.
        await send_one(relay, "c@example.org")
        sink.wait_for(1)

        # The operator's retry of the destination lifts the suspension at once, as
        # `postqueue -f` does Postfix's dead sites (also from another process: the CLI).
        relay.cli("queue", "retry", "--domain", "dead.example")
        for _ in range(100):
            if closer.connections > tried:
                break
            await asyncio.sleep(0.1)
        assert closer.connections > tried
    finally:
        closer.close()


async def _burst_to_a_receiver_that_takes_three(
    make_relay: MakeRelay, sink: SMTPSink, feedback: bool
) -> tuple[RelayProcess, int]:
    """24 messages at once to a receiver that greets a fourth connection with 421: the
    relay and how many messages arrived within 20 s."""
    sink.set_connection_limit(3)
    sink.set_data_delay(0.2)
    relay = make_relay(
        {
            "delivery": {
                "concurrency": 20,
                "destination_concurrency": 10,
                "messages_per_connection": 1,
                "connection_cache_time": 0,
                "claim_delay": 1.0,  # the whole burst is claimed together
                "retry_first": 60,  # a deferral is a miss within the test's 20 s
                "retry_max": 120,
                "concurrency_feedback": feedback,
            },
            "api": {"admin_key": ADMIN},
            "limits": {"rate": 100},
        }
    )
    relay.setup()
    relay.start()
    await asyncio.gather(*(send_one(relay, f"r{i}@example.org") for i in range(24)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with contextlib.suppress(AssertionError):
        await sink.wait_for_async(24, timeout=20)
    took, arrived = loop.time() - started, len(sink.messages)
    print(f"feedback {feedback}: {arrived} arrived in {took:.1f} s, {sink.turned_away} refused")
    return relay, arrived


async def test_a_receiver_that_refuses_a_fourth_session_gets_three_and_no_mail_is_deferred(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay, arrived = await _burst_to_a_receiver_that_takes_three(make_relay, sink, feedback=True)
    # Ten sessions at once: seven are refused. Their mail waits for a slot under the
    # lowered limit instead of retry_first (60 s), so all 24 arrive within 20 s.
    assert arrived == 24
    assert sink.turned_away >= 7
    relay.wait_for_log(r"delivery to example\.org: sessions at once lowered to [1-3] after a")
    relay.wait_for_log(r"delivery to example\.org: \d+ recipients wait for another session")
    metrics = scrape(f"{relay.http_url}/metrics")
    assert value(metrics, "relay_delivery_concurrency_lowered_total") >= 1
    # What an operator sees: the destination, the sessions it gets now, the configured.
    status, body = call(relay, "GET", "/api/v1/queue", ADMIN)
    assert status == 200
    (lowered,) = body["lowered"]
    assert lowered["domain"] == "example.org" and lowered["limit"] == 10
    assert 1 <= lowered["sessions"] < 10
    assert sink.peak_connections == 3


async def test_without_feedback_a_receiver_that_refuses_a_fourth_session_defers_most(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    # The same burst with concurrency_feedback off: what the test above would see if the
    # feedback did nothing. Every refused session's mail waits out retry_first.
    relay, arrived = await _burst_to_a_receiver_that_takes_three(make_relay, sink, feedback=False)
    assert arrived < 24
    status, body = call(relay, "GET", "/api/v1/queue", ADMIN)
    assert status == 200 and body["lowered"] == []
