"""Webhook signatures: what relay sends is what a receiver following docs/events.md accepts."""

from __future__ import annotations

import hashlib
import hmac
import json

from relay.events.emit import bounce_type, event_body, event_json, parse_time
from relay.events.webhooks import sign, verify
from relay.queue.store import EventView


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"event":"delivered"}'
    header = sign("s3cret", 1700000000, body)
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"


def test_receiver_accepts_a_fresh_signature_and_refuses_tampering() -> None:
    body = b'{"id":1}'
    header = sign("k", 1000, body)
    assert verify("k", header, body, now=1000)
    assert not verify("k", header, body + b" ", now=1000)
    assert not verify("other", header, body, now=1000)
    assert not verify("k", header.replace("t=1000", "t=1001"), body, now=1000)


def test_receiver_refuses_a_replayed_old_signature() -> None:
    body = b"{}"
    assert not verify("k", sign("k", 1000, body), body, now=1000 + 301)
    assert not verify("k", "garbage", body, now=1000)


def test_docs_example_verifier_accepts_relay_signature() -> None:
    # The ten-line receiver of docs/events.md, run as written.
    from pathlib import Path

    text = Path(__file__).resolve().parents[2].joinpath("docs/events.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    ns: dict[str, object] = {}
    exec(code, ns)
    body = b'{"event":"opened"}'
    import time

    t = int(time.time())
    assert ns["verify"]("sec", sign("sec", t, body), body) is True  # type: ignore[operator]
    assert ns["verify"]("sec", sign("bad", t, body), body) is False  # type: ignore[operator]


def _ev(kind: str, data: dict[str, object]) -> EventView:
    return EventView(7, 1700000000.5, kind, 1, "Q1", "b@example.org", data, "n1")


def test_event_json_has_the_common_envelope() -> None:
    out = event_json(_ev("delivered", {"reply": "250 ok", "mx": "mx.example.org"}), "alice")
    assert out["id"] == 7 and out["event"] == "delivered" and out["account"] == "alice"
    assert out["time"] == "2023-11-14T22:13:20.500Z"
    assert out["message_id"] == "Q1" and out["recipient"] == "b@example.org"
    assert out["data"]["mx"] == "mx.example.org"
    assert json.loads(event_body(_ev("delivered", {}), "alice"))["event"] == "delivered"


def test_bounce_is_hard_for_5xx_and_soft_otherwise() -> None:
    assert bounce_type({"code": 550}) == "hard"
    assert bounce_type({"code": 452}) == "soft"
    assert bounce_type({"reply": "550 5.1.1 no such user"}) == "hard"
    assert event_json(_ev("bounced", {"code": 550}), None)["data"]["bounce_type"] == "hard"


def test_parse_time_takes_days_iso_and_epoch() -> None:
    assert parse_time("2023-11-14") == 1699920000.0
    assert parse_time("2023-11-14", end=True) == 1699920000.0 + 86400
    assert parse_time("2023-11-14T00:00:10Z") == 1699920010.0
    assert parse_time("12.5") == 12.5
    try:
        parse_time("yesterday")
    except ValueError as exc:
        assert "YYYY-MM-DD" in str(exc)
    else:
        raise AssertionError("parse_time accepted 'yesterday'")
