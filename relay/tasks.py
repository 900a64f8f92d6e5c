"""Background-task helpers shared by the parts that run their own tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


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
