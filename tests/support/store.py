"""In-process store tests: a clock the test moves, and a migrated SQLite Store on it."""

from __future__ import annotations

from pathlib import Path

from relay.config import DatabaseConfig
from relay.queue.store import Store


class Clock:
    """Callable like time.time; ``now`` is whatever the test sets."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def open_store(path: Path, clock: Clock, cache_seconds: float = 5.0) -> Store:
    """A Store on a SQLite file at ``path`` (node "t"), migrated to the current schema."""
    url = f"sqlite+aiosqlite:///{path}"
    store = Store.open(DatabaseConfig(url=url, cache_seconds=cache_seconds), "t", clock)
    await store.migrate()
    return store
