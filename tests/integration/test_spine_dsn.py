"""delivery.dsn: a final failure sends an RFC 3464 report to the sender, from <>."""

from __future__ import annotations

import asyncio

from tests.support.relayproc import MakeRelay, make_message, submit
from tests.support.sink import SMTPSink


async def test_bounce_sends_a_dsn_to_the_sender_when_enabled(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay(
        {"delivery": {"dsn": True, "routes": {"example.com": f"127.0.0.1:{sink.port}"}}}
    )
    relay.setup()
    relay.start()
    sink.set_rcpt_reply("gone@example.org", "550 5.1.1 no such user")
    msg = make_message("a@example.com", ["gone@example.org"], subject="will bounce")
    await submit(
        relay.submission_port, sender="a@example.com", recipients=["gone@example.org"], data=msg
    )
    got = await sink.wait_for_async(1, timeout=30)
    dsn = got[0]
    assert dsn.mail_from in ("", "<>")  # the null reverse-path: no DSN loops
    assert dsn.rcpt_tos == ("a@example.com",)
    assert "multipart/report" in (dsn.header("Content-Type") or "")
    assert "Final-Recipient: rfc822; gone@example.org" in dsn.text
    assert "Status: 5.1.1" in dsn.text
    assert "Subject: will bounce" in dsn.text


async def test_no_dsn_by_default(make_relay: MakeRelay, sink: SMTPSink) -> None:
    relay = make_relay({"delivery": {"routes": {"example.com": f"127.0.0.1:{sink.port}"}}})
    relay.setup()
    relay.start()
    sink.set_rcpt_reply("gone@example.org", "550 5.1.1 no such user")
    msg = make_message("a@example.com", ["gone@example.org"])
    await submit(
        relay.submission_port, sender="a@example.com", recipients=["gone@example.org"], data=msg
    )
    for _ in range(80):
        out = relay.cli("queue", "list", "--status", "bounced").stdout
        if "gone@example.org" in out:
            break
        await asyncio.sleep(0.25)
    assert "gone@example.org" in out
    await asyncio.sleep(1.0)
    assert sink.messages == []
