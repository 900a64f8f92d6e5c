"""MTA-STS in a running relay: policies fetched over HTTPS from a server on loopback,
found through the test DNS server, enforced against TLS sinks with real certificates."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trustme

from tests.integration.test_operations_metrics import scrape, value
from tests.support.dnsserver import DNSServer
from tests.support.net import free_port
from tests.support.relayproc import (
    MakeRelay,
    RelayProcess,
    make_message,
    queue_id,
    send_one,
    submit,
    wait_status,
)
from tests.support.sink import SMTPSink

GOOD_MX = "mx.good.example"
GOOD_IP = "127.0.0.6"


class PolicyServer:
    """https://mta-sts.<domain>/.well-known/mta-sts.txt for every domain in ``policies``,
    with a certificate from ``ca`` for each of those names."""

    def __init__(self, ca: trustme.CA, policies: dict[str, str]) -> None:
        self.policies = policies
        self.fetches: list[str] = []
        cert = ca.issue_cert(*(f"mta-sts.{d}" for d in policies))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").split(":")[0]
                domain = host.removeprefix("mta-sts.")
                server.fetches.append(domain)
                body = server.policies.get(domain)
                if self.path != "/.well-known/mta-sts.txt" or body is None:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: object) -> None:
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def policy_text(mode: str, *mx: str) -> str:
    return (
        "version: STSv1\n"
        + f"mode: {mode}\n"
        + "".join(f"mx: {m}\n" for m in mx)
        + ("max_age: 86400\n")
    )


@pytest.fixture
def world(
    make_relay: MakeRelay,
    sink: SMTPSink,
    dns_server: DNSServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RelayProcess, SMTPSink, PolicyServer]]:
    """Domains with policies; good.example's MX has a certificate the relay trusts."""
    ca = trustme.CA()
    good = SMTPSink(hostname=GOOD_MX, host=GOOD_IP, port=sink.port, ca=ca).start()
    policies = {
        "good.example": policy_text("enforce", "*.good.example"),
        "badcert.example": policy_text("enforce", "mx.badcert.example"),
        "unlisted.example": policy_text("enforce", "mx.elsewhere.example"),
        "testing.example": policy_text("testing", "mx.elsewhere.example"),
    }
    server = PolicyServer(ca, policies)
    mx_of = {
        "good.example": (GOOD_MX, GOOD_IP),
        "badcert.example": ("mx.badcert.example", "127.0.0.1"),  # the default sink: mx.test
        "unlisted.example": (GOOD_MX, GOOD_IP),
        "testing.example": ("mx.testing.example", "127.0.0.1"),
    }
    for domain, (mx, ip) in mx_of.items():
        dns_server.add(domain, "MX", f"10 {mx}.")
        dns_server.add(mx, "A", ip)
        dns_server.add(f"_mta-sts.{domain}", "TXT", '"v=STSv1; id=20261127T1"')
        dns_server.add(f"mta-sts.{domain}", "A", "127.0.0.1")
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    relay = make_relay(
        {
            "delivery": {
                "mta_sts_port": server.port,
                "tls_ca_file": str(ca_file),
                "retry_first": 60,
                "retry_max": 120,
            }
        }
    )
    relay.setup()
    relay.start()
    try:
        yield relay, good, server
    finally:
        server.close()
        good.stop()


