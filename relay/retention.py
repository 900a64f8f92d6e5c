"""The retention sweep: the main process empties the bodies of finished messages.

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

from relay import metrics
from relay.config import RetentionConfig
from relay.queue import retention as sql
from relay.queue.store import Store
from relay.tasks import every

log = logging.getLogger("relay")


class BodySweeper:
    def __init__(self, store: Store, cfg: Callable[[], RetentionConfig]) -> None:
        self.store = store
        self.cfg = cfg
        self._stop = asyncio.Event()

    async def once(self) -> sql.BodySweep | None:
        """One sweep now (None when purging is off)."""
        cfg = self.cfg()
        if not cfg.purge_bodies:
            return None
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

    async def run(self) -> None:
        await every(self._stop, lambda: self.cfg().sweep_interval, self.once, "retention sweep")

    def stop(self) -> None:
        self._stop.set()
