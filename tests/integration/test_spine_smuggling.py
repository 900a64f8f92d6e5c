"""Bare LF / CR dot sequences inside DATA never end the message early (SMTP smuggling)."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from tests.support.relayproc import RelayProcess, unverified_ssl_context
from tests.support.sink import SMTPSink


async def _raw_session(port: int, payload: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies: list[bytes] = []

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                replies.append(line)
                return line

    await reply()
    writer.write(b"EHLO t\r\n")
    await reply()
    writer.write(b"STARTTLS\r\n")
    await reply()
    await writer.start_tls(unverified_ssl_context())
    writer.write(b"EHLO t\r\n")
    await reply()
    writer.write(b"AUTH PLAIN AGFsaWNlAHNlY3JldC1wYXNzLTE=\r\n")
    assert (await reply()).startswith(b"235")
    writer.write(b"MAIL FROM:<a@example.com>\r\n")
    await reply()
    writer.write(b"RCPT TO:<b@example.org>\r\n")
    await reply()
    writer.write(b"DATA\r\n")
    await reply()
    writer.write(payload)
    await reply()
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()
    return replies


@pytest.mark.parametrize(
    "sep",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"],
    ids=["lf-dot-lf", "cr-dot-cr", "lf-dot-crlf", "crlf-dot-lf", "crlf-dot-cr"],
)
async def test_bare_line_ending_dot_does_not_end_the_message(
    relay: RelayProcess, sink: SMTPSink, sep: bytes
) -> None:
    relay.setup()
    relay.start()
    smuggled = (
        b"From: a@example.com\r\nTo: b@example.org\r\nSubject: smug\r\n\r\nhello"
        + sep
        + b"MAIL FROM:<a@example.com>\r\nRCPT TO:<evil@example.org>\r\nDATA\r\n"
        + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
    )
    replies = await _raw_session(relay.submission_port, smuggled)
    assert any(r.startswith(b"250 2.0.0 Ok: queued") for r in replies), replies
    got = sink.wait_for(1)
    await asyncio.sleep(1.0)
    assert len(sink.messages) == 1
    assert all("evil@example.org" not in m.rcpt_tos for m in sink.messages)
    # the smuggled text arrives as body text of the one message
    assert b"evil" in got[0].data


_ = ssl
