"""row_change: a generation every write to a cached table bumps (relay/queue/cache.py).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

The table where missing (the baseline builds it on a fresh database, see 0002), its one
row, and on each table the row cache holds, triggers that bump the row's generation.
Triggers rather than the writers' code: every writer bumps it, whatever its process, its
driver (the SQLite thread jobs write through raw sqlite3) or its tool (an operator's
``UPDATE account`` in the sqlite3 shell or psql).

PostgreSQL: constraint triggers deferred to COMMIT, so the transaction takes the row's
lock last, when it waits for nothing else: two transactions writing cached rows cannot
deadlock over it. SQLite has one writer at a time; its triggers fire per row, at once.

The table list is frozen here; tests/queue/test_row_change.py fails when
cache.CACHED_TABLES names a table without these triggers (it then needs a revision).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    "account",
    "account_level",
    "account_reputation",
    "domain",
    "domain_key",
    "limit_override",
    "warmup_start",
)
_VERBS = ("insert", "update", "delete")


def upgrade() -> None:
    bind = op.get_bind()
    if not sa.inspect(bind).has_table("row_change"):
        op.create_table(
            "row_change",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("generation", sa.BigInteger, nullable=False),
        )
    if bind.execute(sa.text("SELECT count(*) FROM row_change")).scalar() == 0:
        bind.execute(sa.text("INSERT INTO row_change (id, generation) VALUES (1, 0)"))
    if bind.dialect.name == "postgresql":
        op.execute(
            "CREATE OR REPLACE FUNCTION relay_row_change() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN UPDATE row_change SET generation = generation + 1 WHERE id = 1;"
            " RETURN NULL; END $$"
        )
        for table in TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS row_change_{table} ON {table}")
            op.execute(
                f"CREATE CONSTRAINT TRIGGER row_change_{table}"
                f" AFTER INSERT OR UPDATE OR DELETE ON {table}"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
                " EXECUTE FUNCTION relay_row_change()"
            )
        return
    for table in TABLES:
        for verb in _VERBS:
            op.execute(
                f"CREATE TRIGGER IF NOT EXISTS row_change_{table}_{verb}"
                f" AFTER {verb.upper()} ON {table} BEGIN"
                " UPDATE row_change SET generation = generation + 1 WHERE id = 1; END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS row_change_{table} ON {table}")
        op.execute("DROP FUNCTION IF EXISTS relay_row_change()")
    else:
        for table in TABLES:
            for verb in _VERBS:
                op.execute(f"DROP TRIGGER IF EXISTS row_change_{table}_{verb}")
    op.drop_table("row_change")
