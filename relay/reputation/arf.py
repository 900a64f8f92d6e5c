"""Abuse reports in the Abuse Reporting Format (RFC 5965).

multipart/report; report-type=feedback-report: a human part, a message/feedback-report
part (Feedback-Type, Original-Mail-From, Original-Rcpt-To, ...) and the original message
or its headers. Receivers often redact the recipient (Microsoft JMRP does), so the VERP
token in Original-Mail-From, the Return-Path or the List-Unsubscribe mailto of the
original is what names the recipient.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from dataclasses import dataclass

_TOKEN_ADDR = re.compile(r"\b(bounce|unsubscribe)\+([a-z2-7]+)@", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ARFReport:
    feedback_type: str
    original_mail_from: str
    original_rcpt_to: str
    reported_domain: str
    source_ip: str
    user_agent: str
    original_headers: str
    # (kind, token) pairs found anywhere a token may be: VERP sender, List-Unsubscribe.
    tokens: tuple[tuple[str, str], ...]
    original_from: str = ""


def _fields_text(part: email.message.Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):
        return "".join(
            "".join(f"{k}: {v}\n" for k, v in p.items())
            for p in payload
            if isinstance(p, email.message.Message)
        )
    if isinstance(payload, str):
        data = part.get_payload(decode=True)
        return data.decode("utf-8", "replace") if isinstance(data, bytes) else payload
    return ""


def parse_arf(data: bytes) -> ARFReport | None:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    if msg.get_content_type() != "multipart/report":
        return None
    if (msg.get_param("report-type") or "").__str__().lower() != "feedback-report":
        return None
    fields: dict[str, str] = {}
    headers = ""
    original_from = ""
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/feedback-report":
            text = _fields_text(part)
            block = email.message_from_string(text.strip() + "\n", policy=email.policy.compat32)
            fields = {k.lower(): " ".join(str(v).split()) for k, v in block.items()}
        elif ctype == "message/rfc822":
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, email.message.Message):
                headers = "".join(f"{k}: {v}\n" for k, v in inner.items())
                original_from = str(inner.get("From", ""))
        elif ctype == "text/rfc822-headers":
            headers = _fields_text(part)
            original_from = str(
                email.message_from_string(headers, policy=email.policy.compat32).get("From", "")
            )
    if not fields:
        return None
    omf = fields.get("original-mail-from", "").strip("<>")
    tokens = []
    for text in (omf, headers):
        for m in _TOKEN_ADDR.finditer(text):
            pair = (m.group(1).lower(), m.group(2).lower())
            if pair not in tokens:
                tokens.append(pair)
    return ARFReport(
        feedback_type=fields.get("feedback-type", "").lower(),
        original_mail_from=omf,
        original_rcpt_to=fields.get("original-rcpt-to", "").strip("<>").lower(),
        reported_domain=fields.get("reported-domain", "").lower(),
        source_ip=fields.get("source-ip", ""),
        user_agent=fields.get("user-agent", ""),
        original_headers=headers,
        tokens=tuple(tokens),
        original_from=original_from,
    )
