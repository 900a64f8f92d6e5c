"""The retention sweep: the main process empties the bodies of finished messages, and
later deletes their records.

Without it the database only grows, by every body ever sent (issue 7's operations view:
a disk that fills is a 3 a.m. page). Which bodies go, and why the rest of each message
stays, is in relay/queue/retention.py; here is the timing. The config is read afresh
every sweep, so a reload applies at the next one. Errors never stop the loop: a sweep
that fails is simply the next sweep's work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay import metrics
from relay.config import RetentionConfig
from relay.queue import retention as sql
from relay.queue.store import Store
from relay.tasks import every

log = logging.getLogger("relay")


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep did (None: that part is switched off)."""

    bodies: sql.BodySweep | None
    records: sql.RecordSweep | None


class RetentionSweeper:
    def __init__(self, store: Store, cfg: Callable[[], RetentionConfig]) -> None:
        self.store = store
        self.cfg = cfg
        self._stop = asyncio.Event()

    async def once(self) -> Sweep:
        """One sweep now: bodies first (they go sooner), then records."""
        cfg = self.cfg()
        return Sweep(
            await self._bodies(cfg) if cfg.purge_bodies else None,
            await self._records(cfg) if cfg.purge_records else None,
        )

    async def _bodies(self, cfg: RetentionConfig) -> sql.BodySweep:
        started = time.monotonic()
        result = await sql.purge_bodies(self.store, self.store.clock() - cfg.bodies)
        metrics.BODIES_PURGED.inc(result.purged)
        if result.purged:
            log.info(
                "retention: %d bodies purged, %d messages older than %.0f s still in flight"
                " (%.2f s)",
                result.purged,
                result.in_flight,
                cfg.bodies,
                time.monotonic() - started,
            )
        return result

    async def _records(self, cfg: RetentionConfig) -> sql.RecordSweep:
        started = time.monotonic()
        result = await sql.purge_records(self.store, self.store.clock() - cfg.records)
        if result.messages:
            metrics.RECORDS_DELETED.labels("message").inc(result.messages)
        for table, n in result.loose.items():
            if n:
                metrics.RECORDS_DELETED.labels(table).inc(n)
        if result.messages or result.days_rolled or any(result.loose.values()):
            log.info(
                "retention: %d days counted into stats_day, %d messages deleted with their"
                " rows, %d kept (in flight or a later event), other rows deleted: %s (%.2f s)",
                result.days_rolled,
                result.messages,
                result.kept,
                " ".join(f"{t}={n}" for t, n in result.loose.items()),
                time.monotonic() - started,
            )
        return result

    async def run(self) -> None:
        await every(self._stop, lambda: self.cfg().sweep_interval, self.once, "retention sweep")

    def stop(self) -> None:
        self._stop.set()
