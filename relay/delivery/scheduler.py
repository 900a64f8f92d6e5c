"""The held-mail scheduler: releases ``held`` recipients as budgets free up.

Two budgets hold mail: the account's daily quota (with ``queue_over_quota``) and the
sender domain's warm-up (per day and per hour). Each tick releases, oldest accepted
first, what the budgets allow now; released recipients get delivery times spread over
the hour (``warmup.spaced_slots``), so an hourly cap is never a burst at the top of the
hour. What must wait is re-dated to when its budget frees (next hour or next day), so a
tick only looks at rows that may move. The clock is injected: tests drive days.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable

from relay.policy import warmup
from relay.policy.limits import HOUR, Limits, _reason
from relay.queue import limits as q
from relay.tasks import every

log = logging.getLogger("relay.scheduler")

BATCH = 5000


class HeldScheduler:
    def __init__(
        self,
        limits: Limits,
        interval: float,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self.limits = limits
        self.store = limits.store
        self.interval = interval
        self.on_release = on_release
        self._stop = asyncio.Event()
        self._last_prune = 0.0
        self._levels_day = ""

    async def tick(self) -> int:
        """One pass; returns the number of recipients released to the queue."""
        now = self.store.clock()
        rows = await q.held_due(self.store, now, BATCH)
        by_account: dict[int, list[q.HeldRow]] = defaultdict(list)
        by_domain: dict[str, list[q.HeldRow]] = defaultdict(list)
        for r in rows:
            if r.reason.startswith("quota"):
                by_account[r.account_id].append(r)
            else:
                by_domain[r.mail_from.rpartition("@")[2].lower().rstrip(".")].append(r)
        released = 0
        for account_id, held in by_account.items():
            released += await self._release_quota(account_id, held, by_domain)
        for name, held in by_domain.items():
            released += await self._release_warmup(name, held)
        await self._housekeeping(now)
        if released and self.on_release is not None:
            self.on_release()
        return released

    async def _release_quota(
        self, account_id: int, held: list[q.HeldRow], by_domain: dict[str, list[q.HeldRow]]
    ) -> int:
        lim = self.limits
        acct = await lim.for_account(await self.store.get_account_by_id(account_id))
        usage = await lim.daily_usage(account_id)
        room = max(0, acct.daily - usage.used)
        go, wait = held[:room], held[room:]
        now = self.store.clock()
        if wait:
            await q.postpone_held(
                self.store,
                [r.id for r in wait],
                usage.frees_at or now + HOUR,
                f"quota: {acct.daily}/24h reached",
            )
        if not go:
            return 0
        counters = [lim._daily_counter(account_id, now, len(go))]
        # Within quota now; mail of a warming-up domain still waits for its warm-up budget.
        queued = []
        warming: dict[str, bool] = {}
        for r in go:
            name = r.mail_from.rpartition("@")[2].lower().rstrip(".")
            if name not in warming:
                warming[name] = (await lim.warmup_of(name, start=True)).budget is not None
            if warming[name]:
                by_domain[name].append(r)
            else:
                queued.append(r)
        to_warmup = [r for r in go if r not in queued]
        await q.release_held(
            self.store, [(r.id, now) for r in to_warmup], counters, still_held_reason="warmup"
        )
        n = await q.release_held(self.store, [(r.id, now) for r in queued], [])
        for rows in by_domain.values():
            rows.sort(key=lambda r: (r.created_at, r.id))
        return n

    async def _release_warmup(self, name: str, held: list[q.HeldRow]) -> int:
        lim = self.limits
        wu = await lim.warmup_of(name, start=True)
        now = self.store.clock()
        if wu.budget is None:  # warm-up switched off or over: everything goes
            counters = lim.warmup_counters(name, now, 0)
            return await q.release_held(self.store, [(r.id, now) for r in held], counters)
        used_day, used_hour = await lim.warmup_usage(name)
        rel = warmup.plan_release(now, lim.tz, wu.budget, used_day, used_hour, len(held))
        go, wait = held[: rel.count], held[rel.count :]
        if wait:
            await q.postpone_held(
                self.store, [r.id for r in wait], rel.next_check, _reason(rel.reason)
            )
        n = await q.release_held(
            self.store,
            [(r.id, slot) for r, slot in zip(go, rel.slots, strict=True)],
            lim.warmup_counters(name, now, len(go)),
        )
        if n or wait:
            log.info(
                "warmup domain=%s day=%d released=%d waiting=%d next=%s",
                name,
                wu.budget.day,
                n,
                len(wait),
                rel.next_check,
            )
        return n

    async def _housekeeping(self, now: float) -> None:
        today = warmup.local_date(now, self.limits.tz).isoformat()
        if today != self._levels_day:
            for account in await self.store.list_accounts():
                await self.limits.ensure_level(account.id)
            self._levels_day = today
        if now - self._last_prune >= 300:
            await self.store.prune_counters()
            self._last_prune = now

    async def run(self) -> None:
        await every(self._stop, lambda: self.interval, self.tick, "scheduler tick")

    def stop(self) -> None:
        self._stop.set()
