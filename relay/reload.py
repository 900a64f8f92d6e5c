"""SIGHUP: re-read the config file and the TLS certificate, apply what can change live.

Live: log level and format, policy limits (every check is rebuilt from the new config),
AUTH throttling, the per-IP connection limit, delivery routes, DNS resolvers, retry
timing, TLS certificates (for connections made after the reload), and whatever other
areas register with ``on_reload``. Open SMTP sessions are never dropped: they keep the
objects they hold, and the next command sees the new limits.

Needs a restart: listen addresses, the database, node id and delivery concurrency; a
change there is logged as such and otherwise ignored.

A config that fails validation (or a certificate that does not load) is refused with an
error log naming each problem, and the running config stays as it was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relay import metrics, systemd
from relay.config import Config, load_config
from relay.errors import ConfigError
from relay.logs import set_level, setup_logging

if TYPE_CHECKING:
    from relay.app import RelayApp

log = logging.getLogger("relay")

ReloadHook = Callable[["RelayApp", Config], None]
_hooks: list[ReloadHook] = []

# Keys whose new value only a restart can apply (sockets, the database, identities).
RESTART_ONLY = (
    "node_id",
    "hostname",
    "database",
    "listen",
    "http.listen",
    "metrics",
    "delivery.concurrency",
    "delivery.tls_ca_file",
    "smtp.max_message_size",
    "smtp.timeout",
    "shutdown",
)


def on_reload(fn: ReloadHook) -> ReloadHook:
    """Decorator: an area's function called with (app, new_config) after a reload."""
    _hooks.append(fn)
    return fn


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that differ between two config objects."""
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new):
        out: list[str] = []
        for f in dataclasses.fields(old):
            if f.name == "path":
                continue
            path = f"{prefix}.{f.name}" if prefix else f.name
            out += changed_keys(getattr(old, f.name), getattr(new, f.name), path)
        return out
    return [] if old == new else [prefix]


def _restart_only(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESTART_ONLY)


def _load_tls(cert: str, key: str) -> None:
    # Validate in a scratch context first: a bad file must not half-load the live one.
    scratch = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    scratch.load_cert_chain(cert, key)


async def reload(app: RelayApp) -> bool:
    """Re-read and apply the config; False (old config kept) when it is refused."""
    systemd.reloading()
    applied = False
    try:
        applied = await _reload(app)
    finally:
        # READY=1 ends the reload for systemd whatever happened: the service still runs.
        systemd.ready("running" if applied else "reload refused; running the previous config")
    metrics.RELOADS.labels("applied" if applied else "rejected").inc()
    return applied


async def _reload(app: RelayApp) -> bool:
    path = app.cfg.path
    if path is None:
        log.warning("reload: relay was started without a config file; nothing to re-read")
        return False
    try:
        new = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused: config error: %s", problem)
        log.error("reload refused: keeping the running config (fix %s and reload again)", path)
        return False
    if new.tls.cert is None:
        # serve generated a self-signed pair at start; keep using it.
        new = dataclasses.replace(new, tls=app.cfg.tls)
    assert new.tls.cert and new.tls.key
    try:
        await asyncio.to_thread(_load_tls, new.tls.cert, new.tls.key)
    except (OSError, ssl.SSLError) as exc:
        log.error("reload refused: tls.cert/tls.key cannot be loaded: %s", exc)
        log.error("reload refused: keeping the running config and certificate")
        return False
    keys = changed_keys(app.cfg, new)
    later = [k for k in keys if _restart_only(k)]
    if later:
        log.warning("reload: restart needed to apply: %s", ", ".join(later))
    await asyncio.to_thread(app.tls.load_cert_chain, new.tls.cert, new.tls.key)
    apply(app, new)
    log.info(
        "reload applied config=%s changed=%s",
        path,
        ",".join(k for k in keys if not _restart_only(k)) or "-",
    )
    return True


def apply(app: RelayApp, new: Config) -> None:
    """Swap the live parts over to ``new`` (restart-only keys keep their old value)."""
    from relay.policy.build import build_checks

    old = app.cfg
    keep = dataclasses.replace(
        new,
        node_id=old.node_id,
        hostname=old.hostname,
        database=old.database,
        listen=old.listen,
        http=dataclasses.replace(new.http, listen=old.http.listen),
        metrics=old.metrics,
        delivery=dataclasses.replace(
            new.delivery,
            concurrency=old.delivery.concurrency,
            tls_ca_file=old.delivery.tls_ca_file,
        ),
        smtp=dataclasses.replace(
            new.smtp, max_message_size=old.smtp.max_message_size, timeout=old.smtp.timeout
        ),
        shutdown=old.shutdown,
    )
    if keep.log.format != old.log.format:
        setup_logging(keep.log.level, keep.log.format)
    else:
        set_level(keep.log.level)
    app.policy.checks = list(build_checks(keep, app.store))
    app.auth.cfg = keep.smtp
    app.limiter.per_ip = keep.smtp.max_connections_per_ip
    if app.resolver is not None:  # the main process's: delivery's MX lookups
        from relay.delivery.mx import make_resolver

        app.resolver.routes = dict(keep.delivery.routes)
        app.resolver.port = keep.delivery.port
        if keep.dns != old.dns:
            app.resolver.resolver = make_resolver(keep.dns)
    if app.worker is not None:
        app.worker.cfg = keep.delivery
        session = app.worker.session
        session.helo = keep.delivery.helo_name
        session.require_tls = keep.delivery.require_tls
        session.connect_timeout = keep.delivery.connect_timeout
        session.command_timeout = keep.delivery.command_timeout
    webhooks = getattr(app, "webhooks", None)  # timing and concurrency of POSTs
    if webhooks is not None:
        webhooks.cfg = keep.webhooks
    app.cfg = keep
    if app.http is not None:
        app.http.ctx.cfg = keep
    for hook in list(_hooks):
        try:
            hook(app, keep)
        except Exception:
            log.exception("reload hook %s failed", getattr(hook, "__qualname__", hook))
