"""Composition root: builds the parts from the config, starts them in order, stops them.

Start order: database (schema checked) -> delivery worker -> listeners. Stop order is
the reverse: stop accepting, let open SMTP transactions and delivery attempts finish
(bounded by shutdown.grace_seconds), leave everything else queued.

With ``listen.processes: N`` (relay/processes.py) the main process runs everything but
the SMTP listeners and supervises N listener processes, each a ``RelayApp`` with
``listener_only=True``: policy, intake and listeners, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from typing import TYPE_CHECKING

from relay import heap, systemd
from relay import reload as _reload
from relay.config import Config
from relay.events.emit import RefusalRecorder
from relay.health import database_file_ok, free_space, room_for
from relay.intake import Intake
from relay.policy.build import build_checks
from relay.policy.engine import Policy
from relay.policy.limits import Limits, RateLimit
from relay.processes import ListenerProcesses, ParentLink
from relay.queue.store import RateTake, Store
from relay.reputation.service import Reputation
from relay.smtp.auth import Authenticator
from relay.smtp.handler import SMTPHandler
from relay.smtp.listener import Listener, server_tls_context, start_listeners
from relay.smtp.protocol import ConnectionLimiter
from relay.smtp.trusted import TrustedNetworks
from relay.tasks import cancel

if TYPE_CHECKING:
    # The main process's parts, imported where it builds them (_start_main): a listener
    # process never loads delivery, DKIM, DNS, SPF or aiohttp, ~20 MB of modules each
    # (issue 9: peak memory of all processes).
    from relay.delivery.mx import MXResolver
    from relay.delivery.worker import DeliveryWorker
    from relay.http.metrics import MetricsServer
    from relay.http.server import HTTPServer

log = logging.getLogger("relay")


def _nothing(*_: object) -> None:
    return None


def _loop_name() -> str:
    """The running event loop's implementation (config event_loop): uvloop or asyncio."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


