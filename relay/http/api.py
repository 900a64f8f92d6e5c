"""The HTTP API under /api/v1 (docs/openapi.yaml describes it).

Auth: ``Authorization: Bearer KEY``. An account key (``relay apikey create A``) sees only
that account; the admin key (``api.admin_key`` / RELAY_ADMIN_KEY) sees every account and
may use the admin-only routes. Every error is JSON ``{"error": {"code", "message"}}``
with a stable code.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from relay.errors import Conflict, NotFound, StoreUnavailable
from relay.events.emit import event_json, message_json, parse_time, rfc3339
from relay.http.server import CONTEXT, route_installer
from relay.model import WAITING_STATUSES, EventKind, RecipientStatus
from relay.queue import events as q
from relay.queue import holds, operate
from relay.queue import reputation as rep
from relay.queue.events import Webhook

log = logging.getLogger("relay.api")

PREFIX = "/api/v1"


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@dataclass(frozen=True, slots=True)
class Caller:
    account_id: int | None  # None: the admin
    account: str | None

    @property
    def admin(self) -> bool:
        return self.account_id is None


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if not request.path.startswith(PREFIX):
        return await handler(request)
    try:
        return await handler(request)
    except APIError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except NotFound as exc:
        return error_response(404, "not_found", str(exc))
    except Conflict as exc:
        return error_response(409, "conflict", str(exc))
    except StoreUnavailable:
        return error_response(503, "unavailable", "database unavailable, try again later")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
        return error_response(exc.status, code, exc.reason)


async def caller(request: web.Request) -> Caller:
    ctx = request.app[CONTEXT]
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "unauthorized", "send an API key as 'Authorization: Bearer KEY'")
    admin = ctx.cfg.api.admin_key
    if admin and hmac.compare_digest(admin.encode(), token.encode()):
        return Caller(None, None)
    found = await q.account_for_token(ctx.store, token)
    if found is None:
        raise APIError(401, "unauthorized", "unknown API key")
    return Caller(found[0], found[1])


def require_admin(who: Caller) -> None:
    if not who.admin:
        raise APIError(403, "forbidden", "this route needs the admin key")


async def scoped_account(request: web.Request, who: Caller, name: str | None) -> int | None:
    """The account a request acts on: the key's own, or (admin) ?account= / body."""
    if not who.admin:
        if name is not None and name != who.account:
            raise APIError(403, "forbidden", "an account key may only act on its own account")
        return who.account_id
    if name is None:
        return None
    return (await request.app[CONTEXT].store.get_account(name)).id


def _time_arg(request: web.Request, key: str, *, end: bool = False) -> float | None:
    value = request.query.get(key)
    if value is None or value == "":
        return None
    try:
        return parse_time(value, end=end)
    except ValueError as exc:
        raise APIError(400, "bad_request", f"{key}: {exc}") from None


def _int_arg(request: web.Request, key: str, default: int, high: int) -> int:
    value = request.query.get(key)
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= high:
        raise APIError(400, "bad_request", f"{key}: expected a whole number 1-{high}")
    return int(value)


async def json_body(request: web.Request) -> dict[str, Any]:
    limit = request.app[CONTEXT].cfg.api.max_body
    if request.content_length is not None and request.content_length > limit:
        raise APIError(413, "request_too_large", f"request body over {limit} bytes (api.max_body)")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise APIError(413, "request_too_large", f"request body over {limit} bytes (api.max_body)")
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise APIError(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "bad_request", "the body must be a JSON object")
    return data


# ---------------------------------------------------------------------------- messages


async def get_message(request: web.Request) -> web.Response:
    who = await caller(request)
    store = request.app[CONTEXT].store
    m = await store.message_view(request.match_info["id"])
    if not who.admin and m.account_id != who.account_id:
        # Same answer as a missing id: another account's ids are not confirmed.
        raise APIError(404, "not_found", f"no message {request.match_info['id']}")
    acct = who.account or (await store.get_account_by_id(m.account_id)).name
    opens = await q.opens_for(store, m.id)
    return web.json_response(message_json(m, opens, acct))


