"""The queue command's argument types (relay/cli/queue.py)."""

from __future__ import annotations

import argparse

import pytest

from relay.cli.queue import duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
    ],
)
def test_a_duration_is_read_in_seconds_minutes_hours_or_days(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "", "0", "-1m", "inf", "nanh", "2w"])
def test_a_duration_that_is_not_one_or_not_positive_is_refused_by_name(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        duration(text)
