"""Sending limits (issue 4): subject, rate, daily quota with reputation levels,
per-recipient hourly cap, and the warm-up plan applied at accept.

Checks decide; the counts they read live in the counter table and are incremented by the
accept transaction itself (``NewMessage.counters``), so restarts and every process on the
database see the same numbers. Every refusal names the limit, its value and when it frees.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from relay.config import LimitsConfig
from relay.model import Account, RecipientStatus, Stage, Verdict
from relay.policy import reputation, warmup
from relay.policy.engine import Request
from relay.queue import limits as q
from relay.queue.store import CounterAdd, NewRecipient, RateTake, Store

DAY = 86400.0
HOUR = 3600.0
RCPT_BUCKET = 60.0  # per-recipient counts in 1-minute windows: a rolling hour to the minute

ACCOUNT_KEYS = {
    "daily": "daily quota (recipients per rolling 24 h); replaces the reputation level's",
    "rate": "recipients per second",
    "per_recipient_hourly": "messages per hour to one address",
    "max_subject": "subject length in characters",
    "queue_over_quota": "true: over-quota mail is accepted and held, not refused",
    "level": "reputation level (0-based index into limits.levels)",
}
DOMAIN_KEYS = {
    "warmup": "true/false: automatic warm-up for this sender domain",
    "warmup_day": "make today this warm-up day (sets day 1)",
    "warmup_daily": "fixed warm-up daily budget instead of the schedule",
    "warmup_hourly": "fixed warm-up hourly budget instead of the schedule",
}


def utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _in(seconds: float) -> str:
    s = max(0, math.ceil(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{math.ceil(s / 60)} min"
    return f"{s / 3600:.1f} h"


def _bool(text: str) -> bool:
    return text.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True, slots=True)
class AccountLimits:
    account_id: int
    name: str
    daily: int
    daily_source: str
    level: int
    levels: int
    rate: int
    per_recipient_hourly: int
    max_subject: int
    queue_over_quota: bool


@dataclass(frozen=True, slots=True)
class DomainWarmup:
    name: str
    enabled: bool
    budget: warmup.Budget | None  # None: warm-up off or over
    first_day: str | None


@dataclass(frozen=True, slots=True)
class Usage:
    used: int
    frees_at: float | None  # when the oldest counted window leaves the rolling period


class Limits:
    """The limits service shared by the checks, the accept planner and the scheduler."""

    def __init__(self, cfg: LimitsConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.tz = ZoneInfo(cfg.timezone)
        # account id -> (overrides, level row, limits): for_account runs up to five times
        # per message; the rows come from the store's cache, so the same two objects give
        # the same limits (issue 9). A row read again (cache expiry, a write) is a new
        # object and the limits are worked out anew.
        self._derived: dict[int, tuple[Mapping[str, str], q.LevelRow | None, AccountLimits]] = {}

    # ------------------------------------------------------------------ effective limits

    async def for_account(self, account: Account) -> AccountLimits:
        ov = await q.cached_overrides(self.store, "account", account.name)
        row = await q.get_level(self.store, account.id)
        seen = self._derived.get(account.id)
        if seen is not None and seen[0] is ov and seen[1] is row and seen[2].name == account.name:
            return seen[2]
        limits = self._for_account(account, ov, row)
        if len(self._derived) >= 10_000:
            self._derived.clear()
        self._derived[account.id] = (ov, row, limits)
        return limits

    def _for_account(
        self, account: Account, ov: Mapping[str, str], row: q.LevelRow | None
    ) -> AccountLimits:
        table = reputation.level_table(self.cfg)
        level = min(row.level if row else 0, len(table) - 1)
        daily, source = table[level], f"reputation level {level + 1} of {len(table)}"
        if "daily" in ov:
            daily, source = int(ov["daily"]), "set for this account"
        return AccountLimits(
            account_id=account.id,
            name=account.name,
            daily=min(daily, self.cfg.hard_ceiling),
            daily_source=source,
            level=level,
            levels=len(table),
            rate=int(ov.get("rate", self.cfg.rate)),
            per_recipient_hourly=int(ov.get("per_recipient_hourly", self.cfg.per_recipient_hourly)),
            max_subject=int(ov.get("max_subject", self.cfg.max_subject)),
            queue_over_quota=_bool(ov["queue_over_quota"])
            if "queue_over_quota" in ov
            else self.cfg.queue_over_quota,
        )

    async def warmup_of(self, domain_name: str, *, start: bool = False) -> DomainWarmup:
        """The domain's warm-up today; ``start`` records day 1 if it has not sent yet."""
        name = domain_name.lower()
        d = await self.store.get_domain(name)
        if d is None or not d.warmup:
            return DomainWarmup(name, False, None, None)
        now = self.store.clock()
        today = warmup.local_date(now, self.tz)
        if start:
            first = await q.ensure_warmup_start(self.store, name, today.isoformat())
        else:
            first = await q.get_warmup_start(self.store, name) or today.isoformat()
        day = warmup.warmup_day(dt.date.fromisoformat(first), today)
        budget = warmup.budget_for_day(self.cfg.warmup, day, self.cfg.hard_ceiling)
        ov = await q.get_overrides(self.store, "domain", name)
        if "warmup_daily" in ov or "warmup_hourly" in ov:
            base = budget or warmup.Budget(day, self.cfg.hard_ceiling, None)
            budget = warmup.Budget(
                day,
                int(ov.get("warmup_daily", base.daily)),
                int(ov["warmup_hourly"]) if "warmup_hourly" in ov else base.hourly,
            )
        return DomainWarmup(name, True, budget, first)

    # ------------------------------------------------------------------ counters

    def daily_key(self, account_id: int) -> str:
        return f"daily:{account_id}"

    def rcpt_key(self, account_id: int, address: str) -> str:
        return f"rcpt:{account_id}:{address.lower()}"

    def _daily_since(self, now: float) -> float:
        # 24 hourly windows, the current one included: a rolling 24 h to the hour.
        return warmup.hour_start(now) - 23 * HOUR

    def _daily_counter(self, account_id: int, now: float, amount: int) -> CounterAdd:
        window = warmup.hour_start(now)
        # Kept for the reputation window too (sent volume over level_window_days).
        keep = (self.cfg.level_window_days + 1) * DAY
        return CounterAdd(self.daily_key(account_id), window, amount, window + keep)

    async def daily_usage(self, account_id: int) -> Usage:
        key, since = self.daily_read(account_id)
        return self.daily_usage_of(await q.counter_windows(self.store, key, since))

    def daily_read(self, account_id: int) -> tuple[str, float]:
        """The (counter key, since) ``daily_usage`` reads, for a read that batches it."""
        return self.daily_key(account_id), self._daily_since(self.store.clock())

    @staticmethod
    def daily_usage_of(rows: list[tuple[float, int]]) -> Usage:
        """The daily usage from its counter windows (``daily_read`` on)."""
        used = sum(v for _, v in rows)
        frees = next((w + DAY for w, v in rows if v > 0), None)
        return Usage(used, frees)

    def rcpt_since(self, now: float) -> float:
        """Start of the per-recipient count's rolling hour (1-minute windows)."""
        return math.floor(now / RCPT_BUCKET) * RCPT_BUCKET - HOUR + RCPT_BUCKET

    def rcpt_usage_of(self, rows: list[tuple[float, int]]) -> Usage:
        """The per-recipient usage from its counter windows (``rcpt_since`` on)."""
        return Usage(sum(v for _, v in rows), next((w + HOUR for w, v in rows if v > 0), None))

    async def rcpt_usage(self, account_id: int, address: str) -> Usage:
        since = self.rcpt_since(self.store.clock())
        rows = await q.counter_windows(self.store, self.rcpt_key(account_id, address), since)
        return self.rcpt_usage_of(rows)

    def warmup_keys(self, domain_name: str, now: float) -> tuple[str, float, str, float]:
        day = warmup.local_date(now, self.tz)
        return (
            f"warmup:day:{domain_name}",
            warmup.day_start(day, self.tz),
            f"warmup:hour:{domain_name}",
            warmup.hour_start(now),
        )

    async def warmup_usage(self, domain_name: str) -> tuple[int, int]:
        """(sent today, sent this hour) of a warming-up domain."""
        now = self.store.clock()
        dkey, dstart, hkey, hstart = self.warmup_keys(domain_name, now)
        return (
            await self.store.counter_sum(dkey, dstart),
            await self.store.counter_sum(hkey, hstart),
        )

    def warmup_counters(self, domain_name: str, now: float, amount: int) -> list[CounterAdd]:
        if amount <= 0:
            return []
        dkey, dstart, hkey, hstart = self.warmup_keys(domain_name, now)
        return [
            CounterAdd(dkey, dstart, amount, dstart + 2 * DAY),
            CounterAdd(hkey, hstart, amount, hstart + 2 * HOUR),
        ]

    # ------------------------------------------------------------------ accept plan

    async def plan(
        self, account_id: int, mail_from: str, recipients: list[NewRecipient]
    ) -> tuple[list[NewRecipient], tuple[CounterAdd, ...]]:
        """Which recipients go now, which are held, and what the accept counts."""
        now = self.store.clock()
        acct = await self.for_account(await self.store.get_account_by_id(account_id))
        counters: list[CounterAdd] = []
        seen: set[str] = set()
        for r in recipients:
            addr = r.address.lower()
            if addr in seen:
                continue
            seen.add(addr)
            window = math.floor(now / RCPT_BUCKET) * RCPT_BUCKET
            counters.append(CounterAdd(self.rcpt_key(account_id, addr), window, 1, window + HOUR))
        out = list(recipients)
        go = len(out)
        if acct.queue_over_quota:
            usage = await self.daily_usage(account_id)
            go = max(0, min(go, acct.daily - usage.used))
            until = usage.frees_at or now + HOUR
            why = f"quota: {acct.daily}/24h reached"
            out = out[:go] + [
                NewRecipient(r.address, RecipientStatus.HELD, until, why) for r in out[go:]
            ]
            if go:
                counters.append(self._daily_counter(account_id, now, go))
        elif go:
            c = self._daily_counter(account_id, now, go)
            text = f"daily quota {acct.daily} recipients per 24 h reached"
            counters.append(
                CounterAdd(
                    c.key,
                    c.window,
                    c.amount,
                    c.expires_at,
                    acct.daily,
                    self._daily_since(now),
                    text,
                )
            )
        sender_domain = mail_from.rpartition("@")[2].lower().rstrip(".")
        wu = await self.warmup_of(sender_domain, start=True) if go else None
        if wu is not None and wu.budget is not None:
            used_day, used_hour = await self.warmup_usage(sender_domain)
            rel = warmup.plan_release(now, self.tz, wu.budget, used_day, used_hour, go)
            why = rel.reason or f"warm-up day {wu.budget.day}"
            planned = [
                NewRecipient(r.address, RecipientStatus.QUEUED, slot)
                for r, slot in zip(out[: rel.count], rel.slots, strict=True)
            ]
            held = [
                NewRecipient(r.address, RecipientStatus.HELD, rel.next_check, _reason(why))
                for r in out[rel.count : go]
            ]
            out = planned + held + out[go:]
            counters.extend(self.warmup_counters(sender_domain, now, rel.count))
        return out, tuple(counters)

    async def ensure_level(self, account_id: int) -> None:
        """Evaluate an account's reputation level once per local day."""
        now = self.store.clock()
        today = warmup.local_date(now, self.tz).isoformat()
        row = await q.get_level(self.store, account_id)
        if row is not None and row.evaluated_day == today:
            return
        if row is None:
            await q.set_level(self.store, account_id, 0, now, today, "new account")
            return
        days = self.cfg.level_window_days
        since = now - days * DAY
        sent = await self.store.counter_sum(self.daily_key(account_id), since)
        delivered, bounced, complaints = await q.delivery_stats(self.store, account_id, since)
        stats = reputation.SendingStats(days, sent, delivered, bounced, complaints)
        decision = reputation.next_level(self.cfg, row.level, stats)
        level, changed = decision.level, row.changed_at
        if level > row.level and now - row.changed_at < days * DAY:
            level = row.level  # one climb per evaluation window
        if level != row.level:
            changed = now
        await q.set_level(self.store, account_id, level, changed, today, decision.why)


