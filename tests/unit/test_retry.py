import random

from relay.queue.retry import is_expired, next_delay


def test_delay_doubles_from_first_retry_until_the_cap() -> None:
    rng = random.Random(1)
    delays = [next_delay(n, 300, 3600, rng) for n in range(1, 8)]
    bases = [300, 600, 1200, 2400, 3600, 3600, 3600]
    for d, base in zip(delays, bases, strict=True):
        assert 0.8 * base <= d <= base


def test_jitter_spreads_retries_of_recipients_deferred_together() -> None:
    rng = random.Random(7)
    assert len({round(next_delay(1, 300, 3600, rng), 3) for _ in range(20)}) > 10


def test_huge_attempt_counts_do_not_overflow() -> None:
    assert next_delay(10_000, 300, 3600) <= 3600


def test_expiry_when_the_next_retry_falls_past_max_age() -> None:
    assert not is_expired(created_at=0, now=100, delay=100, max_age=259200)
    assert is_expired(created_at=0, now=259000, delay=300, max_age=259200)
