"""mta_sts_policy: MTA-STS policies kept across restarts (relay/delivery/mtasts.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

Explicit operations, created only where missing: the baseline still builds whatever
relay/queue/tables.py holds (no release has shipped), see 0002.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("mta_sts_policy"):
        return
    op.create_table(
        "mta_sts_policy",
        sa.Column("domain", sa.String(255), primary_key=True),
        sa.Column("policy_id", sa.String(32), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("mx", sa.Text, nullable=False),
        sa.Column("max_age", sa.Integer, nullable=False),
        sa.Column("fetched_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("mta_sts_policy")