def _reason(text: str) -> str:
    return ("warmup: " + text.removeprefix("warm-up "))[:64]


# ---------------------------------------------------------------------- checks


class SubjectLimit:
    """Seeds: the subject must be UTF-8 and at most 998 characters (RFC 2047 decoded)."""

    name = "subject"
    stages = frozenset({Stage.DATA})

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    async def __call__(self, request: Request) -> Verdict | None:
        if request.account is None:
            return None
        subject = request.headers.get("subject", "")
        if request.headers.get("subject_ok", "1") == "":
            return Verdict(
                554,
                "5.6.0",
                "Subject is not valid UTF-8 (after decoding RFC 2047 encoded-words):"
                " encode it as UTF-8",
                "subject_encoding",
            )
        acct = await self.limits.for_account(request.account)
        if len(subject) > acct.max_subject:
            return Verdict(
                554,
                "5.6.0",
                f"Subject is {len(subject)} characters, the limit is {acct.max_subject}"
                " (max_subject; 78 or fewer is recommended)",
                "subject_length",
            )
        return None


class LineLength:
    """RFC 5322 §2.1.1: lines are at most 998 characters. The SMTP layer reads longer
    lines so that this refusal (and the subject's, checked first) can name the rule."""

    name = "line_length"
    stages = frozenset({Stage.DATA})
    LIMIT = 998

    async def __call__(self, request: Request) -> Verdict | None:
        longest = int(request.headers.get("longest_line", "0") or 0)
        if longest <= self.LIMIT:
            return None
        return Verdict(
            554,
            "5.6.0",
            f"Message has a line of {longest} characters, the limit is {self.LIMIT}"
            " (RFC 5322 section 2.1.1): wrap long lines or use quoted-printable or base64",
            self.name,
        )


