"""RFC 8460 in a running relay: delivery counts its sessions' TLS against real sinks
(verified, unverifiable, no STARTTLS), and the day's reports reach the domains that ask
for them: POSTed to an HTTPS receiver on loopback and mailed, DKIM-signed, through
relay's own queue to the sink."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.config import (
    Config,
    DeliveryConfig,
    DNSConfig,
    TLSReportsConfig,
    load_config,
    parse_hostport,
)
from relay.delivery.mx import make_resolver
from relay.delivery.tlsreports import FLUSH_EVERY, RETRY_FIRST, RETRY_MAX, TlsReporter
from relay.delivery.tlsrpt import Result, Tally, TlsAttempt
from relay.queue.rollup import DAY
from relay.queue.store import Store
from tests.integration.test_delivery_mtasts import PolicyServer, policy_text
from tests.integration.test_operations_metrics import scrape, value
from tests.support.dkimcheck import dkim_verifies
from tests.support.dnsserver import DNSServer
from tests.support.net import free_port
from tests.support.relayproc import MakeRelay, RelayProcess, send_one, wait_status
from tests.support.sink import SMTPSink

REPORTS_HOST = "tlsrpt.reports.example"


class ReportReceiver:
    """An HTTPS endpoint that keeps every POST (RFC 8460 §5.4)."""

    def __init__(self, ca: trustme.CA) -> None:
        self.posts: list[tuple[str, str, bytes]] = []  # path, content type, body
        self.statuses: list[int] = []  # answers to the next POSTs; then 201
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(REPORTS_HOST).configure_cert(ctx)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.posts.append((self.path, self.headers.get("Content-Type", ""), body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def world(
    make_relay: MakeRelay,
    sink: SMTPSink,
    dns_server: DNSServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RelayProcess, SMTPSink, SMTPSink, ReportReceiver]]:
    """good.example: enforce, an MX with a trusted certificate; testing.example: testing,
    its MX (the default sink) with a certificate relay cannot verify; plain.example: no
    policy, an MX without STARTTLS. Each asks for reports by HTTPS and by mail."""
    ca = trustme.CA()
    good = SMTPSink(hostname="mx.good.example", host="127.0.0.6", port=sink.port, ca=ca).start()
    plain = SMTPSink(tls=False, hostname="mx.plain.example", host="127.0.0.7", port=sink.port)
    plain.start()
    policies = PolicyServer(
        ca,
        {
            "good.example": policy_text("enforce", "*.good.example"),
            "testing.example": policy_text("testing", "mx.testing.example"),
            "unlisted.example": policy_text("enforce", "mx.elsewhere.example"),
            "invalid.example": "version: STSv2\nmode: enforce\n",
            "broken.example": "",  # in the certificate; its policy is gone below (404)
            # webpki.example: a TXT record, but the policy host's certificate is not
            # for its name.
        },
    )
    del policies.policies["broken.example"]
    receiver = ReportReceiver(ca)
    mx_of = {
        "good.example": ("mx.good.example", "127.0.0.6"),
        "testing.example": ("mx.testing.example", "127.0.0.1"),
        "plain.example": ("mx.plain.example", "127.0.0.7"),
        "unlisted.example": ("mx.good.example", "127.0.0.6"),
        "broken.example": ("mx.broken.example", "127.0.0.1"),
        "invalid.example": ("mx.invalid.example", "127.0.0.1"),
        "webpki.example": ("mx.webpki.example", "127.0.0.1"),
    }
    for domain, (mx, ip) in mx_of.items():
        dns_server.add(domain, "MX", f"10 {mx}.")
        dns_server.add(mx, "A", ip)
        if domain != "plain.example":
            dns_server.add(f"_mta-sts.{domain}", "TXT", '"v=STSv1; id=1"')
            dns_server.add(f"mta-sts.{domain}", "A", "127.0.0.1")
        rua = f"https://{REPORTS_HOST}:{receiver.port}/v1/{domain},mailto:tls@example.org"
        # Two strings of one record: §3 joins them without a space.
        dns_server.add(f"_smtp._tls.{domain}", "TXT", f'"v=TLSRPTv1; " "rua={rua}"')
    dns_server.add(REPORTS_HOST, "A", "127.0.0.1")
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    relay = make_relay(
        {
            "delivery": {"mta_sts_port": policies.port, "tls_ca_file": str(ca_file)},
            "tls_reports": {
                "enabled": True,
                "sender": "tlsrpt@example.com",
                "account": "alice",
                "organization": "relay test",
            },
        }
    )
    relay.setup()
    relay.start()
    try:
        yield relay, good, plain, receiver
    finally:
        receiver.close()
        policies.close()
        plain.stop()
        good.stop()


async def _report_tomorrow(relay: RelayProcess) -> list[Any]:
    """The reporter of relay's config and database, a day later than now."""
    cfg = load_config(relay.config_path)
    store = Store.open(cfg.database)
    resolver = make_resolver(cfg.dns)
    later = time.time() + DAY + cfg.tls_reports.send_after + 1
    reporter = TlsReporter(store, lambda: cfg, Tally(), lambda: resolver, clock=lambda: later)
    try:
        return await reporter.tick()
    finally:
        await reporter.close()
        await store.close()


