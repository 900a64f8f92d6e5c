"""Per-recipient List-Unsubscribe (RFC 8058) and VERP, signed by DKIM after rendering."""

from __future__ import annotations

import dkim

from relay.delivery import dkim as relay_dkim
from relay.delivery.render import add_headers, header_names, unsubscribe_headers, verp_address
from relay.domains.keys import dkim_txt_value, generate_rsa
from relay.model import Domain, DomainStatus
from relay.reputation.tokens import TokenKind, read_token

MSG = (
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n"
    b"Message-ID: <1@example.com>\r\n\r\nhello\r\n"
)


def test_headers_are_added_and_covered_by_the_dkim_signature() -> None:
    key = generate_rsa(1024)
    domain = Domain(1, "example.com", 1, DomainStatus.VERIFIED, "relay", key)
    rendered = add_headers(
        MSG,
        unsubscribe_headers("https://relay.test/u/tok", "unsubscribe+tok@bounce.relay.test"),
    )
    signed = relay_dkim.sign(rendered, domain)
    txt = dkim_txt_value(key).encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"relay._domainkey.example.com."
        return txt

    assert dkim.verify(signed, dnsfunc=dnsfunc)
    sig = signed.split(b"\r\n\r\n")[0].decode()
    h_tag = sig.lower().split("h=")[1].split(";")[0]
    assert "list-unsubscribe" in h_tag and "list-unsubscribe-post" in h_tag
    # Changing the unsubscribe link breaks the signature: it is covered.
    tampered = signed.replace(b"/u/tok", b"/u/evil")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in signed
    assert b"List-Unsubscribe: <https://relay.test/u/tok>, <mailto:" in signed


def test_header_names_sees_an_existing_list_unsubscribe() -> None:
    own = b"List-Unsubscribe: <mailto:x@example.com>\r\n" + MSG
    assert b"list-unsubscribe" in header_names(own)
    assert b"list-unsubscribe" not in header_names(MSG)


def test_verp_address_carries_a_bounce_token() -> None:
    addr = verp_address(b"k", 99, "bounce.relay.test")
    local, _, dom = addr.partition("@")
    assert dom == "bounce.relay.test"
    assert local.startswith("bounce+")
    assert read_token(b"k", TokenKind.BOUNCE, local.partition("+")[2]) == 99
