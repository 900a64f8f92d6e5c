"""In-process store tests: a clock the test moves, and a migrated SQLite Store on it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from relay.config import DatabaseConfig
from relay.queue.store import Store


class Clock:
    """Callable like time.time; ``now`` is whatever the test sets."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def clock_of(store: Store) -> Clock:
    """The Clock a test store was opened with (to move it)."""
    assert isinstance(store.clock, Clock)
    return store.clock


async def open_store(path: Path, clock: Clock, cache_seconds: float = 5.0) -> Store:
    """A Store on a SQLite file at ``path`` (node "t"), migrated to the current schema."""
    url = f"sqlite+aiosqlite:///{path}"
    store = Store.open(DatabaseConfig(url=url, cache_seconds=cache_seconds), "t", clock)
    await store.migrate()
    return store


@contextlib.asynccontextmanager
async def server_and_cli(path: Path, clock: Clock) -> AsyncIterator[tuple[Store, Store]]:
    """The server's store (row cache on) and a second one on the same file standing in
    for the CLI (no cache): what one process writes, the other must see."""
    server = await open_store(path, clock)
    cli = await open_store(path, clock, cache_seconds=0)
    try:
        yield server, cli
    finally:
        await server.close()
        await cli.close()
