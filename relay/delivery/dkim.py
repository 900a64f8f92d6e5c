"""DKIM signing (RFC 6376) with dkimpy: the last change made to the bytes."""

from __future__ import annotations

import dkim

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


def _present_headers(message: bytes) -> set[bytes]:
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end]
    names = set()
    for line in head.split(b"\r\n"):
        if line and line[:1] not in (b" ", b"\t") and b":" in line:
            names.add(line.split(b":", 1)[0].strip().lower())
    return names
