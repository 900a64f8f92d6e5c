"""queue list | summary | show | retry | delete, and status."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from relay.cli import with_store
from relay.config import Config
from relay.model import WAITING_STATUSES, RecipientStatus
from relay.queue import holds, operate
from relay.queue.store import MessageView, Store


def _t(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def register(sub: Any) -> None:
    q = sub.add_parser("queue", help="inspect and act on the queue")
    qsub = q.add_subparsers(dest="queue_command", metavar="ACTION")
    qsub.required = True
    p = qsub.add_parser("list", help="recipients not yet final (or of one status)")
    p.add_argument("--status", choices=[s.value for s in RecipientStatus])
    p.add_argument("--domain", help="only recipients at this domain")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(handler=with_store(cmd_list))
    p = qsub.add_parser(
        "summary", help="waiting mail by destination domain: statuses, ages, commonest reply"
    )
    p.add_argument("--top", type=int, default=20, help="domains shown (default 20)")
    p.set_defaults(handler=with_store(cmd_summary))
    p = qsub.add_parser("show", help="one message: recipients and events")
    p.add_argument("id")
    p.set_defaults(handler=with_store(cmd_show))
    p = qsub.add_parser(
        "retry", help="make waiting recipients due now: of a message, a domain, or all"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", help="queue id")
    which.add_argument("--domain", help="every waiting recipient at this domain")
    which.add_argument("--all", action="store_true", help="every waiting recipient")
    p.set_defaults(handler=with_store(cmd_retry))
    p = qsub.add_parser(
        "delete", help="drop recipients not yet final: of a message, or of a domain"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", help="queue id")
    which.add_argument("--domain", help="every waiting recipient at this domain")
    which.add_argument(
        "--account", help="every waiting recipient of this account's mail (after a suspend)"
    )
    p.add_argument(
        "--status",
        choices=[s.value for s in WAITING_STATUSES],
        help="with --domain or --account: only recipients in this status",
    )
    p.set_defaults(handler=with_store(cmd_delete))
    p = qsub.add_parser(
        "hold", help="pause delivery to a domain (its mail waits, untried); list the holds"
    )
    p.add_argument("--domain", help="recipient domain to hold (none: list the holds)")
    p.add_argument(
        "--for",
        dest="duration",
        type=duration,
        help="how long, e.g. 30m, 2h, 1d (default: until released)",
    )
    p.add_argument("--reason", default="", help="shown in the log, the summary and the API")
    p.set_defaults(handler=with_store(cmd_hold))
    p = qsub.add_parser("release", help="end a domain's hold: its waiting mail is due now")
    p.add_argument("--domain", required=True)
    p.set_defaults(handler=with_store(cmd_release))
    p = sub.add_parser("status", help="delivery status of a message (queue id or Message-ID)")
    p.add_argument("id")
    p.set_defaults(handler=with_store(cmd_show))


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Seconds in "90", "90s", "30m", "2h" or "1d" (argparse type)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30m, 2h, 1d)") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (must be > 0)")
    return seconds


async def cmd_list(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    status = RecipientStatus(args.status) if args.status else None
    rows = await store.queue_list(status, args.limit, args.domain)
    counts = await store.queue_counts()
    print("queue: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "empty")
    print(f"{'QUEUE ID':<22} {'STATUS':<10} {'TRIES':>5} {'NEXT/LEASE':<21} RECIPIENT  LAST REPLY")
    for r in rows:
        print(
            f"{r.message_id:<22} {r.status.value:<10} {r.attempts:>5} {_t(r.due_at):<21}"
            f" {r.address}  {(r.last_reply or r.reason or '')[:80]}"
        )
    return 0


def print_message(m: MessageView) -> None:
    print(f"queue id:   {m.id}")
    print(f"message-id: {m.message_id_header}")
    print(f"from:       <{m.mail_from}>  header: {m.header_from}")
    print(f"subject:    {m.subject}")
    print(f"size:       {m.size} bytes   accepted: {_t(m.created_at)}   node: {m.node_id}")
    if not m.body_kept:
        print("body:       purged (retention.bodies: every recipient final)")
    print("recipients:")
    for r in m.recipients:
        nxt = _t(r.due_at) if not r.status.final else "-"
        print(
            f"  {r.address:<32} {r.status.value:<10} attempts={r.attempts} next={nxt}"
            f" lease={r.lease_owner or '-'}"
        )
        if r.last_reply:
            print(f"      last reply: {r.last_reply} (mx {r.last_mx or '-'}, tls={r.last_tls})")
    print("events:")
    for e in m.events:
        extra = e.data.get("reply") or e.data.get("reason") or ""
        # With several nodes on one database, which node did it is the first question.
        node = f" [node {e.node_id}]" if e.node_id else ""
        print(f"  {_t(e.at)} {e.kind:<10} {e.recipient or '':<32} {extra}{node}")


async def cmd_show(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    print_message(await store.message_view(args.id))
    return 0


async def cmd_summary(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    print_holds(await holds.active(store))
    domains = await operate.shape(store)
    if not domains:
        print("queue: nothing waiting")
        return 0
    ages = [name for name, _ in operate.AGE_BUCKETS]
    statuses = [s.value for s in WAITING_STATUSES]
    print("waiting recipients by destination domain; age since accepted")
    print(
        f"{'DOMAIN':<28} {'TOTAL':>6} "
        + " ".join(f"{a:>5}" for a in ages)
        + " "
        + " ".join(f"{s[:8]:>8}" for s in statuses)
        + "  COMMONEST DEFERRAL"
    )
    shown = domains[: max(1, args.top)]
    for d in shown:
        reply = f"{d.top_reply} ({d.top_reply_count})" if d.top_reply else "-"
        print(
            f"{d.domain[:28]:<28} {d.total:>6} "
            + " ".join(f"{n:>5}" for n in d.by_age)
            + " "
            + " ".join(f"{d.by_status[s]:>8}" for s in statuses)
            + f"  {reply}"
        )
    rest = domains[len(shown) :]
    if rest:
        print(f"... and {len(rest)} more domain(s), {sum(d.total for d in rest)} recipient(s)")
    print(f"{'TOTAL':<28} {sum(d.total for d in domains):>6}")
    return 0


async def cmd_retry(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    if args.id is None:
        n = await operate.retry_domain(store, args.domain)
        where = f"at {args.domain}" if args.domain else "in the queue"
        print(f"{n} waiting recipient(s) {where} due now")
        held = await holds.active(store)
        wanted = held.keys() if args.domain is None else {operate.domain_key(args.domain)}
        for name in sorted(held.keys() & wanted):
            print(f"{name} is held: its mail still waits (relay queue release --domain {name})")
        return 0
    n = await store.retry_now(args.id)
    print(f"{n} recipient(s) of {args.id} due now")
    return 0


async def cmd_delete(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    status = RecipientStatus(args.status) if args.status else None
    if args.account is not None:
        account = await store.get_account(args.account)
        n = await operate.delete_waiting(store, status, account_id=account.id)
        print(f"{n} waiting recipient(s) of account {account.name} deleted")
        return 0
    if args.id is None:
        n = await operate.delete_domain(store, args.domain, status)
        print(f"{n} waiting recipient(s) at {args.domain} deleted")
        return 0
    if args.status:
        print("relay queue delete: --status goes with --domain or --account")
        return 2
    n = await store.delete_message(args.id)
    print(f"{n} recipient(s) of {args.id} deleted")
    return 0


def print_holds(found: dict[str, holds.Hold]) -> None:
    for h in sorted(found.values(), key=lambda h: h.domain):
        until = "released" if h.until is None else _t(h.until)
        print(f"held: {h.domain} since {_t(h.since)} until {until}  {h.reason}".rstrip())


async def cmd_hold(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    if args.domain is None:
        found = await holds.active(store)
        print_holds(found)
        if not found:
            print("no domain is held")
        return 0
    if "." not in args.domain:
        print(f"relay queue hold: not a domain: {args.domain!r}")
        return 2
    until = None if args.duration is None else store.clock() + args.duration
    moved = await holds.hold(store, args.domain, args.reason, until)
    name = operate.domain_key(args.domain)
    print_holds({k: h for k, h in (await holds.active(store)).items() if k == name})
    print(f"{moved} waiting recipient(s) at {args.domain} wait for the hold to end")
    return 0


async def cmd_release(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    n = await holds.lift(store, args.domain)
    if n is None:
        print(f"{args.domain} was not held")
        return 1
    print(f"{args.domain} released: {n} waiting recipient(s) due now")
    return 0
