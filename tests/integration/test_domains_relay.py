"""Sender domains end to end: the real relay (CLI and server), the DNS fixture, the sink."""

from __future__ import annotations

import re
import time

import aiosmtplib
import dkim
import dns.resolver
import pytest

from tests.support.dkimcheck import dkim_verifies
from tests.support.dnsserver import DNSServer
from tests.support.relayproc import RelayProcess, make_message, submit
from tests.support.sink import SMTPSink

DOMAIN = "news.example.net"


def status_of(relay: RelayProcess, name: str) -> str:
    for line in relay.cli("domain", "list").stdout.splitlines():
        if line.split() and line.split()[0] == name:
            return line.split()[2]
    raise AssertionError(f"{name} not in `domain list`")


def wait_status(relay: RelayProcess, name: str, want: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if status_of(relay, name) == want:
            return
        time.sleep(0.3)
    raise AssertionError(f"{name} did not become {want}: {status_of(relay, name)}")


async def send(relay: RelayProcess, sender: str) -> None:
    await submit(
        relay.submission_port,
        sender=sender,
        recipients=["b@example.org"],
        data=make_message(sender, ["b@example.org"]),
    )


async def test_domain_is_refused_until_verified_then_a_recheck_fails_it_and_restores_it(
    make_relay: object, dns_server: DNSServer, sink: SMTPSink
) -> None:
    relay: RelayProcess = make_relay(  # type: ignore[operator]
        {"domains": {"recheck_interval": 1}, "dns": {"timeout": 1}}
    )
    relay.setup()
    relay.cli("domain", "add", DOMAIN, "--account", "alice", "--no-warmup")
    relay.start()
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await send(relay, f"a@{DOMAIN}")
    assert refused.value.code == 550 and "not verified" in refused.value.message

    assert relay.publish_dns(DOMAIN)
    out = relay.cli("domain", "verify", DOMAIN).stdout
    assert f"{DOMAIN}: pending -> verified" in out
    await send(relay, f"a@{DOMAIN}")
    (received,) = sink.wait_for(1)
    assert dkim_verifies(received.data, dns_server)

    # The DKIM record disappears: the server's periodic re-check fails the domain, and
    # MAIL FROM names the broken record.
    dns_server.remove(f"relay._domainkey.{DOMAIN}")
    wait_status(relay, DOMAIN, "failed")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await send(relay, f"a@{DOMAIN}")
    assert refused.value.code == 550
    assert "5.7.1" in refused.value.message or "failed its DNS check" in refused.value.message
    assert "DKIM (selector relay) record relay._domainkey.news.example.net" in (
        refused.value.message
    )
    assert "NXDOMAIN" in refused.value.message

    relay.publish_dns(DOMAIN)
    wait_status(relay, DOMAIN, "verified")
    await send(relay, f"a@{DOMAIN}")
    sink.wait_for(2)


async def test_rotated_key_signs_only_after_its_record_verifies_and_dkimpy_accepts_it(
    relay: RelayProcess, dns_server: DNSServer, sink: SMTPSink
) -> None:
    relay.setup()  # example.com, verified, records published
    out = relay.cli("domain", "rotate-key", "example.com").stdout
    selector = re.search(r"selector (\S+)", out)
    assert selector is not None
    new = selector.group(1)
    records = relay.domain_records("example.com") or ""
    assert "relay._domainkey.example.com." in records
    assert f"{new}._domainkey.example.com." in records

    # Not yet published: verify keeps the old selector.
    relay.cli("domain", "verify", "example.com", check=False)
    table = relay.cli("domain", "records", "example.com").stdout
    assert "pending" in table and "relay._domainkey" in table

    relay.publish_dns("example.com")
    out = relay.cli("domain", "verify", "example.com").stdout
    assert f"now signing with selector {new}" in out
    relay.start()
    await send(relay, "a@example.com")
    (received,) = sink.wait_for(1)
    assert f"s={new};" in (received.header("DKIM-Signature") or "").replace(" ", "")
    assert dkim_verifies(received.data, dns_server)


def test_records_table_shows_host_records_and_verify_reports_each_problem(
    relay: RelayProcess, dns_server: DNSServer
) -> None:
    relay.setup(domain=None)
    relay.cli("domain", "add", "abc.example.net", "--account", "alice")
    table = relay.cli("domain", "records", "abc.example.net").stdout
    assert re.search(r"relay\._domainkey\.abc\s", table)
    assert re.search(r"_dmarc\.abc\s", table)
    assert re.search(r"MX\s+abc\s", table)
    bind = relay.domain_records("abc.example.net") or ""
    assert 'IN TXT "v=DKIM1; k=rsa; p=' in bind and '" "' in bind  # split at 255 bytes
    result = relay.cli("domain", "verify", "abc.example.net", check=False)
    assert result.returncode == 1
    assert "NXDOMAIN" in result.stdout and "FAIL" in result.stdout
    assert status_of(relay, "abc.example.net") == "failed"


def test_remove_refuses_queued_mail_and_force_deletes_it(
    relay: RelayProcess, sink: SMTPSink
) -> None:
    relay.setup()
    sink.set_mail_reply("451 4.3.0 try later")  # keep the message queued
    relay.start()
    import asyncio

    asyncio.run(send(relay, "a@example.com"))
    refused = relay.cli("domain", "remove", "example.com", check=False)
    assert refused.returncode != 0 and "still queued" in refused.stderr
    out = relay.cli("domain", "remove", "example.com", "--force").stdout
    assert "1 queued message" in out


async def test_dual_signed_mail_carries_rsa_and_ed25519_signatures_that_both_verify(
    relay: RelayProcess, dns_server: DNSServer, sink: SMTPSink
) -> None:
    relay.setup(domain=None)
    relay.cli("domain", "add", DOMAIN, "--account", "alice", "--algorithm", "both", "--no-warmup")
    relay.publish_dns(DOMAIN)
    assert "pending -> verified" in relay.cli("domain", "verify", DOMAIN).stdout
    relay.start()
    await send(relay, f"a@{DOMAIN}")
    (received,) = sink.wait_for(1)
    sigs = [
        " ".join(line.split())
        for line in received.text.replace("\r\n ", " ").replace("\r\n\t", " ").split("\r\n")
        if line.lower().startswith("dkim-signature:")
    ]
    assert len(sigs) == 2
    assert any("a=ed25519-sha256" in s for s in sigs) and any("a=rsa-sha256" in s for s in sigs)
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_server.port

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    checker = dkim.DKIM(received.data)
    assert checker.verify(idx=0, dnsfunc=dnsfunc) and checker.verify(idx=1, dnsfunc=dnsfunc)
