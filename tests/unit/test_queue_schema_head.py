"""tables.SCHEMA_HEAD is the head of the Alembic scripts (Store.check_schema's fast path
compares databases with it instead of loading Alembic)."""

from __future__ import annotations

from relay.queue import migrate
from relay.queue.tables import SCHEMA_HEAD


def test_schema_head_is_the_alembic_scripts_head() -> None:
    assert migrate.head_revisions() == SCHEMA_HEAD