async def test_the_days_tls_sessions_are_reported_by_https_and_by_signed_mail(
    world: tuple[RelayProcess, SMTPSink, SMTPSink, ReportReceiver],
    sink: SMTPSink,
    dns_server: DNSServer,
) -> None:
    relay, good, plain, receiver = world
    sent = [
        await send_one(relay, "a@good.example"),
        await send_one(relay, "b@testing.example"),
        await send_one(relay, "c@plain.example"),
    ]
    for qid in sent:
        wait_status(relay, qid, "delivered")
    # The policy lists none of its MX hosts: deferred, and reported as such.
    wait_status(relay, await send_one(relay, "d@unlisted.example"), "deferred")
    # A policy that cannot be fetched, or is not valid: delivered with opportunistic TLS
    # (RFC 8461 §5), and reported as what kept the policy from being applied.
    for rcpt in ("e@broken.example", "f@invalid.example", "g@webpki.example"):
        wait_status(relay, await send_one(relay, rcpt), "delivered")
    assert good.messages[0].tls and not plain.messages[0].tls
    # testing mode: the certificate was checked (and failed), the mail went anyway.
    assert ("b@testing.example",) in [m.rcpt_tos for m in sink.messages]
    metrics = scrape(f"{relay.http_url}/metrics")
    assert value(metrics, "relay_delivery_tls_sessions_total", result="success") >= 2
    assert value(metrics, "relay_delivery_tls_sessions_total", result="starttls-not-supported") == 1
    assert (
        value(metrics, "relay_delivery_tls_sessions_total", result="certificate-not-trusted") == 1
    )

    relay.stop()  # the counts in memory are stored on the way out
    shown = relay.cli("tls-report", "show").stdout
    assert "good.example  sts (enforce)  successful 1  failed 0" in shown
    assert "testing.example  sts (testing)  successful 1  failed 1" in shown
    assert "certificate-not-trusted  mx.testing.example [127.0.0.1]" in shown
    assert "plain.example  no-policy-found  successful 0  failed 1" in shown
    # (failed at each retry: the test relay retries after a second)
    assert "unlisted.example  sts (enforce)  successful 0  failed " in shown
    assert "validation-failure  mx.good.example  from -: " in shown
    assert "broken.example  sts  successful 0  failed 1" in shown
    assert "sts-policy-fetch-error  mx.broken.example [127.0.0.1]" in shown
    assert "answered HTTP 404" in shown
    assert "sts-policy-invalid  mx.invalid.example [127.0.0.1]" in shown
    assert "sts-webpki-invalid  mx.webpki.example [127.0.0.1]" in shown
    checked = relay.cli("tls-report", "check", "good.example").stdout.split()
    assert checked == [
        f"https://{REPORTS_HOST}:{receiver.port}/v1/good.example",
        "mailto:tls@example.org",
    ]

    results = await _report_tomorrow(relay)
    assert sorted((r.domain, r.uri.split(":")[0], r.outcome) for r in results) == [
        ("broken.example", "https", "sent"),
        ("broken.example", "mailto", "queued"),
        ("good.example", "https", "sent"),
        ("good.example", "mailto", "queued"),
        ("invalid.example", "https", "sent"),
        ("invalid.example", "mailto", "queued"),
        ("plain.example", "https", "sent"),
        ("plain.example", "mailto", "queued"),
        ("testing.example", "https", "sent"),
        ("testing.example", "mailto", "queued"),
        ("unlisted.example", "https", "sent"),
        ("unlisted.example", "mailto", "queued"),
        ("webpki.example", "https", "sent"),
        ("webpki.example", "mailto", "queued"),
    ]
    assert await _report_tomorrow(relay) == []  # the day is reported once
    assert "no sessions counted" in relay.cli("tls-report", "show").stdout

    posted = {
        path: (ctype, json.loads(gzip.decompress(body))) for path, ctype, body in receiver.posts
    }
    ctype, report = posted["/v1/testing.example"]
    assert ctype == "application/tlsrpt+gzip"
    assert report["organization-name"] == "relay test"
    assert report["contact-info"] == "tlsrpt@example.com"
    (policy,) = report["policies"]
    assert policy["policy"]["policy-type"] == "sts"
    assert policy["policy"]["mx-host"] == ["mx.testing.example"]
    assert "mode: testing" in policy["policy"]["policy-string"]
    assert policy["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 1,
    }
    (failure,) = policy["failure-details"]
    assert failure["result-type"] == "certificate-not-trusted"
    assert failure["receiving-mx-hostname"] == "mx.testing.example"
    assert failure["receiving-ip"] == "127.0.0.1"
    assert failure["sending-mta-ip"] == "127.0.0.1"
    assert failure["failed-session-count"] == 1
    (plain_policy,) = posted["/v1/plain.example"][1]["policies"]
    assert plain_policy["policy"] == {
        "policy-type": "no-policy-found",
        "policy-domain": "plain.example",
    }
    assert plain_policy["failure-details"][0]["result-type"] == "starttls-not-supported"
    (broken,) = posted["/v1/broken.example"][1]["policies"]
    assert broken["policy"] == {"policy-type": "sts", "policy-domain": "broken.example"}
    (fetch_error,) = broken["failure-details"]
    assert fetch_error["result-type"] == "sts-policy-fetch-error"
    assert "answered HTTP 404" in fetch_error["failure-reason-code"]

    # The mailed reports go out through relay's queue, signed with example.com's key.
    sink.clear_replies()
    relay.start()
    mails = [m for m in sink.wait_for(11) if m.rcpt_tos == ("tls@example.org",)]
    assert len(mails) == 7
    by_domain = {m.header("TLS-Report-Domain"): m for m in mails}
    mail = by_domain["testing.example"]
    assert mail.header("TLS-Report-Submitter") == "example.com"
    assert mail.header(
        "Subject",
    ).startswith("Report Domain: testing.example Submitter: example.com")
    assert dkim_verifies(mail.data, dns_server)
    msg = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    attached = [p for p in msg.iter_parts() if p.get_content_type() == "application/tlsrpt+gzip"]
    mailed = json.loads(gzip.decompress(attached[0].get_content()))
    assert mailed["policies"] == report["policies"]


