"""smtp/data.py: a DATA body read in chunks ends where RFC 5321 says, and only there."""

from __future__ import annotations

import pytest

from relay.smtp.data import Body, DataState, body_end, finish


class Incomplete(Exception):
    """The pieces ended before the terminator."""


def read(*feeds: bytes, size: int | None = None, line: int = 1001) -> tuple[Body, bytes]:
    """Feed the pieces into one buffer as the session does, looking for the end after
    each; return the body and what is left after it (pipelined commands)."""
    buf = bytearray()
    scanned = 0
    for piece in feeds:
        buf += piece
        end = body_end(buf, scanned)
        if end >= 0:
            return finish(bytes(buf[:end]), size, line), bytes(buf[end:])
        scanned = len(buf)
    raise Incomplete


def test_body_ends_at_crlf_dot_crlf_and_pipelined_commands_stay_unread() -> None:
    body, rest = read(b"Subject: x\r\n\r\nhello.\r\nbye\r\n.\r\nQUIT\r\n")
    assert body == Body(DataState.OK, b"Subject: x\r\n\r\nhello.\r\nbye\r\n")
    assert rest == b"QUIT\r\n"


def test_an_empty_body_is_just_the_dot() -> None:
    body, rest = read(b".\r\nRSET\r\n")
    assert body == Body(DataState.OK, b"")
    assert rest == b"RSET\r\n"


def test_dot_stuffed_lines_lose_one_dot_including_the_first_line() -> None:
    body, _ = read(b"..first\r\nmid\r\n...two\r\n..\r\n.\r\n")
    assert body.content == b".first\r\nmid\r\n..two\r\n.\r\n"


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 7, 100, 2999, 3000, 3001, 3002])
def test_the_terminator_is_found_across_any_chunk_boundary(cut: int) -> None:
    data = b"a" * 900 + b"\r\n" + (b"b" * 98 + b"\r\n") * 21 + b".\r\n"
    body, rest = read(data[:cut], data[cut:] + b"NOOP\r\n")
    assert body.state is DataState.OK
    assert body.content == data[:-3]
    assert rest == b"NOOP\r\n"


def test_a_large_body_arriving_in_small_pieces_is_read_whole() -> None:
    lines = b"".join(b"line %d with some text.\r\n" % i for i in range(5000))
    data = lines + b".\r\n"
    pieces = [data[i : i + 1460] for i in range(0, len(data), 1460)]
    body, _ = read(*pieces)
    assert body.content == lines


def test_bare_lf_dot_forms_are_body_text_not_the_end() -> None:
    # SMTP smuggling: "\n.\r\n" and "\r\n.\n" must not end DATA. (The CRLF line
    # ".\nthree" starts with a dot, so it loses it, as aiosmtpd's line reader does.)
    body, rest = read(b"one\n.\r\nMAIL FROM:<x@y>\r\ntwo\r\n.\nthree\r\n.\r\nQUIT\r\n")
    assert body.content == b"one\n.\r\nMAIL FROM:<x@y>\r\ntwo\r\n\nthree\r\n"
    assert rest == b"QUIT\r\n"


def test_a_line_over_1001_octets_is_refused_after_the_whole_body() -> None:
    body, rest = read(b"x" * 1000 + b"\r\n" + b"y" * 1000 + b"\r\n.\r\nQUIT\r\n")
    assert body == Body(DataState.TOO_LONG)
    assert rest == b"QUIT\r\n"
    ok, _ = read(b"x" * 999 + b"\r\n.\r\n")
    assert ok.state is DataState.OK


def test_a_body_over_the_size_limit_is_read_to_its_end_then_refused() -> None:
    body, rest = read((b"z" * 98 + b"\r\n") * 50 + b".\r\nQUIT\r\n", size=1000)
    assert body == Body(DataState.TOO_MUCH)
    assert rest == b"QUIT\r\n"


def test_eof_before_the_terminator_raises() -> None:
    with pytest.raises(Incomplete):
        read(b"half a message\r\n")
