"""Delivery status notifications: RFC 3464 parsed properly, the rest best-effort.

A standard DSN is multipart/report; report-type=delivery-status (RFC 6522) whose
message/delivery-status part holds one per-message field block and one block per
recipient (Final-Recipient, Action, Status, Diagnostic-Code). Non-standard bounces
(qmail, old Exim, some webmail) are plain text: we look for the failed address and an
SMTP reply in the text. ``parse_dsn`` returns None only when it finds nothing usable:
the caller keeps such mail and counts it.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from dataclasses import dataclass

from relay.reputation.classify import BounceClass, classify, enhanced_status

_ADDRESS = re.compile(r"<?([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,})>?")
_SMTP_REPLY = re.compile(r"\b([45]\d\d)[ -]((?:[45]\.\d{1,3}\.\d{1,3} )?[^\r\n]*)")
_FAILURE_HINT = re.compile(
    r"could not be delivered|delivery (has )?failed|undeliver|failed permanently|"
    r"permanent (error|failure)|delivery status notification|returned mail|"
    r"mail delivery (failed|subsystem)|failure notice|wasn't delivered|couldn't be delivered",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class DSNRecipient:
    address: str
    action: str  # failed | delayed | delivered | relayed | expanded
    status: str  # RFC 3463, e.g. 5.1.1
    diagnostic: str
    original_recipient: str = ""

    @property
    def hard(self) -> bool:
        return self.action == "failed" and self.status.startswith("5")

    @property
    def bounce_class(self) -> BounceClass:
        return classify(self.diagnostic or self.status, self.status)


@dataclass(frozen=True, slots=True)
class DSN:
    recipients: tuple[DSNRecipient, ...]
    reporting_mta: str = ""
    standard: bool = True
    original_message_id: str = ""
    original_headers: str = ""


def _strip_type(value: str) -> str:
    """'rfc822; a@b' -> 'a@b', 'smtp; 550 ...' -> '550 ...' (RFC 3464 §2.3.2 type;value)."""
    value = " ".join(value.split())
    if ";" in value:
        kind, rest = value.split(";", 1)
        if kind.strip().isalnum() or "-" in kind:
            return rest.strip()
    return value.strip()


def _fields(block: email.message.Message) -> dict[str, str]:
    return {k.lower(): str(v) for k, v in block.items()}


def _original(msg: email.message.Message) -> tuple[str, str]:
    """(Message-ID, header text) of the returned message or its headers, if included."""
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, email.message.Message):
                head = "".join(f"{k}: {v}\n" for k, v in inner.items())
                return str(inner.get("Message-ID", "")).strip(), head
        if ctype == "text/rfc822-headers":
            text = _text(part)
            inner = email.message_from_string(text, policy=email.policy.compat32)
            return str(inner.get("Message-ID", "")).strip(), text
    return "", ""


def _text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        charset = part.get_content_charset() or "utf-8"
        try:
            return payload.decode(charset, "replace")
        except LookupError:
            return payload.decode("utf-8", "replace")
    raw = part.get_payload()
    return raw if isinstance(raw, str) else ""


def _standard(msg: email.message.Message) -> DSN | None:
    for part in msg.walk():
        if part.get_content_type() not in (
            "message/delivery-status",
            "message/global-delivery-status",
        ):
            continue
        payload = part.get_payload()
        blocks: list[email.message.Message] = []
        if isinstance(payload, list):
            blocks = [b for b in payload if isinstance(b, email.message.Message)]
        elif isinstance(payload, str):
            # Some MTAs put a blank line first, or the parser left it as text: split blocks.
            for chunk in re.split(r"\r?\n\s*\r?\n", payload.strip()):
                blocks.append(email.message_from_string(chunk, policy=email.policy.compat32))
        if not blocks:
            continue
        reporting = ""
        recipients: list[DSNRecipient] = []
        for block in blocks:
            f = _fields(block)
            if "reporting-mta" in f:
                reporting = _strip_type(f["reporting-mta"])
            rcpt = f.get("final-recipient") or f.get("original-recipient")
            if not rcpt:
                continue
            diag = _strip_type(f.get("diagnostic-code", ""))
            status = (f.get("status", "") or "").strip().split(" ")[0]
            if not re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status):
                status = enhanced_status(diag) or ("5.0.0" if "fail" in f.get("action", "") else "")
            recipients.append(
                DSNRecipient(
                    address=_strip_type(rcpt).strip("<>").lower(),
                    action=f.get("action", "").strip().lower(),
                    status=status,
                    diagnostic=diag,
                    original_recipient=_strip_type(f.get("original-recipient", "")).strip("<>"),
                )
            )
        if recipients:
            mid, head = _original(msg)
            return DSN(tuple(recipients), reporting, True, mid, head)
    return None


def _best_effort(msg: email.message.Message, raw_text: str) -> DSN | None:
    subject = str(msg.get("Subject", ""))
    sender = str(msg.get("From", "")).lower()
    text = "\n".join(_text(p) for p in msg.walk() if p.get_content_maintype() == "text")
    text = text or raw_text
    looks_like_bounce = (
        _FAILURE_HINT.search(subject)
        or _FAILURE_HINT.search(text[:4000])
        or "mailer-daemon" in sender
        or "postmaster" in sender
    )
    if not looks_like_bounce:
        return None
    reply = _SMTP_REPLY.search(text)
    diag = f"{reply.group(1)} {reply.group(2)}".strip() if reply else ""
    # The failed address: the first one in the text that is not the bounce's own sender.
    address = ""
    for m in _ADDRESS.finditer(text):
        cand = m.group(1).lower()
        if "mailer-daemon" in cand or "postmaster" in cand or cand in sender:
            continue
        address = cand
        break
    if not address:
        return None
    if not diag:
        # qmail style: "Sorry, no mailbox here by that name. (#5.1.1)"
        line = next((ln for ln in text.splitlines() if enhanced_status(ln)), "")
        diag = line.strip()
    status = enhanced_status(diag) or (f"{diag[0]}.0.0" if diag[:1] in ("4", "5") else "5.0.0")
    action = "delayed" if status.startswith("4") else "failed"
    mid, head = _original(msg)
    return DSN((DSNRecipient(address, action, status, diag),), "", False, mid, head)


def parse_dsn(data: bytes) -> DSN | None:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    found = _standard(msg)
    if found is not None:
        return found
    return _best_effort(msg, data.decode("utf-8", "replace"))
