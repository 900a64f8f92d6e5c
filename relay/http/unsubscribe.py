"""/u/{token}: unsubscribing from one sender domain.

GET shows a small confirmation page with a button (mail scanners follow links, so a GET
must not unsubscribe by itself); POST records the suppression. RFC 8058 §3.1: the
one-click POST carries ``List-Unsubscribe=One-Click`` and must work without cookies,
redirects or a page. Both are idempotent: a second POST answers the same.
"""

from __future__ import annotations

import html
import logging

from aiohttp import web

from relay.errors import StoreUnavailable
from relay.http.server import CONTEXT, HTTPContext, route_installer
from relay.reputation.service import Reputation
from relay.reputation.tokens import TokenKind

log = logging.getLogger("relay.http")

PATH = "/u/"

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body{{font-family:sans-serif;max-width:32em;margin:4em auto;padding:0 1em}}
button{{font-size:1.1em;padding:.5em 1.2em}}</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""


def _page(title: str, body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=_PAGE.format(title=html.escape(title), body=body),
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-store"},
    )


def service(ctx: HTTPContext) -> Reputation:
    found = ctx.extras.get("reputation")
    if not isinstance(found, Reputation):
        found = Reputation(ctx.cfg, ctx.store)
        ctx.extras["reputation"] = found
    return found


_INVALID = (
    "<p>This unsubscribe link is not valid. It may have been cut short by your mail program.</p>"
)


async def confirm_page(request: web.Request) -> web.Response:
    rep = service(request.app[CONTEXT])
    token = request.match_info["token"]
    rid = await rep.read(TokenKind.UNSUBSCRIBE, token)
    if rid is None:
        return _page("Unsubscribe", _INVALID, 404)
    action = html.escape(f"{PATH}{token}", quote=True)
    body = (
        "<p>Stop receiving these emails?</p>"
        f'<form method="post" action="{action}">'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Unsubscribe</button></form>'
    )
    return _page("Unsubscribe", body)


async def unsubscribe(request: web.Request) -> web.Response:
    rep = service(request.app[CONTEXT])
    token = request.match_info["token"]
    rid = await rep.read(TokenKind.UNSUBSCRIBE, token)
    if rid is None:
        return _page("Unsubscribe", _INVALID, 404)
    try:
        done = await rep.unsubscribe(rid, "https")
    except StoreUnavailable:
        return _page("Unsubscribe", "<p>Please try again in a minute.</p>", 503)
    if done is None:
        return _page("Unsubscribe", "<p>This message is no longer known here.</p>", 404)
    log.info("unsubscribe domain=%s new=%s", done.domain, done.new)
    return _page(
        "Unsubscribed",
        f"<p>You will no longer receive email from {html.escape(done.domain)}.</p>",
    )


@route_installer
def install(app: web.Application) -> None:
    app.router.add_get(PATH + "{token}", confirm_page)
    app.router.add_post(PATH + "{token}", unsubscribe)
