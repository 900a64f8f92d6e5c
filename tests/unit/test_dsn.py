"""DSN parsing (RFC 3464) on samples modelled on what real MTAs send."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.reputation.classify import BounceClass
from relay.reputation.dsn import parse_dsn

SAMPLES = Path(__file__).parent / "dsn_samples"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.mark.parametrize(
    ("name", "address", "status", "bounce_class", "standard"),
    [
        ("postfix.eml", "nobody@example.org", "5.1.1", BounceClass.RECIPIENT, True),
        ("exim.eml", "gone@example.net", "5.0.0", BounceClass.RECIPIENT, True),
        ("gmail.eml", "missing.person@gmail.com", "5.1.1", BounceClass.RECIPIENT, True),
        ("microsoft.eml", "blocked@outlook.com", "5.7.1", BounceClass.REPUTATION, True),
        ("qmail.eml", "olduser@example.info", "5.1.1", BounceClass.RECIPIENT, False),
    ],
)
def test_hard_bounce_samples_give_recipient_status_and_class(
    name: str, address: str, status: str, bounce_class: BounceClass, standard: bool
) -> None:
    dsn = parse_dsn(sample(name))
    assert dsn is not None
    assert dsn.standard is standard
    [rcpt] = dsn.recipients
    assert rcpt.address == address
    assert rcpt.status == status
    assert rcpt.hard
    assert rcpt.bounce_class is bounce_class


def test_standard_dsn_names_the_original_message() -> None:
    dsn = parse_dsn(sample("postfix.eml"))
    assert dsn is not None
    assert dsn.original_message_id == "<abc123@example.com>"
    assert dsn.reporting_mta == "mx.example.org"
    assert "User unknown" in dsn.recipients[0].diagnostic


def test_delayed_dsn_is_soft() -> None:
    dsn = parse_dsn(sample("delayed.eml"))
    assert dsn is not None
    [rcpt] = dsn.recipients
    assert rcpt.action == "delayed"
    assert rcpt.status == "4.4.1"
    assert not rcpt.hard


def test_mangled_mail_is_not_a_dsn() -> None:
    assert parse_dsn(sample("mangled.eml")) is None


def test_ordinary_reply_is_not_a_dsn() -> None:
    mail = b"From: bob@example.org\r\nSubject: hi\r\n\r\nthanks for the mail, a@example.com\r\n"
    assert parse_dsn(mail) is None
