"""webhook set | list | remove | log, apikey create, stats."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from relay.cli import fail, with_store
from relay.config import Config
from relay.events.emit import parse_time
from relay.queue import events as q
from relay.queue.store import Store


def _t(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def register(sub: Any) -> None:
    w = sub.add_parser("webhook", help="event callbacks (signed HTTP POSTs)")
    wsub = w.add_subparsers(dest="webhook_command", metavar="ACTION")
    wsub.required = True
    p = wsub.add_parser(
        "set",
        help="set the account's callback URL (or a sender's, with --sender)",
        description="Set (or replace) a callback URL. `relay webhook set --account A URL`"
        " or `relay webhook set A URL`.",
    )
    p.add_argument("--account", "-a", help="account name")
    p.add_argument("args", nargs="+", metavar="[ACCOUNT] URL")
    p.add_argument("--sender", help="only events of mail from this envelope sender")
    p.add_argument("--events", help="comma list of event kinds (default: all)")
    p.set_defaults(handler=with_store(cmd_set))
    p = wsub.add_parser("list", help="webhooks and their secrets")
    p.add_argument("--account", "-a")
    p.set_defaults(handler=with_store(cmd_list))
    p = wsub.add_parser("remove", help="delete a webhook (its pending POSTs are dropped)")
    p.add_argument("id", type=int)
    p.set_defaults(handler=with_store(cmd_remove))
    p = wsub.add_parser("log", help="recent webhook deliveries: attempts, codes, errors")
    p.add_argument("--account", "-a")
    p.add_argument("--webhook", type=int, help="only this webhook id")
    p.add_argument("--failures", action="store_true", help="only failed or retried POSTs")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=with_store(cmd_log))

    k = sub.add_parser("apikey", help="HTTP API keys")
    ksub = k.add_subparsers(dest="apikey_command", metavar="ACTION")
    ksub.required = True
    p = ksub.add_parser("create", help="make a bearer key for an account (shown once)")
    p.add_argument("account")
    p.set_defaults(handler=with_store(cmd_apikey))

    p = sub.add_parser(
        "stats",
        help="per-day sending statistics (from events; days past retention.records from"
        " their daily counts)",
    )
    p.add_argument("--from", dest="since", help="first day YYYY-MM-DD (default: 6 days ago)")
    p.add_argument("--to", dest="until", help="last day YYYY-MM-DD, included (default: today)")
    p.add_argument("--domain", help="only mail from this sender domain")
    p.add_argument("--account", "-a", help="only this account")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(handler=with_store(cmd_stats))


async def _account_id(store: Store, name: str | None) -> int | None:
    return None if name is None else (await store.get_account(name)).id


async def cmd_set(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    rest = list(args.args)
    account = args.account
    if account is None:
        if len(rest) != 2:
            return fail("usage: relay webhook set --account ACCOUNT URL (or ACCOUNT URL)", 2)
        account = rest.pop(0)
    if len(rest) != 1:
        return fail("usage: relay webhook set --account ACCOUNT URL", 2)
    url = rest[0]
    if not url.startswith(("http://", "https://")):
        return fail(f"expected an http:// or https:// URL, got {url!r}", 2)
    from relay.http.api import parse_kinds

    try:
        kinds = parse_kinds(args.events)
    except ValueError as exc:
        return fail(str(exc), 2)
    hook, created = await q.set_webhook(store, account, url, sender=args.sender, events=kinds)
    scope = f"sender {hook.sender}" if hook.sender else "account"
    print(f"webhook {hook.id} {'created' if created else 'updated'}: {scope} of {hook.account}")
    print(f"  url:    {hook.url}")
    print(f"  events: {','.join(hook.events) or 'all'}")
    print(f"  secret: {hook.secret}")
    return 0


async def cmd_list(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    hooks = await q.list_webhooks(store, await _account_id(store, args.account))
    print(f"{'ID':>4} {'ACCOUNT':<16} {'SENDER':<28} {'EVENTS':<16} URL / SECRET")
    for h in hooks:
        print(
            f"{h.id:>4} {h.account:<16} {h.sender or '(all)':<28}"
            f" {','.join(h.events) or 'all':<16} {h.url}"
        )
        print(f"{'':>4} {'':<16} {'':<28} {'':<16} secret {h.secret}")
    return 0


async def cmd_remove(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    await q.remove_webhook(store, args.id)
    print(f"webhook {args.id} removed")
    return 0


async def cmd_log(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    rows = await q.delivery_log(
        store,
        account_id=await _account_id(store, args.account),
        webhook_id=args.webhook,
        failures_only=args.failures,
        limit=args.limit,
    )
    print(f"{'UPDATED':<21} {'HOOK':>4} {'EVENT':>7} {'KIND':<12} {'STATUS':<8} TRIES CODE  ERROR")
    for r in rows:
        print(
            f"{_t(r.updated_at):<21} {r.webhook_id:>4} {r.event_id:>7} {r.kind:<12}"
            f" {r.status:<8} {r.attempts:>5} {r.last_code or '-':<5} {r.last_error or ''}"
        )
    return 0


async def cmd_apikey(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    token = await q.create_api_key(store, args.account)
    print(token)
    print(f"(API key for {args.account}: shown once, only its hash is stored)")
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


_COLUMNS = (
    ("DAY", "day", 10),
    ("REQUESTS", "requests", 8),
    ("ACCEPTED", "accepted", 8),
    ("REJECTED", "rejected", 8),
    ("DELIVERED", "delivered", 9),
    ("DEFERRED", "deferred", 8),
    ("BOUNCED", "bounced", 7),
    ("OPENED", "opened", 6),
    ("UNSUB", "unsubscribed", 5),
    ("COMPLAINED", "complained", 10),
    ("DELIV%", "delivery_rate", 6),
    ("OPEN%", "open_rate", 6),
)


def format_table(days: list[q.DayStats]) -> str:
    lines = ["  ".join(f"{h:>{w}}" if k != "day" else f"{h:<{w}}" for h, k, w in _COLUMNS)]
    for d in days:
        row = d.as_dict()
        cells = []
        for _h, k, w in _COLUMNS:
            v = row[k]
            if k == "day":
                cells.append(f"{v:<{w}}")
            elif k.endswith("_rate"):
                cells.append(f"{_pct(v):>{w}}")
            else:
                cells.append(f"{v:>{w}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


async def cmd_stats(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    try:
        until = parse_time(args.until, end=True) if args.until else None
        since = parse_time(args.since) if args.since else None
    except ValueError as exc:
        return fail(str(exc), 2)
    if until is None:
        until = parse_time(datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"), end=True)
    if since is None:
        since = until - 7 * 86400
    days = await q.daily_stats(
        store, since, until, account_id=await _account_id(store, args.account), domain=args.domain
    )
    if args.json:
        import json

        print(json.dumps([d.as_dict() for d in days], indent=2))
        return 0
    scope = f" domain {args.domain}" if args.domain else ""
    scope += f" account {args.account}" if args.account else ""
    print(f"statistics {_t(since)[:10]} .. {_t(until - 1)[:10]} (UTC days){scope}")
    if not days:
        print("no events in this period")
        return 0
    print(format_table(days))
    return 0
