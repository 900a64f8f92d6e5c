"""The server's periodic re-verification of verified (and failed) domains.

A domain whose required record broke goes to ``failed`` and its mail is refused; a failed
domain whose records are back returns to ``verified``. DNS errors never stop the loop.
"""

from __future__ import annotations

import asyncio
import logging

from relay.config import Config
from relay.domains import service
from relay.domains.verify import Verifier
from relay.errors import RelayError
from relay.queue import domains as sql
from relay.queue.store import Store
from relay.tasks import every

log = logging.getLogger("relay.domains")


class Rechecker:
    def __init__(self, store: Store, cfg: Config, verifier: Verifier | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.interval = cfg.domains.recheck_interval
        self.verifier = verifier or Verifier(cfg)
        # Poll a few times per interval, at most once a minute: due domains are found by
        # their last check time in the database, so a restart loses nothing.
        self.poll = max(0.2, min(60.0, self.interval / 4))
        self._stop = asyncio.Event()

    async def once(self) -> int:
        """Re-check every due domain now; returns how many were checked."""
        names = await sql.claim_due_checks(self.store, self.interval)
        for name in names:
            d = await self.store.get_domain(name)
            if d is None:
                continue
            try:
                result = await service.verify(self.store, self.cfg, d, self.verifier)
            except RelayError as exc:
                log.warning("domain %s: re-check not recorded: %s", name, exc)
                continue
            if result.check.broken:
                log.warning(
                    "domain %s: %s (%s)",
                    name,
                    result.status.value,
                    service.broken_summary(result.check),
                )
        return len(names)

    async def run(self) -> None:
        await every(self._stop, lambda: self.poll, self.once, "domain re-check pass")

    def stop(self) -> None:
        self._stop.set()
