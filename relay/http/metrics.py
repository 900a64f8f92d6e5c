"""GET /metrics: on the main HTTP listener and, when ``metrics.listen`` is set, on an
address of its own (so Prometheus can reach it while the API stays private, or the
other way round).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from relay import metrics
from relay.config import HostPort
from relay.errors import StoreUnavailable
from relay.http.server import CONTEXT, route_installer
from relay.queue.store import Store

log = logging.getLogger("relay.http")

_STORE: web.AppKey[Store] = web.AppKey("relay_metrics_store")


async def refresh_queue(store: Store) -> None:
    """Read the queue gauges from the store (two aggregate queries)."""
    try:
        counts = await store.queue_counts()
        oldest = await store.oldest_due()
    except StoreUnavailable as exc:
        log.warning("metrics: queue gauges unavailable: %s", exc)
        metrics.QUEUE.refresh(None, None, store.clock())
        return
    metrics.QUEUE.refresh(counts, oldest, store.clock())


async def _respond(store: Store) -> web.Response:
    await refresh_queue(store)
    body = metrics.render()
    # CONTENT_TYPE_LATEST carries its charset parameter; aiohttp wants it in the header.
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _metrics(request: web.Request) -> web.Response:
    return await _respond(request.app[CONTEXT].store)


@route_installer
def install(app: web.Application) -> None:
    app.router.add_get("/metrics", _metrics)


async def _own_metrics(request: web.Request) -> web.Response:
    return await _respond(request.app[_STORE])


class MetricsServer:
    """The optional dedicated /metrics listener."""

    def __init__(self, listen: HostPort, store: Store) -> None:
        self.listen = listen
        self.store = store
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app[_STORE] = self.store
        app.router.add_get("/metrics", _own_metrics)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.listen.host, self.listen.port, reuse_address=True)
        await site.start()
        server: Any = site._server
        self.port = int(server.sockets[0].getsockname()[1]) if server else self.listen.port
        log.info("metrics listening address=%s:%d", self.listen.host, self.port)

    @property
    def serving(self) -> bool:
        server: Any = None
        if self.runner is not None and self.runner.sites:
            server = next(iter(self.runner.sites))._server
        return bool(server is not None and server.is_serving())

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
