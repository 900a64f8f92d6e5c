"""stats_day, and indexes by age: for the record retention (relay/queue/retention.py).

stats_day keeps whole-day statistics after the retention deletes a day's event rows; the
bounce log and webhook POSTs get an index on their time, which the retention deletes by.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Explicit operations, as the baseline's rule asks. The baseline still builds whatever
relay/queue/tables.py holds (no release has shipped), so on a fresh database it has
already made these: create each only where it is missing, that is on a database
migrated to 0001 before they existed.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_INDEXES = (
    ("ix_bounce_log_at", "bounce_log", ["at"]),
    ("ix_webhook_delivery_created", "webhook_delivery", ["created_at"]),
)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for name, table, columns in _INDEXES:
        if name not in {ix["name"] for ix in inspector.get_indexes(table)}:
            op.create_index(name, table, columns)
    if inspector.has_table("stats_day"):
        return
    op.create_table(
        "stats_day",
        sa.Column("day", sa.Integer, primary_key=True),
        sa.Column(
            "account_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column("sender_domain", sa.String(255), primary_key=True),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("stats_day")
    for name, table, _ in _INDEXES:
        op.drop_index(name, table_name=table)