async def list_messages(request: web.Request) -> web.Response:
    who = await caller(request)
    ctx = request.app[CONTEXT]
    account_id = await scoped_account(request, who, request.query.get("account"))
    status_text = request.query.get("status")
    status = None
    if status_text:
        try:
            status = RecipientStatus(status_text)
        except ValueError:
            allowed = ", ".join(s.value for s in RecipientStatus)
            raise APIError(400, "bad_request", f"status: expected one of {allowed}") from None
    limit = _int_arg(request, "limit", ctx.cfg.api.page_size, 1000)
    rows = await q.search_messages(
        ctx.store,
        account_id=account_id,
        since=_time_arg(request, "from"),
        until=_time_arg(request, "to", end=True),
        sender=request.query.get("sender") or None,
        rcpt=request.query.get("recipient") or None,
        status=status,
        after=request.query.get("cursor") or None,
        limit=limit,
    )
    return web.json_response(
        {
            "messages": [
                {
                    "id": m.id,
                    "mail_from": m.mail_from,
                    "subject": m.subject,
                    "accepted_at": rfc3339(m.created_at),
                    "recipients": [{"address": a, "status": s} for a, s in m.recipients],
                }
                for m in rows
            ],
            # An opaque cursor: pass it back as ?cursor= for the next page.
            "next_cursor": rows[-1].id if len(rows) == limit else None,
        }
    )


async def list_events(request: web.Request) -> web.Response:
    who = await caller(request)
    ctx = request.app[CONTEXT]
    account_id = await scoped_account(request, who, request.query.get("account"))
    after = request.query.get("after", "0")
    if not after.isdigit():
        raise APIError(400, "bad_request", "after: expected an event id")
    limit = _int_arg(request, "limit", ctx.cfg.api.page_size, 1000)
    evs = await q.recent_events(ctx.store, account_id, int(after), limit)
    names: dict[int, str] = {}
    for e in evs:
        if e.account_id is not None and e.account_id not in names:
            names[e.account_id] = (await ctx.store.get_account_by_id(e.account_id)).name
    return web.json_response(
        {
            "events": [
                event_json(e, names.get(e.account_id) if e.account_id else None) for e in evs
            ],
            "next_after": evs[-1].id if evs else int(after),
        }
    )


# ---------------------------------------------------------------------------- stats


async def get_stats(request: web.Request) -> web.Response:
    who = await caller(request)
    ctx = request.app[CONTEXT]
    account_id = await scoped_account(request, who, request.query.get("account"))
    now = ctx.store.clock()
    until = _time_arg(request, "to", end=True) or now + 1
    since = _time_arg(request, "from") or until - 7 * 86400
    days = await q.daily_stats(
        ctx.store, since, until, account_id=account_id, domain=request.query.get("domain")
    )
    total = q.DayStats(
        day="total",
        **{
            k: sum(getattr(d, k) for d in days)
            for k in (
                "accepted",
                "rejected",
                "delivered",
                "deferred",
                "bounced",
                "expired",
                "opened",
                "unsubscribed",
                "complained",
            )
        },
    )
    return web.json_response(
        {
            "from": rfc3339(since),
            "to": rfc3339(until),
            "days": [d.as_dict() for d in days],
            "total": total.as_dict(),
        }
    )


# ---------------------------------------------------------------------------- webhooks


def webhook_json(h: Webhook, *, with_secret: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": h.id,
        "account": h.account,
        "sender": h.sender,
        "url": h.url,
        "events": list(h.events),
        "created_at": rfc3339(h.created_at),
    }
    if with_secret:
        out["secret"] = h.secret
    return out


def _valid_url(url: object) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2000:
        raise APIError(400, "bad_request", "url: expected an http:// or https:// URL")
    return url


def parse_kinds(value: object) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if items is None:
        return ()
    if not isinstance(items, list | tuple):
        raise ValueError("events: expected a list of event kinds")
    kinds = tuple(str(k).strip() for k in items if str(k).strip())
    known = {k.value for k in EventKind}
    bad = [k for k in kinds if k not in known]
    if bad:
        raise ValueError(f"events: unknown kind(s) {', '.join(bad)}; known: {', '.join(known)}")
    return kinds


async def list_hooks(request: web.Request) -> web.Response:
    who = await caller(request)
    account_id = await scoped_account(request, who, request.query.get("account"))
    hooks = await q.list_webhooks(request.app[CONTEXT].store, account_id)
    return web.json_response({"webhooks": [webhook_json(h) for h in hooks]})


async def set_hook(request: web.Request) -> web.Response:
    who = await caller(request)
    body = await json_body(request)
    name = body.get("account")
    if name is not None and not isinstance(name, str):
        raise APIError(400, "bad_request", "account: expected a string")
    if who.admin and name is None:
        raise APIError(400, "bad_request", "account: required with the admin key")
    await scoped_account(request, who, name)
    sender = body.get("sender")
    if sender is not None and (not isinstance(sender, str) or "@" not in sender):
        raise APIError(400, "bad_request", "sender: expected an email address")
    try:
        kinds = parse_kinds(body.get("events"))
    except ValueError as exc:
        raise APIError(400, "bad_request", str(exc)) from None
    hook, created = await q.set_webhook(
        request.app[CONTEXT].store,
        name or who.account or "",
        _valid_url(body.get("url")),
        sender=sender,
        events=kinds,
    )
    return web.json_response(webhook_json(hook, with_secret=True), status=201 if created else 200)


