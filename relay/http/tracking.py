"""GET /t/o/{token}.gif: the open pixel. Always answers the image (a broken image in a
mail client helps nobody); records ``opened`` only for a valid token."""

from __future__ import annotations

import logging

from aiohttp import web

from relay.errors import StoreUnavailable
from relay.events.tracking import PIXEL_GIF, PIXEL_PATH, read_token
from relay.http.server import CONTEXT, route_installer
from relay.queue import events as q

log = logging.getLogger("relay.tracking")

_SECRET = "tracking_secret"
_HEADERS = {
    "Cache-Control": "no-store, no-cache, must-revalidate, private",
    "Pragma": "no-cache",
}


async def _secret(request: web.Request) -> bytes:
    ctx = request.app[CONTEXT]
    secret = ctx.extras.get(_SECRET)
    if not isinstance(secret, bytes):
        secret = await q.tracking_secret(ctx.store)
        ctx.extras[_SECRET] = secret
    return secret


async def open_pixel(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    token = request.match_info["token"]
    try:
        found = read_token(await _secret(request), token)
        if found is not None:
            rid, mid = found
            client = request.headers.get("User-Agent", "")[:200]
            result = await q.record_open(
                ctx.store, rid, mid, bot_window=ctx.cfg.tracking.bot_window, client=client
            )
            if result is not None:
                log.info(
                    "open qid=%s rcpt_id=%d unique=%s count=%d bot=%s",
                    mid,
                    rid,
                    result.unique,
                    result.count,
                    result.bot,
                )
    except StoreUnavailable as exc:
        log.warning("open not recorded, database unavailable: %s", exc)
    return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=_HEADERS)


@route_installer
def install(app: web.Application) -> None:
    app.router.add_get(PIXEL_PATH + "{token}.gif", open_pixel)
