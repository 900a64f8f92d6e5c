"""The accept step: normalise a submitted message and store it in one transaction.

Nothing is acknowledged before it is durable: the SMTP layer answers 250 only after
``Intake.accept`` returns, which is after COMMIT.
"""

from __future__ import annotations

import email.errors
import email.utils
import functools
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.header import Header, decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Protocol

from relay.queue.store import CounterAdd, NewMessage, NewRecipient, RateTake, Store

_EOL = re.compile(rb"\r\n|\r|\n")
_HEADER_PARSER = BytesHeaderParser(policy=compat32)


# RFC 5322 §2.1.1: a line is at most 998 characters, CRLF excluded.
_RFC5322_LINE = 998


def new_queue_id(now: float | None = None) -> str:
    """Sortable by acceptance time (ms, hex) then random: unique across nodes."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:011X}{secrets.token_hex(5).upper()}"


def normalize_line_endings(data: bytes) -> bytes:
    """Every bare CR or LF becomes CRLF (RFC 5321 §2.3.8 allows only CRLF).

    This is also what defeats SMTP smuggling downstream: after it, a bare-LF "\\n.\\n"
    inside the body is an ordinary line holding a dot, which the client dot-stuffs.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        # Already all CRLF (what every SMTP client sends): three C-speed counts instead
        # of a regex substitution per line (~1,300 for a 100 KB body).
        return data
    return _EOL.sub(b"\r\n", data)


def longest_line(data: bytes) -> int:
    """Octets of the longest CRLF-ended line, CRLF not counted."""
    return max(map(len, data.split(b"\r\n")), default=0)


