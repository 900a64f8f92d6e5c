"""The policy engine: ordered checks per SMTP stage; the first refusal wins.

A check that raises or takes too long yields a temporary refusal (fail safe: never
accept on error). Checks only decide; counting lives in the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from relay.model import ACCEPT, Account, Stage, Verdict

log = logging.getLogger("relay.policy")

CHECK_FAILED = Verdict(451, "4.3.0", "Temporary policy failure, try again later", "policy_error")


@dataclass(frozen=True, slots=True)
class Request:
    """What the SMTP layer knows at a stage, in SMTP-free terms."""

    stage: Stage
    listener: str
    client_ip: str
    account: Account | None = None
    mail_from: str | None = None
    rcpt: str | None = None
    recipients: tuple[str, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0
    # The transaction's scratchpad (Haraka's transaction.notes): a check may leave what it
    # read at RCPT for a check at DATA, saving a database trip. Empty when the caller keeps
    # none; every check must still work then.
    notes: dict[str, object] = field(default_factory=dict)


class Check(Protocol):
    name: str
    stages: frozenset[Stage]

    async def __call__(self, request: Request) -> Verdict | None:
        """None (or an ok verdict) lets the request through."""
        ...


class Policy:
    def __init__(self, checks: Sequence[Check], timeout: float = 10.0) -> None:
        self.checks = list(checks)
        self.timeout = timeout
        # The stages being checked now, by task, and the one timer that watches them all.
        self._running: dict[asyncio.Task[object], _Running] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    async def check(self, request: Request) -> Verdict:
        running: _Running | None = None
        try:
            for chk in self.checks:
                if request.stage not in chk.stages:
                    continue
                if running is None:
                    running = self._watch()
                running.deadline = running.loop.time() + self.timeout
                try:
                    verdict = await chk(request)
                except asyncio.CancelledError:
                    if running.expired():
                        log.error("policy check %s took over %g s", chk.name, self.timeout)
                        return CHECK_FAILED
                    raise
                except Exception:
                    log.exception("policy check %s failed", chk.name)
                    return CHECK_FAILED
                if verdict is not None and not verdict.ok:
                    return verdict
            return ACCEPT
        finally:
            if running is not None:
                del self._running[running.task]

    # The per-check timeout with one timer for every session's checks.
    #
    # asyncio.timeout around each check cost a Timeout, a timer and its cancellation per
    # check (~6% of a listener's CPU, issue 9), and a timer per stage still cost a
    # TimerHandle, a push onto the loop's heap and a cancel (~4 us, three stages per
    # message) for timeouts that almost never fire. Now a stage is a dict entry. Every
    # deadline is "now + timeout", so a new one is never earlier than those already
    # watched: the timer, armed at the earliest, only moves later. When it fires it
    # cancels the tasks whose check is over its deadline (``_Running.expired`` turns that
    # cancellation back into a verdict, as asyncio.timeout does with uncancel) and is
    # armed again at the earliest deadline left, if any.

    def _watch(self) -> _Running:
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        running = _Running(task, loop, task.cancelling())
        self._running[task] = running
        first = loop.time() + self.timeout
        # (armed later than this deadline: the timeout was shortened since)
        if self._timer is None or self._timer_loop is not loop or self._timer.when() > first:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_loop = loop
            self._timer = loop.call_at(first, self._on_timer, loop)
        return running

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        earliest: float | None = None
        for running in list(self._running.values()):
            if running.loop is not loop or running.fired:
                continue
            if running.deadline <= now:
                running.fired = True
                running.task.cancel()
            elif earliest is None or running.deadline < earliest:
                earliest = running.deadline
        if earliest is not None:
            self._timer = loop.call_at(earliest, self._on_timer, loop)


class _Running:
    """One task's stage under way: the deadline of the check it awaits now."""

    __slots__ = ("cancelling", "deadline", "fired", "loop", "task")

    def __init__(
        self, task: asyncio.Task[object], loop: asyncio.AbstractEventLoop, cancelling: int
    ) -> None:
        self.task = task
        self.loop = loop
        self.cancelling = cancelling
        self.deadline = 0.0
        self.fired = False

    def expired(self) -> bool:
        """True when the CancelledError being handled is the timer's own (and no one else
        cancelled the task meanwhile): it is then consumed."""
        if not self.fired:
            return False
        self.fired = False
        return self.task.uncancel() <= self.cancelling
