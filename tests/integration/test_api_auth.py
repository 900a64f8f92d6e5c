"""The HTTP API against the real relay: auth, scoping, JSON errors, status, stats, webhooks."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from tests.support.relayproc import MakeRelay, RelayProcess, make_message, queue_id, submit_sync
from tests.support.sink import SMTPSink

ADMIN = "admin-key-0123456789abcdef"


def call(
    relay: RelayProcess,
    method: str,
    path: str,
    key: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(relay.http_url + path, data=data, method=method)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _setup(make_relay: MakeRelay) -> tuple[RelayProcess, str, str]:
    relay = make_relay({"api": {"admin_key": ADMIN, "max_body": 2048}})
    relay.setup()
    relay.add_account("bob", "bob-pass-123")
    alice = relay.cli("apikey", "create", "alice").stdout.split()[0]
    bob = relay.cli("apikey", "create", "bob").stdout.split()[0]
    relay.start()
    return relay, alice, bob


def test_api_refuses_missing_wrong_and_foreign_keys_with_stable_codes(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay, alice, bob = _setup(make_relay)
    qid = queue_id(
        submit_sync(
            relay.submission_port,
            sender="a@example.com",
            recipients=["b@example.org"],
            data=make_message("a@example.com", ["b@example.org"]),
        )
    )
    assert qid
    sink.wait_for(1)
    status, body = call(relay, "GET", f"/api/v1/messages/{qid}")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, body = call(relay, "GET", f"/api/v1/messages/{qid}", "rk_wrong")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, body = call(relay, "GET", f"/api/v1/messages/{qid}", bob)
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = call(relay, "GET", "/api/v1/accounts", alice)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = call(relay, "POST", "/api/v1/apikeys", alice, {"account": "alice"})
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = call(relay, "GET", "/api/v1/stats?account=alice", bob)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = call(relay, "GET", "/api/v1/nothing-here", alice)
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = call(relay, "POST", "/api/v1/webhooks", alice, raw=b"x" * 5000)
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    status, body = call(relay, "POST", "/api/v1/webhooks", alice, raw=b"{not json")
    assert (status, body["error"]["code"]) == (400, "bad_request")
    status, body = call(relay, "GET", "/api/v1/messages?from=yesterday", alice)
    assert (status, body["error"]["code"]) == (400, "bad_request")
    status, body = call(relay, "GET", "/api/v1/accounts", ADMIN)
    assert status == 200 and {a["name"] for a in body["accounts"]} == {"alice", "bob"}
    status, body = call(relay, "POST", "/api/v1/apikeys", ADMIN, {"account": "bob"})
    assert status == 201 and body["key"].startswith("rk_")


def test_status_search_and_stats_report_a_delivered_message(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay, alice, bob = _setup(make_relay)
    qids = []
    for to in ("b@example.org", "c@example.org", "d@example.org"):
        qid = queue_id(
            submit_sync(
                relay.submission_port,
                sender="a@example.com",
                recipients=[to],
                data=make_message("a@example.com", [to]),
            )
        )
        assert qid
        qids.append(qid)
    sink.wait_for(3)
    for _ in range(150):  # the sink has the mail a moment before relay records it
        status, stats = call(relay, "GET", "/api/v1/stats?domain=example.com", alice)
        if stats["total"]["delivered"] == 3:
            break
        time.sleep(0.2)
    status, msg = call(relay, "GET", f"/api/v1/messages/{qids[0]}", alice)
    assert status == 200
    (r,) = msg["recipients"]
    assert r["address"] == "b@example.org" and r["attempts"] == 1 and r["opens"] == 0
    assert r["last_reply"].startswith("250")
    assert [e["event"] for e in msg["events"]] == ["accepted", "delivered"]
    # cursor pagination, newest first
    status, page1 = call(relay, "GET", "/api/v1/messages?limit=2&sender=a@example.com", alice)
    assert [m["id"] for m in page1["messages"]] == [qids[2], qids[1]]
    cursor = page1["next_cursor"]
    status, page2 = call(relay, "GET", f"/api/v1/messages?limit=2&cursor={cursor}", alice)
    assert [m["id"] for m in page2["messages"]] == [qids[0]]
    assert page2["next_cursor"] is None
    status, found = call(relay, "GET", "/api/v1/messages?recipient=C@example.org", alice)
    assert [m["id"] for m in found["messages"]] == [qids[1]]
    status, none = call(relay, "GET", "/api/v1/messages", bob)
    assert none["messages"] == []
    status, stats = call(relay, "GET", "/api/v1/stats?domain=example.com", alice)
    assert status == 200
    assert (stats["total"]["accepted"], stats["total"]["delivered"]) == (3, 3)
    assert stats["total"]["delivery_rate"] == 1.0
    status, bobstats = call(relay, "GET", "/api/v1/stats", bob)
    assert bobstats["total"]["accepted"] == 0


def test_webhooks_are_managed_per_account_over_the_api(make_relay: MakeRelay) -> None:
    relay, alice, bob = _setup(make_relay)
    status, hook = call(
        relay,
        "POST",
        "/api/v1/webhooks",
        alice,
        {"url": "http://127.0.0.1:9/h", "events": ["delivered", "opened"]},
    )
    assert status == 201 and len(hook["secret"]) == 64 and hook["account"] == "alice"
    status, body = call(relay, "POST", "/api/v1/webhooks", alice, {"url": "ftp://x"})
    assert (status, body["error"]["code"]) == (400, "bad_request")
    status, body = call(
        relay, "POST", "/api/v1/webhooks", alice, {"url": "http://x/", "events": ["nope"]}
    )
    assert (status, body["error"]["code"]) == (400, "bad_request")
    status, listed = call(relay, "GET", "/api/v1/webhooks", bob)
    assert listed["webhooks"] == []
    status, body = call(relay, "DELETE", f"/api/v1/webhooks/{hook['id']}", bob)
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = call(relay, "DELETE", f"/api/v1/webhooks/{hook['id']}", alice)
    assert status == 200
    assert "http://127.0.0.1:9/h" not in relay.cli("webhook", "list").stdout