class PerRecipientHourly:
    """Seeds: at most 10 messages per hour from one account to the same address."""

    name = "per_recipient_hourly"
    stages = frozenset({Stage.RCPT})

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    async def __call__(self, request: Request) -> Verdict | None:
        if request.account is None or not request.rcpt:
            return None
        acct = await self.limits.for_account(request.account)
        usage = await self.limits.rcpt_usage(request.account.id, request.rcpt)
        return self.verdict(request.rcpt, acct, usage)

    def verdict(self, rcpt: str, acct: AccountLimits, usage: Usage) -> Verdict | None:
        if usage.used < acct.per_recipient_hourly:
            return None
        now = self.limits.store.clock()
        frees = usage.frees_at or now + HOUR
        return Verdict(
            450,
            "4.2.1",
            f"Too many messages to <{rcpt}>: at most {acct.per_recipient_hourly} per hour"
            f" from one account (per_recipient_hourly); retry after {utc(frees)}"
            f" (in {_in(frees - now)})",
            self.name,
        )


# Request.notes key: the account's daily Usage as read with the last RCPT (RecipientChecks).
DAILY_USAGE_NOTE = "daily_usage"


class DailyQuota:
    """Seeds: 500 recipients per rolling 24 h for a new account, raised by reputation.

    The usage read with the transaction's last RCPT is used when there is one (no trip to
    the database at DATA, issue 9). It may be a DATA transfer old: this check only gives
    the early, detailed refusal; the accept transaction counts the recipients against the
    quota atomically (CounterAdd.limit) and refuses with 451 4.7.1 itself when another
    session used up the rest meanwhile.
    """

    name = "daily_quota"
    stages = frozenset({Stage.DATA})

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    async def __call__(self, request: Request) -> Verdict | None:
        if request.account is None:
            return None
        acct = await self.limits.for_account(request.account)
        if acct.queue_over_quota:
            return None  # the accept plan holds what is over quota
        n = max(1, len(request.recipients))
        noted = request.notes.get(DAILY_USAGE_NOTE)
        if isinstance(noted, Usage):
            usage = noted
        else:
            usage = await self.limits.daily_usage(request.account.id)
        if usage.used + n <= acct.daily:
            return None
        now = self.limits.store.clock()
        frees = usage.frees_at or now + DAY
        return Verdict(
            451,
            "4.7.1",
            f"Daily sending quota reached: {usage.used} of {acct.daily} recipients used in the"
            f" last 24 h ({acct.daily_source}), this message has {n}; quota frees up from"
            f" {utc(frees)} (in {_in(frees - now)})",
            self.name,
        )


