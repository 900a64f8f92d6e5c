"""Per-recipient tokens for VERP bounce addresses and unsubscribe links.

A token is base32(varint(recipient id) + HMAC-SHA256(secret, kind | id)[:10]), lower-case:
23 characters for ids below 2**35, so ``unsubscribe+TOKEN`` stays well inside the 64-octet
local-part limit (RFC 5321 §4.5.3.1.1), and it survives receivers that lower-case local
parts. 80 bits of MAC make guessing a valid token for someone else hopeless; the kind in
the MAC keeps a bounce token from working as an unsubscribe token.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac

_MAC_BYTES = 10


class TokenKind(enum.StrEnum):
    BOUNCE = "b"
    UNSUBSCRIBE = "u"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _unvarint(data: bytes) -> tuple[int, int]:
    n = shift = 0
    for i, byte in enumerate(data[:10]):
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, i + 1
    raise ValueError("bad varint")


def _mac(secret: bytes, kind: TokenKind, payload: bytes) -> bytes:
    return hmac.new(secret, kind.value.encode() + b"|" + payload, hashlib.sha256).digest()[
        :_MAC_BYTES
    ]


def make_token(secret: bytes, kind: TokenKind, recipient_id: int) -> str:
    payload = _varint(recipient_id)
    raw = payload + _mac(secret, kind, payload)
    return base64.b32encode(raw).decode().rstrip("=").lower()


def read_token(secret: bytes, kind: TokenKind, token: str) -> int | None:
    """The recipient id of a valid token, else None."""
    text = token.strip().upper()
    if not text or len(text) > 40:
        return None
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
        rid, used = _unvarint(raw)
    except (binascii.Error, ValueError):
        return None
    payload, mac = raw[:used], raw[used:]
    if len(mac) != _MAC_BYTES or not hmac.compare_digest(mac, _mac(secret, kind, payload)):
        return None
    return rid


def split_local(address: str) -> tuple[str, str, str]:
    """(tag, token, domain) of ``tag+token@domain``; token "" when there is none."""
    local, _, domain = address.strip().strip("<>").rpartition("@")
    tag, _, token = local.partition("+")
    return tag.lower(), token, domain.lower().rstrip(".")
