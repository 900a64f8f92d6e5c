"""Delivery outcomes: deferral and retry, bounces, null MX, require_tls, crash recovery."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.support.dnsserver import DNSServer
from tests.support.relayproc import RelayProcess, make_message, queue_id, submit, submit_sync
from tests.support.sink import SMTPSink


def wait_status(relay: RelayProcess, qid: str, word: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = relay.cli("status", qid).stdout
        recipients = out.split("events:")[0]
        if word in recipients:
            return out
        time.sleep(0.3)
    raise AssertionError(f"status of {qid} never showed {word!r}:\n{out}")


async def _send(relay: RelayProcess, to: str = "b@example.org") -> str:
    msg = make_message("a@example.com", [to])
    qid = queue_id(
        await submit(relay.submission_port, sender="a@example.com", recipients=[to], data=msg)
    )
    assert qid
    return qid


async def test_mx_down_defers_then_delivers_when_it_returns(
    relay: RelayProcess, sink: SMTPSink
) -> None:
    relay.setup()
    relay.start()
    sink.stop()
    qid = await _send(relay)
    out = wait_status(relay, qid, "deferred")
    assert "4.4.1" in out or "Connection" in out
    sink.start()
    sink.wait_for(1, timeout=30)
    wait_status(relay, qid, "delivered")


async def test_mx_5xx_bounces_with_an_event(relay: RelayProcess, sink: SMTPSink) -> None:
    relay.setup()
    relay.start()
    sink.set_rcpt_reply("gone@example.org", "550 5.1.1 no such user")
    qid = await _send(relay, "gone@example.org")
    out = wait_status(relay, qid, "bounced")
    assert "550 5.1.1 no such user" in out
    assert "bounced" in out.split("events:")[1]


async def test_mx_4xx_defers_and_keeps_the_reply(relay: RelayProcess, sink: SMTPSink) -> None:
    relay.setup()
    relay.start()
    sink.set_rcpt_reply(None, "451 4.7.1 greylisted, try later")
    qid = await _send(relay)
    out = wait_status(relay, qid, "deferred")
    assert "451 4.7.1 greylisted" in out
    sink.clear_replies()
    sink.wait_for(1, timeout=30)
    wait_status(relay, qid, "delivered")


async def test_null_mx_bounces(relay: RelayProcess, dns_server: DNSServer) -> None:
    dns_server.add("nomail.example", "MX", "0 .")
    relay.setup()
    relay.start()
    qid = await _send(relay, "x@nomail.example")
    out = wait_status(relay, qid, "bounced")
    assert "null MX" in out


async def test_nxdomain_bounces_and_servfail_defers(
    relay: RelayProcess, dns_server: DNSServer
) -> None:
    dns_server.add("flaky.example", "MX", "10 mx.example.org.")
    dns_server.fail("flaky.example", "servfail")
    relay.setup()
    relay.start()
    q1 = await _send(relay, "x@doesnotexist.example")
    q2 = await _send(relay, "x@flaky.example")
    assert "NXDOMAIN" in wait_status(relay, q1, "bounced")
    wait_status(relay, q2, "deferred")


async def test_require_tls_defers_when_the_mx_has_no_starttls_unless_tls_is_waived(
    make_relay: Callable[..., RelayProcess], dns_server: DNSServer
) -> None:
    with SMTPSink(tls=False) as plain:
        dns_server.add("plain.example", "MX", "10 mx.example.org.")
        relay = make_relay(
            {
                "delivery": {
                    "require_tls": True,
                    "routes": {"plain.example": f"127.0.0.1:{plain.port}"},
                }
            }
        )
        relay.setup()
        relay.start()
        qid = await _send(relay, "x@plain.example")
        out = wait_status(relay, qid, "deferred")
        assert "STARTTLS" in out and "require_tls" in out
        assert plain.messages == []

        # RFC 8689: a message that says "TLS-Required: No" goes in clear all the same.
        waived = make_message("a@example.com", ["y@plain.example"], headers={"TLS-Required": "No"})
        sent = queue_id(
            await submit(
                relay.submission_port,
                sender="a@example.com",
                recipients=["y@plain.example"],
                data=waived,
            )
        )
        assert sent is not None
        wait_status(relay, sent, "delivered")
        assert [(m.rcpt_tos, m.tls) for m in plain.messages] == [(("y@plain.example",), False)]
        # ... and its session in clear was not kept for the next, stricter batch.
        again = await _send(relay, "z@plain.example")
        assert "require_tls" in wait_status(relay, again, "deferred")


async def test_routes_override_mx_lookup(
    make_relay: Callable[..., RelayProcess], dns_server: DNSServer
) -> None:
    with SMTPSink() as other:
        relay = make_relay({"delivery": {"routes": {"routed.example": f"127.0.0.1:{other.port}"}}})
        relay.setup()
        relay.start()
        await _send(relay, "x@routed.example")
        assert other.wait_for(1)[0].rcpt_tos == ("x@routed.example",)


def test_sigkill_after_accept_then_restart_delivers(relay: RelayProcess, sink: SMTPSink) -> None:
    relay.setup()
    relay.start()
    sink.stop()  # nothing can be delivered before the kill
    sent: list[str] = []
    for i in range(5):
        msg = make_message("a@example.com", ["b@example.org"], subject=f"crash {i}")
        res: Any = submit_sync(
            relay.submission_port, sender="a@example.com", recipients=["b@example.org"], data=msg
        )
        qid = queue_id(res)
        assert qid
        sent.append(qid)
    relay.kill()
    sink.start()
    relay.start()
    got = sink.wait_for(5, timeout=60)
    subjects = sorted(m.header("Subject") or "" for m in got)
    assert subjects == [f"crash {i}" for i in range(5)]


def test_sigterm_exits_zero_and_leaves_the_queue(relay: RelayProcess, sink: SMTPSink) -> None:
    relay.setup()
    relay.start()
    sink.stop()
    msg = make_message("a@example.com", ["b@example.org"])
    res: Any = submit_sync(
        relay.submission_port, sender="a@example.com", recipients=["b@example.org"], data=msg
    )
    qid = queue_id(res)
    assert qid
    assert relay.stop() == 0
    out = relay.cli("queue", "list").stdout
    assert qid in out
