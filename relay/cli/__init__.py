"""The `relay` command line. Each area registers its subcommands from its own module."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from relay import __version__
from relay.config import Config, config_path_from, load_config
from relay.errors import ConfigError, RelayError
from relay.queue.store import Store

Handler = Callable[[Config, argparse.Namespace], int]


def fail(message: str, code: int = 1) -> int:
    print(f"relay: {message}", file=sys.stderr)
    return code


def with_store(fn: Callable[[Store, Config, argparse.Namespace], Awaitable[int]]) -> Handler:
    """Run an async command with an open store (schema checked unless it migrates)."""

    def run(cfg: Config, args: argparse.Namespace) -> int:
        async def go() -> int:
            store = Store.open(cfg.database, node_id=cfg.node_id)
            try:
                if not getattr(args, "no_schema_check", False):
                    await store.check_schema()
                return await fn(store, cfg, args)
            finally:
                await store.close()

        return asyncio.run(go())

    return run


def build_parser() -> argparse.ArgumentParser:
    from relay.cli import accounts, domains, queue, serve
    from relay.cli import events as events_cli

    parser = argparse.ArgumentParser(prog="relay", description="Self-hosted email sending service")
    parser.add_argument("-c", "--config", help="config file (default: $RELAY_CONFIG)")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from relay.cli import limits as limits_cli
    from relay.cli import reputation as reputation_cli
    from relay.cli import tlsreports as tls_cli

    for module in (
        serve,
        accounts,
        domains,
        queue,
        events_cli,
        limits_cli,
        reputation_cli,
        tls_cli,
    ):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Any = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    if getattr(args, "no_config", False):
        return int(handler(None, args))
    try:
        cfg = load_config(config_path_from(args.config))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"relay: config error: {problem}", file=sys.stderr)
        return 2
    try:
        return int(handler(cfg, args))
    except RelayError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
