"""blocklist list | add | remove; suppression list | add | remove; account show | suspend |
resume."""

from __future__ import annotations

import argparse
import time
from typing import Any

from relay.cli import fail, with_store
from relay.config import Config
from relay.model import AccountStatus
from relay.queue import reputation as q
from relay.queue.cache import CHECK_EVERY
from relay.queue.store import Store


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def register(sub: Any) -> None:
    bl = sub.add_parser("blocklist", help="recipients no account may send to (hard bounces)")
    bsub = bl.add_subparsers(dest="blocklist_command", metavar="ACTION")
    bsub.required = True
    p = bsub.add_parser("list", help="list blocklisted addresses (expired ones are not shown)")
    p.add_argument("--search", help="only addresses containing this text")
    p.add_argument("--account", help="only entries caused by this account's mail")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(handler=with_store(cmd_blocklist_list))
    p = bsub.add_parser("add", help="blocklist an address")
    p.add_argument("address")
    p.add_argument("--days", type=float, help="how long (default: reputation.blocklist_days)")
    p.add_argument("--reason", default="added by the operator")
    p.set_defaults(handler=with_store(cmd_blocklist_add))
    p = bsub.add_parser("remove", help="take an address off the blocklist")
    p.add_argument("address")
    p.set_defaults(handler=with_store(cmd_blocklist_remove))

    sp = sub.add_parser("suppression", help="unsubscribes and complaints, per sender domain")
    ssub = sp.add_subparsers(dest="suppression_command", metavar="ACTION")
    ssub.required = True
    p = ssub.add_parser("list", help="list suppressed (sender domain, address) pairs")
    p.add_argument("--domain", help="only this sender domain")
    p.add_argument("--search", help="only addresses containing this text")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(handler=with_store(cmd_suppression_list))
    p = ssub.add_parser("add", help="stop a sender domain sending to an address")
    p.add_argument("address")
    p.add_argument("--domain", required=True, help="sender domain")
    p.add_argument("--reason", default="manual", choices=("manual", "unsubscribe", "complaint"))
    p.set_defaults(handler=with_store(cmd_suppression_add))
    p = ssub.add_parser("remove", help="let a sender domain send to an address again")
    p.add_argument("address")
    p.add_argument("--domain", required=True, help="sender domain")
    p.set_defaults(handler=with_store(cmd_suppression_remove))


def register_account(asub: Any) -> None:
    """``account show`` and ``account resume`` on the existing ``account`` parser."""
    p = asub.add_parser("show", help="an account's state, bounce and complaint rates")
    p.add_argument("name")
    p.set_defaults(handler=with_store(cmd_account_show))
    p = asub.add_parser(
        "suspend",
        help="refuse an account's mail and hold what it has queued (leaked credentials)",
    )
    p.add_argument("name")
    p.add_argument("--reason", default="", help="shown to its SMTP clients and in the event")
    p.set_defaults(handler=with_store(cmd_account_suspend))
    p = asub.add_parser("resume", help="lift a suspension and restart the rate window")
    p.add_argument("name")
    p.set_defaults(handler=with_store(cmd_account_resume))
    p = asub.add_parser(
        "unsubscribe-header", help="add List-Unsubscribe to this account's mail (default on)"
    )
    p.add_argument("name")
    p.add_argument("state", choices=("on", "off"))
    p.set_defaults(handler=with_store(cmd_account_unsubscribe_header))


