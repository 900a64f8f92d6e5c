"""The HTTP side of relay: one aiohttp application on ``http.listen``.

Areas add their routes through ``HTTPContext.routes`` modules (health, metrics, API,
tracking, unsubscribe) so this file stays the one place that starts and stops the server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from relay.config import Config
from relay.queue.store import Store

log = logging.getLogger("relay.http")


@dataclass
class HTTPContext:
    """What HTTP handlers may use. ``extras`` lets an area hang its own objects here."""

    cfg: Config
    store: Store
    readiness: Callable[[], dict[str, bool]] = lambda: {}
    extras: dict[str, Any] = field(default_factory=dict)


# aiohttp app key under which every handler finds the HTTPContext.
CONTEXT: web.AppKey[HTTPContext] = web.AppKey("relay_context")

RouteInstaller = Callable[[web.Application], None]
_installers: list[RouteInstaller] = []


def route_installer(fn: RouteInstaller) -> RouteInstaller:
    """Decorator: register a function that adds routes to the application."""
    _installers.append(fn)
    return fn


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    checks = dict(ctx.readiness())
    checks["database"] = await ctx.store.ping()
    ok = all(checks.values())
    return web.json_response(
        {"status": "ready" if ok else "unready", "checks": checks}, status=200 if ok else 503
    )


def build_app(ctx: HTTPContext) -> web.Application:
    # Importing the route modules registers their installers.
    from relay.http import routes  # noqa: F401

    app = web.Application(client_max_size=1024 * 1024)
    app[CONTEXT] = ctx
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    for install in _installers:
        install(app)
    return app


class HTTPServer:
    def __init__(self, ctx: HTTPContext) -> None:
        self.ctx = ctx
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        listen = self.ctx.cfg.http.listen
        if listen is None:
            return
        self.runner = web.AppRunner(build_app(self.ctx), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, listen.host, listen.port, reuse_address=True)
        await site.start()
        server: Any = site._server
        self.port = int(server.sockets[0].getsockname()[1]) if server else listen.port
        log.info("http listening address=%s:%d", listen.host, self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
