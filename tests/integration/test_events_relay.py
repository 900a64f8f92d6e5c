"""Events end to end with the real relay process: webhooks, restarts, open tracking."""

from __future__ import annotations

import email
import re
import urllib.request
from collections import Counter
from typing import Any

import aiosmtplib
import pytest

from relay.events.webhooks import verify
from tests.support.hooks import HookReceiver
from tests.support.relayproc import MakeRelay, RelayProcess, make_message, queue_id, submit_sync
from tests.support.sink import SMTPSink

FAST: dict[str, Any] = {
    "webhooks": {"retry_first": 0.2, "retry_max": 0.5, "poll_interval": 0.1, "timeout": 5},
    "tracking": {"bot_window": 0},
}


def _secret(relay: RelayProcess, url: str) -> str:
    out = relay.cli("webhook", "set", "--account", "alice", url).stdout
    m = re.search(r"secret: ([0-9a-f]{64})", out)
    assert m, out
    return m.group(1)


def _send(relay: RelayProcess, to: str, sender: str = "a@example.com", **kw: Any) -> str:
    qid = queue_id(
        submit_sync(
            relay.submission_port,
            sender=sender,
            recipients=[to],
            data=make_message(sender, [to], **kw),
        )
    )
    assert qid
    return qid


def test_webhook_gets_scripted_scenario_signed_and_in_message_order(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay(FAST)
    relay.setup()
    with HookReceiver() as hooks:
        secret = _secret(relay, hooks.url)
        relay.start()
        sink.set_rcpt_reply("gone@example.org", "550 5.1.1 no such user")
        ok = _send(relay, "b@example.org")
        bad = _send(relay, "gone@example.org")
        # unverified sender domain: refused at MAIL
        with pytest.raises(aiosmtplib.SMTPSenderRefused):
            _send(relay, "c@example.org", sender="x@unverified.test")
        evs = hooks.wait_for(
            lambda e: {x["event"] for x in e} >= {"delivered", "bounced", "rejected"}
        )
        for h in hooks.received:
            assert verify(secret, h.headers["X-Relay-Signature"], h.body)
            assert h.headers["X-Relay-Timestamp"] == h.headers["X-Relay-Signature"][2:12]
        by_msg = {m: [x["event"] for x in evs if x["message_id"] == m] for m in (ok, bad)}
        assert by_msg[ok] == ["accepted", "delivered"]
        # a hard bounce may be followed by `blocklisted` (reputation), never preceded
        assert by_msg[bad][:2] == ["accepted", "bounced"]
        (rejected,) = [x for x in evs if x["event"] == "rejected"]
        assert rejected["data"]["reply"].startswith("5") and rejected["message_id"] is None
        bounced = next(x for x in evs if x["event"] == "bounced")
        assert bounced["data"]["bounce_type"] == "hard" and bounced["data"]["code"] == 550
        delivered = next(x for x in evs if x["event"] == "delivered")
        assert delivered["data"]["mx"] and delivered["data"]["reply"].startswith("250")


def test_receiver_down_then_relay_restarted_still_delivers_each_event_once(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay(FAST)
    relay.setup()
    hooks = HookReceiver()  # not started: connection refused
    _secret(relay, hooks.url)
    relay.start()
    qid = _send(relay, "b@example.org")
    sink.wait_for(1)
    deadline_log = ""
    for _ in range(100):
        deadline_log = relay.cli("webhook", "log", "--failures").stdout
        if "pending" in deadline_log:
            break
    assert "pending" in deadline_log and "Error" in deadline_log, deadline_log
    relay.restart()
    with hooks:
        evs = hooks.wait_for(lambda e: any(x["event"] == "delivered" for x in e))
    counts = Counter((x["id"], x["event"]) for x in evs)
    assert [k[1] for k in sorted(counts)] == ["accepted", "delivered"]
    assert set(counts.values()) == {1}
    assert all(x["message_id"] == qid for x in evs)
    assert "done" in relay.cli("webhook", "log").stdout


def _pixel_url(data: bytes) -> str | None:
    msg = email.message_from_bytes(data)
    for part in msg.walk():
        if part.get_content_type() == "text/html":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            m = re.search(r'<img src="([^"]+/t/o/[^"]+\.gif)"', payload.decode())
            return m.group(1) if m else None
    return None


def test_pixel_is_in_html_mail_only_and_an_open_counts_once(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay(FAST)
    relay.setup()
    relay.start()
    html_qid = _send(relay, "b@example.org", html="<html><body><p>Hi</p></body></html>")
    _send(relay, "c@example.org")
    got = sink.wait_for(2)
    by_rcpt = {m.rcpt_tos[0]: m for m in got}
    assert _pixel_url(by_rcpt["c@example.org"].data) is None
    assert "/t/o/" not in by_rcpt["c@example.org"].text
    url = _pixel_url(by_rcpt["b@example.org"].data)
    assert url and url.startswith(relay.http_url)
    assert "DKIM-Signature" in by_rcpt["b@example.org"].text
    for _ in range(3):
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.headers["Content-Type"] == "image/gif"
            assert resp.read().startswith(b"GIF89a")
    # a forged token still gets the image but records nothing
    with urllib.request.urlopen(url.replace("/t/o/", "/t/o/x"), timeout=10) as resp:
        assert resp.status == 200
    status = relay.cli("status", html_qid).stdout
    assert status.count("opened") == 3, status
    stats = relay.cli("stats", "--json").stdout
    import json

    (today,) = json.loads(stats)
    assert today["opened"] == 1 and today["delivered"] == 2 and today["open_rate"] == 0.5
