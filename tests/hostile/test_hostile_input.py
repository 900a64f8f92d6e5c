"""Hostile input against the real relay: each gets a clear reply (class + RFC 3463 code),
and the server keeps serving well-behaved clients afterwards.

Sizes are configurable: RELAY_TEST_AUTH_ATTEMPTS (failed AUTHs, default 300),
RELAY_TEST_IDLE_CONNECTIONS (default 500), RELAY_TEST_OVERSIZE_BYTES (default 24 MiB).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import time

import pytest

from tests.hostile.conftest import (
    HOSTILE_AUTH_FAIL_LIMIT,
    HOSTILE_MAX_SIZE,
    HOSTILE_PER_IP,
    HOSTILE_TIMEOUT,
)
from tests.hostile.rawsmtp import Closed, Raw
from tests.support.relayproc import MakeRelay, RelayProcess, make_message, submit_sync
from tests.support.sink import SMTPSink

ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3} ", re.M)


def assert_clear(reply: tuple[int, str], *codes: int) -> None:
    code, text = reply
    assert code in codes, f"expected {codes}, got {text!r}"
    assert ENHANCED.match(text), f"no RFC 3463 enhanced code in {text!r}"


def assert_still_serving(relay: RelayProcess, sink: SMTPSink, subject: str) -> None:
    """A well-behaved client still gets its message accepted and delivered."""
    before = len(sink.messages)
    refused, reply = submit_sync(
        relay.submission_port,
        sender="a@example.com",
        recipients=["ok@example.org"],
        data=make_message("a@example.com", ["ok@example.org"], subject=subject),
    )
    assert refused == {} and "queued as" in reply, reply
    deadline = time.monotonic() + 30
    while not any(m.header("Subject") == subject for m in sink.wait_for(before + 1)):
        assert time.monotonic() < deadline, f"{subject!r} was not delivered within 30 s"
        time.sleep(0.1)


SMUGGLING = {
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "crlf-dot-lf": b"\r\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
}


def test_smtp_smuggling_end_of_data_variants_never_split_one_message_at_the_sink(
    hostile: RelayProcess, hostile_sink: SMTPSink
) -> None:
    accepted: list[str] = []
    for name, variant in SMUGGLING.items():
        with Raw(hostile.submission_port) as c:
            c.ready()
            assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
            assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send(
                f"From: a@example.com\r\nTo: b@example.org\r\nSubject: smug {name}\r\n\r\n"
                "hello".encode()
                + variant
                + b"MAIL FROM:<a@example.com>\r\nRCPT TO:<evil@example.org>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
            )
            code, text = c.reply()
            # Refusing a bare CR/LF message outright is safe too; accepting must give one.
            assert code in (250, 550, 554), text
            if code == 250:
                accepted.append(name)
                assert c.cmd("QUIT")[0] == 221
    # A marker sent after every probe: once it is in, the probes' deliveries are done.
    assert_still_serving(hostile, hostile_sink, "after smuggling")
    messages = hostile_sink.wait_for(len(accepted) + 1)
    evil = [m for m in messages if "evil@example.org" in m.rcpt_tos]
    assert not evil, f"smuggled message(s) delivered: {[m.data[:300] for m in evil]}"
    subjects = [m.header("Subject") for m in messages]
    for name in accepted:
        assert subjects.count(f"smug {name}") == 1, subjects
        [msg] = [m for m in messages if m.header("Subject") == f"smug {name}"]
        assert b"evil" in msg.data, "the rest of the body was lost instead of kept as text"
    assert "smuggled" not in subjects


def test_commands_pipelined_with_starttls_are_discarded_not_run_after_the_handshake(
    hostile: RelayProcess,
) -> None:
    with Raw(hostile.submission_port) as c:
        assert c.cmd("EHLO probe.test")[0] == 250
        # CVE-2011-0411 class: plaintext injected behind STARTTLS in the same packet.
        c.send(b"STARTTLS\r\nRSET\r\nXYZZY\r\nMAIL FROM:<a@example.com>\r\n")
        code, text = c.reply()
        assert code == 220, text
        c.buf = b""
        import ssl

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        c.sock = ctx.wrap_socket(c.sock)
        try:
            code, text = c.cmd("EHLO probe.test")
        except (Closed, OSError):
            return  # closing after 220 also runs nothing injected
        assert code == 250 and "AUTH" in text, f"first reply after TLS was {text!r}"
        # MAIL was injected before the handshake: it must not have started a transaction.
        assert_clear(c.cmd("RCPT TO:<b@example.org>"), 503, 530)


def test_auth_before_tls_is_refused_and_not_advertised(hostile: RelayProcess) -> None:
    with Raw(hostile.submission_port) as c:
        code, text = c.cmd("EHLO probe.test")
        assert code == 250 and "AUTH" not in text and "STARTTLS" in text, text
        assert_clear(c.auth_plain("alice", "secret-pass-1"), 530)
        assert_clear(c.cmd("AUTH LOGIN"), 530)


def test_auth_with_malformed_base64_gets_501_and_the_session_goes_on(
    hostile: RelayProcess, hostile_sink: SMTPSink
) -> None:
    with Raw(hostile.submission_port, source="127.0.0.21") as c:
        c.ready(login=False)
        assert_clear(c.cmd("AUTH PLAIN !!!not*base64"), 501)
        code, text = c.cmd("AUTH LOGIN")
        assert code == 334, text
        assert_clear(c.cmd("%%%%"), 501)
        assert_clear(c.cmd("AUTH PLAIN AGFsaWNl"), 501)  # base64 of "\0alice": no password
        c.login()
        assert_clear(c.cmd("MAIL FROM:<a@example.com>"), 250)
    assert_still_serving(hostile, hostile_sink, "after bad base64")


@pytest.mark.slow
def test_failed_auth_flood_is_throttled_with_454_and_other_clients_are_still_served(
    hostile: RelayProcess, hostile_sink: SMTPSink
) -> None:
    attempts = int(os.environ.get("RELAY_TEST_AUTH_ATTEMPTS", "300"))
    replies: dict[str, int] = {}
    sent = 0
    while sent < attempts:
        with Raw(hostile.submission_port, source="127.0.0.66") as c:
            c.ready(login=False)
            for _ in range(min(100, attempts - sent)):
                code, text = c.auth_plain("alice", f"wrong-{sent}")
                sent += 1
                key = text[:9]
                replies[key] = replies.get(key, 0) + 1
                assert code in (535, 454), text
    assert replies.get("535 5.7.8", 0) <= HOSTILE_AUTH_FAIL_LIMIT, replies
    assert replies.get("454 4.7.0", 0) >= attempts - HOSTILE_AUTH_FAIL_LIMIT, replies
    print(f"\nfailed AUTH flood: {attempts} attempts -> {replies}")
    # The throttled IP is refused even with the right password; another IP is not.
    with Raw(hostile.submission_port, source="127.0.0.66") as c:
        c.ready(login=False)
        code, text = c.auth_plain("alice", "secret-pass-1")
        assert_clear((code, text), 454)
        assert "limit" in text
    assert_still_serving(hostile, hostile_sink, "after auth flood")


@pytest.mark.parametrize(
    "command",
    [
        b"MAIL FROM:<a@example.com\x00>",
        b"MAIL FROM:<a\x00b@example.com>",
        b"MAIL FROM:<a\r@example.com>",
        b"MAIL FROM:<a@example.com\rX-Injected: yes>",
    ],
)
def test_control_characters_in_mail_from_are_refused(hostile: RelayProcess, command: bytes) -> None:
    with Raw(hostile.submission_port) as c:
        c.ready()
        assert_clear(c.cmd(command), 501, 553, 500)
        assert_clear(c.cmd("NOOP"), 250)


def test_control_characters_in_rcpt_to_are_refused_and_never_reach_headers(
    hostile: RelayProcess, hostile_sink: SMTPSink
) -> None:
    with Raw(hostile.submission_port) as c:
        c.ready()
        assert_clear(c.cmd("MAIL FROM:<a@example.com>"), 250)
        for bad in (
            b"RCPT TO:<b@example.org\x00>",
            b"RCPT TO:<b\r@example.org>",
            b"RCPT TO:<b@example.org\rX-Injected: yes>",
            b"RCPT TO:<b@example.org",
        ):
            assert_clear(c.cmd(bad), 501, 553, 500)
        # A bare LF ends the command line early: both halves are refused as syntax errors.
        c.send(b"RCPT TO:<b@example.org\nX-Injected: yes>\r\n")
        assert_clear(c.reply(), 501, 553, 500)
        assert_clear(c.reply(), 500, 501, 502)
        assert_clear(c.cmd("RCPT TO:<b@example.org>"), 250)
        assert c.cmd("DATA")[0] == 354
        code, text = c.cmd(b"From: a@example.com\r\nSubject: clean rcpt\r\n\r\nbody\r\n.")
        assert code == 250, text
    messages = hostile_sink.wait_for(1)
    assert messages[0].rcpt_tos == ("b@example.org",)
    assert b"X-Injected" not in messages[0].data


def test_command_lines_over_1000_bytes_get_500_5_5_6_and_the_session_goes_on(
    hostile: RelayProcess,
) -> None:
    with Raw(hostile.submission_port) as c:
        c.ready()
        assert_clear(c.cmd(b"NOOP " + b"x" * 5000), 500)
        assert_clear(c.cmd(b"MAIL FROM:<" + b"a" * 1200 + b"@example.com>"), 500, 501, 553)
        code, text = c.cmd(b"X" * 70000)
        assert code == 500 and "5.5.6" in text, text
        assert_clear(c.cmd("MAIL FROM:<a@example.com>"), 250)


def test_data_lines_over_1000_bytes_are_refused_with_500_5_5_6(
    hostile: RelayProcess, hostile_sink: SMTPSink
) -> None:
    with Raw(hostile.submission_port) as c:
        c.ready()
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: long line\r\n\r\n" + b"y" * 200_000 + b"\r\nend\r\n")
        code, text = c.cmd(b".")
        assert_clear((code, text), 500, 552, 554)
        assert "5.5.6" in text or "line" in text.lower(), text
        assert_clear(c.cmd("NOOP"), 250)
    assert_still_serving(hostile, hostile_sink, "after long data line")
    assert not [m for m in hostile_sink.messages if m.header("Subject") == "long line"]


def test_data_over_the_size_limit_is_refused_without_reading_the_whole_upload(
    hostile: RelayProcess, hostile_sink: SMTPSink
) -> None:
    total = int(os.environ.get("RELAY_TEST_OVERSIZE_BYTES", str(24 * 1024 * 1024)))
    line = b"z" * 998 + b"\r\n"
    sent = 0
    reply: tuple[int, str] | None = None
    with Raw(hostile.submission_port) as c:
        c.ready()
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        chunk = b"Subject: huge\r\n\r\n" + line * 64
        try:
            while sent < total:
                c.send(chunk)
                sent += len(chunk)
                readable, _, _ = select.select([c.sock], [], [], 0)
                if readable:
                    break
            else:
                c.send(b".\r\n")
            reply = c.reply()
        except (OSError, Closed):
            pass  # the server cut the upload; its reply may be lost in the reset
        if reply is None:
            with contextlib.suppress(OSError, Closed):
                reply = c.reply()
    print(f"\noversize DATA: {sent} of {total} bytes sent before the server answered/closed")
    assert sent < total, "the server read the whole oversized upload before answering"
    if reply is not None:
        assert_clear(reply, 552)
        assert str(HOSTILE_MAX_SIZE) in reply[1], reply
    assert_still_serving(hostile, hostile_sink, "after oversize")


def test_one_thousand_recipients_get_452_4_5_3_past_fifty(
    hostile: RelayProcess, hostile_sink: SMTPSink
) -> None:
    with Raw(hostile.submission_port) as c:
        c.ready()
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
        # Pipelined (RFC 2920): every RCPT in one write, then read every reply.
        c.send(b"".join(f"RCPT TO:<r{i}@example.org>\r\n".encode() for i in range(1000)))
        replies = [c.reply() for _ in range(1000)]
        ok = [r for r in replies if r[0] == 250]
        over = [r for r in replies if r[0] == 452]
        assert len(ok) == 50 and len(over) == 950, {r[1][:40] for r in replies}
        assert all("4.5.3" in r[1] and "50" in r[1] for r in over), over[0]
        assert c.cmd("DATA")[0] == 354
        code, text = c.cmd(b"From: a@example.com\r\nSubject: fifty\r\n\r\nhi\r\n.")
        assert code == 250, text
    delivered: set[str] = set()
    for m in hostile_sink.wait_for(1):
        delivered.update(m.rcpt_tos)
    deadline = time.monotonic() + 30
    while len(delivered) < 50 and time.monotonic() < deadline:
        time.sleep(0.2)
        delivered = {r for m in hostile_sink.messages for r in m.rcpt_tos}
    assert delivered == {f"r{i}@example.org" for i in range(50)}


def test_invalid_utf8_in_headers_and_subject_gets_a_clear_reply(
    hostile: RelayProcess, hostile_sink: SMTPSink
) -> None:
    with Raw(hostile.submission_port) as c:
        c.ready()
        assert c.cmd("MAIL FROM:<a@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        code, text = c.cmd(
            b"From: a@example.com\r\nTo: b@example.org\r\nSubject: bad \xff\xfe \xc3\x28\r\n"
            b"X-Bad: \x80\x81\xc0\xaf\r\nSubject-Alt: =?utf-8?b?/w==?=\r\n\r\n"
            b"body \xed\xa0\x80\r\n."
        )
        assert_clear((code, text), 250, 550, 554)
        assert_clear(c.cmd("RSET"), 250)
    assert_still_serving(hostile, hostile_sink, "after invalid utf-8")


def test_garbage_commands_get_500s_then_the_server_hangs_up_and_serves_others(
    hostile: RelayProcess, hostile_sink: SMTPSink
) -> None:
    with Raw(hostile.submission_port) as c:
        replies: list[tuple[int, str]] = []
        try:
            for junk in (b"\x00\x01\x02\x03", b"GET / HTTP/1.1", b"\xff\xfe\xfd", b"HELO", b"}{"):
                replies.append(c.cmd(junk))
            for i in range(20):
                replies.append(c.cmd(f"BOGUS{i} x"))
        except (Closed, OSError):
            pass
        assert replies, "no reply at all to garbage"
        for reply in replies:
            assert_clear(reply, 500, 501, 502)
        assert replies[-1][0] == 502, "the server never gave up on an endless stream of junk"
    assert_still_serving(hostile, hostile_sink, "after garbage")


@pytest.mark.slow
def test_a_client_sending_one_byte_per_second_is_timed_out(
    hostile: RelayProcess, hostile_sink: SMTPSink
) -> None:
    command = b"EHLO slowloris.example.invalid.with.a.very.long.name\r\n"
    reply = b""
    with Raw(hostile.submission_port) as c:
        c.sock.settimeout(HOSTILE_TIMEOUT + 5)
        sent = 0
        try:
            for byte in command:
                c.send(bytes([byte]))
                sent += 1
                readable, _, _ = select.select([c.sock], [], [], 1.0)
                if readable:
                    reply = c.sock.recv(4096)
                    break
        except OSError:
            pass
    assert sent < len(command), "the slow client was never cut off"
    assert reply == b"" or reply.startswith(b"421 4.4.2"), reply
    assert_still_serving(hostile, hostile_sink, "after slowloris")


@pytest.mark.slow
def test_idle_connections_past_the_per_ip_cap_get_421_and_others_are_served(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    count = int(os.environ.get("RELAY_TEST_IDLE_CONNECTIONS", "500"))
    # Its own relay: the module's 3 s timeout would free slots while 500 sockets open.
    hostile = make_relay({"smtp": {"timeout": 120, "max_connections_per_ip": HOSTILE_PER_IP}})
    hostile.setup()
    hostile.start()
    hostile_sink = sink
    socks: list[socket.socket] = []
    greetings: list[bytes] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.settimeout(20)
            s.bind(("127.0.0.77", 0))
            s.connect(("127.0.0.1", hostile.submission_port))
            socks.append(s)
        for s in socks:
            try:
                greetings.append(s.recv(4096))
            except OSError as exc:
                greetings.append(repr(exc).encode())
        # Another client (another IP) is served while the cap holds those connections.
        assert_still_serving(hostile, hostile_sink, "during idle flood")
    finally:
        for s in socks:
            s.close()
    welcomed = [g for g in greetings if g.startswith(b"220")]
    refused = [g for g in greetings if g.startswith(b"421 4.7.0")]
    print(f"\nidle flood: {count} connections -> {len(welcomed)} x 220, {len(refused)} x 421")
    assert len(welcomed) == HOSTILE_PER_IP, greetings[:3]
    assert len(refused) == count - HOSTILE_PER_IP, [g for g in greetings if g[:3] != b"220"][:3]
    assert f"limit {HOSTILE_PER_IP}".encode() in refused[0], refused[0]
    # Closing them frees the slots again.
    deadline = time.monotonic() + 20
    while True:
        with Raw(hostile.submission_port, source="127.0.0.77", greet=False) as c:
            first = c._line()
        if first.startswith(b"220") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert first.startswith(b"220"), first
