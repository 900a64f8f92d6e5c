"""Real submission clients against the real relay: swaks, msmtp, smtplib, aiosmtplib.

Each client's message must reach the sink (the recipients' MX), signed by the relay, and
pass an independent DKIM verifier (Perl's Mail::DKIM) against the test DNS server.
"""

from __future__ import annotations

import smtplib
import subprocess
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.interop.peers import have, mail_dkim_verify, perl_has
from tests.support.dnsserver import DNSServer
from tests.support.relayproc import (
    DEFAULT_PASSWORD,
    RelayProcess,
    make_message,
    submit,
)
from tests.support.sink import SMTPSink

pytestmark = pytest.mark.interop


def _swaks(relay: RelayProcess, port: int, tls: str, mech: str, subject: str) -> str:
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{port}",
            tls,
            "--auth",
            mech,
            "--auth-user",
            "alice",
            "--auth-password",
            DEFAULT_PASSWORD,
            "--from",
            "a@example.com",
            "--to",
            "b@example.org",
            "--header",
            f"Subject: {subject}",
            "--timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"swaks {tls} {mech} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.mark.skipif(have("swaks") is not None, reason="swaks is not installed")
def test_swaks_auth_plain_and_login_over_starttls_587_and_implicit_tls_465_are_delivered(
    relay: RelayProcess, sink: SMTPSink, dns_server: DNSServer
) -> None:
    relay.setup()
    relay.start()
    cases = [
        (relay.submission_port, "--tls", "PLAIN"),
        (relay.submission_port, "--tls", "LOGIN"),
        (relay.smtps_port, "--tlsc", "PLAIN"),
        (relay.smtps_port, "--tlsc", "LOGIN"),
    ]
    for port, tls, mech in cases:
        out = _swaks(relay, port, tls, mech, f"swaks {tls} {mech}")
        assert "235 2.7.0" in out, out  # AUTH succeeded with an enhanced code
        assert "queued as" in out, out
    messages = sink.wait_for(len(cases))
    subjects = sorted(m.header("Subject") or "" for m in messages)
    assert subjects == sorted(f"swaks {t} {m}" for _, t, m in cases)
    assert all(m.tls for m in messages), "relay delivered without STARTTLS to a TLS sink"
    if perl_has("Mail::DKIM::Verifier", "Net::DNS"):
        for m in messages:
            report = mail_dkim_verify(m.data, dns_server.port)
            assert "result=pass" in report, report


@pytest.mark.skipif(have("msmtp") is not None, reason="msmtp is not installed")
def test_msmtp_as_sendmail_wrapper_reads_recipients_from_headers_and_verifies_tls(
    relay: RelayProcess, sink: SMTPSink, tmp_path: Path
) -> None:
    # One envelope with the header's sender: per-recipient VERP/unsubscribe (issue 5) off.
    relay.config["reputation"] = {"verp": False, "list_unsubscribe": False}
    relay.write_config()
    relay.setup()
    relay.start()
    # What an application's sendmail wrapper does: `sendmail -t` with a system msmtprc,
    # the envelope taken from the headers, the relay certificate checked against a CA.
    conf = tmp_path / "msmtprc"
    conf.write_text(
        "defaults\n"
        "auth on\n"
        "tls on\n"
        "tls_starttls on\n"
        f"tls_trust_file {relay.ca_path}\n"
        "account default\n"
        "host 127.0.0.1\n"
        f"port {relay.submission_port}\n"
        "user alice\n"
        f"password {DEFAULT_PASSWORD}\n"
        "from a@example.com\n"
    )
    conf.chmod(0o600)
    message = (
        "From: App <a@example.com>\n"
        "To: Bob <b@example.org>\n"
        "Cc: carol@example.org\n"
        "Subject: via msmtp -t\n"
        "\n"
        "hello from a sendmail wrapper\n"
    )
    result = subprocess.run(
        ["msmtp", "-C", str(conf), "-t", "--read-envelope-from"],
        input=message,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"msmtp failed: {result.stdout}{result.stderr}"
    [msg] = sink.wait_for(1)
    assert sorted(msg.rcpt_tos) == ["b@example.org", "carol@example.org"]
    assert msg.mail_from == "a@example.com"
    assert b"hello from a sendmail wrapper\r\n" in msg.data
    assert msg.header("Message-ID"), "relay did not add a Message-ID to a message without one"


def test_smtplib_submits_over_verified_starttls_and_implicit_tls(
    relay: RelayProcess, sink: SMTPSink
) -> None:
    relay.setup()
    relay.start()
    ctx = relay.client_ssl_context(verify=True)
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.org"
    msg["Subject"] = "smtplib starttls"
    msg.set_content("hello from smtplib\n")
    with smtplib.SMTP("127.0.0.1", relay.submission_port, timeout=30) as s:
        s.starttls(context=ctx)
        s.login("alice", DEFAULT_PASSWORD)
        assert s.send_message(msg) == {}
    del msg["Subject"]
    msg["Subject"] = "smtplib implicit"
    with smtplib.SMTP_SSL("127.0.0.1", relay.smtps_port, timeout=30, context=ctx) as s:
        s.login("alice", DEFAULT_PASSWORD)
        assert s.send_message(msg) == {}
    subjects = sorted(m.header("Subject") or "" for m in sink.wait_for(2))
    assert subjects == ["smtplib implicit", "smtplib starttls"]


async def test_aiosmtplib_submits_over_verified_starttls_and_implicit_tls(
    relay: RelayProcess, sink: SMTPSink
) -> None:
    relay.setup()
    relay.start()
    ctx = relay.client_ssl_context(verify=True)
    for port, implicit in ((relay.submission_port, False), (relay.smtps_port, True)):
        refused, reply = await submit(
            port,
            sender="a@example.com",
            recipients=["b@example.org"],
            data=make_message("a@example.com", ["b@example.org"], subject=f"aio {implicit}"),
            implicit_tls=implicit,
            tls_context=ctx,
        )
        assert refused == {}
        assert reply.startswith("2.0.0 Ok: queued as"), reply
    messages = await sink.wait_for_async(2)
    assert sorted(m.header("Subject") or "" for m in messages) == ["aio False", "aio True"]
