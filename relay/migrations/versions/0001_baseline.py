"""Baseline: the whole schema as relay.queue.tables.metadata describes it.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

No release has shipped yet, so the baseline is built from the table definitions at run
time: tables appended to relay/queue/tables.py before the first release are created by
this revision without touching it. ``checkfirst`` makes it safe on a database that an
earlier `relay migrate` (plain ``metadata.create_all``) already populated.

THE RULE ONCE A RELEASE SHIPS: freeze this file (replace ``create_all`` with the explicit
``op.create_table`` calls for the schema of that release), and make every later change a
new revision with explicit ``op.*`` operations (``op.create_table``, ``op.add_column``
inside ``op.batch_alter_table`` for SQLite, ...). A later revision must never read
``metadata``: otherwise a fresh database would get the new table from this baseline and
then fail when the later revision creates it again.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from relay.queue.tables import metadata

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    metadata.create_all(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    metadata.drop_all(op.get_bind(), checkfirst=True)
