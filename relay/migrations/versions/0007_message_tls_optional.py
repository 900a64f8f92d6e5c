"""message.tls_optional: RFC 8689 "TLS-Required: No" (delivery without TLS demands).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27

Added only where missing: the baseline still builds whatever relay/queue/tables.py
holds (no release has shipped), see 0002. SQLite adds a NOT NULL column with a constant
default in place (no table rebuild).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("message")}
    if "tls_optional" in columns:
        return
    op.add_column(
        "message",
        sa.Column("tls_optional", sa.Boolean, nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    with op.batch_alter_table("message") as batch:
        batch.drop_column("tls_optional")
