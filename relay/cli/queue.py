"""queue list | show | retry | delete, and status."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from relay.cli import with_store
from relay.config import Config
from relay.model import RecipientStatus
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
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(handler=with_store(cmd_list))
    p = qsub.add_parser("show", help="one message: recipients and events")
    p.add_argument("id")
    p.set_defaults(handler=with_store(cmd_show))
    p = qsub.add_parser("retry", help="make a message's waiting recipients due now")
    p.add_argument("id")
    p.set_defaults(handler=with_store(cmd_retry))
    p = qsub.add_parser("delete", help="drop a message's recipients that are not final")
    p.add_argument("id")
    p.set_defaults(handler=with_store(cmd_delete))
    p = sub.add_parser("status", help="delivery status of a message (queue id or Message-ID)")
    p.add_argument("id")
    p.set_defaults(handler=with_store(cmd_show))


async def cmd_list(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    status = RecipientStatus(args.status) if args.status else None
    rows = await store.queue_list(status, args.limit)
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


async def cmd_retry(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    n = await store.retry_now(args.id)
    print(f"{n} recipient(s) of {args.id} due now")
    return 0


async def cmd_delete(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    n = await store.delete_message(args.id)
    print(f"{n} recipient(s) of {args.id} deleted")
    return 0
