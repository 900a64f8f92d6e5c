"""ARF (RFC 5965) complaint parsing."""

from __future__ import annotations

from relay.reputation.arf import parse_arf

ARF = b"""From: staff@hotmail.example
To: fbl@relay.test
Subject: complaint about message from 192.0.2.1
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
     boundary="part1_13d.2e68ed54_boundary"

--part1_13d.2e68ed54_boundary
Content-Type: text/plain; charset="US-ASCII"

This is an email abuse report for an email message received from IP
192.0.2.1 on Thu, 8 Mar 2005 14:00:00 EDT.

--part1_13d.2e68ed54_boundary
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <bounce+TOKEN@relay.test>
Original-Rcpt-To: <someone@example.net>
Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT
Reporting-MTA: dns; mail.example.net
Source-IP: 192.0.2.1
Reported-Domain: example.com

--part1_13d.2e68ed54_boundary
Content-Type: message/rfc822
Content-Disposition: inline

From: <a@example.com>
Received: from mailserver.example.com by example.net with SMTP
To: <Undisclosed Recipients>
Subject: Earn money
List-Unsubscribe: <http://relay.test/u/UTOKEN>, <mailto:unsubscribe+utoken@relay.test>
Message-ID: <8787KJKJ3K4J3K4J3K4J3.mail@example.com>

Spam Spam Spam
--part1_13d.2e68ed54_boundary--
"""


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


def test_arf_report_fields_and_tokens() -> None:
    report = parse_arf(crlf(ARF))
    assert report is not None
    assert report.feedback_type == "abuse"
    assert report.original_rcpt_to == "someone@example.net"
    assert report.source_ip == "192.0.2.1"
    assert ("bounce", "token") in report.tokens
    assert ("unsubscribe", "utoken") in report.tokens
    assert "a@example.com" in report.original_from


def test_a_dsn_is_not_an_arf_report() -> None:
    dsn = ARF.replace(b"report-type=feedback-report", b"report-type=delivery-status")
    assert parse_arf(crlf(dsn)) is None
    assert parse_arf(b"Subject: hi\r\n\r\nhello\r\n") is None
