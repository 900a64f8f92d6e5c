"""aiosmtplib's DATA preparation (line endings, RFC 5321 §4.5.2 dot-stuffing) in C.

aiosmtplib runs two regular-expression substitutions over every message it sends:
lone CR/LF to CRLF, and a "." added before each line starting with one. On a 100 KB
body each costs about 0.5 ms of the delivery process's CPU (issue 9), for bodies that
intake already made all-CRLF. The replacements do the same with bytes.count and
bytes.replace; aiosmtplib has no hook for this, so the two module-level names its
``execute_data_command`` uses are swapped, as relay/delivery/dkim.py does for dkimpy.
tests/unit/test_delivery_transparency.py checks they give the very same bytes.
"""

from __future__ import annotations

import aiosmtplib.protocol as _protocol

_regex_normalize = _protocol.normalize_message_line_endings
_REGEX_PERIOD = _protocol.PERIOD_REGEX


def normalize_message_line_endings(message: bytes) -> bytes:
    """Every line ends in CRLF, the last one included."""
    crlf = message.count(b"\r\n")
    if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
        return _regex_normalize(message)  # lone CR or LF: the rare case, the original code
    return message if message.endswith(b"\r\n") else message + b"\r\n"


class _PeriodStuffing:
    """Stands in for ``re.compile(rb"(?m)^\\.")`` in ``PERIOD_REGEX.sub(b"..", m)``.

    aiosmtplib calls it only after normalize_message_line_endings, so every "\\n" ends a
    CRLF and a line starts at offset 0 or after "\\n"."""

    pattern = _REGEX_PERIOD.pattern

    def sub(self, repl: bytes, message: bytes) -> bytes:
        if repl != b".." or message.count(b"\r\n") != message.count(b"\n"):
            return _REGEX_PERIOD.sub(repl, message)
        stuffed = message.replace(b"\n.", b"\n..")
        return b"." + stuffed if stuffed.startswith(b".") else stuffed


def install() -> None:
    _protocol.normalize_message_line_endings = normalize_message_line_endings
    _protocol.PERIOD_REGEX = _PeriodStuffing()  # type: ignore[assignment]