def _hook_id(request: web.Request) -> int:
    text = request.match_info["id"]
    if not text.isdigit():
        raise APIError(404, "not_found", f"no webhook {text}")
    return int(text)


async def delete_hook(request: web.Request) -> web.Response:
    who = await caller(request)
    await q.remove_webhook(request.app[CONTEXT].store, _hook_id(request), who.account_id)
    return web.json_response({"deleted": _hook_id(request)})


async def hook_log(request: web.Request) -> web.Response:
    who = await caller(request)
    account_id = await scoped_account(request, who, request.query.get("account"))
    rows = await q.delivery_log(
        request.app[CONTEXT].store,
        account_id=account_id,
        failures_only=request.query.get("failures") in ("1", "true"),
        limit=_int_arg(request, "limit", 50, 1000),
    )
    return web.json_response(
        {
            "deliveries": [
                {
                    "id": r.id,
                    "webhook_id": r.webhook_id,
                    "url": r.url,
                    "event_id": r.event_id,
                    "event": r.kind,
                    "message_id": r.message_id,
                    "status": r.status,
                    "attempts": r.attempts,
                    "last_code": r.last_code,
                    "last_error": r.last_error,
                    "updated_at": rfc3339(r.updated_at),
                }
                for r in rows
            ]
        }
    )


# ---------------------------------------------------------------------------- admin


async def create_key(request: web.Request) -> web.Response:
    require_admin(await caller(request))
    body = await json_body(request)
    name = body.get("account")
    if not isinstance(name, str) or not name:
        raise APIError(400, "bad_request", "account: required")
    token = await q.create_api_key(request.app[CONTEXT].store, name)
    return web.json_response({"account": name, "key": token}, status=201)


async def list_accounts(request: web.Request) -> web.Response:
    require_admin(await caller(request))
    accounts = await request.app[CONTEXT].store.list_accounts()
    return web.json_response(
        {"accounts": [{"id": a.id, "name": a.name, "status": a.status.value} for a in accounts]}
    )


async def suspend_account(request: web.Request) -> web.Response:
    """``relay account suspend``: refuse the account's mail and hold what it queued."""
    require_admin(await caller(request))
    body = await json_body(request)
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise APIError(400, "bad_request", "reason: expected a string")
    store = request.app[CONTEXT].store
    account = await store.get_account(request.match_info["name"])
    why = await rep.suspend_by_operator(store, account.id, reason)
    if why is None:
        raise APIError(409, "conflict", f"account {account.name} is suspended already")
    return web.json_response({"account": account.name, "status": "suspended", "reason": why})


async def resume_account(request: web.Request) -> web.Response:
    """``relay account resume``: lift a suspension; its held mail is queued again."""
    require_admin(await caller(request))
    store = request.app[CONTEXT].store
    account = await store.get_account(request.match_info["name"])
    released = await rep.resume(store, account.id)
    return web.json_response({"account": account.name, "status": "active", "released": released})


async def queue_summary(request: web.Request) -> web.Response:
    """Waiting mail by destination domain (``relay queue summary``)."""
    require_admin(await caller(request))
    ctx = request.app[CONTEXT]
    domains = await operate.shape(ctx.store)
    ages = [name for name, _ in operate.AGE_BUCKETS]
    # Suspensions live in this process's delivery worker (relay/delivery/destinations.py).
    found = ctx.extras.get("destinations")
    now = ctx.store.clock()
    suspended = [
        {"domain": name, "until": rfc3339(now + left), "reason": reason}
        for name, left, reason in (found.snapshot() if found is not None else [])
    ]
    # Destinations that refused a session: the sessions they get now (concurrency_feedback).
    lowered = [
        {"domain": name, "sessions": sessions, "limit": limit}
        for name, sessions, limit in (found.lowered() if found is not None else [])
    ]
    held = [
        {
            "domain": h.domain,
            "reason": h.reason,
            "since": rfc3339(h.since),
            "until": None if h.until is None else rfc3339(h.until),
        }
        for h in sorted((await holds.active(ctx.store)).values(), key=lambda h: h.domain)
    ]
    return web.json_response(
        {
            "total": sum(d.total for d in domains),
            "held": held,
            "suspended": suspended,
            "lowered": lowered,
            "domains": [
                {
                    "domain": d.domain,
                    "total": d.total,
                    "ages": dict(zip(ages, d.by_age, strict=True)),
                    "statuses": {s.value: d.by_status[s.value] for s in WAITING_STATUSES},
                    "top_deferral": (
                        {"reply": d.top_reply, "count": d.top_reply_count} if d.top_reply else None
                    ),
                }
                for d in domains
            ],
        }
    )


