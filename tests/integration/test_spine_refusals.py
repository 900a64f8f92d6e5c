"""Refusals carry the exact codes, and the session stays usable after each."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from tests.support.relayproc import MakeRelay, RelayProcess, make_message, unverified_ssl_context
from tests.support.sink import SMTPSink


async def _client(port: int, *, starttls: bool = True) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        start_tls=False,
        validate_certs=False,
        tls_context=unverified_ssl_context(),
        timeout=20,
    )
    await client.connect()
    await client.ehlo()
    if starttls:
        await client.starttls()
        await client.ehlo()
    return client


@pytest.fixture
def started(relay: RelayProcess) -> RelayProcess:
    relay.setup()
    relay.start()
    return relay


async def test_ehlo_advertises_auth_only_after_tls(started: RelayProcess) -> None:
    client = await _client(started.submission_port, starttls=False)
    for ext in ("size", "8bitmime", "pipelining", "enhancedstatuscodes", "starttls"):
        assert client.supports_extension(ext), ext
    assert not client.supports_extension("auth")
    resp = await client.execute_command(b"AUTH", b"PLAIN", b"AGFsaWNlAHNlY3JldC1wYXNzLTE=")
    assert (resp.code, resp.message.split()[0]) == (530, "5.7.0")
    await client.starttls()
    await client.ehlo()
    assert client.supports_extension("auth")
    assert {"plain", "login"} <= {m.lower() for m in client.server_auth_methods}
    client.close()


async def test_mail_without_auth_is_refused_530_and_session_stays_usable(
    started: RelayProcess,
) -> None:
    client = await _client(started.submission_port)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
        await client.mail("a@example.com")
    assert exc.value.code == 530 and "5.7.0 Authentication required" in exc.value.message
    await client.login("alice", "secret-pass-1")
    resp = await client.mail("a@example.com")
    assert resp.code == 250
    await client.quit()


async def test_wrong_password_is_refused_535_then_right_one_works(started: RelayProcess) -> None:
    client = await _client(started.submission_port)
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as exc:
        await client.login("alice", "wrong")
    assert exc.value.code == 535 and exc.value.message.startswith("5.7.8")
    await client.login("alice", "secret-pass-1")
    await client.quit()


async def test_repeated_auth_failures_from_one_ip_are_throttled(started: RelayProcess) -> None:
    client = await _client(started.submission_port)
    codes = []
    for _ in range(7):
        try:
            # auth_plain, not login(): login() falls back to LOGIN after a failed PLAIN,
            # which would count two failures per call.
            await client.auth_plain("alice", "wrong")
        except aiosmtplib.SMTPAuthenticationError as exc:
            codes.append((exc.code, exc.message[:5]))
    assert codes[:5] == [(535, "5.7.8")] * 5
    assert codes[5] == (454, "4.7.0")
    # even the right password is refused while throttled: no guessing around the limit
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as exc:
        await client.auth_plain("alice", "secret-pass-1")
    assert exc.value.code == 454
    client.close()


async def test_foreign_sender_domain_is_refused_550_naming_domain_and_account(
    started: RelayProcess,
) -> None:
    client = await _client(started.submission_port)
    await client.login("alice", "secret-pass-1")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
        await client.mail("a@other.example")
    assert exc.value.code == 550
    assert exc.value.message.startswith("5.7.1")
    assert "other.example" in exc.value.message and "alice" in exc.value.message
    resp = await client.mail("a@example.com")  # still usable
    assert resp.code == 250
    await client.quit()


async def test_foreign_from_header_is_refused_at_data(started: RelayProcess) -> None:
    client = await _client(started.submission_port)
    await client.login("alice", "secret-pass-1")
    await client.mail("a@example.com")
    await client.rcpt("b@example.org")
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await client.data(make_message("boss@other.example", ["b@example.org"]))
    assert exc.value.code == 550 and "From: header domain other.example" in exc.value.message
    await client.quit()


async def test_oversized_message_is_refused_552_534(make_relay: object) -> None:
    relay = make_relay({"smtp": {"max_message_size": 10_000}})  # type: ignore[operator]
    relay.setup()
    relay.start()
    client = await _client(relay.submission_port)
    await client.login("alice", "secret-pass-1")
    # declared SIZE over the limit: refused at MAIL
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
        await client.mail("a@example.com", options=["SIZE=20000"])
    assert exc.value.code == 552 and exc.value.message.startswith("5.3.4")
    assert "10000" in exc.value.message
    # undeclared but too big: refused after DATA
    await client.mail("a@example.com")
    await client.rcpt("b@example.org")
    big = make_message("a@example.com", ["b@example.org"], body="x" * 60 + ("\n" + "y" * 70) * 300)
    with pytest.raises(aiosmtplib.SMTPDataError) as exc2:
        await client.data(big)
    assert exc2.value.code == 552 and exc2.value.message.startswith("5.3.4")
    resp = await client.noop()
    assert resp.code == 250
    await client.quit()


async def test_unauthenticated_port_25_is_no_open_relay(make_relay: object, sink: SMTPSink) -> None:
    relay = make_relay({"listen": {"smtp": "auto"}})  # type: ignore[operator]
    relay.setup()
    relay.start()
    client = await _client(relay.smtp_port)
    await client.mail("someone@elsewhere.example")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as exc:
        await client.rcpt("b@example.org")
    assert exc.value.code == 550 and exc.value.message.startswith("5.7.1")
    await client.quit()
    assert sink.messages == []


async def test_quota_used_up_between_rcpt_and_data_gets_451_4_7_1_and_queues_nothing(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    # DATA's quota check uses the usage read with the last RCPT; the accept transaction
    # counts atomically. A session that read "1 left" at RCPT, then lost it to another
    # session before DATA, must hear the quota refusal, not a storage failure.
    relay = make_relay({"limits": {"daily": 2}})
    relay.setup()
    relay.start()
    first = await _client(relay.submission_port)
    await first.login("alice", "secret-pass-1")
    await first.mail("a@example.com")
    await first.rcpt("slow@example.org")
    other = await _client(relay.submission_port)
    await other.login("alice", "secret-pass-1")
    for n in range(2):
        msg = make_message("a@example.com", [f"fast{n}@example.org"])
        await other.sendmail("a@example.com", [f"fast{n}@example.org"], msg)
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await first.data(make_message("a@example.com", ["slow@example.org"]))
    assert exc.value.code == 451
    assert exc.value.message.startswith("4.7.1 Daily quota 2 recipients per 24 h reached")
    # The next transaction is refused at DATA by the detailed check, as before.
    await first.mail("a@example.com")
    await first.rcpt("later@example.org")
    with pytest.raises(aiosmtplib.SMTPDataError) as again:
        await first.data(make_message("a@example.com", ["later@example.org"]))
    assert again.value.code == 451 and "2 of 2 recipients used" in again.value.message
    await first.quit()
    await other.quit()
    got = await sink.wait_for_async(2, timeout=30)
    await asyncio.sleep(1.0)  # would a third (refused) message still arrive?
    assert sorted(r for m in got for r in m.rcpt_tos) == ["fast0@example.org", "fast1@example.org"]
    assert len(sink.messages) == 2
