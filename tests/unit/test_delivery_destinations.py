"""Per-destination session slots and the suspension of unreachable destinations."""

from __future__ import annotations

import asyncio

from relay.delivery.destinations import Destinations


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _destinations(limit: int = 2, window: float = 300.0) -> tuple[Destinations, Clock]:
    clock = Clock()
    return Destinations(lambda: limit, lambda: window, clock), clock


async def test_a_destination_gets_at_most_its_limit_of_sessions_in_turn() -> None:
    dests, _ = _destinations(limit=2)
    running: list[str] = []
    peak = {"a.example": 0, "b.example": 0}
    order: list[int] = []
    release = asyncio.Event()

    async def session(name: str, n: int) -> None:
        async with dests.slot(name):
            running.append(name)
            peak[name] = max(peak[name], running.count(name))
            order.append(n)
            await release.wait()
            running.remove(name)

    tasks = [asyncio.create_task(session("a.example", n)) for n in range(5)]
    tasks.append(asyncio.create_task(session("b.example", 99)))
    await asyncio.sleep(0.01)
    # Two of a.example run; b.example is not held up behind the other three.
    assert order == [0, 1, 99]
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 99, 2, 3, 4]  # the rest in the order they came
    assert peak == {"a.example": 2, "b.example": 1}
    assert dests._gates == {}  # nothing kept for destinations no longer in use


async def test_an_unreachable_destination_is_suspended_for_the_window() -> None:
    dests, clock = _destinations(window=300)
    assert dests.unreachable("dead.example", "4.4.1 refused") == 300
    suspension = dests.suspended("dead.example")
    assert suspension is not None and suspension.reason == "4.4.1 refused"
    assert dests.suspended("other.example") is None
    clock.now += 299
    assert dests.suspended("dead.example") == suspension
    assert dests.snapshot() == [("dead.example", 1.0, "4.4.1 refused")]
    clock.now += 1
    assert dests.suspended("dead.example") is None
    assert dests.snapshot() == []


async def test_a_destination_that_answered_within_the_window_is_not_suspended() -> None:
    dests, clock = _destinations(window=300)
    dests.reached("busy.example")
    clock.now += 200
    # One refused connection while sessions open fine: a busy MX, not a dead one.
    assert dests.unreachable("busy.example", "421 too many connections") == 0
    assert dests.suspended("busy.example") is None
    clock.now += 100
    assert dests.unreachable("busy.example", "421 too many connections") == 300


async def test_a_session_opened_or_a_retry_lifts_a_suspension_and_zero_never_suspends() -> None:
    dests, _ = _destinations(window=300)
    dests.unreachable("flaky.example", "timeout")
    dests.reached("flaky.example")  # a session that was already trying got through
    assert dests.suspended("flaky.example") is None
    dests.unreachable("flaky.example", "timeout")
    dests.lift("flaky.example")  # an operator's retry
    assert dests.suspended("flaky.example") is None
    off, _ = _destinations(window=0)
    assert off.unreachable("dead.example", "refused") == 0
    assert off.suspended("dead.example") is None
