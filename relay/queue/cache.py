"""A small in-process TTL cache for rows that change rarely but are read per message.

One message's policy pass used to read the same account, domain, limit overrides,
reputation level and suspension state five times over (~20 read transactions per
message). Here each is read at most once per ``database.cache_seconds`` (default 5 s).

Freshness rules:
- Writes made by this process invalidate the whole cache as soon as they commit: a
  listener on the engine notices any INSERT/UPDATE/DELETE on a cached table and the
  store's write block clears the cache after its COMMIT (and once more before, so a read
  racing the commit cannot keep the old row for long).
- Writes made by other processes (the CLI's `relay account suspend`, `relay limits set`,
  `relay domain verify`, another node, an operator's SQL) reach this cache within
  ``CHECK_EVERY`` (0.5 s): triggers on the cached tables bump ``row_change.generation``
  when such a write commits (migration 0005), and a read of the cache that finds the
  last look at the generation older than CHECK_EVERY reads it (one single-row read) and
  drops everything when it moved. Before that, a suspension from the CLI took up to
  the TTL, and a leaked account's mail kept being accepted for those seconds.
- The TTL stays as a backstop. The callers still cache only the *permissive* outcome
  where that matters (a verified domain, an active account, an account that is not
  suspended): a domain verified or an account resumed from the CLI takes effect for the
  very next message.
- A load that raced a clear does not put its (possibly older) row back: each clear
  starts a new epoch and a load keeps its value only if the epoch did not move.
- ``cache_seconds: 0`` turns the cache off (every read goes to the database).

The TTL runs on ``time.monotonic``, not the store's injectable clock: tests that move
the store's clock by days must not see rows they wrote minutes of real time ago expire,
nor keep stale ones.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")

# Tables whose rows the cache holds (directly or joined): a write to any of them by this
# process clears the cache.
CACHED_TABLES = (
    "account",
    "account_level",
    "account_reputation",
    "domain",
    "domain_key",
    "limit_override",
    "warmup_start",
)
_WRITE_VERBS = ("INSERT", "UPDATE", "DELETE", "REPLACE")
# Bound on entries: one per account/domain/override scope; a flood of distinct names
# (every sender domain of a big tenant) must not grow the process without limit.
MAX_ENTRIES = 10_000
# How stale a cached row may be after another process's write committed: a suspension by
# the CLI applies on every node within this. One indexed single-row read per process per
# CHECK_EVERY, and only while rows are being read.
CHECK_EVERY = 0.5

_MISSING = object()


def _writes_cached_table(statement: str) -> bool:
    head = statement.lstrip()[:80]
    verb = head[:7].upper()
    if not verb.startswith(_WRITE_VERBS):
        return False
    # "INSERT INTO account (", "UPDATE account_level SET", "DELETE FROM domain WHERE" ...
    words = head.replace('"', " ").replace("(", " ").split()
    target = ""
    for i, w in enumerate(words[:4]):
        if w.upper() in {"INTO", "FROM"} or (i == 0 and w.upper() == "UPDATE"):
            target = words[i + 1].lower() if i + 1 < len(words) else ""
            break
    return target in CACHED_TABLES


class RowCache:
    """TTL cache keyed by (namespace, key); one per Store."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._rows: dict[Hashable, tuple[float, Any]] = {}
        # Set by the statement listener, consumed after the write block's COMMIT.
        self.dirty = False
        self.hits = 0
        self.misses = 0
        # Bumped by every clear: a load that started in an older epoch is not kept.
        self._epoch = 0
        # follow(): the shared generation, when it was last read, and the last value.
        self._generation_of: Callable[[], Awaitable[int]] | None = None
        self._check_at = 0.0
        self._generation: int | None = None

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def clear(self) -> None:
        self._rows.clear()
        self._epoch += 1

    def after_write(self) -> None:
        """Called by Store._write after its COMMIT returned."""
        if self.dirty:
            self.dirty = False
            self.clear()

    def follow(self, generation_of: Callable[[], Awaitable[int]]) -> None:
        """Drop everything when ``generation_of()`` (row_change.generation, which every
        process's writes to the cached tables bump) moves; looked at most every
        CHECK_EVERY, by the reads themselves."""
        self._generation_of = generation_of

    async def _look(self) -> None:
        """Read the generation (fetch calls it once CHECK_EVERY has passed)."""
        if self._generation_of is None:
            return
        now = self.clock()
        # Set before the read: the reads that arrive meanwhile serve what is cached
        # rather than each reading the generation too.
        self._check_at = now + CHECK_EVERY
        generation = await self._generation_of()
        if generation != self._generation:
            self._generation = generation
            self.clear()

    def get(self, key: Hashable) -> Any:
        hit = self._rows.get(key)
        if hit is None:
            return _MISSING
        if hit[0] <= self.clock():
            self._rows.pop(key, None)
            return _MISSING
        return hit[1]

    def put(self, key: Hashable, value: Any, epoch: int | None = None) -> None:
        """Keep ``value``, unless ``epoch`` (when the load began) is no longer current."""
        if epoch is not None and epoch != self._epoch:
            return
        if len(self._rows) >= MAX_ENTRIES:
            self.clear()
        self._rows[key] = (self.clock() + self.ttl, value)

    async def fetch(
        self,
        key: Hashable,
        load: Callable[[], Awaitable[T]],
        keep: Callable[[T], bool] = lambda _v: True,
    ) -> T:
        """The cached value of ``key``, or ``load()``'s (cached when ``keep`` says so)."""
        if not self.enabled:
            return await load()
        if self._generation_of is not None and self.clock() >= self._check_at:
            await self._look()
        found = self.get(key)
        if found is not _MISSING:
            self.hits += 1
            value: T = found
            return value
        self.misses += 1
        epoch = self._epoch
        value = await load()
        if keep(value):
            self.put(key, value, epoch)
        return value

    def watch(self, engine: AsyncEngine) -> None:
        """Invalidate on this process's own writes to the cached tables."""

        @sa.event.listens_for(engine.sync_engine, "before_cursor_execute")
        def _on_statement(
            _conn: Any, _cursor: Any, statement: str, _params: Any, _ctx: Any, _many: bool
        ) -> None:
            if _writes_cached_table(statement):
                self.dirty = True
                self.clear()
