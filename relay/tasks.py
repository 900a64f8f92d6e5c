"""Background-task helpers shared by the parts that run their own tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from relay.errors import RelayError

log = logging.getLogger("relay")


async def every(
    stop: asyncio.Event,
    interval: Callable[[], float],
    step: Callable[[], Awaitable[object]],
    what: str,
) -> None:
    """Run ``step`` now and then every ``interval()`` seconds until ``stop`` is set.

    A failing step never ends the loop: the next round is its retry. A RelayError (the
    database unavailable, most often) is a warning; anything else is logged with its
    traceback, as a bug."""
    while not stop.is_set():
        try:
            await step()
        except RelayError as exc:
            log.warning("%s failed: %s", what, exc)
        except Exception:
            log.exception("%s failed unexpectedly", what)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval())


async def cancel(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait until it has ended (its CancelledError is the expected end)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def drain(tasks: Iterable[asyncio.Task[None]], grace: float) -> None:
    """Let ``tasks`` finish within ``grace`` seconds, then cancel and reap the rest.

    Shutdown's contract (SIGTERM): work in flight may complete, nothing outlives the
    grace period, and no task is left un-awaited.
    """
    running = set(tasks)
    if not running:
        return
    _done, pending = await asyncio.wait(running, timeout=grace)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
