"""Our DKIM signer (relay/delivery/dkim.py) against dkimpy: same bytes, and they verify."""

from __future__ import annotations

import logging
import random
import time

import dkim
import pytest

from relay.delivery import dkim as relay_dkim
from relay.domains.keys import dkim_txt_value, generate_ed25519, generate_rsa, signing_key_bytes
from relay.model import Domain, DomainStatus

NOW = 1_795_000_000

MESSAGE = (
    b"From: Alice <a@example.com>\r\nTo: b@example.org\r\nSubject: hello  there\r\n"
    b"Date: Thu, 26 Nov 2026 00:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n"
    b"\r\nbody line one\r\n\r\nbody   line two  \r\n"
)

# Header and body shapes that canonicalization, header selection and folding must get
# right (RFC 6376 §3.4.2, §3.4.4, §5.4.2).
TRICKY = [
    MESSAGE,
    # folded values, tabs, runs of spaces, space before the colon's value, odd case
    b"FROM:\tAlice\r\n  <a@example.com>  \r\nto:b@example.org\r\nSUBJECT:  a \t b\r\n\t c\r\n"
    b"\r\nx\r\n",
    # a header listed in h= twice in the message: the last instance is signed
    b"From: a@example.com\r\nTo: one@example.org\r\nTo: two@example.org\r\n"
    b"Subject: first\r\nSubject: second\r\n\r\nbody\r\n",
    # no From at all (h= still lists it: RFC 6376 §5.4 requires it)
    b"To: b@example.org\r\nSubject: no from\r\n\r\nbody\r\n",
    # empty body, body of empty lines, body without a final CRLF
    b"From: a@example.com\r\n\r\n",
    b"From: a@example.com\r\n\r\n\r\n\r\n\r\n",
    b"From: a@example.com\r\n\r\nno final line end",
    b"From: a@example.com\r\n\r\nline\r\n\r\n\r\n",
    # body whitespace: tabs, runs, trailing WSP, WSP-only lines
    b"From: a@example.com\r\n\r\n\tindented  twice \t\r\n \t \r\nend\r\n",
    # a long header value folded by the sender, 8-bit bytes, empty value
    b"From: a@example.com\r\nSubject: " + b"word " * 40 + b"\r\nX-Empty:\r\n"
    b"References: <" + b"r" * 200 + b"@example.com>\r\nTo: \xc3\xa9t\xc3\xa9@example.org\r\n"
    b"\r\nbody\r\n",
    # every recommended header, in an unusual order
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nContent-Type: text/plain\r\n"
    b"MIME-Version: 1.0\r\nList-Unsubscribe: <https://u.example.com/x>\r\nCc: c@example.org\r\n"
    b"Reply-To: r@example.com\r\nIn-Reply-To: <0@example.com>\r\nFrom: a@example.com\r\n"
    b"Content-Transfer-Encoding: 7bit\r\n\r\nbody\r\n",
]


def _domain(key: str, algorithm: str = "rsa-sha256", name: str = "example.com") -> Domain:
    return Domain(1, name, 1, DomainStatus.VERIFIED, "sel", key, dkim_algorithm=algorithm)


