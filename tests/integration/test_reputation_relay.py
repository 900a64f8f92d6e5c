"""The real relay end to end: hard bounce -> blocklist -> 550 at RCPT; signed RFC 8058
headers and VERP; unsubscribe by GET page + button, one-click POST and mailto on port 25;
late DSNs; suspension and resume through the CLI."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from tests.integration.test_api_auth import ADMIN, call
from tests.support.dkimcheck import dkim_verifies
from tests.support.dnsserver import DNSServer
from tests.support.relayproc import (
    MakeRelay,
    RelayProcess,
    make_message,
    submit,
)
from tests.support.sink import Received, SMTPSink

DSN_DIR = Path(__file__).parent.parent / "unit" / "dsn_samples"


def wait_until(fn: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


async def send(relay: RelayProcess, rcpts: list[str], sender: str = "a@example.com") -> Any:
    return await submit(
        relay.submission_port,
        sender=sender,
        recipients=rcpts,
        data=make_message(sender, rcpts),
    )


def blocklist(relay: RelayProcess) -> str:
    return relay.cli("blocklist", "list").stdout


@pytest.fixture
def started(make_relay: MakeRelay) -> RelayProcess:
    relay = make_relay({"listen": {"smtp": "auto"}})
    relay.setup()
    relay.start()
    return relay


async def test_user_unknown_is_blocklisted_and_refused_at_rcpt_while_others_deliver(
    started: RelayProcess, sink: SMTPSink
) -> None:
    sink.set_rcpt_reply("gone@example.org", "550 5.1.1 <gone@example.org> user unknown")
    sink.set_rcpt_reply("policy@example.org", "550 5.7.1 Client host blocked using Spamhaus")
    await send(started, ["gone@example.org", "policy@example.org", "b@example.org"])
    await asyncio.to_thread(sink.wait_for, 1)
    out = await asyncio.to_thread(
        wait_until, lambda: "gone@example.org" in blocklist(started) and blocklist(started)
    )
    assert "policy@example.org" not in out  # a reputation refusal is not the address's fault
    assert "alice" in out and "user unknown" in out

    refused, _reply = await send(started, ["gone@example.org", "c@example.org"])
    assert set(refused) == {"gone@example.org"}
    resp = refused["gone@example.org"]
    assert resp.code == 550 and resp.message.startswith("5.1.1")
    assert "relay blocklist remove gone@example.org" in resp.message
    msgs = await asyncio.to_thread(sink.wait_for, 2)
    assert msgs[-1].rcpt_tos == ("c@example.org",)

    started.cli("blocklist", "remove", "gone@example.org")
    refused, _ = await send(started, ["gone@example.org"])
    assert refused == {}
    started.cli("blocklist", "add", "x@example.org", "--days", "3", "--reason", "typo trap")
    assert "typo trap" in started.cli("blocklist", "list", "--search", "x@").stdout
    assert "x@example.org" not in started.cli("blocklist", "list", "--account", "alice").stdout


async def test_each_recipient_gets_signed_one_click_headers_and_a_verp_sender(
    started: RelayProcess, sink: SMTPSink, dns_server: DNSServer
) -> None:
    await send(started, ["r1@example.org", "r2@example.org"])
    msgs: list[Received] = await asyncio.to_thread(sink.wait_for, 2)
    links = set()
    for m in msgs:
        assert len(m.rcpt_tos) == 1  # per-recipient content: one envelope each
        assert re.fullmatch(r"bounce\+[a-z2-7]+@relay\.test", m.mail_from)
        lu = m.header("List-Unsubscribe")
        assert lu is not None
        assert re.fullmatch(
            rf"<{re.escape(started.http_url)}/u/[a-z2-7]+>,"
            r" <mailto:unsubscribe\+[a-z2-7]+@relay\.test>",
            lu,
        )
        assert m.header("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
        sig = m.header("DKIM-Signature") or ""
        assert "list-unsubscribe:list-unsubscribe-post" in sig.replace(" ", "").lower()
        assert dkim_verifies(m.data, dns_server)
        links.add(lu)
    assert len(links) == 2


async def test_message_with_its_own_list_unsubscribe_keeps_it(
    started: RelayProcess, sink: SMTPSink
) -> None:
    data = make_message(
        "a@example.com", ["b@example.org"], headers={"List-Unsubscribe": "<mailto:own@example.com>"}
    )
    await submit(
        started.submission_port, sender="a@example.com", recipients=["b@example.org"], data=data
    )
    [m] = await asyncio.to_thread(sink.wait_for, 1)
    assert m.header("List-Unsubscribe") == "<mailto:own@example.com>"
    assert m.header("List-Unsubscribe-Post") is None


async def _links(sink: SMTPSink, n: int) -> tuple[str, str]:
    msgs = await asyncio.to_thread(sink.wait_for, n)
    lu = msgs[n - 1].header("List-Unsubscribe") or ""
    url, mailto = re.findall(r"<([^>]+)>", lu)
    return url, mailto.removeprefix("mailto:")


async def test_unsubscribe_by_page_one_click_and_mailto_is_per_sender_domain(
    started: RelayProcess, sink: SMTPSink
) -> None:
    started.add_domain("other.com", "alice")
    await send(started, ["reader@example.org"])
    url, _ = await _links(sink, 1)
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            page = await resp.text()
            assert resp.status == 200 and "<button" in page and 'method="post"' in page
        assert "reader@example.org" not in started.cli("suppression", "list").stdout  # GET alone
        for _ in range(2):  # idempotent
            async with http.post(url, data={"List-Unsubscribe": "One-Click"}) as resp:
                assert resp.status == 200
        async with http.get(url[:-3] + "aaa") as resp:
            assert resp.status == 404
    out = started.cli("suppression", "list").stdout
    assert "example.com" in out and "reader@example.org" in out and "unsubscribe" in out

    refused, _ = await send(started, ["reader@example.org", "x@example.org"])
    assert set(refused) == {"reader@example.org"}
    assert refused["reader@example.org"].code == 550
    assert refused["reader@example.org"].message.startswith("5.7.1")
    assert "example.com" in refused["reader@example.org"].message
    refused, _ = await send(started, ["reader@example.org"], sender="news@other.com")
    assert refused == {}  # other sender domains still reach it

    # mailto on port 25, no AUTH
    _url, mailto = await _links(sink, 3)  # the message from news@other.com
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=started.smtp_port, start_tls=False, timeout=20
    )
    async with smtp:
        await smtp.sendmail("reader@example.org", [mailto], b"Subject: unsubscribe\r\n\r\n\r\n")
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as exc:
            await smtp.sendmail(
                "x@evil.example", ["b@example.org"], b"Subject: relay?\r\n\r\nx\r\n"
            )
        [err] = exc.value.recipients
        assert err.code == 550 and err.message.startswith("5.7.1")
    out = started.cli("suppression", "list", "--domain", "other.com").stdout
    assert "reader@example.org" in out
    started.cli("suppression", "remove", "reader@example.org", "--domain", "example.com")
    refused, _ = await send(started, ["reader@example.org"])
    assert refused == {}


async def test_late_dsn_to_the_verp_address_blocklists(
    started: RelayProcess, sink: SMTPSink
) -> None:
    await send(started, ["nobody@example.org"])
    [m] = await asyncio.to_thread(sink.wait_for, 1)
    verp = m.mail_from
    token = verp.split("+", 1)[1].split("@")[0]
    data = (DSN_DIR / "postfix.eml").read_bytes().replace(b"TOKEN", token.encode())
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=started.smtp_port, start_tls=False, timeout=20
    )
    async with smtp:
        _, reply = await smtp.sendmail("", [verp], data.replace(b"\n", b"\r\n"))
    assert "dsn report" in reply
    assert "nobody@example.org" in blocklist(started)


async def test_crossing_the_bounce_rate_suspends_and_resume_restores(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    # 0.7: outcomes are recorded per message as they come, so the rate is evaluated after
    # each bounce (25%, 50%, 75%); only the third crosses the threshold.
    relay = make_relay({"reputation": {"min_sample": 4, "bounce_threshold": 0.7}})
    relay.setup()
    relay.start()
    for addr in ("u1@example.org", "u2@example.org", "u3@example.org"):
        sink.set_rcpt_reply(addr, f"550 5.1.1 <{addr}> user unknown")
    await send(relay, ["u1@example.org", "u2@example.org", "u3@example.org", "ok@example.org"])
    await asyncio.to_thread(
        wait_until, lambda: "suspended" in relay.cli("account", "show", "alice").stdout
    )
    shown = relay.cli("account", "show", "alice").stdout
    assert "75.00%" in shown and "70.00%" in shown
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
        await send(relay, ["b@example.org"])
    assert exc.value.code == 550 and exc.value.message.startswith("5.7.1")
    assert "75.0%" in exc.value.message and "70.0%" in exc.value.message
    relay.cli("account", "resume", "alice")
    assert "active" in relay.cli("account", "show", "alice").stdout
    refused, _ = await send(relay, ["b@example.org"])
    assert refused == {}


async def test_an_operator_suspends_a_leaked_account_and_drops_its_queued_mail(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    # Leaked credentials at 3 a.m.: stop the account's mail now, drop what it queued.
    relay = make_relay({"delivery": {"retry_first": 3600, "retry_max": 3600}})
    relay.setup()
    relay.start()
    sink.set_rcpt_reply(None, "451 4.7.1 try later")  # what it sent waits, deferred
    await send(relay, ["s1@example.org", "s2@example.org"])
    await asyncio.to_thread(
        wait_until,
        lambda: relay.cli("queue", "list", "--status", "deferred").stdout.count(" deferred ") == 2,
    )
    out = relay.cli("account", "suspend", "alice", "--reason", "credentials leaked").stdout
    assert "account alice suspended" in out
    assert "credentials leaked" in relay.cli("account", "show", "alice").stdout
    held = relay.cli("queue", "list", "--status", "held").stdout
    assert held.count(" held ") == 2
    again = relay.cli("account", "suspend", "alice", check=False)
    assert again.returncode != 0 and "suspended already" in again.stderr + again.stdout

    # Every process sees the suspension within cache.CHECK_EVERY (0.5 s; the row cache's
    # TTL is 5 s): the very first MAIL FROM a second later is refused by name.
    await asyncio.sleep(1.0)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused_mail:
        await send(relay, ["s3@example.org"])
    refusal = refused_mail.value
    assert refusal.code == 550
    assert refusal.message.startswith("5.7.1") and "credentials leaked" in refusal.message

    # The two held.
    dropped = relay.cli("queue", "delete", "--account", "alice").stdout
    assert dropped.startswith("2 ") and "of account alice deleted" in dropped
    assert relay.cli("queue", "list").stdout.count("@example.org") == 0
    assert "0 held recipients queued" in relay.cli("account", "resume", "alice").stdout
    sink.clear_replies()
    refused, _ = await send(relay, ["ok@example.org"])
    assert refused == {}
    assert [m.rcpt_tos for m in sink.wait_for(1)] == [("ok@example.org",)]


async def test_the_admin_api_suspends_and_resumes_an_account_and_refuses_others(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay({"api": {"admin_key": ADMIN}})
    relay.setup()
    relay.start()
    path = "/api/v1/accounts/alice/suspend"
    status, body = call(relay, "POST", path, ADMIN, {"reason": "credentials leaked"})
    assert status == 200
    assert body == {"account": "alice", "status": "suspended", "reason": "credentials leaked"}
    assert "credentials leaked" in relay.cli("account", "show", "alice").stdout
    status, body = call(relay, "POST", path, ADMIN, {})
    assert status == 409 and "suspended already" in body["error"]["message"]
    assert call(relay, "POST", "/api/v1/accounts/nobody/suspend", ADMIN, {})[0] == 404
    assert call(relay, "POST", path, ADMIN, {"reason": 7})[0] == 400
    assert call(relay, "POST", path, "not-the-key", {})[0] == 401

    status, body = call(relay, "POST", "/api/v1/accounts/alice/resume", ADMIN)
    assert status == 200 and body == {"account": "alice", "status": "active", "released": 0}
    assert "state       active" in relay.cli("account", "show", "alice").stdout
