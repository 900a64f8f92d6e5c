"""A DATA body (RFC 5321 §4.1.1.4, §4.5.2): where it ends, and what it is once it has.

The session (relay/smtp/protocol.py) keeps the bytes a client sent in one buffer. During
DATA it asks ``body_end`` where the terminator is, scanning only what arrived since its
last look, so a body is found in a few C-speed ``find`` calls however it is cut into
packets (aiosmtpd read it one ``readuntil`` per line: ~1,300 round trips through the
stream reader for a 100 KB body, issue 9). ``finish`` checks and unstuffs the whole body
at once, also in C.

Only CRLF.CRLF ends the body (or "." CRLF as its very first line): a bare-LF
``\\n.\\r\\n`` or ``\\r\\n.\\n`` is body text (the SMTP smuggling forms). A line longer
than the line limit or a body over the size limit is read to its end, then refused
(500 / 552), so the client hears the answer to the DATA it sent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from relay.intake import has_line_over

_END = b".\r\n"
_TERMINATOR = b"\r\n.\r\n"


class DataState(enum.Enum):
    OK = enum.auto()
    TOO_LONG = enum.auto()  # a line over line_length_limit
    TOO_MUCH = enum.auto()  # more than data_size_limit octets


@dataclass(frozen=True, slots=True)
class Body:
    state: DataState
    content: bytes = b""  # unstuffed, every line with its CRLF; empty unless OK


def body_end(buf: bytes | bytearray, scanned: int = 0) -> int:
    """The offset just past the terminator in ``buf`` (which starts at the body's first
    octet), or -1. ``scanned``: bytes already looked at without finding it."""
    if buf.startswith(_END):
        return len(_END)
    # The terminator may straddle what was scanned and what arrived since: back up 4.
    i = buf.find(_TERMINATOR, max(0, scanned - len(_TERMINATOR) + 1))
    return -1 if i < 0 else i + len(_TERMINATOR)


def finish(raw: bytes, size_limit: int | None, line_limit: int) -> Body:
    """The body from ``raw`` (everything up to and including its terminator)."""
    content = raw[: -len(_END)]  # the CRLF before the final "." ends the last line
    if size_limit and len(content) > size_limit:
        return Body(DataState.TOO_MUCH)
    if has_line_over(content, line_limit - 2):  # line_limit counts the CRLF
        return Body(DataState.TOO_LONG)
    # RFC 5321 §4.5.2: a line beginning with "." had one more "." put in front.
    if content.startswith(b"."):
        content = content[1:]
    return Body(DataState.OK, content.replace(b"\r\n.", b"\r\n"))
