"""Per-destination delivery limits: how many sessions one destination gets at once, and a
pause for a destination that cannot be reached.

Both are what Postfix's queue manager does per next-hop domain:
- ``delivery.destination_concurrency`` (20, Postfix's default_destination_concurrency_limit):
  a large mailing to one domain opens at most this many sessions to it, however many
  workers are free. Big receivers refuse or rate-limit more (421 "too many connections"),
  and the rest of the queue keeps the other workers.
- ``delivery.destination_suspend`` (on): when no MX host of a destination could be
  reached (refused, timed out, 4xx/5xx greeting) and no session to it was opened for
  ``delivery.retry_first`` (5 minutes), it is suspended that long: its mail is deferred
  at once with "delivery temporarily suspended" and the reason, instead of every session
  spending the connect timeout (30 s a host) on it. Postfix marks such a destination
  dead the same way, until its minimal_backoff_time (also 5 minutes) has passed. A
  destination that answered within the window is not suspended by one failure: that is
  a busy destination refusing one more connection, not a dead one.

The state is per process (each node learns for itself), keyed by recipient domain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Suspension:
    until: float  # on the monotonic clock
    since: float  # wall-clock time it began (an operator's retry after it lifts it)
    reason: str  # why the last attempt reached no MX host


@dataclass
class _Gate:
    slots: asyncio.Semaphore
    users: int = 0  # sessions holding or waiting for a slot


class Destinations:
    def __init__(
        self,
        limit: Callable[[], int],
        suspend_for: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._limit = limit
        self._wall = wall
        self._suspend_for = suspend_for
        self._clock = clock
        self._gates: dict[str, _Gate] = {}
        self._reached: dict[str, float] = {}  # destination -> when a session last opened
        self._suspended: dict[str, Suspension] = {}

    @asynccontextmanager
    async def slot(self, name: str) -> AsyncIterator[None]:
        """Hold one of the destination's session slots (waiting for one, in turn)."""
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = _Gate(asyncio.Semaphore(max(1, self._limit())))
        gate.users += 1
        try:
            async with gate.slots:
                yield
        finally:
            gate.users -= 1
            if gate.users == 0:
                del self._gates[name]

    def reached(self, name: str) -> None:
        """A session to the destination was opened."""
        now = self._clock()
        self._reached[name] = now
        self._suspended.pop(name, None)
        if len(self._reached) > 10_000:  # forget destinations not reached for a window
            cut = now - self._suspend_for()
            self._reached = {k: v for k, v in self._reached.items() if v >= cut}

    def unreachable(self, name: str, reason: str) -> float:
        """No MX host of the destination could be reached: suspend it, unless a session
        to it opened within the window. The seconds it is suspended for (0: it is not)."""
        window = self._suspend_for()
        now = self._clock()
        last = self._reached.get(name)
        if window <= 0 or (last is not None and now - last < window):
            return 0.0
        self._suspended[name] = Suspension(now + window, self._wall(), reason)
        return window

    def suspended(self, name: str) -> Suspension | None:
        """The destination's suspension now, or None."""
        hit = self._suspended.get(name)
        if hit is None:
            return None
        if hit.until <= self._clock():
            del self._suspended[name]
            return None
        return hit

    def snapshot(self) -> list[tuple[str, float, str]]:
        """(destination, seconds left, reason) of each suspension in force now."""
        now = self._clock()
        return sorted(
            (name, hit.until - now, hit.reason)
            for name, hit in self._suspended.items()
            if hit.until > now
        )

    def lift(self, name: str) -> None:
        """End the destination's suspension (an operator's retry)."""
        self._suspended.pop(name, None)