def has_line_over(data: bytes, limit: int) -> bool:
    """True when a line of ``data`` is longer than ``limit`` octets (CRLF not counted).

    Splitting a 100 KB body into its ~1,300 lines to measure them cost ~0.15 ms, twice per
    message (issue 9). Cut ``data`` into blocks of limit/2 octets: a line longer than
    ``limit`` holds a whole block with no CRLF in it, so when every block has one, no
    line is too long. Only a block without a CRLF (a long line, or the body's last few
    octets) needs the exact measure.
    """
    if len(data) <= limit:
        return False
    block = max(1, limit // 2)
    find = data.find
    for start in range(0, len(data), block):
        if find(b"\r\n", start, start + block) < 0:
            return longest_line(data) > limit
    return False


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """The normalised bytes and the header facts policy and storage need."""

    data: bytes
    header_from: str
    from_address: str
    subject: str
    subject_ok: bool
    message_id: str
    has_date: bool
    # Octets of the longest line without CRLF when it is over RFC 5322 §2.1.1's 998;
    # 0 when every line is within it (then not measured: see has_line_over).
    longest_line: int = 0
    # RFC 8689 §5: "TLS-Required: No", the sender's wish that delivery not refuse for
    # want of (verified) TLS: the recipient domain's MTA-STS and require_tls are waived.
    tls_optional: bool = False

    @property
    def headers(self) -> dict[str, str]:
        return {
            "from": self.header_from,
            "from_address": self.from_address,
            "subject": self.subject,
            "subject_ok": "1" if self.subject_ok else "",
            "message-id": self.message_id,
            "longest_line": str(self.longest_line),
        }


def _split(data: bytes) -> tuple[bytes, bytes]:
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    idx = data.find(b"\r\n\r\n")
    if idx < 0:
        return data, b""
    return data[: idx + 2], data[idx + 4 :]


@functools.lru_cache(maxsize=4)
def _date_of_second(second: int) -> str:
    return email.utils.formatdate(second, localtime=False)


def rfc5322_date(when: float) -> str:
    """RFC 5322 §3.3 date-time in UTC, to the second (a Received and a Date header per
    message formatted it afresh: ~1% of the listener, issue 9; now once a second)."""
    return _date_of_second(int(when))


# The From forms nearly every sender writes: "Display Name <local@domain>",
# "<local@domain>" and "local@domain", with dot-atom parts (RFC 5322 §3.4.1) of the
# usual characters and a display name of plain words. For these, getaddresses() reads
# the same address (tests/unit/test_intake.py compares them on generated values) at a
# tenth of the cost: it was ~1% of each process's CPU per message (issue 9). Any other
# form, quoted, commented, grouped, folded or listed, takes getaddresses().
_DOT_ATOM_LOCAL = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*"
_DOT_ATOM_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_FROM = re.compile(
    rf"[ \t]*(?:(?:[A-Za-z0-9_-]+[ \t]+)*(?:[A-Za-z0-9_-]+[ \t]*)?"
    rf"<(?P<angle>{_DOT_ATOM_LOCAL}@{_DOT_ATOM_DOMAIN})>"
    rf"|(?P<bare>{_DOT_ATOM_LOCAL}@{_DOT_ATOM_DOMAIN}))[ \t]*"
)
# compat32 turns undecodable bytes into lone surrogates (U+DC80-U+DCFF).
_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")


def first_address(value: str) -> str:
    """The first address of a From field's value as ``email.utils.getaddresses`` reads
    it; "" when there is none with an "@"."""
    simple = _SIMPLE_FROM.fullmatch(value)
    if simple is not None:
        return simple.group("angle") or simple.group("bare")
    addrs = email.utils.getaddresses([value]) if value else []
    return addrs[0][1] if addrs and "@" in addrs[0][1] else ""


def decode_subject(raw: str) -> tuple[str, bool]:
    """Decode RFC 2047 encoded-words; False when the result is not valid text."""
    if raw.isascii() and "=?" not in raw:
        # No encoded-word can start without "=?": decode_header returns the value as it
        # is, and make_header's str() gives it back unchanged. A fast path for the
        # common plain subject (decoding cost ~5 us per message).
        return raw.replace("\r\n", "").replace("\n", ""), True
    try:
        text = str(make_header(decode_header(raw)))
    except (UnicodeDecodeError, LookupError, ValueError, email.errors.HeaderParseError):
        return raw, False
    if "\ufffd" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return text, False
    return text.replace("\r\n", "").replace("\n", ""), True


# RFC 8689 §5.1: tls-required-field = "TLS-Required:" [FWS] "No" CRLF (ABNF strings are
# case-insensitive). Looked for in the lowered header block with a plain find (~1 us for
# 1 KB) and only then matched: a case-insensitive regex search over the block cost
# 14 us a message, and adding it to _NEEDED would end _header_fields' early stop.
_TLS_REQUIRED = b"\ntls-required:"
_TLS_REQUIRED_NO = re.compile(rb"[ \t]*(?:\r\n[ \t]+)?no[ \t]*\r")


def _tls_optional(head: bytes) -> bool:
    low = b"\n" + head.lower()
    at = low.find(_TLS_REQUIRED)
    return at >= 0 and _TLS_REQUIRED_NO.match(low, at + len(_TLS_REQUIRED)) is not None


# The fields parse reads, lower case: Message.get compares names case-insensitively.
_NEEDED = frozenset({"from", "subject", "message-id", "date"})
# What compat32's Message.get returns for a present field: the raw str, or a Header
# (unknown-8bit) when the value holds surrogate-escaped 8-bit octets.
_Fetched = str | Header
# One item of a header block as FeedParser reads it: a line matching its headerRE (a
# field name, RFC 5322 §3.6.8 ftext i.e. printable US-ASCII but ":", then ":"; or
# "From "; or WSP) plus the WSP-led lines that follow it (RFC 5322 §2.2.3 folding).
# Group 1 is the name, group 2 everything after the colon. Items run back to back until
# the first line matching none of the three, which FeedParser takes as the body's
# first line (the blank separator, or a "name" with SP, an 8-bit octet or no colon).
_ITEM = re.compile(r"(?:([\041-\071\073-\176]*):|From |[ \t])([^\r]*(?:\r\n[ \t][^\r]*)*)\r\n")


def _header_fields(head: bytes) -> dict[str, _Fetched] | None:
    """The first ``From``, ``Subject``, ``Message-ID`` and ``Date`` of ``head``, keyed by
    lower-case name, each exactly what ``msg.get(name)`` returns after
    ``BytesHeaderParser(policy=compat32).parsebytes(head + CRLF)``. None when ``head``
    has a bare CR or LF (parse never passes one), for the caller to fall back.

    FeedParser keeps only items that start with a named field: a "From " line (unix-from
    or a misplaced envelope header), an empty name (":x") or a WSP line with no field
    before it is dropped along with the WSP lines after it.
    """
    # BytesParser decodes as ASCII with surrogateescape: 8-bit octets become U+DC80..DCFF.
    text = head.decode("ascii", "surrogateescape")
    crlf = text.count("\r\n")
    if text.count("\r") != crlf or text.count("\n") != crlf:
        # FeedParser also ends lines at a bare CR or LF; _ITEM does not.
        return None
    text += "\r\n"
    # Only a surrogate makes compat32's header_fetch_parse return anything but the str.
    sanitize = not head.isascii()
    fields: dict[str, _Fetched] = {}
    pos = 0
    while (item := _ITEM.match(text, pos)) is not None:
        pos = item.end()
        name = item.group(1)
        if not name:
            continue
        key = name.lower()
        if key not in _NEEDED or key in fields:
            # Message.get returns the first occurrence.
            continue
        value = _compat32_value(item.group(2))
        fields[key] = compat32.header_fetch_parse(name, value) if sanitize else value
        if len(fields) == len(_NEEDED):
            break
    return fields


def _compat32_value(after_colon: str) -> str:
    """compat32's header_source_parse: SP/HTAB after the colon stripped, continuation
    lines kept verbatim with their CRLF+WSP fold. (Its rstrip of the final CRLF has
    nothing to do here: _ITEM leaves that CRLF out, and no line holds a bare CR or LF.)"""
    return after_colon.lstrip(" \t")


def _parse_with_email(data: bytes) -> ParsedMessage:
    """parse through the email package's own header parser: the fallback, and the
    reference the tests hold _header_fields to."""
    data = normalize_line_endings(data)
    head, _ = _split(data)
    msg = _HEADER_PARSER.parsebytes(head + b"\r\n")
    fields = {name: value for name in _NEEDED if (value := msg.get(name)) is not None}
    return _from_fields(data, fields, head)


def parse(data: bytes) -> ParsedMessage:
    data = normalize_line_endings(data)
    head, _ = _split(data)
    # FeedParser cost 4-9% of the SMTP listener's CPU for four fields; _header_fields
    # returns the same values without building a Message.
    fields = _header_fields(head)
    if fields is None:
        return _parse_with_email(data)
    return _from_fields(data, fields, head)


def _from_fields(data: bytes, fields: Mapping[str, _Fetched], head: bytes) -> ParsedMessage:
    raw_from = str(fields.get("from", "") or "")
    from_address = first_address(raw_from)
    raw_subject = fields.get("subject", "")
    subject_ok = True
    subject = ""
    if raw_subject is not None:
        raw = str(raw_subject)
        if not raw.isascii() and _SURROGATE_ESCAPE.search(raw):
            # Undecodable bytes (see _SURROGATE_ESCAPE): not valid UTF-8.
            subject, subject_ok = raw.encode("utf-8", "replace").decode(), False
        else:
            subject, subject_ok = decode_subject(raw)
    return ParsedMessage(
        data=data,
        header_from=raw_from,
        from_address=from_address,
        subject=subject,
        subject_ok=subject_ok,
        message_id=str(fields.get("message-id", "") or "").strip(),
        has_date="date" in fields,
        longest_line=longest_line(data) if has_line_over(data, _RFC5322_LINE) else 0,
        tls_optional=_tls_optional(head),
    )


class AcceptPlanner(Protocol):
    """Decides, just before the accept transaction, which recipients are held (warm-up,
    queue_over_quota) and which counters the transaction increments (relay/policy/limits.py)."""

    async def plan(
        self, account_id: int, mail_from: str, recipients: list[NewRecipient]
    ) -> tuple[list[NewRecipient], tuple[CounterAdd, ...]]: ...


class Intake:
    def __init__(self, store: Store, hostname: str, clock: Callable[[], float] = time.time):
        self.store = store
        self.hostname = hostname
        self.clock = clock
        self.planner: AcceptPlanner | None = None
        # (account id, recipients) -> the rate tokens the accept transaction takes
        # (relay/policy/limits.py RateLimit.take); None: no rate limit.
        self.rate: Callable[[int, int], Awaitable[RateTake | None]] | None = None

    def finalize(
        self,
        parsed: ParsedMessage,
        queue_id: str,
        received: str,
    ) -> tuple[bytes, str]:
        """Add Received, and Message-ID/Date when missing (RFC 5321 §4.4, RFC 6409 §8)."""
        extra: list[bytes] = [received.encode("utf-8", "replace")]
        message_id = parsed.message_id
        if not message_id:
            message_id = f"<{queue_id}@{self.hostname}>"
            extra.append(f"Message-ID: {message_id}".encode())
        if not parsed.has_date:
            extra.append(f"Date: {rfc5322_date(self.clock())}".encode())
        return b"\r\n".join(extra) + b"\r\n" + parsed.data, message_id

    def received_header(
        self, *, helo: str, client_ip: str, protocol: str, queue_id: str, rcpt: str | None
    ) -> str:
        helo_clean = re.sub(r"[^A-Za-z0-9.\-\[\]:_]", "", helo)[:255] or "unknown"
        line = (
            f"Received: from {helo_clean} ([{client_ip}])\r\n\tby {self.hostname} (relay)"
            f" with {protocol} id {queue_id}"
        )
        if rcpt:
            line += f"\r\n\tfor <{rcpt}>"
        return line + f"; {rfc5322_date(self.clock())}"

    async def accept(
        self,
        *,
        account_id: int,
        mail_from: str,
        recipients: list[NewRecipient],
        parsed: ParsedMessage,
        helo: str,
        client_ip: str,
        protocol: str,
        queue_id: str | None = None,
    ) -> str:
        qid = queue_id or new_queue_id(self.clock())
        received = self.received_header(
            helo=helo,
            client_ip=client_ip,
            protocol=protocol,
            queue_id=qid,
            rcpt=recipients[0].address if len(recipients) == 1 else None,
        )
        body, message_id = self.finalize(parsed, qid, received)
        counters: tuple[CounterAdd, ...] = ()
        rate = None if self.rate is None else await self.rate(account_id, len(recipients))
        if self.planner is not None:
            recipients, counters = await self.planner.plan(account_id, mail_from, recipients)
        await self.store.accept(
            NewMessage(
                id=qid,
                account_id=account_id,
                mail_from=mail_from,
                body=body,
                recipients=tuple(recipients),
                header_from=parsed.header_from[:512],
                subject=parsed.subject[:2000],
                message_id_header=message_id[:998],
                client=client_ip,
                counters=counters,
                rate=rate,
                tls_optional=parsed.tls_optional,
            )
        )
        return qid
