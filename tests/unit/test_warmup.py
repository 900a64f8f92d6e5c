"""The warm-up schedule: the seeds' table, interpolation, doubling, spacing, YAML override."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from relay.config import DEFAULT_WARMUP, load_config
from relay.errors import ConfigError
from relay.policy.warmup import (
    Budget,
    budget_for_day,
    day_start,
    plan_release,
    spaced_slots,
    warmup_day,
)

UTC = ZoneInfo("UTC")


@pytest.mark.parametrize(
    ("day", "daily", "hourly"),
    [
        (1, 1000, 200),
        (2, 1500, 200),
        (3, 2000, 400),
        (4, 3000, 400),
        (5, 4500, 500),
        (6, 6000, 500),
        (8, 7000, 750),
        (10, 8000, 1000),
        (11, 8000, 800),
        (20, 15000, 3000),
        (30, 25000, 5000),
        (31, 50000, 10000),
        (32, 100000, 20000),
    ],
)
def test_budget_follows_the_seeds_table_interpolating_inside_ranges(
    day: int, daily: int, hourly: int
) -> None:
    assert budget_for_day(DEFAULT_WARMUP, day, 300000) == Budget(day, daily, hourly)


def test_warmup_ends_when_doubling_reaches_the_hard_ceiling() -> None:
    assert budget_for_day(DEFAULT_WARMUP, 33, 300000) is not None  # 200,000
    assert budget_for_day(DEFAULT_WARMUP, 34, 300000) is None  # 400,000 >= ceiling


def test_day_one_is_the_first_sending_day() -> None:
    first = dt.date(2026, 1, 1)
    assert warmup_day(first, first) == 1
    assert warmup_day(first, dt.date(2026, 1, 2)) == 2


def test_spaced_slots_spread_an_hourly_cap_over_the_hour() -> None:
    start = 1_800_000_000.0 - (1_800_000_000.0 % 3600)
    slots = spaced_slots(start, 0, 200, 200)
    assert slots[0] == start
    assert slots[-1] == start + 199 * 18
    assert all(b - a == 18 for a, b in itertools.pairwise(slots))


def test_release_stops_at_the_daily_budget_and_waits_for_the_next_local_day() -> None:
    tz = ZoneInfo("Europe/Paris")
    now = day_start(dt.date(2026, 3, 2), tz) + 10 * 3600
    rel = plan_release(now, tz, Budget(1, 1000, 200), used_today=950, used_this_hour=0, waiting=80)
    assert rel.count == 50
    assert rel.next_check == day_start(dt.date(2026, 3, 3), tz)
    assert "1000/day" in rel.reason


def test_release_stops_at_the_hourly_budget_and_waits_for_the_next_hour() -> None:
    now = day_start(dt.date(2026, 3, 2), UTC) + 10 * 3600 + 5
    rel = plan_release(now, UTC, Budget(1, 1000, 200), used_today=0, used_this_hour=190, waiting=80)
    assert rel.count == 10
    assert rel.next_check == day_start(dt.date(2026, 3, 2), UTC) + 11 * 3600
    assert "200/hour" in rel.reason


def test_warmup_table_is_overridable_in_yaml(tmp_path: Path) -> None:
    cfg_file = tmp_path / "relay.yaml"
    cfg_file.write_text(
        "limits:\n  warmup:\n    - {days: 1, daily: 10, hourly: 5}\n"
        '    - {days: "2-3", daily: "20-40", hourly: "10-20"}\n'
    )
    table = load_config(cfg_file).limits.warmup
    assert budget_for_day(table, 1) == Budget(1, 10, 5)
    assert budget_for_day(table, 2) == Budget(2, 20, 10)
    assert budget_for_day(table, 3) == Budget(3, 40, 20)
    assert budget_for_day(table, 4) == Budget(4, 80, 40)


def test_a_warmup_table_with_a_gap_is_refused_naming_the_key(tmp_path: Path) -> None:
    cfg_file = tmp_path / "relay.yaml"
    cfg_file.write_text("limits:\n  warmup:\n    - {days: 2, daily: 10}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg_file)
    assert "limits.warmup[0].days" in str(exc.value.problems)
