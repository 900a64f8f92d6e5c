"""delivery_hold: recipient domains an operator paused (relay/queue/holds.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

Explicit operations, created only where missing: the baseline still builds whatever
relay/queue/tables.py holds (no release has shipped), see 0002.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("delivery_hold"):
        return
    op.create_table(
        "delivery_hold",
        sa.Column("domain", sa.String(255), primary_key=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("until", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("delivery_hold")
