"""delivery/smtpclient.py: the body on the wire is what RFC 5321 §4.5.2 says, and replies
are read as §4.2.1 defines them."""

from __future__ import annotations

import asyncio
import random
import re

import pytest

from relay.delivery.smtpclient import (
    Reply,
    ReplyTimeout,
    SMTPConnection,
    TransactionReplies,
    _path,
    _ReplyReader,
    stuff,
)

# The reference: what aiosmtplib sent (two regular expressions), plus the terminator.
_LINE_ENDINGS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")
_PERIOD = re.compile(rb"(?m)^\.")


def regex_version(message: bytes) -> bytes:
    out = _LINE_ENDINGS.sub(b"\r\n", message)
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return _PERIOD.sub(b"..", out) + b".\r\n"


def test_same_bytes_as_the_regexes_on_random_messages() -> None:
    rng = random.Random(9)
    alphabet = [b"a", b".", b"\r\n", b"\r", b"\n", b"..", b"\r\n.", b" "]
    for _ in range(3000):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        assert stuff(message) == regex_version(message), message


def test_typical_and_edge_messages() -> None:
    for message in [
        b".",
        b".\r\n",
        b"..\r\n.\r\n",
        b"Subject: x\r\n\r\n.hidden\r\nend",
        b"bare\nlf\n.dot\n",
        b"cr\r.only\r",
    ]:
        assert stuff(message) == regex_version(message), message


def test_an_empty_body_is_just_the_terminator() -> None:
    assert stuff(b"") == b".\r\n"


def test_multiline_replies_are_joined_and_split_packets_are_waited_for() -> None:
    reader = _ReplyReader()
    reader.data_received(b"250-relay.test\r\n250-PIPELINING\r")
    assert not reader.replies
    reader.data_received(b"\n250 SIZE 100\r\n354 go\r\n")
    assert list(reader.replies) == [
        Reply(250, "relay.test\nPIPELINING\nSIZE 100"),
        Reply(354, "go"),
    ]


def test_a_line_that_is_not_a_reply_breaks_the_session() -> None:
    reader = _ReplyReader()
    reader.data_received(b"HTTP/1.1 400 Bad Request\r\n")
    assert reader.error is not None and "not an SMTP reply" in str(reader.error)


class ScriptedMX:
    """A loopback server that offers PIPELINING and answers MAIL/RCPT/DATA from a script,
    recording every line it reads (the body included). It holds its MAIL and RCPT replies
    until DATA arrives: a client that waited for each reply would time out."""

    def __init__(
        self, rcpt_replies: list[bytes], mail: bytes = b"250 ok", data: bytes = b"354 go"
    ) -> None:
        self.mail, self.rcpt, self.data = mail, rcpt_replies, data
        self.lines: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.test ESMTP\r\n")
        rcpts = iter(self.rcpt)
        held: list[bytes] = []
        in_body = False
        while line := await reader.readline():
            self.lines.append(line)
            if in_body:
                if line == b".\r\n":
                    in_body = False
                    writer.write(b"250 2.0.0 queued\r\n")
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                held.append(self.mail + b"\r\n")
            elif verb == b"RCPT":
                held.append(next(rcpts) + b"\r\n")
            elif verb == b"DATA":
                writer.write(b"".join(held) + self.data + b"\r\n")
                held.clear()
                in_body = self.data.startswith(b"354")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
        writer.close()

    async def run(
        self, rcpts: list[str], body: bytes = b"Subject: t\r\n\r\nhi\r\n"
    ) -> TransactionReplies:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            conn = await SMTPConnection.open("127.0.0.1", port, connect_timeout=5)
            await conn.ehlo("relay.test")
            replies = await conn.transaction("a@example.com", ["SIZE=30"], rcpts, body)
            await conn.quit()
        finally:
            server.close()
            await server.wait_closed()
        return replies


async def test_pipelined_group_with_one_refused_recipient_still_sends_the_body() -> None:
    mx = ScriptedMX([b"250 ok", b"550 5.1.1 no such user"])
    replies = await mx.run(["b@example.org", "c@example.org"])
    assert [r.code for r in replies.rcpts] == [250, 550]
    assert replies.data is not None and replies.data.code == 250
    assert [line[:4] for line in mx.lines[1:5]] == [b"MAIL", b"RCPT", b"RCPT", b"DATA"]
    assert b"hi\r\n" in mx.lines and b".\r\n" in mx.lines


async def test_a_refused_mail_from_sends_no_body() -> None:
    mx = ScriptedMX([b"503 5.5.1 need MAIL"], mail=b"550 5.7.1 sender refused", data=b"503 no")
    replies = await mx.run(["b@example.org"])
    assert replies.mail.code == 550 and replies.data is not None and replies.data.code == 503
    assert b"hi\r\n" not in mx.lines


async def test_354_with_every_recipient_refused_is_ended_empty() -> None:
    # RFC 2920 §3.1: a server may accept DATA though no RCPT succeeded; the client must
    # then send an empty message, not the body.
    mx = ScriptedMX([b"550 5.1.1 no"])
    replies = await mx.run(["b@example.org"])
    assert replies.data is None
    assert b"hi\r\n" not in mx.lines and b".\r\n" in mx.lines


async def test_each_read_gets_its_whole_timeout_from_when_it_starts() -> None:
    # NOOP is answered at once, then the client idles 80 ms (the timer armed by that read
    # is still set, for 100 ms after it). The next reply takes 60 ms: past that read's
    # deadline, within its own. Then a reply that never comes times out in 100 ms.
    async def slow_second(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 mx ready\r\n")
        answered = 0
        while await r.readline():
            answered += 1
            if answered == 3:
                await asyncio.sleep(0.06)
            if answered <= 3:
                w.write(b"250 ok\r\n")

    server = await asyncio.start_server(slow_second, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await SMTPConnection.open("127.0.0.1", port, connect_timeout=5)
        # A read under the 5 s connect timeout armed the timer 5 s out; the shorter
        # command timeout must still hold.
        conn.send(b"NOOP")
        await conn.read()
        conn.timeout = 0.1
        assert (await conn.command(b"NOOP")).code == 250
        await asyncio.sleep(0.08)
        assert (await conn.command(b"NOOP")).code == 250
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ReplyTimeout):
            await conn.command(b"NOOP")
        assert 0.1 <= loop.time() - started < 2.0
    finally:
        server.close()
    conn.abort()


async def test_a_server_that_stops_answering_times_out_the_read_and_nothing_leaks() -> None:
    async def silent_after_banner(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 mx ready\r\n")
        await asyncio.sleep(5)
        w.close()

    server = await asyncio.start_server(silent_after_banner, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await SMTPConnection.open("127.0.0.1", port, connect_timeout=5)
        conn.timeout = 0.1
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ReplyTimeout, match=r"no reply within 0\.1 s"):
            await conn.command(b"EHLO relay.test")
        assert 0.1 <= loop.time() - started < 2.0
        # The timer fired into the waiter, not into the task: nothing left cancelled.
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0.01)
    finally:
        server.close()
    conn.abort()


@pytest.mark.parametrize(
    "address", ["a@b.example\r\nRSET", "a>@b.example", "<a@b.example", "a\x00@b"]
)
def test_an_address_that_would_forge_a_command_line_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="not usable on an SMTP command line"):
        _path(address)
    assert _path("a@b.example") == b"<a@b.example>"
