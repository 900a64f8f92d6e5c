"""Classification of permanent SMTP failures.

recipient: the address is bad (RFC 3463 5.1.x addressing, 5.2.1 mailbox disabled, and
"user unknown"-type texts): it goes on the blocklist. reputation: the receiver refused us
(5.7.x security/policy, block lists): the address is fine, the sending IP is counted.
other: any other permanent failure (mailbox full 5.2.2, message too big 5.3.4, ...).
"""

from __future__ import annotations

import enum
import re

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_CODE = re.compile(r"^\s*([245]\d\d)\b")

_RECIPIENT_WORDS = re.compile(
    r"user unknown|unknown user|no such (user|mailbox|recipient|address)|mailbox (not found|"
    r"unavailable|does not exist)|does not exist|doesn'?t exist|invalid (recipient|mailbox|"
    r"address)|recipient (address )?rejected|address rejected|unknown recipient|not a valid "
    r"(mailbox|recipient)|account (has been )?disabled|no mailbox here|unrouteable address|"
    r"user not found|recipient not found|mailbox is disabled|inactive user",
    re.IGNORECASE,
)
_REPUTATION_WORDS = re.compile(
    r"block(ed|list)|blacklist|spamhaus|spamcop|barracuda|reputation|\bpolicy\b|\bspam\b|"
    r"rejected due to|dnsbl|\brbl\b|not authori[sz]ed|access denied|\bdmarc\b|\bspf\b|\bdkim\b",
    re.IGNORECASE,
)


class BounceClass(enum.StrEnum):
    RECIPIENT = "recipient"
    REPUTATION = "reputation"
    OTHER = "other"


def enhanced_status(text: str) -> str | None:
    m = _ENHANCED.search(text)
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None


def reply_code(text: str) -> int | None:
    m = _CODE.match(text)
    return int(m.group(1)) if m else None


def classify(reply: str, status: str | None = None) -> BounceClass:
    """Class of a permanent failure from its reply text (and DSN Status when known)."""
    st = status or enhanced_status(reply)
    if st is not None and st.endswith(".0.0"):
        # A DSN's generic Status (Exim writes 5.0.0) says less than the reply it carries.
        st = enhanced_status(reply) or st
    if st is not None:
        _cls, subject, detail = st.split(".")
        if subject == "7":
            return BounceClass.REPUTATION
        # 5.1.7/5.1.8 are about our sender address, not the recipient's.
        if subject == "1":
            return BounceClass.OTHER if detail in ("7", "8") else BounceClass.RECIPIENT
        if subject == "2" and detail == "1":
            return BounceClass.RECIPIENT
        if not (subject == "0" and detail == "0"):
            if _RECIPIENT_WORDS.search(reply) and not _REPUTATION_WORDS.search(reply):
                return BounceClass.RECIPIENT
            return BounceClass.OTHER
    if _REPUTATION_WORDS.search(reply):
        return BounceClass.REPUTATION
    if _RECIPIENT_WORDS.search(reply):
        return BounceClass.RECIPIENT
    return BounceClass.OTHER
