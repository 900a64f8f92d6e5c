"""Signed per-recipient tokens for VERP and unsubscribe."""

from __future__ import annotations

from relay.reputation.tokens import TokenKind, make_token, read_token, split_local

SECRET = b"s3cret"


def test_token_round_trips_to_the_recipient_id() -> None:
    for rid in (1, 127, 128, 2**31 + 5):
        token = make_token(SECRET, TokenKind.UNSUBSCRIBE, rid)
        assert read_token(SECRET, TokenKind.UNSUBSCRIBE, token) == rid
        assert read_token(SECRET, TokenKind.UNSUBSCRIBE, token.upper()) == rid


def test_token_fits_in_a_local_part() -> None:
    token = make_token(SECRET, TokenKind.UNSUBSCRIBE, 2**34)
    assert len(f"unsubscribe+{token}") <= 64
    assert token == token.lower() and token.isalnum()


def test_tampered_or_foreign_tokens_are_refused() -> None:
    token = make_token(SECRET, TokenKind.UNSUBSCRIBE, 42)
    other = make_token(SECRET, TokenKind.UNSUBSCRIBE, 43)
    assert read_token(b"another secret", TokenKind.UNSUBSCRIBE, token) is None
    assert read_token(SECRET, TokenKind.BOUNCE, token) is None
    assert (
        read_token(SECRET, TokenKind.UNSUBSCRIBE, token[:-1] + ("a" if token[-1] != "a" else "b"))
        is None
    )
    assert read_token(SECRET, TokenKind.UNSUBSCRIBE, other[:4] + token[4:]) in (None, 42)
    assert read_token(SECRET, TokenKind.UNSUBSCRIBE, "") is None
    assert read_token(SECRET, TokenKind.UNSUBSCRIBE, "!!!") is None


def test_split_local() -> None:
    assert split_local("<Bounce+AbC@Relay.Test>") == ("bounce", "AbC", "relay.test")
    assert split_local("fbl@relay.test") == ("fbl", "", "relay.test")
