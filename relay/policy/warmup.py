"""Automatic warm-up: the per-domain schedule as pure functions.

Day 1 of a domain is its first sending day, counted in ``limits.timezone``. The default
schedule is the seeds' "Email warm-up (vital)" table; inside a range of days the daily and
hourly budgets are interpolated linearly, after the last row they double every day until
the daily budget reaches the account hard ceiling, where warm-up ends.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from relay.config import WarmupStep


@dataclass(frozen=True, slots=True)
class Budget:
    """What one warm-up day allows: recipients per day and per hour (None: no hourly cap)."""

    day: int
    daily: int
    hourly: int | None


def _lerp(lo: int, hi: int, first: int, last: int, day: int) -> int:
    if last <= first:
        return lo
    return round(lo + (hi - lo) * (day - first) / (last - first))


def budget_for_day(
    schedule: Sequence[WarmupStep], day: int, ceiling: int | None = None
) -> Budget | None:
    """The warm-up budget of ``day`` (1-based), or None once warm-up is over."""
    if not schedule:
        return None
    day = max(day, 1)
    for step in schedule:
        if step.first_day <= day <= step.last_day:
            hourly = (
                None
                if step.hourly_from is None or step.hourly_to is None
                else _lerp(step.hourly_from, step.hourly_to, step.first_day, step.last_day, day)
            )
            return Budget(
                day,
                _lerp(step.daily_from, step.daily_to, step.first_day, step.last_day, day),
                hourly,
            )
    last = max(schedule, key=lambda s: s.last_day)
    if day < last.first_day:
        return None  # a gap in an operator's table: no warm-up limit on those days
    # "Day N: doubled daily" (seeds): keep the hourly cap in proportion, so spacing holds.
    factor = 2 ** (day - last.last_day)
    daily = last.daily_to * factor
    if ceiling is not None and daily >= ceiling:
        return None
    hourly = None if last.hourly_to is None else last.hourly_to * factor
    return Budget(day, daily, hourly)


def last_warmup_day(schedule: Sequence[WarmupStep], ceiling: int) -> int:
    """The last day on which warm-up still limits a domain."""
    if not schedule:
        return 0
    last = max(schedule, key=lambda s: s.last_day)
    if last.daily_to <= 0:
        return last.last_day
    return last.last_day + max(0, math.ceil(math.log2(ceiling / last.daily_to)) - 1)


def local_date(ts: float, tz: ZoneInfo) -> dt.date:
    return dt.datetime.fromtimestamp(ts, tz).date()


def day_start(day: dt.date, tz: ZoneInfo) -> float:
    """Epoch seconds of local midnight starting ``day`` (DST-safe via zoneinfo)."""
    return dt.datetime.combine(day, dt.time(0), tzinfo=tz).timestamp()


def next_day_start(ts: float, tz: ZoneInfo) -> float:
    return day_start(local_date(ts, tz) + dt.timedelta(days=1), tz)


def hour_start(ts: float) -> float:
    # Hours are the same length in every zone with whole-hour offsets; budgets per hour are
    # counted on UTC hour boundaries so a DST change never makes an hour count twice.
    return math.floor(ts / 3600.0) * 3600.0


def warmup_day(first_day: dt.date, today: dt.date) -> int:
    return (today - first_day).days + 1


def spaced_slots(now: float, used_in_hour: int, hourly: int | None, count: int) -> list[float]:
    """Delivery times for ``count`` recipients released in the hour containing ``now``.

    The hourly cap is spread evenly over the hour: a cap of 200/h means one recipient
    every 18 s, never 200 at the top of the hour. Slots continue from the last one used
    (or from now, if that is later) and never leave the hour: budget an hour did not use
    in time is not spent as a burst at its end.
    """
    if hourly is None or hourly <= 0:
        return [now] * count
    start = hour_start(now)
    step = 3600.0 / hourly
    base = max(now, start + used_in_hour * step)
    fits = max(0, math.ceil((start + 3600.0 - base) / step))
    return [base + i * step for i in range(min(count, fits))]


@dataclass(frozen=True, slots=True)
class Release:
    """How many held recipients of one domain may be released now, and when each goes."""

    count: int
    slots: tuple[float, ...]
    next_check: float
    reason: str


def plan_release(
    now: float,
    tz: ZoneInfo,
    budget: Budget,
    used_today: int,
    used_this_hour: int,
    waiting: int,
) -> Release:
    """Pure: release what today's and this hour's budgets leave, spaced over the hour."""
    left_day = max(0, budget.daily - used_today)
    left_hour = left_day if budget.hourly is None else max(0, budget.hourly - used_this_hour)
    count = min(waiting, left_day, left_hour)
    slots = spaced_slots(now, used_this_hour, budget.hourly, count)
    if len(slots) < count:  # the rest of this hour has room for fewer slots
        count, left_hour = len(slots), 0
    left_day, left_hour = left_day - count, left_hour - count
    if left_day <= 0:
        nxt, why = next_day_start(now, tz), f"warm-up day {budget.day}: {budget.daily}/day used"
    elif left_hour <= 0:
        nxt = hour_start(now) + 3600.0
        why = f"warm-up day {budget.day}: {budget.hourly}/hour used"
    else:
        nxt, why = now, ""
    return Release(count, tuple(slots), nxt, why)
