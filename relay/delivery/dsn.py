"""Delivery status notifications (RFC 3464) back to the sender on final failure.

Off by default (``delivery.dsn``): applications learn outcomes from events, webhooks and
``relay status``, and bounces to no-reply senders are noise. When on, one DSN per
message lists every recipient that bounced or expired in that attempt. A DSN has the null
reverse-path (RFC 5321 §4.5.5), so a DSN that fails is never answered with another.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Sequence

from relay.model import Outcome, RecipientStatus

_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


def status_code(outcome: Outcome) -> str:
    found = _ENHANCED.search(outcome.reply or "")
    if found:
        return found.group(1)
    return "4.4.7" if outcome.status is RecipientStatus.EXPIRED else "5.0.0"


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    original: bytes,
    failures: Sequence[tuple[str, Outcome]],
    arrival: float,
    now: float,
) -> bytes:
    """The DSN message (multipart/report) for ``failures`` of one original message."""
    end = original.find(b"\r\n\r\n")
    headers = original if end < 0 else original[: end + 2]
    boundary = f"=_relay_dsn_{secrets.token_hex(12)}"
    text = [
        f"This is the mail system at {reporting_mta}.",
        "",
        "Your message could not be delivered to the recipients below.",
        "",
    ]
    for rcpt, o in failures:
        why = "gave up retrying" if o.status is RecipientStatus.EXPIRED else "refused"
        text.append(f"<{rcpt}>: {why}: {' '.join((o.reply or '').split())}")
    report = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"Arrival-Date: {email.utils.formatdate(arrival, localtime=False)}",
    ]
    for rcpt, o in failures:
        report += ["", f"Final-Recipient: rfc822; {rcpt}", "Action: failed"]
        report.append(f"Status: {status_code(o)}")
        if o.mx:
            report.append(f"Remote-MTA: dns; {o.mx}")
        report.append(f"Diagnostic-Code: smtp; {' '.join((o.reply or '').split())}")
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate(now, localtime=False)}",
        f"Message-ID: {email.utils.make_msgid(domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",  # RFC 3834: never auto-answer this
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    crlf = "\r\n"
    parts = [
        crlf.join(head),
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "",
        crlf.join(text),
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        crlf.join(report),
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    tail = f"{crlf}--{boundary}--{crlf}"
    return crlf.join(parts).encode("utf-8") + crlf.encode() + headers + tail.encode()
