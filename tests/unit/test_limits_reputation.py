"""Reputation levels: climb after a clean, busy window; fall on bad rates."""

from __future__ import annotations

from relay.config import LimitsConfig
from relay.policy.reputation import SendingStats, level_table, next_level, quota_for_level

CFG = LimitsConfig()


def test_level_table_starts_at_the_new_account_quota_of_500() -> None:
    assert level_table(CFG) == (500, 2000, 10000, 50000, 300000)
    assert quota_for_level(CFG, 0) == 500
    assert quota_for_level(CFG, 99) == 300000


def test_level_rises_after_a_clean_period_using_most_of_the_quota() -> None:
    stats = SendingStats(days=7, sent=3000, delivered=2990, bounced=10, complaints=0)
    assert next_level(CFG, 0, stats).level == 1


def test_level_stays_when_the_quota_was_not_used() -> None:
    stats = SendingStats(days=7, sent=100, delivered=100, bounced=0, complaints=0)
    assert next_level(CFG, 1, stats).level == 1


def test_level_falls_when_the_bounce_rate_is_over_the_threshold() -> None:
    stats = SendingStats(days=7, sent=3500, delivered=3000, bounced=500, complaints=0)
    decision = next_level(CFG, 2, stats)
    assert decision.level == 1
    assert "bounce rate" in decision.why


def test_level_falls_when_the_complaint_rate_is_over_the_threshold() -> None:
    stats = SendingStats(days=7, sent=3500, delivered=3000, bounced=0, complaints=10)
    assert next_level(CFG, 1, stats).level == 0


def test_level_never_goes_below_zero_or_past_the_table() -> None:
    bad = SendingStats(days=7, sent=10, delivered=5, bounced=5, complaints=0)
    assert next_level(CFG, 0, bad).level == 0
    busy = SendingStats(days=7, sent=10**7, delivered=10**7, bounced=0, complaints=0)
    assert next_level(CFG, 4, busy).level == 4
