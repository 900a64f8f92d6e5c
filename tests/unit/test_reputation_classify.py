"""Permanent failures: recipient-class (blocklist) vs reputation-class (not the address)."""

from __future__ import annotations

import pytest

from relay.reputation.classify import BounceClass, classify, enhanced_status


@pytest.mark.parametrize(
    "reply",
    [
        "550 5.1.1 <gone@bad.example> user unknown",
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        "550 5.2.1 The email account that you tried to reach is disabled",
        "550 User unknown",
        "550 Requested action not taken: mailbox unavailable (no such user)",
        "553 5.0.0 sorry, no mailbox here by that name",
    ],
)
def test_recipient_class(reply: str) -> None:
    assert classify(reply) is BounceClass.RECIPIENT


@pytest.mark.parametrize(
    "reply",
    [
        "550 5.7.1 Service unavailable, Client host [192.0.2.1] blocked using Spamhaus",
        "554 5.7.1 Message rejected due to local policy",
        "550 5.7.26 Unauthenticated email is not accepted from this domain (DMARC)",
        "554 Your IP is on our blocklist",
    ],
)
def test_reputation_class(reply: str) -> None:
    assert classify(reply) is BounceClass.REPUTATION


@pytest.mark.parametrize(
    "reply",
    [
        "552 5.2.2 Mailbox full",
        "552 5.3.4 Message size exceeds fixed limit",
        "550 5.1.8 Sender address rejected: domain not found",
    ],
)
def test_other_permanent_failures_do_not_blocklist(reply: str) -> None:
    assert classify(reply) is BounceClass.OTHER


def test_generic_dsn_status_defers_to_the_reply() -> None:
    assert classify("550 5.2.1 account disabled", "5.0.0") is BounceClass.RECIPIENT


def test_enhanced_status_extraction() -> None:
    assert enhanced_status("550-5.1.1 The email account") == "5.1.1"
    assert enhanced_status("no code here") is None
