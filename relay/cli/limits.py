"""limits show | set: every sending limit of an account or a sender domain."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from relay.cli import fail, with_store
from relay.config import Config
from relay.errors import NotFound
from relay.policy import warmup
from relay.policy.limits import (
    ACCOUNT_KEYS,
    DAY,
    DOMAIN_KEYS,
    HOUR,
    Limits,
    _in,
    utc,
)
from relay.queue import limits as q
from relay.queue.store import Store


def register(sub: Any) -> None:
    lim = sub.add_parser("limits", help="show or set sending limits")
    lsub = lim.add_subparsers(dest="limits_command", metavar="ACTION")
    lsub.required = True
    p = lsub.add_parser("show", help="an account's limits and use (or --domain: its warm-up)")
    p.add_argument("account", nargs="?")
    p.add_argument("--domain", help="a sender domain: warm-up day, budgets and held mail")
    p.set_defaults(handler=with_store(cmd_show))
    keys = ", ".join([*ACCOUNT_KEYS, *(f"--domain: {k}" for k in DOMAIN_KEYS)])
    p = lsub.add_parser("set", help=f"override a limit (KEY=VALUE; keys: {keys})")
    p.add_argument("account", nargs="?")
    p.add_argument("--domain")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="VALUE 'default' unsets")
    p.set_defaults(handler=with_store(cmd_set))


async def cmd_show(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    limits = Limits(cfg.limits, store)
    if args.domain:
        return await _show_domain(limits, args.domain.lower().rstrip("."))
    if not args.account:
        return fail("name an account, or --domain DOMAIN")
    account = await store.get_account(args.account)
    a = await limits.for_account(account)
    now = store.clock()
    usage = await limits.daily_usage(account.id)
    level = await q.get_level(store, account.id)
    print(f"account {account.name}")
    frees = f"; frees up from {utc(usage.frees_at)}" if usage.frees_at else ""
    print(
        f"  daily quota        {a.daily} recipients per rolling 24 h ({a.daily_source});"
        f" used {usage.used}, remaining {max(0, a.daily - usage.used)}{frees}"
    )
    days = cfg.limits.level_window_days
    delivered, bounced, complaints = await q.delivery_stats(store, account.id, now - days * DAY)
    done = delivered + bounced
    print(
        f"  reputation level   {a.level + 1} of {a.levels}"
        f" (quotas {', '.join(str(v) for v in _table(cfg))});"
        f" last {days} days: bounce rate {bounced / done if done else 0:.1%}"
        f" (max {cfg.limits.level_max_bounce_rate:.1%}), complaint rate"
        f" {complaints / delivered if delivered else 0:.2%}"
        f" (max {cfg.limits.level_max_complaint_rate:.2%})"
        + (f"; {level.why}" if level and level.why else "")
    )
    print(f"  hard ceiling       {cfg.limits.hard_ceiling} recipients per day")
    print(f"  rate               {a.rate} recipients per second (token bucket, 1 s burst)")
    top = await q.top_counters(store, f"rcpt:{account.id}:", now - HOUR)
    busiest = ", ".join(f"{k} {v}" for k, v in top[:3]) or "none"
    print(
        f"  per recipient      {a.per_recipient_hourly} messages per hour to one address;"
        f" busiest in the last hour: {busiest}"
    )
    print(f"  subject            at most {a.max_subject} characters, valid UTF-8")
    print(f"  recipients         at most {cfg.smtp.max_recipients} per message")
    print(f"  queue over quota   {'on (held, not refused)' if a.queue_over_quota else 'off'}")
    held, nxt = await q.held_summary(store, account_id=account.id)
    when = f", next release check {utc(nxt)}" if nxt else ""
    print(f"  held               {held} recipients{when}")
    for d, owner, _ in await store.list_domains():
        if owner == account.name:
            print(await _warmup_line(limits, d.name))
    return 0


def _table(cfg: Config) -> tuple[int, ...]:
    from relay.policy.reputation import level_table

    return level_table(cfg.limits)


async def _warmup_line(limits: Limits, name: str) -> str:
    wu = await limits.warmup_of(name)
    if not wu.enabled:
        return f"  warm-up {name:<18} off"
    if wu.budget is None:
        return f"  warm-up {name:<18} complete (day 1 was {wu.first_day})"
    used_day, used_hour = await limits.warmup_usage(name)
    b = wu.budget
    hourly = f", {b.hourly}/hour (used {used_hour})" if b.hourly else ""
    started = (
        "" if wu.first_day and await q.get_warmup_start(limits.store, name) else " (not started)"
    )
    return (
        f"  warm-up {name:<18} day {b.day}{started}: today's budget {b.daily}, used {used_day},"
        f" remaining {max(0, b.daily - used_day)}{hourly}"
    )


async def _show_domain(limits: Limits, name: str) -> int:
    store = limits.store
    d = await store.get_domain(name)
    if d is None:
        raise NotFound(f"no domain named {name!r}")
    now = store.clock()
    print(f"domain {name}")
    print(await _warmup_line(limits, name))
    wu = await limits.warmup_of(name)
    if wu.budget is not None:
        tomorrow = warmup.local_date(now, limits.tz) + dt.timedelta(days=1)
        nxt = warmup.budget_for_day(limits.cfg.warmup, wu.budget.day + 1, limits.cfg.hard_ceiling)
        print(
            f"  day resets         {utc(warmup.next_day_start(now, limits.tz))}"
            f" (in {_in(warmup.next_day_start(now, limits.tz) - now)}, {limits.cfg.timezone});"
            f" {tomorrow.isoformat()} budget {nxt.daily if nxt else 'unlimited (warm-up done)'}"
        )
        if wu.budget.hourly:
            print(
                f"  hourly spacing     one recipient every {3600 / wu.budget.hourly:.0f} s;"
                f" hour resets {utc(warmup.hour_start(now) + HOUR)}"
            )
    held, nxt_due = await q.held_summary(store, sender_domain=name)
    when = f", next release check {utc(nxt_due)}" if nxt_due else ""
    print(f"  held               {held} recipients{when}")
    ov = await q.get_overrides(store, "domain", name)
    if ov:
        print("  overrides          " + ", ".join(f"{k}={v}" for k, v in sorted(ov.items())))
    return 0


async def cmd_set(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    if not args.settings:
        return fail("give at least one KEY=VALUE")
    scope = "domain" if args.domain else "account"
    if scope == "account":
        if not args.account:
            return fail("name an account, or --domain DOMAIN")
        account = await store.get_account(args.account)
        name = account.name
    else:
        name = args.domain.lower().rstrip(".")
        if await store.get_domain(name) is None:
            raise NotFound(f"no domain named {name!r}")
        if args.account:
            args.settings.insert(0, args.account)
    allowed = ACCOUNT_KEYS if scope == "account" else DOMAIN_KEYS
    limits = Limits(cfg.limits, store)
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            return fail(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(allowed)}")
        unset = value == "default"
        if key in {"queue_over_quota", "warmup"}:
            if not unset and value.lower() not in {"true", "false", "on", "off", "1", "0"}:
                return fail(f"{key}: expected true or false, got {value!r}")
        elif not unset and (not value.isdigit() or int(value) < (0 if key == "level" else 1)):
            return fail(f"{key}: expected a whole number, got {value!r}")
        if key == "level":
            table = _table(cfg)
            lvl = 0 if unset else min(int(value), len(table) - 1)
            await q.set_level(store, account.id, lvl, store.clock(), "", "set by operator")
        elif key == "warmup":
            on = not unset and value.lower() in {"true", "on", "1"}
            await q.set_domain_warmup(store, name, on or unset)
        elif key == "warmup_day":
            today = warmup.local_date(store.clock(), limits.tz)
            first = today - dt.timedelta(days=(1 if unset else int(value)) - 1)
            await q.set_warmup_start(store, name, first.isoformat())
        else:
            await q.set_override(store, scope, name, key, None if unset else value)
        print(f"{scope} {name}: {key} = {value}")
    return 0