class RelayApp:
    def __init__(self, cfg: Config, listener_only: bool = False) -> None:
        self.cfg = cfg
        self.listener_only = listener_only
        # A listener process tells the main process about new mail and its readiness.
        self.parent = ParentLink.from_env() if listener_only else None
        self.children: ListenerProcesses | None = None
        # Lease owner: node id plus a per-process nonce, so a restarted process (or two
        # processes with the same node id) never mistakes another's lease for its own.
        self.owner = f"{cfg.node_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.store = Store.open(cfg.database, node_id=cfg.node_id, own_checkpoints=True)
        self.limiter = ConnectionLimiter(cfg.smtp.max_connections_per_ip)
        self.listeners: list[Listener] = []
        self.worker: DeliveryWorker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._recheck_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._tls_reports_task: asyncio.Task[None] | None = None
        self._tls_reports_stop = asyncio.Event()
        self._stop = asyncio.Event()
        self.metrics_server: MetricsServer | None = None
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[bool]] = set()
        self.reputation = Reputation(cfg, self.store)
        # Delivery's MX resolver and the HTTP server: the main process's (_start_main).
        self.resolver: MXResolver | None = None
        self.http: HTTPServer | None = None

    async def _rate_take(self, account_id: int, recipients: int) -> RateTake | None:
        # The live check (config reloads replace it) decides the rate.
        for chk in self.policy.checks:
            if isinstance(chk, RateLimit):
                account = await self.store.get_account_by_id(account_id)
                return await chk.take(account, recipients)
        return None

    def readiness(self) -> dict[str, bool]:
        """Facts /readyz reports besides the database."""
        if self.children is not None:
            listening = self.children.ready
        else:
            listening = bool(self.listeners) and all(
                li.server.is_serving() for li in self.listeners
            )
        return {
            "listeners": listening,
            "delivery": self.worker is not None and self.worker.running,
            "database_file": database_file_ok(self.cfg.database),
            # MAIL is refused below smtp.min_free_space (policy/checks.py QueueSpace).
            "queue_space": room_for(free_space(self.cfg.database), self.cfg.smtp.min_free_space),
        }

    async def start(self) -> None:
        cfg = self.cfg
        if self.parent is None:
            # A listener process's main process checked the schema before starting it
            # (the check loads alembic: ~6 MB in each listener process, issue 9).
            await self.store.check_schema()
        assert cfg.tls.cert and cfg.tls.key, "serve() fills in tls before start()"
        self.tls = server_tls_context(cfg.tls.cert, cfg.tls.key)
        self.policy = policy = Policy(build_checks(cfg, self.store))
        intake = Intake(self.store, cfg.hostname)
        intake.planner = limits = Limits(cfg.limits, self.store)
        intake.rate = self._rate_take
        self.auth = auth = Authenticator(self.store, cfg.smtp)
        self.refusals = RefusalRecorder(self.store)
        if self.listener_only:
            await self._start_listeners(policy, intake, auth, limits)
            frozen = heap.settle()
            if self.parent is not None:
                self.parent.ready()
            log.info(
                "relay listener process started node=%s pid=%d loop=%s heap_frozen=%d",
                cfg.node_id,
                os.getpid(),
                _loop_name(),
                frozen,
            )
            return
        await self._start_main(policy, intake, auth, limits)

    async def _start_main(
        self, policy: Policy, intake: Intake, auth: Authenticator, limits: Limits
    ) -> None:
        """Delivery, webhooks, the schedulers, HTTP and metrics, then the listeners (in
        this process or in listener processes)."""
        from relay.delivery.mx import MXResolver
        from relay.delivery.render import Renderer as ReputationRenderer
        from relay.delivery.scheduler import HeldScheduler
        from relay.delivery.tlsreports import TlsReporter
        from relay.delivery.tlsreports import run as run_tls_reports
        from relay.delivery.tlsrpt import Tally
        from relay.delivery.worker import DeliveryWorker
        from relay.domains.recheck import Rechecker
        from relay.events.tracking import OpenTracker
        from relay.events.tracking import base_url as tracking_base_url
        from relay.events.webhooks import WebhookDispatcher
        from relay.http.metrics import MetricsServer
        from relay.http.server import HTTPContext, HTTPServer
        from relay.retention import RetentionSweeper

        cfg = self.cfg
        self.resolver = MXResolver(cfg.dns, cfg.delivery.port, dict(cfg.delivery.routes))
        self.http = HTTPServer(HTTPContext(cfg, self.store, readiness=self.readiness))
        self.http.ctx.extras["reputation"] = self.reputation
        # The main process checkpoints the database for every process (checkpoint.py).
        self.store.start_checkpoints()
        self.worker = DeliveryWorker(
            self.store,
            cfg.delivery,
            self.resolver,
            self.owner,
            reputation=ReputationRenderer(
                cfg,
                self.store,
                self.reputation.secret,
                self.reputation.bounce_domain,
                self.reputation.public_url,
            ),
            after_outcomes=self.reputation.after_outcomes,
            render=OpenTracker(self.store, cfg.tracking, tracking_base_url(cfg)).render,
        )
        self._worker_task = asyncio.create_task(self.worker.run())
        # RFC 8460: delivery counts its sessions' TLS; the reporter stores the counts each
        # minute and sends each ended day's reports (tls_reports.enabled, live).
        tally = Tally(lambda: self.cfg.tls_reports.enabled)
        self.worker.tls_tally = tally
        resolver = self.resolver
        self.tls_reporter = TlsReporter(
            self.store, lambda: self.cfg, tally, lambda: resolver.resolver, self.worker.wake
        )
        self._tls_reports_task = asyncio.create_task(
            run_tls_reports(self.tls_reporter, self._tls_reports_stop)
        )
        self.http.ctx.extras["destinations"] = self.worker.destinations  # the queue API
        # Webhooks: own task, own concurrency and timeouts; never holds a delivery slot.
        self.webhooks = WebhookDispatcher(self.store, cfg.webhooks, self.owner)
        self._webhooks_task = asyncio.create_task(self.webhooks.run())
        self.scheduler = HeldScheduler(limits, cfg.limits.scheduler_interval, self.worker.wake)
        self._scheduler_task = asyncio.create_task(self.scheduler.run())
        self.rechecker = Rechecker(self.store, cfg)
        self._recheck_task = asyncio.create_task(self.rechecker.run())
        self.sweeper = RetentionSweeper(self.store, lambda: self.cfg.retention)
        self._sweep_task = asyncio.create_task(self.sweeper.run())
        await self.http.start()
        if cfg.metrics.listen is not None:
            self.metrics_server = MetricsServer(cfg.metrics.listen, self.store)
            await self.metrics_server.start()
        if cfg.listen.processes:
            assert cfg.path is not None, "listener processes re-read the config file"
            self.children = ListenerProcesses(cfg.listen.processes, str(cfg.path), self.worker.wake)
            await self.children.start()
            where = f"{cfg.listen.processes} listener processes"
        else:
            await self._start_listeners(policy, intake, auth, limits)
            where = f"{len(self.listeners)} SMTP listeners"
        frozen = heap.settle()
        systemd.ready(f"serving {where}")
        log.info(
            "relay started node=%s owner=%s loop=%s heap_frozen=%d",
            cfg.node_id,
            self.owner,
            _loop_name(),
            frozen,
        )

    async def _start_listeners(
        self, policy: Policy, intake: Intake, auth: Authenticator, limits: Limits
    ) -> None:
        cfg = self.cfg
        trusted = (
            TrustedNetworks(self.store, cfg.listen.trusted_networks)
            if cfg.listen.trusted_networks
            else None
        )

        if self.worker is not None:
            on_accept = self.worker.wake
        elif self.parent is not None:
            on_accept = self.parent.wake
        else:  # a listener process started by hand: delivery finds the mail by polling
            on_accept = _nothing

        def handler_for(name: str) -> SMTPHandler:
            return SMTPHandler(
                listener=name,
                policy=policy,
                intake=intake,
                authenticator=auth,
                on_accept=on_accept,
                on_refusal=self.refusals,
                inbound=self.reputation.process_inbound,
                trusted=trusted,
            )

        self.listeners = await start_listeners(
            cfg, self.tls, handler_for, self.limiter, reuse_port=bool(cfg.listen.processes)
        )

    def _on_sighup(self) -> None:
        task = asyncio.create_task(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> bool:
        """SIGHUP: re-read config and certificates (relay/reload.py); one at a time."""
        async with self._reload_lock:
            if self.children is not None:
                self.children.signal_all(signal.SIGHUP)
            done = await _reload.reload(self)
            heap.settle()  # what the old configuration left behind may go now
            return done

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        await self.start()
        await self._stop.wait()
        await self.stop()
        return 0

    async def stop(self) -> None:
        grace = self.cfg.shutdown.grace_seconds
        systemd.stopping("draining")
        log.info("relay stopping: closing listeners, grace %.0f s", grace)
        for listener in self.listeners:
            listener.server.close()
        deadline = time.monotonic() + grace
        if self.children is not None:
            # Each child closes its listeners and drains its own sessions.
            await self.children.stop(grace)
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
        if getattr(self, "_scheduler_task", None) is not None:
            self.scheduler.stop()
            await self._scheduler_task
        if self.worker is not None:
            await self.worker.stop(max(0.0, deadline - time.monotonic()))
        if self._tls_reports_task is not None:
            # After delivery stopped: its last sessions' counts go in the final flush.
            self._tls_reports_stop.set()
            await self._tls_reports_task
        if self._recheck_task is not None:
            self.rechecker.stop()
            await cancel(self._recheck_task)
        if self._sweep_task is not None:
            self.sweeper.stop()
            await cancel(self._sweep_task)
        if self._worker_task is not None:
            await cancel(self._worker_task)
        if getattr(self, "refusals", None) is not None:
            await self.refusals.drain()
        if getattr(self, "webhooks", None) is not None:
            await self.webhooks.stop()
            await cancel(self._webhooks_task)
        if self.http is not None:
            await self.http.stop()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        await self.store.close()
        log.info("relay stopped")
