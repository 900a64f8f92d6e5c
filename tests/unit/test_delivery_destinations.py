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


async def test_a_destination_is_not_suspended_while_another_session_to_it_is_under_way() -> None:
    dests, _ = _destinations(window=300)
    dests.started("burst.example")
    dests.started("burst.example")  # the refused one
    # A burst's first refusal comes back before its other sessions are open: not dead.
    assert dests.unreachable("burst.example", "421 too many connections") == 0
    dests.ended("burst.example")
    dests.ended("burst.example")
    dests.started("burst.example")
    assert dests.unreachable("burst.example", "timeout") == 300  # the last one: dead


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


def _learning(limit: int = 20, remember: float = 600.0) -> tuple[Destinations, Clock]:
    clock = Clock()
    return Destinations(lambda: limit, lambda: 300.0, clock, remember_for=lambda: remember), clock


async def test_a_session_refused_beside_k_others_lowers_the_limit_to_k_and_waiters_wait() -> None:
    dests, _ = _learning(limit=20)
    release = asyncio.Event()
    started: list[int] = []
    lowered: list[int | None] = []

    async def session(n: int, refused: bool = False) -> None:
        async with dests.slot("busy.example"):
            started.append(n)
            dests.started("busy.example")
            if refused:  # 421 too many connections
                lowered.append(dests.refused("busy.example"))
            else:
                await release.wait()
            dests.ended("busy.example")

    first = [asyncio.create_task(session(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    await session(3, refused=True)  # refused while three others were under way
    assert lowered == [3]
    assert dests.allowed("busy.example") == 3
    assert dests.lowered() == [("busy.example", 3, 20)]
    more = [asyncio.create_task(session(n)) for n in range(4, 7)]
    await asyncio.sleep(0.01)
    assert started == [0, 1, 2, 3]  # the limit is now 3, all taken
    release.set()
    await asyncio.gather(*first, *more)
    assert started == [0, 1, 2, 3, 4, 5, 6]
    assert dests._gates == {}


async def test_a_lone_refused_session_lowers_to_one_and_a_refusal_never_raises_the_limit() -> None:
    dests, _ = _learning(limit=20)
    dests.started("quiet.example")
    assert dests.refused("quiet.example") == 1  # nothing else under way: one at a time
    dests.ended("quiet.example")
    assert dests.allowed("quiet.example") == 1
    for _ in range(3):
        dests.started("quiet.example")
    assert dests.refused("quiet.example") is None  # two others is above 1: no drop, no rise
    assert dests.allowed("quiet.example") == 1


async def test_a_lowered_limit_grows_by_one_per_limits_worth_of_messages_to_the_configured() -> (
    None
):
    dests, _ = _learning(limit=6)
    for _ in range(3):
        dests.started("busy.example")
    assert dests.refused("busy.example") == 2
    taken = 0
    seen = [dests.allowed("busy.example")]
    while dests.allowed("busy.example") < 6:
        dests.delivered("busy.example")
        taken += 1
        if dests.allowed("busy.example") != seen[-1]:
            seen.append(dests.allowed("busy.example"))
    assert seen == [2, 3, 4, 5, 6]
    assert taken == 2 + 3 + 4 + 5  # additive increase: one per limit's worth
    assert dests.lowered() == []  # back at the configured limit: forgotten


async def test_a_grown_limit_admits_a_waiting_session_without_waiting_for_a_release() -> None:
    dests, _ = _learning(limit=20)
    assert dests.refused("busy.example") == 1  # (nothing counted under way: also 1)
    hold = asyncio.Event()
    entered: list[int] = []

    async def session(n: int) -> None:
        async with dests.slot("busy.example"):
            entered.append(n)
            await hold.wait()

    tasks = [asyncio.create_task(session(n)) for n in range(2)]
    await asyncio.sleep(0.01)
    assert entered == [0]
    dests.delivered("busy.example")  # 1 -> 2
    await asyncio.sleep(0.01)
    assert entered == [0, 1]
    hold.set()
    await asyncio.gather(*tasks)


async def test_a_lowered_limit_is_forgotten_after_the_quiet_window_and_off_means_none() -> None:
    dests, clock = _learning(limit=20, remember=600)
    assert dests.refused("busy.example") == 1
    clock.now += 600
    assert dests.allowed("busy.example") == 1
    clock.now += 1
    assert dests.allowed("busy.example") == 20
    assert dests.lowered() == []
    off, _ = _learning(limit=20, remember=0)
    assert off.refused("busy.example") is None
    assert off.allowed("busy.example") == 20


async def test_a_waiting_session_cancelled_gives_its_turn_to_the_next() -> None:
    dests, _ = _destinations(limit=1)
    hold = asyncio.Event()
    entered: list[int] = []

    async def session(n: int) -> None:
        async with dests.slot("a.example"):
            entered.append(n)
            await hold.wait()

    tasks = [asyncio.create_task(session(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    tasks[1].cancel()  # waiting behind 0
    hold.set()
    await asyncio.gather(tasks[0], tasks[2])
    assert entered == [0, 2]
    assert dests._gates == {}


async def test_lowered_limits_past_the_window_are_dropped_when_many_are_kept() -> None:
    dests, clock = _learning(limit=20, remember=600)
    for n in range(10_000):
        dests.refused(f"d{n}.example")
    clock.now += 601
    assert len(dests._learned) == 10_000
    dests.refused("fresh.example")  # the 10,001st: the stale ones go
    assert list(dests._learned) == ["fresh.example"]
