"""tls_report_count: sessions' TLS outcomes per day and domain (RFC 8460 reports).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27

Explicit operations, created only where missing: the baseline still builds whatever
relay/queue/tables.py holds (no release has shipped), see 0002.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("tls_report_count"):
        return
    op.create_table(
        "tls_report_count",
        sa.Column("day", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("policy_domain", sa.String(255), nullable=False),
        sa.Column("policy_type", sa.String(32), nullable=False),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("result", sa.String(64), nullable=False),
        sa.Column("mx", sa.String(255), nullable=False),
        sa.Column("sending_ip", sa.String(64), nullable=False),
        sa.Column("receiving_ip", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("tls_report_count")