async def test_a_failed_post_is_retried_with_backoff_until_it_is_taken(
    stores: tuple[Store, Store], dns_server: DNSServer, tmp_path: Path
) -> None:
    # §5.5: "a sender SHOULD attempt redelivery for up to 24 hours", with backoff.
    store, _cli = stores
    ca = trustme.CA()
    receiver = ReportReceiver(ca)
    receiver.statuses = [503, 500]
    rua = f"https://{REPORTS_HOST}:{receiver.port}/r"
    dns_server.add("_smtp._tls.x.example", "TXT", f'"v=TLSRPTv1; rua={rua}"')
    dns_server.add(REPORTS_HOST, "A", "127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cfg = Config(
        hostname="relay.test",
        dns=DNSConfig((parse_hostport(dns_server.nameserver),)),
        delivery=DeliveryConfig(tls_ca_file=str(ca_file)),
        tls_reports=TLSReportsConfig(enabled=True),
    )
    resolver = make_resolver(cfg.dns)
    now = [20_000 * DAY + 3600.0]
    tally = Tally(clock=lambda: now[0])
    tally.recorder("x.example", None)(TlsAttempt(Result.SUCCESS, "mx.x.example"))
    reporter = TlsReporter(store, lambda: cfg, tally, lambda: resolver, clock=lambda: now[0])
    try:
        assert await reporter.tick() == []  # counts stored; the day has not ended
        now[0] += DAY
        assert [s.outcome for s in await reporter.tick()] == ["failed"]  # 503
        now[0] += FLUSH_EVERY
        await reporter.tick()
        assert len(receiver.posts) == 1  # not due yet
        now[0] += RETRY_FIRST
        await reporter.tick()  # 500: the next wait doubles
        now[0] += RETRY_FIRST
        await reporter.tick()
        assert len(receiver.posts) == 2
        now[0] += RETRY_FIRST
        await reporter.tick()  # 201
        now[0] += RETRY_MAX * 4
        await reporter.tick()
        assert len(receiver.posts) == 3  # taken: no more tries, and the day is not resent
        bodies = {gzip.decompress(body) for _path, _ctype, body in receiver.posts}
        assert len(bodies) == 1
    finally:
        await reporter.close()
        receiver.close()
