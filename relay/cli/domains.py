"""domain add | list | records | verify | rotate-key | remove."""

from __future__ import annotations

import argparse
import datetime
from typing import TYPE_CHECKING, Any

from relay.cli import with_store
from relay.config import Config
from relay.errors import RelayError
from relay.model import DomainStatus
from relay.queue.store import Store

if TYPE_CHECKING:
    from relay.domains.verify import DomainCheck, RecordCheck

# relay.domains (keys, DNS checks, SPF) is imported by the commands that use it: every
# `relay` process registers these commands, `relay serve`'s listener processes included,
# and those never need cryptography, dnspython or pyspf (issue 9: their memory).


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
    p.add_argument(
        "--algorithm",
        choices=["rsa", "ed25519", "both"],
        default=None,
        help="DKIM key type (default: domains.dkim_algorithm); both = dual signing",
    )
    p.set_defaults(handler=with_store(cmd_add))
    p = dsub.add_parser("list", help="list domains with status and last check")
    p.set_defaults(handler=with_store(cmd_list))
    p = dsub.add_parser("records", help="the DNS records to publish")
    p.add_argument("domain")
    p.add_argument("--format", choices=["table", "bind"], default="table")
    p.set_defaults(handler=with_store(cmd_records))
    p = dsub.add_parser("verify", help="check the published DNS records now")
    p.add_argument("domain", nargs="?")
    p.add_argument("--all", action="store_true", help="every domain")
    p.set_defaults(handler=with_store(cmd_verify))
    p = dsub.add_parser("rotate-key", help="new DKIM key under a new selector")
    p.add_argument("domain")
    p.set_defaults(handler=with_store(cmd_rotate))
    p = dsub.add_parser("remove", help="delete a domain (refused while its mail is queued)")
    p.add_argument("domain")
    p.add_argument("--force", action="store_true", help="also delete its queued messages")
    p.set_defaults(handler=with_store(cmd_remove))


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def cmd_add(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    from relay.domains import service

    d = await service.add_domain(
        store,
        cfg,
        args.domain,
        args.account,
        verified=args.verified,
        warmup=not args.no_warmup,
        algorithm=args.algorithm,
    )
    print(f"domain {d.name} added for account {args.account}: status {d.status.value}")
    print(
        f"publish its records (relay domain records {d.name}), then: relay domain verify {d.name}"
    )
    return 0


async def cmd_list(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    rows = await store.list_domains()
    print(f"{'DOMAIN':<32} {'ACCOUNT':<16} {'STATUS':<10} LAST CHECK")
    for d, account_name, checked in rows:
        print(f"{d.name:<32} {account_name:<16} {d.status.value:<10} {_when(checked)}")
    return 0


async def cmd_records(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    from relay.domains import service
    from relay.domains.records import host_record
    from relay.domains.verify import CheckStatus

    d = await service.get(store, args.domain)
    expected = await service.expected_for(store, cfg, d)
    if args.format == "bind":
        needed = ", ".join(sorted({e.kind.value.upper() for e in expected if e.required}))
        print(f"; relay: DNS records for {d.name} (required: {needed or 'none'})")
        for e in expected:
            if e.selector is not None and e.role.value == "pending":
                print("; new DKIM key (rotation): relay signs with it once this record verifies")
            print(e.bind_line())
        return 0
    last = await service.last_check(store, d)
    seen: dict[tuple[str, str], RecordCheck] = {}
    if last is not None:
        seen = {(r.kind.value, r.name): r for r in last.records}
    print(
        f"{d.name}: status {d.status.value}, last check {_when(last.checked_at if last else None)}"
    )
    print(f"{'RECORD':<34} {'TYPE':<4} {'HOST RECORD':<28} {'STATUS':<10} NAME")
    for e in expected:
        r = seen.get((e.kind.value, e.name))
        status = r.status.value if r else "unchecked"
        need = "" if e.required else " (recommended)"
        print(
            f"{e.label + need:<34} {e.rtype:<4} {host_record(e.name, d.name):<28}"
            f" {status:<10} {e.fqdn}"
        )
        print(f"    expected: {e.display_value}")
        print(f"    current:  {(r.current or '(none)') if r else '(not checked yet)'}")
        if r and r.status is not CheckStatus.PASS:
            print(f"    why:      {r.reason}")
    return 0


def _print_check(check: DomainCheck) -> None:
    from relay.domains.verify import CheckStatus

    for r in check.records:
        print(f"  {r.status.value.upper():<9} {r.label:<32} {r.name}.  {r.reason}")
        if r.status is not CheckStatus.PASS:
            print(f"            seen: {r.current or '(nothing)'}")


async def cmd_verify(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    from relay.domains import service
    from relay.domains.verify import Verifier

    if args.all == bool(args.domain):
        raise RelayError("name one domain, or use --all")
    if args.all:
        domains = [d for d, _account, _checked in await store.list_domains()]
    else:
        domains = [await service.get(store, args.domain)]
    verifier = Verifier(cfg)
    all_ok = True
    for d in domains:
        result = await service.verify(store, cfg, d, verifier)
        was = d.status.value
        now = result.status.value
        change = f"{was} -> {now}" if was != now else now
        print(f"{d.name}: {change}")
        _print_check(result.check)
        if result.check.broken:
            names = ", ".join(r.label for r in result.check.broken)
            print(f"  not verified: fix {names} and run `relay domain verify {d.name}` again")
        elif result.check.temporary and result.status is not DomainStatus.VERIFIED:
            print("  DNS did not answer for some records: status kept, try again later")
        elif result.check.temporary:
            print("  DNS did not answer for some records: status kept (verified)")
        if result.rotated_to:
            print(
                f"  DKIM key rotated: now signing with selector {result.rotated_to};"
                f" keep the old selector's record published for a few days (mail in transit)"
            )
        all_ok = all_ok and result.status is DomainStatus.VERIFIED
    return 0 if all_ok else 1


async def cmd_rotate(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    from relay.domains import service

    d = await service.get(store, args.domain)
    selector = await service.rotate_key(store, cfg, d)
    print(f"domain {d.name}: new DKIM key under selector {selector}")
    print(f"relay keeps signing with selector {d.dkim_selector} until the new record verifies:")
    print(f"publish {selector}._domainkey.{d.name} (relay domain records {d.name}),")
    print(f"then run `relay domain verify {d.name}` (the server also re-checks periodically)")
    return 0


async def cmd_remove(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    from relay.domains import service

    d = await service.get(store, args.domain)
    deleted = await service.remove(store, d, force=args.force)
    extra = f" and {deleted} queued message(s)" if deleted else ""
    print(f"domain {d.name} removed{extra}")
    return 0