def _dkimpy(message: bytes, domain: Domain, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """dkimpy's signature for the same moment and the same header list."""
    monkeypatch.setattr(time, "time", lambda: float(NOW))
    try:
        return relay_dkim._sign_with_dkimpy(message, domain)
    finally:
        monkeypatch.undo()


def _ours(message: bytes, domain: Domain) -> bytes:
    """Our signer's own path (not its dkimpy fallback) at the same moment."""
    assert relay_dkim._split_crlf(message) is not None
    return relay_dkim._sign(message, domain, NOW)


def _verifies(signed: bytes, key: str) -> bool:
    txt = dkim_txt_value(key).encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"sel._domainkey.example.com."
        return txt

    return bool(dkim.verify(signed, dnsfunc=dnsfunc))


@pytest.fixture(scope="module")
def rsa_key() -> str:
    return generate_rsa(1024)


@pytest.fixture(scope="module")
def ed_key() -> str:
    return generate_ed25519()


@pytest.mark.parametrize("index", range(len(TRICKY)))
def test_rsa_signature_is_byte_identical_to_dkimpy_and_verifies(
    index: int, rsa_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = TRICKY[index]
    ours = _ours(message, _domain(rsa_key))
    assert ours == _dkimpy(message, _domain(rsa_key), monkeypatch)
    assert _verifies(ours, rsa_key)


@pytest.mark.parametrize("index", range(len(TRICKY)))
def test_ed25519_signature_is_byte_identical_to_dkimpy_and_verifies(
    index: int, ed_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = TRICKY[index]
    domain = _domain(ed_key, "ed25519-sha256")
    ours = _ours(message, domain)
    assert ours == _dkimpy(message, domain, monkeypatch)
    assert _verifies(ours, ed_key)


def _random_message(rng: random.Random) -> bytes:
    names = [b"From", b"To", b"Cc", b"Subject", b"Date", b"Message-ID", b"X-Other", b"Reply-To"]
    words = [b"a", b"bb", b"<c@example.com>", b"\xc3\xa9", b"x" * 90, b"=?utf-8?q?q?="]
    ws = [b" ", b"  ", b"\t", b" \t ", b""]
    lines: list[bytes] = []
    for _ in range(rng.randint(0, 9)):
        name = rng.choice(names)
        name = name.upper() if rng.random() < 0.2 else name
        value = b"".join(rng.choice(ws) + rng.choice(words) for _ in range(rng.randint(0, 6)))
        lines.append(name + b":" + value + rng.choice(ws))
        while rng.random() < 0.3:  # a folded continuation line
            lines.append(rng.choice([b" ", b"\t", b"  "]) + rng.choice(words) + rng.choice(ws))
    body = b"\r\n".join(
        b"".join(rng.choice(ws) + rng.choice(words) for _ in range(rng.randint(0, 5)))
        for _ in range(rng.randint(0, 8))
    )
    body += rng.choice([b"", b"\r\n", b"\r\n\r\n", b" \r\n\t\r\n"])
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def test_random_messages_sign_exactly_as_dkimpy_does(
    rsa_key: str, ed_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(6376)
    for i in range(300):
        message = _random_message(rng)
        if message.startswith(b"\r\n"):
            continue  # no header at all: left to dkimpy (and intake adds Received)
        domain = _domain(rsa_key) if i % 3 == 0 else _domain(ed_key, "ed25519-sha256")
        ours = _ours(message, domain)
        assert ours == _dkimpy(message, domain, monkeypatch), message
        key = rsa_key if i % 3 == 0 else ed_key
        froms = message.lower().count(b"\r\nfrom:") + message.lower().startswith(b"from:")
        # dkimpy refuses to verify a message with two From fields (RFC 6376 §8.15).
        assert _verifies(ours, key) or froms > 1, message


def test_a_changed_body_or_signed_header_no_longer_verifies(rsa_key: str) -> None:
    signed = relay_dkim.sign(MESSAGE, _domain(rsa_key))
    assert _verifies(signed, rsa_key)
    assert not _verifies(signed.replace(b"body line one", b"body line 1"), rsa_key)
    assert not _verifies(signed.replace(b"Subject: hello", b"Subject: jello"), rsa_key)


def test_rsa_2048_signature_verifies_and_the_key_is_parsed_once() -> None:
    key = generate_rsa(2048)
    domain = _domain(key)
    relay_dkim._load_key.cache_clear()
    first = relay_dkim.sign(MESSAGE, domain)
    second = relay_dkim.sign(MESSAGE.replace(b"one", b"uno"), domain)
    assert _verifies(first, key) and _verifies(second, key)
    assert relay_dkim._load_key.cache_info().hits >= 1


def test_a_message_with_bare_lf_line_ends_is_signed_by_dkimpy_and_verifies(
    rsa_key: str,
) -> None:
    message = MESSAGE.replace(b"\r\n", b"\n")
    signed = relay_dkim.sign(message, _domain(rsa_key))
    assert signed.startswith(b"DKIM-Signature:") and signed.endswith(message)
    assert _verifies(signed, rsa_key)


def test_dual_signing_adds_a_second_signature_over_the_first(rsa_key: str, ed_key: str) -> None:
    [signed] = relay_dkim.sign_each(
        [(MESSAGE, [_domain(rsa_key), _domain(ed_key, "ed25519-sha256")])]
    )
    assert signed.count(b"DKIM-Signature:") == 2
    assert signed.index(b"a=ed25519-sha256") < signed.index(b"a=rsa-sha256")


def test_an_unparsable_header_block_is_sent_unsigned_without_failing_the_batch(
    rsa_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    # "Subject : x" (obsolete syntax, RFC 5322 §4.5.3) is refused by dkimpy's parser.
    odd = b"From: a@example.com\r\nSubject : x\r\n\r\nbody\r\n"
    with caplog.at_level(logging.WARNING, logger="relay.delivery"):
        out = relay_dkim.sign_each([(odd, [_domain(rsa_key)]), (MESSAGE, [_domain(rsa_key)])])
    assert out[0] == odd
    assert _verifies(out[1], rsa_key)
    assert "sent unsigned" in caplog.text


def test_a_key_this_signer_cannot_use_is_left_to_dkimpy(rsa_key: str) -> None:
    # An RSA key filed under ed25519-sha256 is a configuration error dkimpy reports.
    assert relay_dkim._load_key(rsa_key, "ed25519-sha256") is None
    assert signing_key_bytes(rsa_key, "ed25519-sha256") == rsa_key.encode()
