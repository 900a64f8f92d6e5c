"""DKIM key material: generation and the public key as published in DNS."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


def generate_rsa(bits: int = 2048) -> str:
    """A new RSA private key, PEM (PKCS#8) text."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def generate_ed25519() -> str:
    """A new Ed25519 private key (RFC 8463), PEM (PKCS#8) text."""
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_key_b64(private_pem: str) -> str:
    """The ``p=`` value: base64 DER SubjectPublicKeyInfo for RSA, raw 32 bytes for Ed25519."""
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode()
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def dkim_txt_value(private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    k = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
    return f"v=DKIM1; k={k}; p={public_key_b64(private_pem)}"


def signing_key_bytes(private_pem: str, algorithm: str) -> bytes:
    """The private key as dkimpy's ``dkim.sign`` wants it: PEM for RSA, base64 of the raw
    32-byte seed for Ed25519 (dkimpy hands it to PyNaCl's SigningKey)."""
    if algorithm != "ed25519-sha256":
        return private_pem.encode()
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(raw)
    return private_pem.encode()
