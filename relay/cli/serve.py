"""serve, migrate, check-config, init."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from relay.cli import fail, with_store
from relay.config import Config, TLSConfig, load_config
from relay.errors import ConfigError, NotMigrated
from relay.logs import set_node, setup_logging
from relay.passwords import generate_password, hash_password
from relay.queue.store import Store


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the relay (SMTP listeners, delivery)")
    # Internal: how the main process starts its listener processes (relay/processes.py).
    p.add_argument("--listener-process", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_serve)
    p = sub.add_parser("migrate", help="create or upgrade the database schema")
    p.set_defaults(handler=with_store(cmd_migrate), no_schema_check=True)
    p = sub.add_parser("check-config", help="validate the config file; print every error")
    p.set_defaults(handler=cmd_check_config, no_config=True)
    p = sub.add_parser(
        "init", help="first run: write a config, a self-signed cert, the database, an account"
    )
    p.add_argument("--data-dir", default="var", help="where the database and cert go")
    p.add_argument("--account", default="admin", help="first account's name")
    p.set_defaults(handler=cmd_init, no_config=True)


def data_dir_of(cfg: Config) -> Path:
    url = cfg.database.url
    if url.startswith("sqlite+aiosqlite:///"):
        return Path(url[len("sqlite+aiosqlite:///") :]).parent
    return Path.cwd()


def ensure_tls(cfg: Config) -> Config:
    """Use the configured certificate, or make (once) and use a self-signed one."""
    if cfg.tls.cert and cfg.tls.key:
        return cfg
    d = data_dir_of(cfg)
    cert, key = d / "selfsigned-cert.pem", d / "selfsigned-key.pem"
    if not cert.exists() or not key.exists():
        # Here, not at the top: every listener process runs this module (cryptography).
        from relay.certs import write_self_signed

        write_self_signed(cert, key, cfg.hostname)
        print(
            f"relay: no tls.cert configured: generated a self-signed certificate {cert}"
            " (clients will not verify it; configure tls.cert and tls.key for production)",
            file=sys.stderr,
        )
    return dataclasses.replace(cfg, tls=TLSConfig(cert=str(cert), key=str(key)))


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def _cap_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena and keeps it: with a
    pooled SQLite connection per thread (aiosqlite) a listener process grew from 76 to
    170 MB PSS under 100 sessions; with 2 arenas 108 MB, at the same throughput (issue
    9). Not glibc (musl, macOS): nothing to do."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(_M_ARENA_MAX, arenas)
    except OSError:
        pass


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    listener_only = bool(getattr(args, "listener_process", False))
    metrics_dir = None
    if cfg.listen.processes and not listener_only:
        if cfg.path is None:
            return fail("listen.processes needs relay started with -c CONFIG")
        # Before prometheus_client is first imported (relay.app imports it): every process
        # then keeps its counters in files here and /metrics adds them up (metrics.py).
        metrics_dir = tempfile.mkdtemp(prefix="relay-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from relay.app import RelayApp

    setup_logging(cfg.log.level, cfg.log.format)
    set_node(cfg.node_id)
    cfg = ensure_tls(cfg)

    _cap_malloc_arenas()

    async def go() -> int:
        app = RelayApp(cfg, listener_only=listener_only)
        try:
            return await app.run()
        except NotMigrated as exc:
            await app.store.close()
            return fail(f"{exc} (relay -c {cfg.path or 'CONFIG'} migrate)")

    run: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    if cfg.event_loop == "uvloop":
        import uvloop

        run = uvloop.run
    try:
        return run(go())
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


async def cmd_migrate(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    version = await store.migrate()
    print(f"database at schema version {version}")
    return 0


def cmd_check_config(cfg: Config | None, args: argparse.Namespace) -> int:
    from relay.config import config_path_from

    path = config_path_from(args.config)
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    print(f"{loaded.path or '(defaults)'}: ok")
    return 0


CONFIG_TEMPLATE = """\
# relay configuration written by `relay init`; every key: config.example.yaml
hostname: {hostname}
database:
  url: "sqlite+aiosqlite:///{db}"
listen:
  submission: "127.0.0.1:{sub}"
  smtps: "127.0.0.1:{smtps}"
  smtp: null
http:
  listen: "127.0.0.1:8025"
delivery:
  helo_name: {hostname}
"""


def cmd_init(cfg: Config | None, args: argparse.Namespace) -> int:
    import socket

    path = Path(args.config or "relay.yaml")
    data = Path(args.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # 587/465 need root or CAP_NET_BIND_SERVICE; a first run as a user gets 2587/2465.
        privileged = os.getuid() == 0
        path.write_text(
            CONFIG_TEMPLATE.format(
                hostname=socket.getfqdn(),
                db=data / "relay.db",
                sub=587 if privileged else 2587,
                smtps=465 if privileged else 2465,
            )
        )
        print(f"wrote {path}")
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    ensure_tls(loaded)

    async def go() -> int:
        store = Store.open(loaded.database, node_id=loaded.node_id)
        try:
            await store.migrate()
            if not await store.list_accounts():
                password = generate_password()
                await store.add_account(args.account, hash_password(password))
                print(f"created account {args.account!r} with password: {password}")
                print("(shown once; change it with `relay account passwd`)")
        finally:
            await store.close()
        return 0

    return asyncio.run(go())
