"""queue/writelock.py: one writer at a time across processes, without sleeping polls."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from relay.queue.writelock import WriteLock


async def test_a_second_holder_waits_until_the_first_lets_go(tmp_path: Path) -> None:
    # Two WriteLocks on one path are two open files: flock(2) excludes them as it
    # excludes two processes.
    a, b = WriteLock(str(tmp_path / "db-wlock")), WriteLock(str(tmp_path / "db-wlock"))
    order: list[str] = []

    async def second() -> None:
        async with b.held():
            order.append("b")

    async with a.held():
        task = asyncio.create_task(second())
        await asyncio.sleep(0.2)
        assert order == []  # still waiting for a
        order.append("a done")
    await asyncio.wait_for(task, 5)
    assert order == ["a done", "b"]
    a.close()
    b.close()


async def test_a_waiter_cancelled_before_it_gets_the_lock_does_not_keep_it(
    tmp_path: Path,
) -> None:
    a, b = WriteLock(str(tmp_path / "db-wlock")), WriteLock(str(tmp_path / "db-wlock"))

    async def wait_forever() -> None:
        async with b.held():
            await asyncio.sleep(3600)

    async with a.held():
        task = asyncio.create_task(wait_forever())
        await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # b's thread may take the lock after a lets go; it must give it back by itself.
    async with asyncio.timeout(5):
        async with a.held():
            pass
    a.close()
    b.close()
