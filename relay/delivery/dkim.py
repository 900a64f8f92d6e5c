"""DKIM signing (RFC 6376) with dkimpy: the last change made to the bytes.

dkimpy canonicalizes and builds the header; the RSA operation itself runs in OpenSSL
(``cryptography``) instead of dkimpy's pure-Python modular exponentiation, which cost
~5 ms per RSA-2048 signature (issue 9). RSASSA-PKCS1-v1_5 is deterministic, so the
signature bytes are identical either way (tests/unit/test_dkim_openssl.py checks it).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim import canonicalization

from relay.domains.keys import signing_key_bytes
from relay.model import Domain

# The headers RFC 6376 §5.4.1 recommends signing, plus the ones relay adds. Listing a
# header that is absent is fine (and blocks it being added later without breaking).
SIGNED_HEADERS = (
    b"From",
    b"To",
    b"Cc",
    b"Subject",
    b"Date",
    b"Message-ID",
    b"Reply-To",
    b"MIME-Version",
    b"Content-Type",
    b"Content-Transfer-Encoding",
    b"List-Unsubscribe",
    b"List-Unsubscribe-Post",
    b"In-Reply-To",
    b"References",
)


def sign(message: bytes, domain: Domain) -> bytes:
    """Return ``message`` with a DKIM-Signature header for ``domain`` prepended."""
    present = _present_headers(message)
    include = [h for h in SIGNED_HEADERS if h.lower() in present]
    if b"from" not in present:
        include.insert(0, b"From")
    signature = dkim.sign(
        message,
        domain.dkim_selector.encode(),
        domain.name.encode(),
        signing_key_bytes(domain.dkim_private_key, domain.dkim_algorithm),
        include_headers=include,
        canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=domain.dkim_algorithm.encode(),
        linesep=b"\r\n",
    )
    return bytes(signature) + message


def sign_each(messages: Sequence[tuple[bytes, Sequence[Domain]]]) -> list[bytes]:
    """Each message signed by each of its domains in turn (a dual-signing domain adds
    a second signature over the first); a message with no domain is returned as is."""
    out: list[bytes] = []
    for message, domains in messages:
        for domain in domains:
            message = sign(message, domain)
        out.append(message)
    return out


def _present_headers(message: bytes) -> set[bytes]:
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end]
    names = set()
    for line in head.split(b"\r\n"):
        if line and line[:1] not in (b" ", b"\t") and b":" in line:
            names.add(line.split(b":", 1)[0].strip().lower())
    return names


# ---------------------------------------------------------------------- OpenSSL RSA

_HASHES: dict[str, Any] = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}
_dkimpy_parse_pem = dkim.parse_pem_private_key
_dkimpy_rsa_sign = dkim.RSASSA_PKCS1_v1_5_sign


class _OpenSSLKey(dict[str, Any]):
    """dkimpy's parsed key (a dict of integers) carrying the same key loaded in OpenSSL
    (None when OpenSSL could not load it: dkimpy's own code signs then)."""

    openssl: rsa.RSAPrivateKey | None = None


@functools.lru_cache(maxsize=256)
def _parse_pem(data: bytes) -> _OpenSSLKey:
    # Parsed once per key (the PEM is the cache key); dkimpy re-parsed it per message.
    key = _OpenSSLKey(_dkimpy_parse_pem(data))
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return key
    if isinstance(loaded, rsa.RSAPrivateKey):
        key.openssl = loaded
    return key


def _rsa_sign(hash_obj: Any, private_key: Any) -> bytes:
    algorithm = _HASHES.get(str(getattr(hash_obj, "name", "")).lower())
    openssl = getattr(private_key, "openssl", None)
    if openssl is None or algorithm is None:
        return bytes(_dkimpy_rsa_sign(hash_obj, private_key))
    signature: bytes = openssl.sign(
        hash_obj.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm())
    )
    return signature


# dkimpy has no signer hook: DKIM.sign/gen_header call these two module-level names.
# The replacements fall back to dkimpy's own code for anything they do not handle.
dkim.parse_pem_private_key = _parse_pem
dkim.RSASSA_PKCS1_v1_5_sign = _rsa_sign


# ---------------------------------------------------------------------- body passes in C

_dkimpy_rfc822_parse = dkim.rfc822_parse
_dkimpy_relaxed_body = dkim.canonicalization.Relaxed.canonicalize_body


def _rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's parse, splitting only the header block: dkimpy splits the whole message
    into lines with a regular expression and joins the body back with CRLF, ~1 ms per
    100 KB (issue 9). For an all-CRLF message (what intake stores) the body is the bytes
    after the blank line, unchanged; anything else goes to dkimpy's own code."""
    end = message.find(b"\r\n\r\n")
    if end < 0 or message.count(b"\n") != message.count(b"\r\n"):
        return _dkimpy_rfc822_parse(message)  # type: ignore[no-any-return]
    headers, _ = _dkimpy_rfc822_parse(message[: end + 4])
    return headers, message[end + 4 :]


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 relaxed body canonicalization. dkimpy runs two regular-expression
    substitutions over the body (~4 ms per 100 KB); when the body has no tab, no two
    spaces in a row and no space before a CRLF they change nothing, which three C-speed
    searches establish. Only the trailing empty lines are then left to remove."""
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        return _dkimpy_relaxed_body(body)  # type: ignore[no-any-return]
    return canonicalization.correct_empty_body(  # type: ignore[no-any-return]
        canonicalization.strip_trailing_lines(body)
    )


dkim.rfc822_parse = _rfc822_parse
dkim.canonicalization.Relaxed.canonicalize_body = staticmethod(_relaxed_body)
