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
- ``delivery.concurrency_feedback`` (on): a destination that refuses a session (no MX
  host answered, or a 421 greeting or reply) while k of our sessions to it are open has
  shown that it takes about k: its limit drops to max(1, k) at once, and grows back by
  one for each limit's worth of messages it then takes, up to the configured limit
  (additive increase, fast decrease: TCP's congestion window, and Postfix's destination
  concurrency feedback). Without it every session past the receiver's own limit is
  refused and its mail waits out ``retry_first``; with it, about one probe per limit's
  worth of messages is. A lowered limit is forgotten once the destination gave no
  feedback for ``2 * retry_first``, so that the mail the refusals deferred retries
  under it.

The state is per process (each node learns for itself), keyed by recipient domain.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Suspension:
    until: float  # on the monotonic clock
    since: float  # wall-clock time it began (an operator's retry after it lifts it)
    reason: str  # why the last attempt reached no MX host


@dataclass
class _Gate:
    active: int = 0  # sessions holding a slot
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)  # in turn


@dataclass
class _Learned:
    limit: int  # sessions the destination takes now, below the configured limit
    touched: float  # monotonic time of its last feedback
    taken: int = 0  # messages it took since the limit last changed


class Destinations:
    def __init__(
        self,
        limit: Callable[[], int],
        suspend_for: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        remember_for: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._limit = limit
        self._wall = wall
        self._suspend_for = suspend_for
        self._clock = clock
        self._remember_for = remember_for  # 0: no feedback, the configured limit always
        self._gates: dict[str, _Gate] = {}
        self._going: dict[str, int] = {}  # destination -> its sessions under way now
        self._learned: dict[str, _Learned] = {}
        self._reached: dict[str, float] = {}  # destination -> when a session last opened
        self._suspended: dict[str, Suspension] = {}

    def allowed(self, name: str) -> int:
        """How many sessions the destination may have at once now."""
        limit = max(1, self._limit())
        learned = self._learned.get(name)
        if learned is None:
            return limit
        if self._clock() - learned.touched > self._remember_for():
            del self._learned[name]
            return limit
        return max(1, min(limit, learned.limit))

    @asynccontextmanager
    async def slot(self, name: str) -> AsyncIterator[None]:
        """Hold one of the destination's session slots (waiting for one, in turn)."""
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = _Gate()
        if gate.waiting or gate.active >= self.allowed(name):
            turn = asyncio.get_running_loop().create_future()
            gate.waiting.append(turn)
            try:
                await turn  # _admit counted us in before it woke us
            except asyncio.CancelledError:
                if turn in gate.waiting:
                    gate.waiting.remove(turn)
                    self._done_with(name, gate)
                else:  # admitted, then cancelled before we ran: pass the slot on
                    self._release(name, gate)
                raise
        else:
            gate.active += 1
        try:
            yield
        finally:
            self._release(name, gate)

    def _release(self, name: str, gate: _Gate) -> None:
        gate.active -= 1
        self._admit(name, gate)
        self._done_with(name, gate)

    def _admit(self, name: str, gate: _Gate) -> None:
        allowed = self.allowed(name)
        while gate.waiting and gate.active < allowed:
            gate.waiting.popleft().set_result(None)
            gate.active += 1

    def _done_with(self, name: str, gate: _Gate) -> None:
        if not gate.active and not gate.waiting and self._gates.get(name) is gate:
            del self._gates[name]

    def started(self, name: str) -> None:
        """A session to the destination is under way (connecting or open); see ended."""
        self._going[name] = self._going.get(name, 0) + 1

    def others(self, name: str) -> int:
        """Sessions under way to the destination besides the caller's own."""
        return max(0, self._going.get(name, 0) - 1)

    def ended(self, name: str) -> None:
        """The session counted by started() is over."""
        left = self._going.get(name, 0) - 1
        if left > 0:
            self._going[name] = left
        else:
            self._going.pop(name, None)

    def refused(self, name: str) -> int | None:
        """A session under way to the destination was refused (no MX host answered, or
        421): it takes about as many as the others under way now. The lowered limit, or
        None when it did not drop.

        The others are counted from when they began connecting, not from when they were
        open: a burst's refusals come back while the sessions let in are still in their
        TLS handshake, and would otherwise count too few. Each refused session ends, so
        the last refusal of a burst counts what the destination let in."""
        if self._remember_for() <= 0:
            return None
        now = self._clock()
        before = self.allowed(name)
        taken = max(1, self.others(name))
        learned = self._learned.get(name)
        if taken >= before:
            if learned is not None:
                learned.touched = now
            return None
        self._learned[name] = _Learned(taken, now)
        if len(self._learned) > 10_000:  # forget the limits no destination used for a window
            self.lowered()  # (reading each one drops those past remember_for)
        return taken

    def delivered(self, name: str) -> None:
        """The destination took a message (answered its transaction): a lowered limit
        grows by one for each limit's worth of messages."""
        learned = self._learned.get(name)
        if learned is None:
            return
        learned.touched = self._clock()
        learned.taken += 1
        if learned.taken < learned.limit:
            return
        learned.limit += 1
        learned.taken = 0
        if learned.limit >= self._limit():
            del self._learned[name]
        gate = self._gates.get(name)
        if gate is not None:
            self._admit(name, gate)

    def lowered(self) -> list[tuple[str, int, int]]:
        """(destination, sessions allowed now, configured limit) of each lowered limit."""
        limit = max(1, self._limit())
        return sorted(
            (name, n, limit) for name in list(self._learned) if (n := self.allowed(name)) < limit
        )

    def reached(self, name: str) -> None:
        """A session to the destination was opened."""
        now = self._clock()
        self._reached[name] = now
        self._suspended.pop(name, None)
        if len(self._reached) > 10_000:  # forget destinations not reached for a window
            cut = now - self._suspend_for()
            self._reached = {k: v for k, v in self._reached.items() if v >= cut}

    def unreachable(self, name: str, reason: str) -> float:
        """No MX host of the destination could be reached by a session under way (see
        started): suspend it, unless a session to it opened within the window or another
        is under way (a burst's refusals come back before its first sessions are open).
        The seconds it is suspended for (0: it is not)."""
        window = self._suspend_for()
        now = self._clock()
        last = self._reached.get(name)
        if window <= 0 or (last is not None and now - last < window) or self.others(name):
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
