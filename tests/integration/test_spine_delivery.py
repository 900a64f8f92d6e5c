"""The spine end to end: submit over 587/465 -> relay -> MX found via DNS, with DKIM."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.support.dkimcheck import dkim_verifies
from tests.support.dnsserver import DNSServer
from tests.support.relayproc import MakeRelay, RelayProcess, make_message, queue_id, submit
from tests.support.sink import SMTPSink


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["587-starttls", "465-implicit"])
async def test_submitted_message_arrives_once_signed_with_received_header(
    relay: RelayProcess, sink: SMTPSink, dns_server: DNSServer, implicit_tls: bool
) -> None:
    relay.setup()
    relay.start()
    port = relay.smtps_port if implicit_tls else relay.submission_port
    msg = make_message("a@example.com", ["b@example.org"], subject="spine")
    result = await submit(
        port,
        sender="a@example.com",
        recipients=["b@example.org"],
        data=msg,
        implicit_tls=implicit_tls,
    )
    assert result[0] == {}
    assert queue_id(result)
    got = sink.wait_for(1)
    assert len(got) == 1
    m = got[0]
    assert m.tls, "delivery should use STARTTLS when the MX offers it"
    assert m.rcpt_tos == ("b@example.org",)
    # VERP (issue 5): the envelope sender names this message and recipient for late bounces.
    assert re.fullmatch(r"bounce\+[a-z2-7]+@relay\.test", m.mail_from), m.mail_from
    assert m.header("Received") and "relay.test" in (m.header("Received") or "")
    assert m.header("DKIM-Signature") and "d=example.com" in (m.header("DKIM-Signature") or "")
    assert dkim_verifies(m.data, dns_server)


async def test_message_id_and_date_are_added_when_missing(
    relay: RelayProcess, sink: SMTPSink
) -> None:
    relay.setup()
    relay.start()
    msg = make_message("a@example.com", ["b@example.org"], message_id=False, date=False)
    result = await submit(
        relay.submission_port, sender="a@example.com", recipients=["b@example.org"], data=msg
    )
    qid = queue_id(result)
    m = sink.wait_for(1)[0]
    assert m.header("Message-ID") == f"<{qid}@relay.test>"
    assert m.header("Date")


async def test_recipients_at_one_domain_share_one_transaction(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    # Per-recipient rendering (VERP, unsubscribe tokens) splits envelopes: off here.
    relay = make_relay({"reputation": {"verp": False, "list_unsubscribe": False}})
    relay.setup()
    relay.start()
    rcpts = ["b@example.org", "c@example.org", "d@example.org"]
    msg = make_message("a@example.com", rcpts)
    await submit(relay.submission_port, sender="a@example.com", recipients=rcpts, data=msg)
    got = sink.wait_for(1)
    assert sorted(got[0].rcpt_tos) == rcpts


async def test_mail_accepted_within_claim_delay_goes_out_in_one_session(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    # Sessions are not kept between batches here, so one client port at the sink means
    # the four messages were claimed together (delivery.claim_delay). With 0 they go
    # out in several sessions.
    relay = make_relay({"delivery": {"claim_delay": 2.0, "connection_cache_time": 0}})
    relay.setup()
    relay.start()
    for i in range(4):
        rcpt = f"r{i}@example.org"
        msg = make_message("a@example.com", [rcpt], subject=f"burst {i}")
        await submit(relay.submission_port, sender="a@example.com", recipients=[rcpt], data=msg)
    got = sink.wait_for(4)
    assert sorted(r for m in got for r in m.rcpt_tos) == [f"r{i}@example.org" for i in range(4)]
    assert len({m.peer for m in got}) == 1, [m.peer for m in got]


async def test_messages_larger_than_the_prepare_ahead_go_out_whole_and_signed_in_one_session(
    make_relay: MakeRelay, sink: SMTPSink, dns_server: DNSServer
) -> None:
    # Each ~660 KB message is a prepare-ahead chunk of its own (worker.PREPARE_AHEAD_BYTES
    # is 512 KB): the session takes them one by one as the next is signed, and every one
    # arrives whole, once, with a valid signature.
    # The claim waits 6 s after the first accept, so that all four (2.6 MB, submitted at
    # once) are claimed together even on a machine busy with other tests (2 s was not).
    relay = make_relay({"delivery": {"claim_delay": 6.0, "connection_cache_time": 0}})
    relay.setup()
    relay.start()
    line = "0123456789abcdef" * 4 + "\n"

    async def one(i: int) -> None:
        rcpt = f"big{i}@example.org"
        msg = make_message("a@example.com", [rcpt], subject=f"big {i}", body=line * 10000)
        await submit(relay.submission_port, sender="a@example.com", recipients=[rcpt], data=msg)

    await asyncio.gather(*(one(i) for i in range(4)))
    got = sink.wait_for(4)
    assert sorted(r for m in got for r in m.rcpt_tos) == [f"big{i}@example.org" for i in range(4)]
    assert len({m.peer for m in got}) == 1, [m.peer for m in got]
    for m in got:
        assert len(m.data) > 600_000 and m.text.count("0123456789abcdef") == 10000 * 4
        assert dkim_verifies(m.data, dns_server)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_relay_serves_starttls_and_delivers_on_either_event_loop(
    make_relay: MakeRelay, sink: SMTPSink, loop: str
) -> None:
    relay = make_relay({"event_loop": loop})
    relay.setup()
    relay.start()
    relay.wait_for_log(rf"relay started .*loop={loop}\b")
    msg = make_message("a@example.com", ["loop@example.org"], subject=f"on {loop}")
    result = await submit(
        relay.submission_port, sender="a@example.com", recipients=["loop@example.org"], data=msg
    )
    assert queue_id(result)
    (got,) = sink.wait_for(1)
    assert got.tls and got.rcpt_tos == ("loop@example.org",)


async def test_status_reports_delivered_with_mx_and_tls(
    relay: RelayProcess, sink: SMTPSink
) -> None:
    relay.setup()
    relay.start()
    msg = make_message("a@example.com", ["b@example.org"])
    result = await submit(
        relay.submission_port, sender="a@example.com", recipients=["b@example.org"], data=msg
    )
    qid = queue_id(result)
    assert qid
    sink.wait_for(1)
    out = ""
    for _ in range(50):
        out = relay.cli("status", qid).stdout
        if "delivered" in out.split("events:")[0]:
            break
        await asyncio.sleep(0.2)
    assert "b@example.org" in out and "delivered" in out
    assert "mx.example.org" in out and "tls=True" in out