def _queue_domain(body: dict[str, Any]) -> str | None:
    domain = body.get("domain")
    if domain is not None and (not isinstance(domain, str) or "." not in domain):
        raise APIError(400, "bad_request", "domain: expected a domain name")
    return domain


def _required_domain(body: dict[str, Any]) -> str:
    domain = _queue_domain(body)
    if domain is None:
        raise APIError(400, "bad_request", "domain: required")
    return domain


async def queue_retry(request: web.Request) -> web.Response:
    """Waiting recipients of ``domain`` (or, with ``all: true``, every one) due now."""
    require_admin(await caller(request))
    body = await json_body(request)
    domain = _queue_domain(body)
    if (domain is None) == (body.get("all") is not True):
        raise APIError(400, "bad_request", 'give either "domain" or "all": true')
    n = await operate.retry_domain(request.app[CONTEXT].store, domain)
    return web.json_response({"due_now": n})


async def queue_hold(request: web.Request) -> web.Response:
    """Pause delivery to ``domain`` for ``seconds`` (absent: until released)."""
    require_admin(await caller(request))
    body = await json_body(request)
    domain = _required_domain(body)
    seconds = body.get("seconds")
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0
    ):
        raise APIError(400, "bad_request", "seconds: expected a number > 0")
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise APIError(400, "bad_request", "reason: expected a string")
    store = request.app[CONTEXT].store
    until = None if seconds is None else store.clock() + float(seconds)
    n = await holds.hold(store, domain, reason, until)
    return web.json_response({"held": domain, "waiting": n})


async def queue_release(request: web.Request) -> web.Response:
    """End the hold of ``domain``: its waiting mail is due now."""
    require_admin(await caller(request))
    domain = _required_domain(await json_body(request))
    n = await holds.lift(request.app[CONTEXT].store, domain)
    if n is None:
        raise APIError(404, "not_found", f"{domain} is not held")
    return web.json_response({"released": domain, "due_now": n})


async def queue_delete(request: web.Request) -> web.Response:
    """Drop the waiting recipients of ``domain`` (only ``status``, if given)."""
    require_admin(await caller(request))
    body = await json_body(request)
    domain = _required_domain(body)
    waiting = [s.value for s in WAITING_STATUSES]
    status = body.get("status")
    if status is not None and status not in waiting:
        raise APIError(400, "bad_request", f"status: expected one of {', '.join(waiting)}")
    n = await operate.delete_domain(
        request.app[CONTEXT].store, domain, None if status is None else RecipientStatus(status)
    )
    return web.json_response({"deleted": n})


async def not_found(request: web.Request) -> web.Response:
    raise APIError(404, "not_found", f"no route {request.method} {request.path}")


@route_installer
def install(app: web.Application) -> None:
    app.middlewares.append(json_errors)
    r = app.router
    r.add_get(f"{PREFIX}/messages", list_messages)
    r.add_get(f"{PREFIX}/messages/{{id}}", get_message)
    r.add_get(f"{PREFIX}/events", list_events)
    r.add_get(f"{PREFIX}/stats", get_stats)
    r.add_get(f"{PREFIX}/webhooks", list_hooks)
    r.add_post(f"{PREFIX}/webhooks", set_hook)
    r.add_get(f"{PREFIX}/webhooks/log", hook_log)
    r.add_delete(f"{PREFIX}/webhooks/{{id}}", delete_hook)
    r.add_post(f"{PREFIX}/apikeys", create_key)
    r.add_get(f"{PREFIX}/accounts", list_accounts)
    r.add_post(f"{PREFIX}/accounts/{{name}}/suspend", suspend_account)
    r.add_post(f"{PREFIX}/accounts/{{name}}/resume", resume_account)
    r.add_get(f"{PREFIX}/queue", queue_summary)
    r.add_post(f"{PREFIX}/queue/retry", queue_retry)
    r.add_post(f"{PREFIX}/queue/delete", queue_delete)
    r.add_post(f"{PREFIX}/queue/hold", queue_hold)
    r.add_post(f"{PREFIX}/queue/release", queue_release)
    r.add_route("*", f"{PREFIX}/{{tail:.*}}", not_found)
