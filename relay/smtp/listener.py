"""Listening sockets: submission (STARTTLS, 587), smtps (implicit TLS, 465), smtp (25)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from relay.config import Config, HostPort
from relay.smtp.handler import SMTPHandler
from relay.smtp.protocol import ConnectionLimiter, RelaySMTP

log = logging.getLogger("relay.smtp")


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


@dataclass
class Listener:
    name: str
    address: HostPort
    server: asyncio.Server

    @property
    def port(self) -> int:
        sock = self.server.sockets[0]
        return int(sock.getsockname()[1])


async def start_listeners(
    cfg: Config,
    tls: ssl.SSLContext,
    handler_for: Callable[[str], SMTPHandler],
    limiter: ConnectionLimiter,
    reuse_port: bool = False,
) -> list[Listener]:
    """Bind every configured listener; a null address leaves that listener off.

    ``reuse_port``: several listener processes bind the same addresses and the kernel
    spreads connections over them (relay/processes.py)."""
    loop = asyncio.get_running_loop()
    out: list[Listener] = []
    specs: list[tuple[str, HostPort | None, bool, bool]] = [
        # name, address, implicit TLS, AUTH required before MAIL
        ("submission", cfg.listen.submission, False, True),
        ("smtps", cfg.listen.smtps, True, True),
        ("smtp", cfg.listen.smtp, False, False),
    ]
    for name, addr, implicit, require_auth in specs:
        if addr is None:
            continue
        handler = handler_for(name)

        def factory(
            handler: SMTPHandler = handler,
            name: str = name,
            implicit: bool = implicit,
            require_auth: bool = require_auth,
        ) -> RelaySMTP:
            return RelaySMTP(
                handler,
                listener=name,
                implicit_tls=implicit,
                require_auth=require_auth,
                max_message_size=cfg.smtp.max_message_size,
                limiter=limiter,
                hostname=cfg.hostname,
                ident="relay ESMTP",
                tls_context=None if implicit else tls,
                timeout=cfg.smtp.timeout,
            )

        server = await loop.create_server(
            factory,
            addr.host,
            addr.port,
            ssl=tls if implicit else None,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
        listener = Listener(name, addr, server)
        log.info("listening name=%s address=%s:%d", name, addr.host, listener.port)
        out.append(listener)
    return out