async def cmd_blocklist_list(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    account_id = None
    if args.account:
        account_id = (await store.get_account(args.account)).id
    entries = await q.blocklist_list(
        store, search=args.search, account_id=account_id, limit=args.limit
    )
    print(f"{'ADDRESS':<40} {'ADDED':<16} {'EXPIRES':<16} {'ACCOUNT':<12} {'SOURCE':<7} REASON")
    for e in entries:
        reason = " ".join(e.reason.split())
        print(
            f"{e.address:<40} {_when(e.created_at):<16} {_when(e.expires_at):<16}"
            f" {e.account_name or '-':<12} {e.source:<7} {reason}"
        )
    return 0


async def cmd_blocklist_add(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    if "@" not in args.address:
        return fail(f"{args.address!r} is not an email address")
    days = cfg.reputation.blocklist_days if args.days is None else args.days
    if days <= 0:
        return fail("--days must be > 0")
    expires = await q.blocklist_add(store, args.address, args.reason, days)
    print(f"{args.address.lower()} blocklisted until {_when(expires)} UTC")
    return 0


async def cmd_blocklist_remove(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    if not await q.blocklist_remove(store, args.address):
        return fail(f"{args.address} is not on the blocklist")
    print(f"{args.address.lower()} removed from the blocklist")
    return 0


async def cmd_suppression_list(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    rows = await q.suppression_list(store, domain=args.domain, search=args.search, limit=args.limit)
    print(f"{'DOMAIN':<28} {'ADDRESS':<40} {'REASON':<12} ADDED")
    for s in rows:
        print(f"{s.domain:<28} {s.address:<40} {s.reason:<12} {_when(s.created_at)}")
    return 0


async def cmd_suppression_add(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    d = await store.get_domain(args.domain)
    new = await q.suppression_add(
        store,
        args.domain,
        args.address,
        args.reason,
        account_id=d.account_id if d is not None else None,
    )
    what = "suppressed" if new else "was already suppressed"
    print(f"{args.address.lower()} {what} for {args.domain.lower()}")
    return 0


async def cmd_suppression_remove(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    if not await q.suppression_remove(store, args.domain, args.address):
        return fail(f"{args.address} is not suppressed for {args.domain}")
    print(f"{args.address.lower()} may receive from {args.domain.lower()} again")
    return 0


async def cmd_account_show(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    account = await store.get_account(args.name)
    state = await q.account_state(store, account.id)
    assert state is not None
    r = cfg.reputation
    stats = await q.window_stats(store, account.id, r.window_seconds)
    print(f"account     {account.name}")
    print(f"state       {state.status.value}")
    if state.status is AccountStatus.SUSPENDED:
        print(f"suspended   {_when(state.suspended_at)} UTC: {state.suspended_reason or '-'}")
    print(
        f"window      since {_when(stats.since)} UTC ({r.window_seconds / 3600:g} h,"
        f" minimum sample {r.min_sample})"
    )
    print(
        f"bounces     {stats.bad_rate:.2%} hard-bounce+blocklisted"
        f" ({stats.hard} hard + {stats.refused} blocklisted of {stats.total});"
        f" threshold {r.bounce_threshold:.2%}"
    )
    print(
        f"complaints  {stats.complaint_rate:.3%} ({stats.complaints} of {stats.sent});"
        f" threshold {r.complaint_threshold:.3%}"
    )
    return 0


async def cmd_account_suspend(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    account = await store.get_account(args.name)
    if await q.suspend_by_operator(store, account.id, args.reason) is None:
        return fail(f"account {account.name} is suspended already")
    print(
        f"account {account.name} suspended: its MAIL FROM is refused (550 5.7.1) within"
        f" {CHECK_EVERY:g} s on every node, and its waiting mail is held."
        f" `relay queue delete --account {account.name}` drops that mail;"
        f" `relay account resume {account.name}` sends it."
    )
    return 0


async def cmd_account_resume(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    account = await store.get_account(args.name)
    released = await q.resume(store, account.id)
    print(
        f"account {account.name} active; rate window restarted; {released} held recipients queued"
    )
    return 0


async def cmd_account_unsubscribe_header(
    store: Store, cfg: Config, args: argparse.Namespace
) -> int:
    account = await store.get_account(args.name)
    await q.set_account_setting(store, account.id, "list_unsubscribe", args.state == "on")
    print(
        f"List-Unsubscribe headers {args.state} for account {account.name}"
        " (running relays pick it up within 30 s)"
    )
    return 0
