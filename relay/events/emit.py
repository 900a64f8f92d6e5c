"""The public JSON shape of an event (webhook bodies and the HTTP API; docs/events.md).

Every event has the same envelope: ``id``, ``event`` (the kind), ``time`` (RFC 3339 UTC),
``timestamp`` (epoch seconds), ``account``, ``message_id``, ``recipient`` (null where it
does not apply) and ``data``, the kind-specific facts (remote reply, MX, TLS, reason ...).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from typing import Any

from relay.errors import StoreUnavailable
from relay.model import Account, EventKind, Stage, Verdict
from relay.queue import events as q
from relay.queue.store import EventView, MessageView, Store

log = logging.getLogger("relay.events")

#: kinds whose ``data`` carries the remote MX facts
DELIVERY_KINDS = frozenset(
    {EventKind.DELIVERED, EventKind.DEFERRED, EventKind.BOUNCED, EventKind.EXPIRED}
)


def rfc3339(ts: float) -> str:
    return (
        datetime.datetime.fromtimestamp(ts, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def bounce_type(data: dict[str, Any]) -> str:
    """hard (5xx: the address or domain will not take mail) or soft (anything else)."""
    code = data.get("code")
    reply = str(data.get("reply") or "")
    if isinstance(code, int):
        return "hard" if code >= 500 else "soft"
    return "hard" if reply[:1] == "5" else "soft"


def event_json(ev: EventView, account: str | None) -> dict[str, Any]:
    data = dict(ev.data)
    if ev.kind == EventKind.BOUNCED.value:
        data.setdefault("bounce_type", bounce_type(data))
        # sync: refused during our SMTP attempt; async: a DSN arrived later (issue 8)
        data.setdefault("bounce_mode", "sync")
    return {
        "id": ev.id,
        "event": ev.kind,
        "time": rfc3339(ev.at),
        "timestamp": ev.at,
        "account": account,
        "message_id": ev.message_id,
        "recipient": ev.recipient,
        "node": ev.node_id,
        "data": data,
    }


def event_body(ev: EventView, account: str | None) -> bytes:
    """The exact bytes POSTed (and signed): compact, keys sorted, UTF-8."""
    return json.dumps(
        event_json(ev, account), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def parse_time(text: str, *, end: bool = False) -> float:
    """``YYYY-MM-DD`` (UTC; with ``end`` the day's end, so ranges include it), an ISO
    8601 date-time, or epoch seconds. Raises ValueError naming the accepted forms."""
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    try:
        if len(value) == 10:
            d = datetime.date.fromisoformat(value)
            start = datetime.datetime(d.year, d.month, d.day, tzinfo=datetime.UTC).timestamp()
            return start + 86400.0 if end else start
        dt = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"expected YYYY-MM-DD, an ISO 8601 time or epoch seconds, got {text!r}"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()


def message_json(
    m: MessageView, opens: dict[str, tuple[int, float | None]], account: str | None
) -> dict[str, Any]:
    """A MessageView as the status API returns it: per recipient status, attempts, last
    reply, times and opens, then the message's events in order."""
    return {
        "id": m.id,
        "account": account,
        "message_id_header": m.message_id_header,
        "mail_from": m.mail_from,
        "header_from": m.header_from,
        "subject": m.subject,
        "size": m.size,
        "body_kept": m.body_kept,
        "accepted_at": rfc3339(m.created_at),
        "recipients": [
            {
                "address": r.address,
                "status": r.status.value,
                "attempts": r.attempts,
                "last_reply": r.last_reply,
                "last_mx": r.last_mx,
                "last_tls": r.last_tls,
                "reason": r.reason,
                "next_attempt": None if r.status.final else rfc3339(r.due_at),
                "updated_at": rfc3339(r.updated_at),
                "opens": opens.get(r.address, (0, None))[0],
                "first_opened_at": (
                    rfc3339(first) if (first := opens.get(r.address, (0, None))[1]) else None
                ),
            }
            for r in m.recipients
        ],
        "events": [event_json(e, account) for e in m.events],
    }


class RefusalRecorder:
    """The SMTP handler's ``on_refusal``: writes a ``rejected`` event per refusal of an
    authenticated account (the reply text and reason are the same as the SMTP reply's).

    The handler must answer without waiting for the database, so each write is a task;
    ``drain`` waits for the outstanding ones at shutdown.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(
        self, account: Account, stage: Stage, sender: str | None, rcpt: str | None, v: Verdict
    ) -> None:
        task = asyncio.create_task(self._write(account.id, stage, sender, rcpt, v))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(
        self, account_id: int, stage: Stage, sender: str | None, rcpt: str | None, v: Verdict
    ) -> None:
        try:
            await q.add_rejected(
                self.store,
                account_id,
                stage=stage.value,
                mail_from=sender,
                rcpt=rcpt,
                code=v.code,
                enhanced=v.enhanced,
                text=v.text,
                reason=v.reason,
            )
        except StoreUnavailable as exc:
            log.warning("rejected event not recorded, database unavailable: %s", exc)

    async def drain(self, grace: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
