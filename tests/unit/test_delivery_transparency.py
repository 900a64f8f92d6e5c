"""delivery/transparency.py gives aiosmtplib exactly the bytes its own regexes would."""

from __future__ import annotations

import random
import re

from relay.delivery import transparency

_LINE_ENDINGS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")
_PERIOD = re.compile(rb"(?m)^\.")


def regex_version(message: bytes) -> bytes:
    out = _LINE_ENDINGS.sub(b"\r\n", message)
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return _PERIOD.sub(b"..", out)


def fast_version(message: bytes) -> bytes:
    out = transparency.normalize_message_line_endings(message)
    return transparency._PeriodStuffing().sub(b"..", out)


def test_same_bytes_as_the_regexes_on_random_messages() -> None:
    rng = random.Random(9)
    alphabet = [b"a", b".", b"\r\n", b"\r", b"\n", b"..", b"\r\n.", b" "]
    for _ in range(3000):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        assert fast_version(message) == regex_version(message), message


def test_typical_and_edge_messages() -> None:
    for message in [
        b"",
        b".",
        b".\r\n",
        b"..\r\n.\r\n",
        b"Subject: x\r\n\r\n.hidden\r\nend",
        b"bare\nlf\n.dot\n",
        b"cr\r.only\r",
    ]:
        assert fast_version(message) == regex_version(message), message


def test_installed_into_aiosmtplib() -> None:
    import aiosmtplib.protocol

    import relay.delivery.client  # noqa: F401  (installs on import)

    assert aiosmtplib.protocol.normalize_message_line_endings is (
        transparency.normalize_message_line_endings
    )
    assert isinstance(aiosmtplib.protocol.PERIOD_REGEX, transparency._PeriodStuffing)
