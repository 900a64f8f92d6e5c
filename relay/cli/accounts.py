"""account add | list | passwd."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from typing import Any

from relay.cli import fail, with_store
from relay.config import Config
from relay.passwords import generate_password, hash_password
from relay.queue.store import Store


def register(sub: Any) -> None:
    acc = sub.add_parser("account", help="manage accounts (SMTP AUTH users)")
    asub = acc.add_subparsers(dest="account_command", metavar="ACTION")
    asub.required = True
    p = asub.add_parser("add", help="create an account")
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(handler=with_store(cmd_add))
    p = asub.add_parser("list", help="list accounts")
    p.set_defaults(handler=with_store(cmd_list))
    p = asub.add_parser("passwd", help="set an account's password")
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true")
    p.set_defaults(handler=with_store(cmd_passwd))
    from relay.cli import reputation  # account show | resume

    reputation.register_account(asub)


def read_password(from_stdin: bool) -> str | None:
    """The password from stdin (one line, newline not included), or None to generate."""
    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    if sys.stdin.isatty():
        first = getpass.getpass("Password (empty: generate one): ")
        if not first:
            return None
        if getpass.getpass("Again: ") != first:
            raise SystemExit("relay: passwords differ")
        return first
    return None


async def cmd_add(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    password = read_password(args.password_stdin)
    if password == "":
        return fail("empty password on stdin")
    generated = password is None
    secret = password or generate_password()
    hashed = await asyncio.to_thread(hash_password, secret)
    await store.add_account(args.name, hashed)
    print(f"account {args.name} created")
    if generated:
        print(f"password: {secret}  (shown once)")
    return 0


async def cmd_list(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    accounts = await store.list_accounts()
    print(f"{'NAME':<24} {'STATUS':<10}")
    for a in accounts:
        print(f"{a.name:<24} {a.status.value:<10}")
    return 0


async def cmd_passwd(store: Store, cfg: Config, args: argparse.Namespace) -> int:
    password = read_password(args.password_stdin)
    if password == "":
        return fail("empty password on stdin")
    generated = password is None
    secret = password or generate_password()
    await store.set_password(args.name, await asyncio.to_thread(hash_password, secret))
    print(f"password of {args.name} changed")
    if generated:
        print(f"password: {secret}  (shown once)")
    return 0
