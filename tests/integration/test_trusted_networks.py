"""listen.trusted_networks end to end: the real relay, a real client, the sink as MX."""

from __future__ import annotations

import aiosmtplib
import pytest

from tests.support.relayproc import MakeRelay, make_message, queue_id, submit
from tests.support.sink import SMTPSink


async def test_client_on_trusted_network_sends_without_auth_as_the_mapped_account(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay({"listen": {"trusted_networks": {"127.0.0.0/8": "alice"}}})
    relay.setup()
    relay.start()
    msg = make_message("app@example.com", ["b@example.org"], subject="trusted")
    result = await submit(
        relay.submission_port,
        sender="app@example.com",
        recipients=["b@example.org"],
        data=msg,
        username=None,
        starttls=False,
    )
    assert queue_id(result)
    got = sink.wait_for(1)
    assert got[0].rcpt_tos == ("b@example.org",)
    assert got[0].header("Subject") == "trusted"
    relay.wait_for_log(r"account=alice .*outcome=queued")


async def test_client_outside_trusted_networks_still_needs_auth(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay({"listen": {"trusted_networks": {"127.0.0.2/32": "alice"}}})
    relay.setup()
    relay.start()
    msg = make_message("app@example.com", ["b@example.org"])
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
        await submit(
            relay.submission_port,
            sender="app@example.com",
            recipients=["b@example.org"],
            data=msg,
            username=None,
            starttls=False,
        )
    assert info.value.code == 530


async def test_trusted_session_is_still_bound_by_sender_domain_policy(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay({"listen": {"trusted_networks": {"127.0.0.0/8": "alice"}}})
    relay.setup()
    relay.start()
    msg = make_message("app@not-alices.example", ["b@example.org"])
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
        await submit(
            relay.submission_port,
            sender="app@not-alices.example",
            recipients=["b@example.org"],
            data=msg,
            username=None,
            starttls=False,
        )
    assert info.value.code // 100 == 5


async def test_trusted_client_may_still_auth_as_another_account(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay({"listen": {"trusted_networks": {"127.0.0.0/8": "nobody-yet"}}})
    relay.setup()  # alice with example.com; the trusted account does not exist
    relay.start()
    msg = make_message("a@example.com", ["b@example.org"], subject="authed")
    result = await submit(
        relay.submission_port,
        sender="a@example.com",
        recipients=["b@example.org"],
        data=msg,
    )
    assert queue_id(result)
    assert sink.wait_for(1)[0].header("Subject") == "authed"
