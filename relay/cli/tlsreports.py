"""`relay tls-report`: what the SMTP TLS reports (RFC 8460) will say, and who asks for them."""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

from relay.cli import fail, with_store
from relay.config import Config
from relay.queue import tlsrpt as sql
from relay.queue.events import day_of
from relay.queue.operate import domain_key
from relay.queue.rollup import DAY
from relay.queue.store import Store

# Delivery's modules are imported by the commands: `relay serve` builds this parser in
# every listener process, which must not load aiohttp, nor relay.metrics before its
# PROMETHEUS_MULTIPROC_DIR is set (tests/integration/test_perf_processes.py).


def register(sub: Any) -> None:
    t = sub.add_parser("tls-report", help="SMTP TLS reports (RFC 8460) to recipient domains")
    tsub = t.add_subparsers(dest="tls_report_command", metavar="ACTION")
    tsub.required = True
    p = tsub.add_parser(
        "show",
        help="delivery's TLS sessions counted and not reported yet, per day and domain",
    )
    p.add_argument("--domain", help="only this recipient domain")
    p.set_defaults(handler=with_store(cmd_show))
    p = tsub.add_parser(
        "check",
        help="the domain's _smtp._tls record: where its reports would go",
    )
    p.add_argument("domain")
    p.set_defaults(handler=with_store(cmd_check))


async def cmd_show(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    from relay.delivery.tlsrpt import ReportPolicy

    counts = await sql.pending(store)
    if args.domain:
        counts = [c for c in counts if c.policy_domain == domain_key(args.domain)]
    if not cfg.tls_reports.enabled:
        print("tls_reports.enabled is off: sessions are not counted and no report is sent")
    if not counts:
        print("no sessions counted since the last reports")
        return 0
    groups: dict[tuple[int, str, str, str], list[sql.SessionCount]] = defaultdict(list)
    for c in counts:
        groups[(c.day, c.policy_domain, c.policy_type, c.policy)].append(c)
    for (day, domain, policy_type, text), rows in groups.items():
        held_to = ReportPolicy.from_json(policy_type, text)
        mode = next((s[6:] for s in held_to.strings if s.startswith("mode: ")), "")
        ok = sum(r.n for r in rows if not r.result)
        failed = sum(r.n for r in rows if r.result)
        date = day_of(day * DAY)
        kind = f"{policy_type} ({mode})" if mode else policy_type
        print(f"{date}  {domain}  {kind}  successful {ok}  failed {failed}")
        for r in rows:
            if r.result:
                where = f"{r.mx} [{r.receiving_ip}]" if r.receiving_ip else r.mx
                why = f"  ({r.detail})" if r.detail else ""
                print(f"    {r.result}  {where}  from {r.sending_ip or '-'}: {r.n}{why}")
    return 0


async def cmd_check(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    from relay.delivery.mx import make_resolver
    from relay.delivery.tlsreports import TlsReporter
    from relay.delivery.tlsrpt import Tally

    domain = domain_key(args.domain)
    resolver = make_resolver(cfg.dns)
    reporter = TlsReporter(store, lambda: cfg, Tally(), lambda: resolver)
    uris = await reporter.rua(domain)
    if not uris:
        return fail(f"{domain} publishes no TLSRPT record (_smtp._tls.{domain} TXT): no reports")
    for uri in uris:
        print(uri)
    return 0
