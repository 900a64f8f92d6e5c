"""DKIM signing with the RSA operation in OpenSSL (relay/delivery/dkim.py, issue 9)."""

from __future__ import annotations

import dkim
import pytest

from relay.delivery import dkim as relay_dkim
from relay.domains.keys import dkim_txt_value, generate_ed25519, generate_rsa
from relay.model import Domain, DomainStatus

MESSAGE = (
    b"From: Alice <a@example.com>\r\nTo: b@example.org\r\nSubject: hello  there\r\n"
    b"Date: Thu, 26 Nov 2026 00:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n"
    b"\r\nbody line one\r\n\r\nbody   line two  \r\n"
)


def _domain(key: str, algorithm: str = "rsa-sha256", selector: str = "relay") -> Domain:
    return Domain(
        1, "example.com", 1, DomainStatus.VERIFIED, selector, key, dkim_algorithm=algorithm
    )


def _verifies(signed: bytes, key: str, selector: str = "relay") -> bool:
    txt = dkim_txt_value(key).encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"{selector}._domainkey.example.com.".encode()
        return txt

    return bool(dkim.verify(signed, dnsfunc=dnsfunc))


def test_rsa_signature_verifies_with_dkimpy_against_the_published_key() -> None:
    key = generate_rsa(2048)
    signed = relay_dkim.sign(MESSAGE, _domain(key))
    assert signed.startswith(b"DKIM-Signature:") and signed.endswith(MESSAGE)
    assert _verifies(signed, key)
    assert not _verifies(signed.replace(b"body line one", b"body line 1"), key)


def test_rsa_signature_is_byte_identical_to_dkimpy_pure_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = generate_rsa(1024)
    fast = relay_dkim.sign(MESSAGE, _domain(key))
    # dkimpy's own RSA code, as before the change: PKCS#1 v1.5 is deterministic.
    monkeypatch.setattr(dkim, "parse_pem_private_key", relay_dkim._dkimpy_parse_pem)
    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", relay_dkim._dkimpy_rsa_sign)
    slow = relay_dkim.sign(MESSAGE, _domain(key))
    # Same timestamp needed for identical t=: compare everything but the t= and b= tags.
    assert _verifies(slow, key) and _verifies(fast, key)

    def tags(signed: bytes) -> dict[bytes, bytes]:
        header = signed[: signed.index(b"\r\nFrom:")].replace(b"\r\n", b"").replace(b" ", b"")
        value = header.split(b":", 1)[1]
        return dict(t.split(b"=", 1) for t in value.split(b";") if b"=" in t)

    f, s = tags(fast), tags(slow)
    if f[b"t"] == s[b"t"]:
        assert f[b"b"] == s[b"b"]
    assert {k: v for k, v in f.items() if k not in (b"t", b"b")} == {
        k: v for k, v in s.items() if k not in (b"t", b"b")
    }


def test_rsa_signatures_of_one_key_reuse_the_parsed_key_and_each_verifies() -> None:
    key = generate_rsa(1024)
    domain = _domain(key)
    first = relay_dkim.sign(MESSAGE, domain)
    second = relay_dkim.sign(MESSAGE.replace(b"one", b"uno"), domain)
    assert _verifies(first, key) and _verifies(second, key)
    assert relay_dkim._parse_pem.cache_info().hits >= 1


def test_ed25519_signing_still_verifies() -> None:
    key = generate_ed25519()
    signed = relay_dkim.sign(MESSAGE, _domain(key, "ed25519-sha256", "ed"))
    assert b"a=ed25519-sha256" in signed.replace(b" ", b"")
    assert _verifies(signed, key, "ed")


def test_fast_relaxed_body_matches_dkimpys_regex_passes_on_random_bodies() -> None:
    import random

    rng = random.Random(6376)
    alphabet = [b"a", b" ", b"  ", b"\t", b"\r\n", b" \r\n", b"\r\n\r\n", b"x y"]
    for _ in range(3000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 25)))
        assert relay_dkim._relaxed_body(body) == relay_dkim._dkimpy_relaxed_body(body), body


def test_fast_header_split_matches_dkimpys_parse() -> None:
    for message in [
        MESSAGE,
        b"From: a@x\r\nSubject: folded\r\n  line\r\n\r\n",
        b"From: a@x\r\n\r\nbody with bare\nlf\r\n",  # not all-CRLF: dkimpy's own parse
        b"From: a@x\r\nTo: b@y\r\n",  # no body
        b"From: a@x\r\n\r\n\r\n.\r\n\r\n",
    ]:
        assert relay_dkim._rfc822_parse(message) == relay_dkim._dkimpy_rfc822_parse(message)


def test_a_large_signed_body_still_verifies() -> None:
    key = generate_rsa()
    body = b"".join(b"line %d of a long newsletter, with  two spaces\r\n" % i for i in range(3000))
    message = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body
    assert _verifies(relay_dkim.sign(message, _domain(key)), key)


def test_sign_each_signs_a_batch_with_each_messages_own_keys_in_order() -> None:
    rsa, ed = generate_rsa(1024), generate_ed25519()
    dual = [_domain(rsa), _domain(ed, "ed25519-sha256", "ed")]
    other = MESSAGE.replace(b"hello", b"goodbye")
    plain, one, two = relay_dkim.sign_each([(MESSAGE, []), (other, dual[:1]), (MESSAGE, dual)])
    assert plain == MESSAGE
    assert one.count(b"DKIM-Signature:") == 1 and one.endswith(other) and _verifies(one, rsa)
    # The second key signs over the first signature: the ed25519 one comes first.
    assert two.count(b"DKIM-Signature:") == 2 and two.startswith(b"DKIM-Signature: v=1; a=ed25519")
    rsa_at = two.index(b"DKIM-Signature: v=1; a=rsa-sha256")
    assert 0 < rsa_at < two.index(MESSAGE) and _verifies(two[rsa_at:], rsa)
