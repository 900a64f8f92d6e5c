"""Composition root: builds the parts from the config, starts them in order, stops them.

Start order: database (schema checked) -> delivery worker -> listeners. Stop order is
the reverse: stop accepting, let open SMTP transactions and delivery attempts finish
(bounded by shutdown.grace_seconds), leave everything else queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid

from relay.config import Config
from relay.delivery.mx import MXResolver
from relay.delivery.worker import DeliveryWorker
from relay.http.server import HTTPContext, HTTPServer
from relay.intake import Intake
from relay.policy.checks import MaxRecipients, RequireAuth, SenderDomain
from relay.policy.engine import Check, Policy
from relay.queue.store import Store
from relay.smtp.auth import Authenticator
from relay.smtp.handler import SMTPHandler
from relay.smtp.listener import Listener, server_tls_context, start_listeners
from relay.smtp.protocol import ConnectionLimiter

log = logging.getLogger("relay")


def build_checks(cfg: Config, store: Store) -> list[Check]:
    """The ordered policy checks; the first refusal wins."""
    return [
        RequireAuth(),
        MaxRecipients(cfg.smtp.max_recipients),
        SenderDomain(store),
    ]


class RelayApp:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # Lease owner: node id plus a per-process nonce, so a restarted process (or two
        # processes with the same node id) never mistakes another's lease for its own.
        self.owner = f"{cfg.node_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.store = Store.open(cfg.database, node_id=cfg.node_id)
        self.limiter = ConnectionLimiter(cfg.smtp.max_connections_per_ip)
        self.listeners: list[Listener] = []
        self.worker: DeliveryWorker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.http = HTTPServer(HTTPContext(cfg, self.store, readiness=self.readiness))

    def readiness(self) -> dict[str, bool]:
        """Facts /readyz reports besides the database."""
        return {
            "listeners": bool(self.listeners)
            and all(li.server.is_serving() for li in self.listeners),
            "delivery": self.worker is not None and self.worker.running,
        }

    async def start(self) -> None:
        cfg = self.cfg
        await self.store.check_schema()
        assert cfg.tls.cert and cfg.tls.key, "serve() fills in tls before start()"
        tls = server_tls_context(cfg.tls.cert, cfg.tls.key)
        policy = Policy(build_checks(cfg, self.store))
        intake = Intake(self.store, cfg.hostname)
        auth = Authenticator(self.store, cfg.smtp)
        resolver = MXResolver(cfg.dns, cfg.delivery.port, dict(cfg.delivery.routes))
        self.worker = DeliveryWorker(self.store, cfg.delivery, resolver, self.owner)
        self._worker_task = asyncio.create_task(self.worker.run())

        def handler_for(name: str) -> SMTPHandler:
            assert self.worker is not None
            return SMTPHandler(
                listener=name,
                policy=policy,
                intake=intake,
                authenticator=auth,
                on_accept=self.worker.wake,
            )

        self.listeners = await start_listeners(cfg, tls, handler_for, self.limiter)
        await self.http.start()
        log.info("relay started node=%s owner=%s", cfg.node_id, self.owner)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        await self._stop.wait()
        await self.stop()
        return 0

    async def stop(self) -> None:
        grace = self.cfg.shutdown.grace_seconds
        log.info("relay stopping: closing listeners, grace %.0f s", grace)
        for listener in self.listeners:
            listener.server.close()
        deadline = time.monotonic() + grace
        # Idle sessions are told to go; sessions mid-transaction may finish first.
        while time.monotonic() < deadline:
            for session in list(self.limiter.sessions):
                if not session.in_transaction:
                    session.shutdown()
            if not self.limiter.sessions:
                break
            await asyncio.sleep(0.05)
        for session in list(self.limiter.sessions):
            session.shutdown()
        if self.worker is not None:
            await self.worker.stop(max(0.0, deadline - time.monotonic()))
        if self._worker_task is not None:
            self._worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker_task
        await self.http.stop()
        await self.store.close()
        log.info("relay stopped")
