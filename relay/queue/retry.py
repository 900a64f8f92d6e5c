"""Retry timing: a pure function, so it is tested without clocks or sleeps."""

from __future__ import annotations

import random


def next_delay(attempts: int, first: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based).

    Doubling backoff (first, 2*first, 4*first, ... capped), with up to 20% jitter taken
    off so that many recipients deferred together do not all retry in the same second.
    """
    n = max(1, attempts)
    base: float = min(cap, first * float(2 ** min(n - 1, 32)))
    jitter: float = (rng or random).uniform(0.8, 1.0)
    return float(max(0.01, base * jitter))


def is_expired(created_at: float, now: float, delay: float, max_age: float) -> bool:
    """True when the next retry would fall past ``max_age`` after acceptance."""
    return now + delay - created_at > max_age
