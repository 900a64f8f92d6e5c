"""The policy engine: ordered checks, first refusal wins, fail safe on error or timeout."""

from __future__ import annotations

import asyncio

from relay.model import Stage, Verdict
from relay.policy.engine import CHECK_FAILED, Policy, Request

NO = Verdict(550, "5.7.1", "no", "no")


class Fixed:
    def __init__(self, name: str, verdict: Verdict | None, delay: float = 0.0) -> None:
        self.name = name
        self.stages = frozenset({Stage.RCPT})
        self.verdict = verdict
        self.delay = delay
        self.calls = 0

    async def __call__(self, request: Request) -> Verdict | None:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.verdict


class Raises(Fixed):
    async def __call__(self, request: Request) -> Verdict | None:
        self.calls += 1
        raise RuntimeError("database on fire")


def rcpt() -> Request:
    return Request(Stage.RCPT, "submission", "127.0.0.1", rcpt="b@example.org")


async def test_first_refusal_wins_and_later_checks_do_not_run() -> None:
    first, refuses, later = Fixed("a", None), Fixed("b", NO), Fixed("c", None)
    assert await Policy([first, refuses, later]).check(rcpt()) == NO
    assert (first.calls, refuses.calls, later.calls) == (1, 1, 0)


async def test_checks_of_other_stages_are_skipped() -> None:
    other = Fixed("mail", NO)
    other.stages = frozenset({Stage.MAIL})
    verdict = await Policy([other]).check(rcpt())
    assert verdict.ok and other.calls == 0


async def test_a_check_that_raises_gives_a_temporary_failure() -> None:
    later = Fixed("later", None)
    assert await Policy([Raises("boom", None), later]).check(rcpt()) == CHECK_FAILED
    assert CHECK_FAILED.reply.startswith("451 4.3.0") and later.calls == 0


async def test_a_check_over_the_timeout_gives_a_temporary_failure() -> None:
    slow = Fixed("slow", None, delay=5.0)
    started = asyncio.get_running_loop().time()
    assert await Policy([slow], timeout=0.05).check(rcpt()) == CHECK_FAILED
    assert asyncio.get_running_loop().time() - started < 2.0


async def test_the_timeout_is_per_check_not_per_stage() -> None:
    # Three checks of 40 ms each under a 100 ms timeout: none is over, all pass.
    checks = [Fixed(f"c{i}", None, delay=0.04) for i in range(3)]
    assert (await Policy(checks, timeout=0.1).check(rcpt())).ok


async def test_cancelling_the_session_is_not_turned_into_a_verdict() -> None:
    task = asyncio.ensure_future(Policy([Fixed("slow", None, delay=5.0)]).check(rcpt()))
    await asyncio.sleep(0.01)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the cancellation was swallowed")


async def test_after_a_timed_out_check_the_session_carries_on_uncancelled() -> None:
    slow = Fixed("slow", None, delay=5.0)
    assert await Policy([slow], timeout=0.05).check(rcpt()) == CHECK_FAILED
    await asyncio.sleep(0.01)  # would raise CancelledError if the timeout leaked
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_no_timer_outlives_the_stage_it_guarded() -> None:
    quick = [Fixed(f"c{i}", None, delay=0.01) for i in range(2)]
    assert (await Policy(quick, timeout=0.05).check(rcpt())).ok
    await asyncio.sleep(0.1)  # past the 50 ms deadline: nothing may cancel us now


async def test_a_late_check_in_a_stage_gets_its_whole_timeout() -> None:
    # The stage's timer is armed at the first check; the third check starts 60 ms later
    # and still gets its own 100 ms, though the stage as a whole takes 140 ms.
    checks = [Fixed("a", None, delay=0.03), Fixed("b", None, delay=0.03)]
    checks.append(Fixed("c", None, delay=0.08))
    assert (await Policy(checks, timeout=0.1).check(rcpt())).ok


class SlowFor(Fixed):
    """Quick, except for one recipient."""

    async def __call__(self, request: Request) -> Verdict | None:
        self.calls += 1
        await asyncio.sleep(5.0 if request.rcpt == "slow@example.org" else 0.01)
        return None


async def test_concurrent_sessions_share_the_timer_and_only_the_slow_one_times_out() -> None:
    policy = Policy([SlowFor("maybe-slow", None)], timeout=0.1)

    async def session(rcpt_to: str, stages: int) -> list[Verdict]:
        request = Request(Stage.RCPT, "submission", "127.0.0.1", rcpt=rcpt_to)
        return [await policy.check(request) for _ in range(stages)]

    # Quick sessions come and go (each stage adds and drops its entry) while the slow
    # one waits; their later stages start after the timer was armed and still pass.
    quick = [asyncio.ensure_future(session("b@example.org", 15)) for _ in range(30)]
    stalled = asyncio.ensure_future(session("slow@example.org", 1))
    results = await asyncio.gather(*quick, stalled)
    assert all(v.ok for verdicts in results[:-1] for v in verdicts)
    assert results[-1] == [CHECK_FAILED]
    assert not policy._running
