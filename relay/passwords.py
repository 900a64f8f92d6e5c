"""Password hashing: scrypt (RFC 7914) with a random salt, in a self-describing string.

Format: ``scrypt$N$r$p$salt_b64$hash_b64``. Hashing is slow on purpose (tens of ms), so
the SMTP server calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

# N=2**14, r=8, p=1: the parameters RFC 7914 §2 and OWASP list for interactive logins
# (16 MiB of memory per hash).
_N, _R, _P = 2**14, 8, 1
_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64)
        want = base64.b64decode(digest_b64)
        got = hashlib.scrypt(
            password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), maxmem=_MAXMEM
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def generate_password() -> str:
    """A random password for `relay account add` without --password-stdin."""
    return secrets.token_urlsafe(18)


# A fixed hash to verify against when the account does not exist, so a wrong user name
# costs the same time as a wrong password (no account enumeration by timing).
DUMMY_HASH = hash_password(secrets.token_urlsafe(12))
