"""Schema migrations: Alembic scripts in relay/migrations, run through the store's engine.

`relay migrate` calls :func:`upgrade`; `relay serve` (and every CLI command) calls
:func:`check` and refuses a database whose Alembic revision is not this code's head. The
same code runs on SQLite and PostgreSQL: Alembic gets the sync-facing connection of the
async engine via ``run_sync`` (see relay/migrations/env.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from relay.errors import NotMigrated

if TYPE_CHECKING:
    from relay.queue.store import Store

SCRIPT_LOCATION = Path(__file__).resolve().parent.parent / "migrations"

# Any constant works: it only has to be the same on every node. Two nodes running
# `relay migrate` at once then take turns instead of both creating the same tables.
_PG_MIGRATE_LOCK = 0x72656C6179  # "relay"


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    return cfg


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revisions() -> tuple[str, ...]:
    """The revision(s) this code expects the database to be at."""
    return tuple(sorted(_script().get_heads()))


def _current(sync_conn: sa.Connection) -> tuple[str, ...]:
    return tuple(sorted(MigrationContext.configure(sync_conn).get_current_heads()))


async def current_revisions(store: Store) -> tuple[str, ...]:
    """The database's Alembic revision(s); empty when it was never migrated."""
    async with store._read() as conn:
        return await conn.run_sync(_current)


async def upgrade(store: Store) -> tuple[str, ...]:
    """Apply every pending migration in one transaction; return the new revision(s).

    Idempotent. On SQLite the transaction starts with BEGIN IMMEDIATE (dialect.py), on
    PostgreSQL with an advisory lock: either way concurrent runs are serialised.
    """
    cfg = alembic_config()
    await asyncio.to_thread(_script)  # read the scripts off the event loop once

    def run(sync_conn: sa.Connection) -> tuple[str, ...]:
        if sync_conn.dialect.name == "postgresql":
            sync_conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, "head")
        return _current(sync_conn)

    async with store._write() as conn:
        return await conn.run_sync(run)


async def check(store: Store) -> None:
    """Raise NotMigrated unless the database is at this code's head revision."""
    # Alembic logs its plugin setup and dialect choice at INFO: noise in a server's log.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    heads = await asyncio.to_thread(head_revisions)
    found = await current_revisions(store)
    if found == heads:
        return
    if not found:
        raise NotMigrated(
            "the database has no relay schema (or one made before migrations): run `relay migrate`"
        )
    script = _script()
    known = all(_known(script, rev) for rev in found)
    if not known:
        raise NotMigrated(
            f"the database schema is at revision {', '.join(found)}, which this relay does not"
            f" know (it needs {', '.join(heads)}): a newer relay migrated it; upgrade this node"
        )
    raise NotMigrated(
        f"the database schema is at revision {', '.join(found)}, this relay needs"
        f" {', '.join(heads)}: run `relay migrate`"
    )


def _known(script: ScriptDirectory, rev: str) -> bool:
    try:
        return script.get_revision(rev) is not None
    except Exception:  # alembic raises its own ResolutionError subclasses for unknown ids
        return False
