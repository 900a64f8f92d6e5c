"""delivery/smtpclient.py: the body on the wire is what RFC 5321 §4.5.2 says, and replies
are read as §4.2.1 defines them."""

from __future__ import annotations

import random
import re

from relay.delivery.smtpclient import Reply, _ReplyReader, stuff

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
