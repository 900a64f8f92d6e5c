"""Alembic environment for relay, on both SQLite and PostgreSQL.

`relay migrate` (relay/queue/migrate.py) runs Alembic inside the store's own async engine:
it opens an AsyncConnection, enters ``run_sync`` and hands the sync-facing connection in
``config.attributes["connection"]``, so migrations see exactly the engine settings the
server uses (SQLite WAL and BEGIN IMMEDIATE, PostgreSQL pool and timeouts).

Run by hand (``alembic -c relay/alembic.ini upgrade head``) there is no connection: the
URL comes from the relay config ($RELAY_CONFIG or ``-x config=FILE``) and an async engine
is made here, again driven through ``run_sync``.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

from relay.queue.tables import metadata

config = context.config
target_metadata = metadata


def _configure_and_run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: autogenerate proposes batch operations.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url_from_relay_config() -> str:
    from relay.config import config_path_from, load_config

    path = context.get_x_argument(as_dictionary=True).get("config")
    return load_config(config_path_from(path)).database.url


async def _run_async(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_configure_and_run)
            await conn.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or _url_from_relay_config()
    asyncio.run(_run_async(url))


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or _url_from_relay_config()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
