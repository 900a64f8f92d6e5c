"""Durable webhook delivery: event rows (the outbox) -> signed POSTs.

The dispatcher is its own task with its own concurrency bound and timeouts, so a slow or
dead receiver only ever holds webhook slots, never a mail delivery slot. Each loop:

1. fan out: new event rows become ``webhook_delivery`` rows for each matching webhook;
2. claim: due rows are leased (crash recovery = the lease runs out), one per message at a
   time per webhook so the receiver sees a message's events in order;
3. POST each, then record done / retry at backoff / failed after ``retry_for``.

Delivery is at least once: a crash between the receiver's 2xx and our commit repeats the
POST; receivers deduplicate on the event ``id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable

import aiohttp

from relay import __version__
from relay.config import WebhooksConfig
from relay.errors import StoreUnavailable
from relay.events.emit import event_body
from relay.queue import events as q
from relay.queue.retry import next_delay
from relay.queue.store import Store
from relay.tasks import drain

log = logging.getLogger("relay.webhooks")

SIGNATURE_HEADER = "X-Relay-Signature"
TIMESTAMP_HEADER = "X-Relay-Timestamp"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``t=TIMESTAMP,v1=HEX``: HMAC-SHA256(secret, f"{t}." + body), as Stripe does, so
    the timestamp is covered and a captured POST cannot be replayed later."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str, header: str, body: bytes, now: float | None = None, tolerance: float = 300
) -> bool:
    """What a receiver does (docs/events.md has the stand-alone version)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = sign(secret, t, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class WebhookDispatcher:
    def __init__(
        self,
        store: Store,
        cfg: WebhooksConfig,
        owner: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.owner = owner
        self.clock = clock
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: set[int] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._session: aiohttp.ClientSession | None = None
        # PostgreSQL takes ids before commit; give concurrent writers time to commit.
        self._settle = 2.0 if store.dialect == "postgresql" else 0.0
        self.running = False

    def wake(self, *_: object) -> None:
        self._wake.set()

    async def run(self) -> None:
        self.running = True
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout)
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            headers={"User-Agent": f"relay-webhooks/{__version__}"},
            connector=aiohttp.TCPConnector(limit=self.cfg.concurrency),
        )
        try:
            while not self._stopping:
                try:
                    busy = await self.step()
                except StoreUnavailable as exc:
                    log.warning("webhook dispatch: database unavailable: %s", exc)
                    busy = False
                if not busy:
                    await self._sleep(self.cfg.poll_interval)
        finally:
            self.running = False

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def step(self) -> bool:
        """One fan-out + claim round; True when it found work."""
        fanned = await q.fan_out(self.store, settle=self._settle)
        free = self.cfg.concurrency - len(self._tasks)
        if free <= 0:
            return fanned > 0
        claims = await q.claim_deliveries(self.store, self.owner, self.cfg.lease_seconds, free)
        for c in claims:
            self._inflight.add(c.id)
            task = asyncio.create_task(self._post(c))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return bool(claims) or fanned > 0

    async def _post(self, c: q.DeliveryClaim) -> None:
        async with self._slots:
            try:
                body = event_body(c.event, c.account)
                ts = int(self.clock())
                headers = {
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign(c.secret, ts, body),
                    TIMESTAMP_HEADER: str(ts),
                    "X-Relay-Event": c.event.kind,
                    "X-Relay-Event-Id": str(c.event.id),
                }
                ok, code, error = await self._send(c.url, body, headers)
                next_due: float | None = None
                if not ok:
                    now = self.clock()
                    delay = next_delay(c.attempts + 1, self.cfg.retry_first, self.cfg.retry_max)
                    if now + delay - c.event.at <= self.cfg.retry_for:
                        next_due = now + delay
                log.info(
                    "webhook id=%d event=%d kind=%s url=%s attempt=%d outcome=%s code=%s%s",
                    c.webhook_id,
                    c.event.id,
                    c.event.kind,
                    c.url,
                    c.attempts + 1,
                    "done" if ok else ("retry" if next_due else "failed"),
                    code,
                    f" error={error!r}" if error else "",
                )
                await self._record(c.id, ok, code, error, next_due)
            finally:
                self._inflight.discard(c.id)

    async def _send(
        self, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[bool, int | None, str | None]:
        assert self._session is not None
        try:
            async with self._session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return True, resp.status, None
                return False, resp.status, f"HTTP {resp.status} {resp.reason or ''}".strip()
        except TimeoutError:
            return False, None, f"timeout after {self.cfg.timeout:g} s"
        except aiohttp.ClientError as exc:
            return False, None, f"{exc.__class__.__name__}: {exc}"[:300]
        except Exception as exc:  # a bad URL must not kill the dispatcher
            return False, None, f"{exc.__class__.__name__}: {exc}"[:300]

    async def _record(
        self, delivery_id: int, ok: bool, code: int | None, error: str | None, due: float | None
    ) -> None:
        for attempt in range(10):
            try:
                await q.record_delivery(
                    self.store,
                    self.owner,
                    delivery_id,
                    ok=ok,
                    code=code,
                    error=error,
                    next_due=due,
                )
                return
            except StoreUnavailable as exc:
                log.warning("recording webhook result failed (try %d): %s", attempt + 1, exc)
                await asyncio.sleep(min(5.0, 0.5 * (attempt + 1)))

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        self.wake()
        await drain(self._tasks, grace)
        if self._inflight:
            with contextlib.suppress(StoreUnavailable):
                await q.release_deliveries(self.store, self.owner, sorted(self._inflight))
        if self._session is not None:
            await self._session.close()