async def test_an_enforced_policy_delivers_over_verified_tls_and_defers_what_it_forbids(
    world: tuple[RelayProcess, SMTPSink, PolicyServer], sink: SMTPSink, dns_server: DNSServer
) -> None:
    relay, good, server = world

    ok = await send_one(relay, "a@good.example")
    (got,) = good.wait_for(1)
    assert got.tls and got.rcpt_tos == ("a@good.example",)
    assert "good.example" in server.fetches
    relay.wait_for_log(r"mta-sts: policy of good\.example: mode=enforce mx=\*\.good\.example")
    wait_status(relay, ok, "delivered")

    # The MX's certificate is not valid for its name (nor from a trusted CA): not sent.
    bad = await send_one(relay, "b@badcert.example")
    shown = wait_status(relay, bad, "deferred")
    assert "4.7.5 Certificate of mx.badcert.example does not verify" in shown
    assert "MTA-STS" in shown

    # The MX is fine, but the policy does not list it (a spoofed MX record): not sent.
    unlisted = await send_one(relay, "c@unlisted.example")
    shown = wait_status(relay, unlisted, "deferred")
    assert "MTA-STS policy of unlisted.example lists none of its MX hosts" in shown
    assert len(good.messages) == 1
    assert not [m for m in sink.messages if m.rcpt_tos[0].endswith(("badcert.example",))]

    # testing mode: reported, delivered as without a policy.
    testing = await send_one(relay, "d@testing.example")
    wait_status(relay, testing, "delivered")
    relay.wait_for_log(r"mta-sts testing: MX hosts of testing\.example not in its policy")

    metrics = scrape(f"{relay.http_url}/metrics")
    assert value(metrics, "relay_delivery_mta_sts_total", outcome="enforced") >= 2
    assert value(metrics, "relay_delivery_mta_sts_total", outcome="refused") >= 1
    assert value(metrics, "relay_delivery_mta_sts_total", outcome="testing_mismatch") == 1

    # The policy is cached: a second message to good.example fetches nothing new, and
    # does not even ask for the TXT record again (checked at most every 5 minutes).
    fetched = server.fetches.count("good.example")
    asked = dns_server.query_count("_mta-sts.good.example", "TXT")
    await send_one(relay, "e@good.example")
    good.wait_for(2)
    assert server.fetches.count("good.example") == fetched
    assert dns_server.query_count("_mta-sts.good.example", "TXT") == asked


async def test_tls_required_no_delivers_past_a_policy_the_mx_fails_and_others_wait(
    world: tuple[RelayProcess, SMTPSink, PolicyServer], sink: SMTPSink
) -> None:
    # RFC 8689: the sender says the message may go without verified TLS (a TLS report,
    # a password reset to a domain whose MTA-STS broke): the policy is waived for it
    # alone, in a session of its own; the message beside it keeps the policy.
    relay, _good, _server = world
    waived = make_message("a@example.com", ["x@badcert.example"], headers={"TLS-Required": "No"})
    strict = make_message("a@example.com", ["y@badcert.example"])
    await submit(
        relay.submission_port,
        sender="a@example.com",
        recipients=["x@badcert.example"],
        data=waived,
    )
    kept = queue_id(
        await submit(
            relay.submission_port,
            sender="a@example.com",
            recipients=["y@badcert.example"],
            data=strict,
        )
    )
    assert kept is not None
    (got,) = sink.wait_for(1)
    assert got.rcpt_tos == ("x@badcert.example",)
    assert got.tls  # opportunistic TLS, the certificate not checked
    assert got.header("TLS-Required") == "No"  # kept for the next hop (RFC 8689 §5)
    shown = wait_status(relay, kept, "deferred")
    assert "4.7.5 Certificate of mx.badcert.example does not verify" in shown

    # The policy's refusal did not suspend the domain: more waived mail goes at once.
    await submit(
        relay.submission_port,
        sender="a@example.com",
        recipients=["z@badcert.example"],
        data=make_message("a@example.com", ["z@badcert.example"], headers={"TLS-Required": "no"}),
    )
    assert [m.rcpt_tos for m in sink.wait_for(2)][1] == ("z@badcert.example",)


async def test_a_domain_without_a_policy_is_delivered_as_before(
    world: tuple[RelayProcess, SMTPSink, PolicyServer], sink: SMTPSink
) -> None:
    relay, _good, server = world
    qid = await send_one(relay, "x@example.org")
    sink.wait_for(1)
    wait_status(relay, qid, "delivered")
    assert server.fetches == []


async def test_a_policy_stays_in_force_across_a_restart_when_it_cannot_be_fetched_again(
    world: tuple[RelayProcess, SMTPSink, PolicyServer], sink: SMTPSink
) -> None:
    # RFC 8461 §5.1: an attacker who blocks the policy fetch must not turn the policy off,
    # and a restart must not either: the policy is kept in the database until max_age.
    relay, _good, server = world
    first = await send_one(relay, "a@badcert.example")
    wait_status(relay, first, "MTA-STS")
    relay.restart()
    server.policies.clear()  # every fetch now fails (404)
    fetches = len(server.fetches)

    again = await send_one(relay, "b@badcert.example")
    shown = wait_status(relay, again, "deferred")
    assert "4.7.5 Certificate of mx.badcert.example does not verify" in shown
    assert not sink.messages
    # The TXT id is unchanged, so the kept policy was used without a fetch at all.
    assert len(server.fetches) == fetches
