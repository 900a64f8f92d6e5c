"""Self-checks of the test support code (DNS server, SMTP sink, relay process runner).

They use real sockets on 127.0.0.1 only; the relay itself is not needed (the process
runner is checked against a stand-in program).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import textwrap
from pathlib import Path

import aiosmtplib
import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.resolver
import pytest
import yaml

from tests.support.dnsserver import DNSServer
from tests.support.net import free_port, port_accepts
from tests.support.relayproc import (
    RelayError,
    RelayProcess,
    deep_merge,
    make_message,
    queue_id,
    submit,
)
from tests.support.sink import SMTPSink

# ---------------------------------------------------------------------- DNS server


def resolver_for(server: DNSServer, lifetime: float = 3.0) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    return resolver


async def test_dns_answers_mx_a_and_multi_string_txt(dns_server: DNSServer) -> None:
    dns_server.add("Example.ORG", "MX", "10 mx.example.org.")
    dns_server.add("example.org.", "MX", "20 mx2.example.org")  # trailing dot optional
    dns_server.add("mx.example.org", "A", "127.0.0.1")
    dns_server.add("mx.example.org", "AAAA", "::1")
    key = "p=" + "A" * 250
    dns_server.add("relay._domainkey.example.com", "TXT", f'"v=DKIM1; k=rsa; " "{key}"')
    resolver = resolver_for(dns_server)

    mx = await resolver.resolve("example.org", "MX")
    assert mx.response.flags & dns.flags.AA
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, "mx.example.org."),
        (20, "mx2.example.org."),
    ]
    a = await resolver.resolve("MX.example.org", "A")
    assert [r.to_text() for r in a] == ["127.0.0.1"]
    aaaa = await resolver.resolve("mx.example.org", "AAAA")
    assert [r.to_text() for r in aaaa] == ["::1"]

    txt = await resolver.resolve("relay._domainkey.example.com", "TXT")
    [record] = list(txt)
    assert record.strings == (b"v=DKIM1; k=rsa; ", key.encode())


async def test_dns_nxdomain_nodata_and_null_mx(dns_server: DNSServer) -> None:
    dns_server.add("nomail.example", "MX", "0 .")
    dns_server.add("_dmarc.sub.example", "TXT", "v=DMARC1; p=none")
    resolver = resolver_for(dns_server)

    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("unknown.example", "MX")
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("nomail.example", "A")
    with pytest.raises(dns.resolver.NoAnswer):  # empty non-terminal: exists, no data
        await resolver.resolve("sub.example", "TXT")
    [null_mx] = list(await resolver.resolve("nomail.example", "MX"))
    assert null_mx.preference == 0 and null_mx.exchange.to_text() == "."
    txt = await resolver.resolve("_dmarc.sub.example", "TXT")
    assert [r.strings for r in txt] == [(b"v=DMARC1; p=none",)]

    dns_server.remove("nomail.example", "MX")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("nomail.example", "MX")


async def test_dns_cname_is_answered_not_chased(dns_server: DNSServer) -> None:
    dns_server.add("alias.example", "CNAME", "target.example.")
    query = dns.message.make_query("alias.example", "A")
    response = await dns.asyncquery.udp(query, "127.0.0.1", port=dns_server.port, timeout=3)
    assert [rrset.to_text() for rrset in response.answer] == [
        "alias.example. 60 IN CNAME target.example."
    ]


async def test_dns_zone_text(dns_server: DNSServer) -> None:
    dns_server.add("old.example", "A", "127.0.0.9")
    dns_server.set_zone_text(
        textwrap.dedent(
            """\
            ; what `relay domain records --format bind` might print
            relay._domainkey.example.com. 3600 IN TXT "v=DKIM1; k=rsa; " "p=MIIB"
            example.com.  IN TXT "v=spf1 ip4:127.0.0.1 -all"
            $ORIGIN example.net.
            @      300 IN MX 10 mx
            mx         IN A  127.0.0.2
            """
        )
    )
    assert dns_server.records("old.example", "A") == []
    dns_server.add_zone_text('_dmarc.example.com. IN TXT "v=DMARC1; p=none"\n')
    resolver = resolver_for(dns_server)

    dkim = await resolver.resolve("relay._domainkey.example.com", "TXT")
    assert [r.strings for r in dkim] == [(b"v=DKIM1; k=rsa; ", b"p=MIIB")]
    assert dkim.rrset is not None and dkim.rrset.ttl == 3600
    spf = await resolver.resolve("example.com", "TXT")
    assert spf.rrset is not None and spf.rrset.ttl == 60
    mx = await resolver.resolve("example.net", "MX")
    assert [r.exchange.to_text() for r in mx] == ["mx.example.net."]
    a = await resolver.resolve("mx.example.net", "A")
    assert [r.to_text() for r in a] == ["127.0.0.2"]
    dmarc = await resolver.resolve("_dmarc.example.com", "TXT")
    assert [r.strings for r in dmarc] == [(b"v=DMARC1; p=none",)]


async def test_dns_failure_injection(dns_server: DNSServer) -> None:
    dns_server.add("flaky.example", "MX", "10 mx.flaky.example.")
    dns_server.add("flaky.example", "A", "127.0.0.1")
    dns_server.fail("FLAKY.example.", "servfail")
    query = dns.message.make_query("flaky.example", "MX")
    response = await dns.asyncquery.udp(query, "127.0.0.1", port=dns_server.port, timeout=3)
    assert response.rcode() == dns.rcode.SERVFAIL

    dns_server.fail("flaky.example", "timeout")
    with pytest.raises(dns.exception.Timeout):
        await dns.asyncquery.udp(query, "127.0.0.1", port=dns_server.port, timeout=0.5)
    with pytest.raises(dns.exception.Timeout):
        await dns.asyncquery.tcp(query, "127.0.0.1", port=dns_server.port, timeout=0.5)

    dns_server.clear_failures()
    dns_server.fail("flaky.example", "servfail", rdtype="A")  # only A fails
    response = await dns.asyncquery.udp(query, "127.0.0.1", port=dns_server.port, timeout=3)
    assert response.rcode() == dns.rcode.NOERROR and len(response.answer) == 1
    a_query = dns.message.make_query("flaky.example", "A")
    response = await dns.asyncquery.udp(a_query, "127.0.0.1", port=dns_server.port, timeout=3)
    assert response.rcode() == dns.rcode.SERVFAIL


async def test_dns_tcp_and_truncation(dns_server: DNSServer) -> None:
    big = " ".join(f'"{"k" * 250}"' for _ in range(8))  # ~2 KB: too big for plain UDP
    dns_server.add("big.example", "TXT", big)
    query = dns.message.make_query("big.example", "TXT")  # no EDNS: 512-byte limit
    udp = await dns.asyncquery.udp(query, "127.0.0.1", port=dns_server.port, timeout=3)
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = await dns.asyncquery.tcp(query, "127.0.0.1", port=dns_server.port, timeout=3)
    assert len(tcp.answer[0][0].strings) == 8
    # A resolver retries over TCP by itself.
    answer = await resolver_for(dns_server).resolve("big.example", "TXT")
    assert len(next(iter(answer)).strings) == 8
    assert dns_server.query_count("big.example", "TXT") >= 3


def test_dns_restart_keeps_port() -> None:
    server = DNSServer().start()
    try:
        port = server.port
        server.stop()
        server.start()
        assert server.port == port
        assert server.nameserver == f"127.0.0.1:{port}"
    finally:
        server.stop()


# ---------------------------------------------------------------------- SMTP sink


async def send(
    sink: SMTPSink,
    recipients: list[str],
    *,
    start_tls: bool | None = True,
    data: bytes | None = None,
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=sink.port,
        start_tls=start_tls,
        tls_context=sink.client_ssl_context(),
        timeout=10,
    )
    async with client:
        return await client.sendmail(
            "sender@example.com",
            recipients,
            data or make_message("sender@example.com", recipients),
        )


async def test_sink_receives_over_starttls(sink: SMTPSink) -> None:
    _, reply = await send(sink, ["bob@example.org", "carol@example.org"])
    assert "queued as sink1" in reply
    [received] = await sink.wait_for_async(1, timeout=5)
    assert received.tls is True
    assert received.mail_from == "sender@example.com"
    assert received.rcpt_tos == ("bob@example.org", "carol@example.org")
    assert received.header("subject") == "Test message"
    assert received.data.endswith(b"\r\n")
    assert received.peer[0] == "127.0.0.1"
    assert sink.connections == 1


async def test_sink_without_tls() -> None:
    with SMTPSink(tls=False) as sink:
        await send(sink, ["bob@example.org"], start_tls=None)
        [received] = sink.wait_for(1, timeout=5)
        assert received.tls is False
        with pytest.raises(aiosmtplib.SMTPException):
            await send(sink, ["bob@example.org"], start_tls=True)


async def test_sink_scripted_replies(sink: SMTPSink) -> None:
    sink.set_rcpt_reply("Nobody@example.org", "550 5.1.1 user unknown")
    refused, _ = await send(sink, ["bob@example.org", "nobody@example.org"])
    assert refused["nobody@example.org"].code == 550
    [received] = sink.wait_for(1, timeout=5)
    assert received.rcpt_tos == ("bob@example.org",)

    sink.set_data_reply("451 4.3.0 try later")
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await send(sink, ["bob@example.org"])
    assert info.value.code == 451

    sink.clear_replies()
    sink.set_rcpt_reply(None, "452 4.2.2 mailbox full")
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(sink, ["bob@example.org"])
    sink.clear_replies()
    await send(sink, ["bob@example.org"])
    assert len(sink.wait_for(2, timeout=5)) == 2
    assert sink.rcpt_attempts.count("bob@example.org") == 4


async def test_sink_stop_and_start_on_same_port(sink: SMTPSink) -> None:
    port = sink.port
    await send(sink, ["bob@example.org"])
    sink.stop()
    assert not port_accepts(port)
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await send(sink, ["bob@example.org"])
    sink.start()
    assert sink.port == port
    await send(sink, ["bob@example.org"])
    assert len(sink.wait_for(2, timeout=5)) == 2
    assert sink.connections == 2


async def test_sink_stop_cuts_open_connections(sink: SMTPSink) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False, timeout=5)
    await client.connect()
    await client.ehlo()
    await asyncio.to_thread(sink.stop)
    with pytest.raises(aiosmtplib.SMTPException):
        await client.noop()
    client.close()
    sink.start()


def test_sink_wait_for_times_out_with_a_clear_message(sink: SMTPSink) -> None:
    with pytest.raises(AssertionError, match=r"got 0 message\(s\) of the 1 awaited"):
        sink.wait_for(1, timeout=0.2)


# ---------------------------------------------------------------------- relay process

FAKE_SERVE = textwrap.dedent(
    """\
    import signal, socket, sys, time, yaml
    cfg = yaml.safe_load(open(sys.argv[1]))
    if sys.argv[2] != "serve":
        print("ran", *sys.argv[2:], "stdin=" + repr(sys.stdin.read()))
        sys.exit(3 if sys.argv[2] == "fail" else 0)
    ports = [v for v in cfg["listen"].values() if v] + [cfg["http"]["listen"]]
    socks = []
    for value in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(value.rsplit(":", 1)[1])))
        s.listen()
        socks.append(s)
    def term(*_):
        print("draining", flush=True)
        sys.exit(0)
    if "--ignore-term" not in sys.argv:
        signal.signal(signal.SIGTERM, term)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("listening", flush=True)
    while True:
        time.sleep(0.1)
    """
)


class FakeRelay(RelayProcess):
    """RelayProcess whose program is FAKE_SERVE instead of `python -m relay`."""

    script: Path
    extra_args: tuple[str, ...] = ()

    def command(self, *args: str) -> list[str]:
        return [sys.executable, str(self.script), str(self.config_path), *args, *self.extra_args]


def fake_relay(tmp_path: Path, dns_server: DNSServer, **extra: object) -> FakeRelay:
    proc = FakeRelay(tmp_path / "node", dns_server, 2525, extra or None)
    proc.script = tmp_path / "fake_serve.py"
    proc.script.write_text(FAKE_SERVE)
    return proc


def test_relay_config_file(tmp_path: Path, dns_server: DNSServer) -> None:
    proc = RelayProcess(
        tmp_path,
        dns_server,
        2525,
        {"listen": {"smtp": "auto"}, "delivery": {"require_tls": True}},
    )
    cfg = yaml.safe_load(proc.config_path.read_text())
    assert cfg["dns"]["nameservers"] == [dns_server.nameserver]
    assert cfg["delivery"]["port"] == 2525
    assert cfg["delivery"]["require_tls"] is True and cfg["delivery"]["retry_first"] == 1
    assert cfg["listen"]["submission"] == f"127.0.0.1:{proc.submission_port}"
    assert cfg["listen"]["smtp"] == f"127.0.0.1:{proc.smtp_port}"
    assert cfg["http"]["listen"] == f"127.0.0.1:{proc.http_port}"
    ports = {proc.submission_port, proc.smtps_port, proc.smtp_port, proc.http_port}
    assert len(ports) == 4
    assert proc.db_url == f"sqlite+aiosqlite:///{tmp_path}/relay.db"
    assert proc.db_url.startswith("sqlite+aiosqlite:////")
    assert Path(cfg["tls"]["cert"]).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" in Path(cfg["tls"]["key"]).read_bytes()

    default = RelayProcess(tmp_path / "other", dns_server, 2525)
    with pytest.raises(RuntimeError, match="smtp"):
        _ = default.smtp_port


def test_deep_merge() -> None:
    base = {"a": {"b": 1, "c": [1]}, "d": 2}
    merged = deep_merge(base, {"a": {"b": 5}, "e": None})
    assert merged == {"a": {"b": 5, "c": [1]}, "d": 2, "e": None}
    assert base == {"a": {"b": 1, "c": [1]}, "d": 2}


def test_relay_cli_runner(tmp_path: Path, dns_server: DNSServer) -> None:
    proc = fake_relay(tmp_path, dns_server)
    result = proc.cli("account", "add", "alice", "--password-stdin", input="pw\n")
    assert result.stdout.strip() == "ran account add alice --password-stdin stdin='pw\\n'"
    assert proc.cli("fail", check=False).returncode == 3
    with pytest.raises(RelayError, match="exited with 3"):
        proc.cli("fail")


def test_relay_start_stop_kill_restart(tmp_path: Path, dns_server: DNSServer) -> None:
    proc = fake_relay(tmp_path, dns_server)
    try:
        proc.start()
        assert proc.running and port_accepts(proc.submission_port)
        assert port_accepts(proc.http_port)
        assert proc.stop() == 0
        assert "draining" in proc.log_text()
        assert not port_accepts(proc.submission_port)

        proc.start()
        proc.wait_for_log("listening")
        assert proc.kill() == -signal.SIGKILL
        proc.restart()
        assert proc.running
        assert proc.log_text().count("listening") == 3
    finally:
        proc.close()
    assert not proc.running


def test_relay_stop_timeout_kills(tmp_path: Path, dns_server: DNSServer) -> None:
    proc = fake_relay(tmp_path, dns_server)
    proc.extra_args = ("--ignore-term",)
    try:
        proc.start()
        with pytest.raises(RelayError, match="did not exit"):
            proc.stop(timeout=0.5)
        assert not proc.running
    finally:
        proc.close()


def test_relay_start_reports_early_exit(tmp_path: Path, dns_server: DNSServer) -> None:
    proc = fake_relay(tmp_path, dns_server)
    proc.script.write_text("import sys\nprint('bad config: listen.smtp')\nsys.exit(2)\n")
    with pytest.raises(RelayError, match=r"(?s)exited with 2.*bad config"):
        proc.start()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_queue_id() -> None:
    assert queue_id("2.0.0 Ok: queued as <01HX-abc>") == "01HX-abc"
    assert queue_id(({}, "Ok: queued as 42")) == "42"
    assert queue_id("OK") is None


async def test_submit_helper_against_sink(sink: SMTPSink) -> None:
    # submit() without AUTH against the sink: the same client path tests use on the relay.
    data = make_message("a@example.com", ["b@example.org"], subject="hi")
    refused, reply = await submit(
        sink.port,
        sender="a@example.com",
        recipients=["b@example.org"],
        data=data,
        username=None,
    )
    assert refused == {} and queue_id(reply) == "sink1"
    [received] = sink.wait_for(1, timeout=5)
    assert received.tls is True and received.header("Subject") == "hi"
    with SMTPSink() as second:
        await submit(
            second.port,
            sender="a@example.com",
            recipients=["b@example.org"],
            data=data.decode(),
            username=None,
            starttls=False,
        )
        assert second.wait_for(1, timeout=5)[0].tls is False