class RateLimit:
    """Seeds: 20 messages per second per account; a message to N recipients counts N.

    With ``in_accept`` (how relay serve runs it) the DATA check only lets the message
    through and the SMTP path takes the tokens inside the accept transaction
    (``take``/NewMessage.rate): one commit per message instead of two (issue 9). The
    refusal, code and text are the same either way.
    """

    name = "rate"
    stages = frozenset({Stage.DATA})

    def __init__(self, limits: Limits, *, in_accept: bool = False) -> None:
        self.limits = limits
        self.in_accept = in_accept

    async def take(self, account: Account, n: int) -> RateTake:
        """The tokens a message to ``n`` recipients takes in its accept transaction."""
        acct = await self.limits.for_account(account)
        interval = 1.0 / acct.rate
        # one second of burst: the bucket holds `rate` tokens
        return RateTake(
            f"rate:{account.id}", interval, (acct.rate - 1) * interval, max(1, n), _rate_text(acct)
        )

    async def __call__(self, request: Request) -> Verdict | None:
        if request.account is None or self.in_accept:
            return None
        r = await self.take(request.account, len(request.recipients))
        wait = await q.take_tokens(
            self.limits.store, r.key, self.limits.store.clock(), r.interval, r.tolerance, r.amount
        )
        if wait <= 0:
            return None
        return Verdict(
            451, "4.7.1", r.limit_text.replace("{wait}", f"{max(wait, 0.001):.2f}"), self.name
        )


def _rate_text(acct: AccountLimits) -> str:
    return (
        f"Sending rate exceeded: at most {acct.rate} recipients per second for account"
        f" {acct.name} (rate); retry in {{wait}} s"
    )
