"""Reputation levels: the daily quota an account climbs to by sending well.

Pure functions. An account starts at level 0 (``limits.daily``, 500 in the seeds) and is
re-evaluated once per local day: over the last ``level_window_days`` it climbs one level
when it used at least ``level_min_usage`` of its quota with bounce and complaint rates
under their maxima, and falls one level when either rate is over. It never goes past the
hard ceiling (300,000 a day: the seeds' ``FailedOperation.ExceedSendLimit``).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import LimitsConfig


@dataclass(frozen=True, slots=True)
class SendingStats:
    """What an account did over the evaluation window."""

    days: int
    sent: int  # recipients accepted (counted against the quota)
    delivered: int
    bounced: int
    complaints: int

    @property
    def bounce_rate(self) -> float:
        done = self.delivered + self.bounced
        return self.bounced / done if done else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.delivered if self.delivered else 0.0


def level_table(cfg: LimitsConfig) -> tuple[int, ...]:
    """Daily quota per level: level 0 is ``limits.daily``, the rest ``limits.levels[1:]``."""
    rest = tuple(v for v in cfg.levels[1:] if v > cfg.daily)
    return tuple(min(v, cfg.hard_ceiling) for v in (cfg.daily, *rest))


def quota_for_level(cfg: LimitsConfig, level: int) -> int:
    table = level_table(cfg)
    return table[max(0, min(level, len(table) - 1))]


@dataclass(frozen=True, slots=True)
class LevelDecision:
    level: int
    why: str


def next_level(cfg: LimitsConfig, level: int, stats: SendingStats) -> LevelDecision:
    table = level_table(cfg)
    level = max(0, min(level, len(table) - 1))
    if stats.bounce_rate > cfg.level_max_bounce_rate:
        return LevelDecision(
            max(0, level - 1),
            f"bounce rate {stats.bounce_rate:.1%} over {cfg.level_max_bounce_rate:.1%}",
        )
    if stats.complaint_rate > cfg.level_max_complaint_rate:
        return LevelDecision(
            max(0, level - 1),
            f"complaint rate {stats.complaint_rate:.2%} over {cfg.level_max_complaint_rate:.2%}",
        )
    capacity = table[level] * max(1, stats.days)
    usage = stats.sent / capacity if capacity else 0.0
    if usage >= cfg.level_min_usage and level + 1 < len(table):
        return LevelDecision(
            level + 1,
            f"used {usage:.0%} of quota with bounce {stats.bounce_rate:.1%},"
            f" complaints {stats.complaint_rate:.2%}",
        )
    return LevelDecision(level, f"usage {usage:.0%}, bounce {stats.bounce_rate:.1%}")
