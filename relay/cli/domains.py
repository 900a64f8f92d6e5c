"""domain add | list | records."""

from __future__ import annotations

import argparse
import asyncio
import datetime
from typing import Any

from relay.cli import with_store
from relay.config import Config
from relay.domains.keys import dkim_txt_value, generate_rsa
from relay.queue.store import Store


def register(sub: Any) -> None:
    dom = sub.add_parser("domain", help="manage sender domains")
    dsub = dom.add_subparsers(dest="domain_command", metavar="ACTION")
    dsub.required = True
    p = dsub.add_parser("add", help="add a sender domain and generate its DKIM key")
    p.add_argument("domain")
    p.add_argument("--account", required=True)
    p.add_argument(
        "--verified", action="store_true", help="mark usable without DNS checks (tests, labs)"
    )
    p.add_argument("--no-warmup", action="store_true", help="start with warm-up off")
    p.set_defaults(handler=with_store(cmd_add))
    p = dsub.add_parser("list", help="list domains with status")
    p.set_defaults(handler=with_store(cmd_list))
    p = dsub.add_parser("records", help="the DNS records to publish")
    p.add_argument("domain")
    p.add_argument("--format", choices=["table", "bind"], default="table")
    p.set_defaults(handler=with_store(cmd_records))


async def cmd_add(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    name = args.domain.lower().rstrip(".")
    account = await store.get_account(args.account)
    key = await asyncio.to_thread(generate_rsa, cfg.dkim.key_bits)
    d = await store.add_domain(
        name,
        account.id,
        cfg.dkim.selector,
        key,
        verified=args.verified,
        warmup=not args.no_warmup,
    )
    print(f"domain {d.name} added for account {account.name}: status {d.status.value}")
    print(f"publish its records: relay domain records {d.name}")
    return 0


async def cmd_list(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    rows = await store.list_domains()
    print(f"{'DOMAIN':<32} {'ACCOUNT':<16} {'STATUS':<10} LAST CHECK")
    for d, account_name, checked in rows:
        when = (
            datetime.datetime.fromtimestamp(checked, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            if checked
            else "-"
        )
        print(f"{d.name:<32} {account_name:<16} {d.status.value:<10} {when}")
    return 0


def _txt_strings(value: str) -> str:
    # RFC 7208 §3.3 / RFC 6376 §3.6.2.2: TXT strings are at most 255 bytes each.
    parts = [value[i : i + 255] for i in range(0, len(value), 255)]
    return " ".join(f'"{p}"' for p in parts)


async def cmd_records(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    from relay.errors import NotFound

    d = await store.get_domain(args.domain)
    if d is None:
        raise NotFound(f"no domain named {args.domain!r}")
    dkim_name = f"{d.dkim_selector}._domainkey.{d.name}."
    records = [
        ("TXT", dkim_name, dkim_txt_value(d.dkim_private_key)),
        ("TXT", f"{d.name}.", "v=spf1 a mx ~all"),
        ("TXT", f"_dmarc.{d.name}.", f"v=DMARC1; p=none; rua=mailto:dmarc@{d.name}"),
    ]
    if args.format == "bind":
        for rtype, host, value in records:
            print(f"{host} 3600 IN {rtype} {_txt_strings(value)}")
        return 0
    print(f"{'TYPE':<5} {'HOST':<40} VALUE")
    for rtype, host, value in records:
        print(f"{rtype:<5} {host:<40} {value}")
    return 0
