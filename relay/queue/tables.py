"""The schema: one table per noun. SQLAlchemy Core, portable between SQLite and PostgreSQL.

Times are float seconds since the epoch (UTC) everywhere: one representation on both
dialects, and trivial to drive from an injected clock in tests.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# BIGINT on PostgreSQL, INTEGER on SQLite (where only INTEGER PRIMARY KEY is the rowid alias).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

#: Bumped whenever the schema changes; `relay serve` refuses a database at another version.
SCHEMA_VERSION = 1

schema_meta = sa.Table(
    "schema_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# account.status: active | suspended (see model.AccountStatus).
# settings: JSON object of per-account overrides (limits, tracking, ...).
account = sa.Table(
    "account",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default="active"),
    sa.Column("settings", sa.Text, nullable=False, server_default="{}"),
    sa.Column("created_at", sa.Float, nullable=False),
)

# domain.status: pending -> verified <-> failed (see model.DomainStatus). A domain may send
# only while verified. dkim_private_key is PEM text.
domain = sa.Table(
    "domain",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("account_id", BigId, sa.ForeignKey("account.id"), nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("dkim_selector", sa.String(63), nullable=False),
    sa.Column("dkim_private_key", sa.Text, nullable=False),
    sa.Column("dkim_algorithm", sa.String(32), nullable=False, server_default="rsa-sha256"),
    sa.Column("warmup", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("checks", sa.Text, nullable=False, server_default="{}"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("verified_at", sa.Float),
    sa.Column("last_check_at", sa.Float),
)

# message: the accepted bytes (CRLF line endings, headers normalised) and the envelope.
message = sa.Table(
    "message",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("account_id", BigId, sa.ForeignKey("account.id"), nullable=False, index=True),
    sa.Column("mail_from", sa.String(512), nullable=False),
    sa.Column("header_from", sa.String(512), nullable=False, server_default=""),
    sa.Column("subject", sa.Text, nullable=False, server_default=""),
    sa.Column("message_id_header", sa.String(998), nullable=False, server_default=""),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("client", sa.String(255), nullable=False, server_default=""),
    sa.Column("node_id", sa.String(255), nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
)

# recipient.status (model.RecipientStatus):
#   queued   due_at = when it may first be tried
#   held     due_at = when a budget may free up (warm-up, quota)
#   sending  leased by lease_owner until due_at; past it any worker may claim the row again
#   deferred due_at = next retry (doubling backoff with jitter)
#   delivered | bounced | expired | deleted: final, due_at unused
# The (status, due_at) index is what makes claiming cost the same at any queue depth.
recipient = sa.Table(
    "recipient",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(32), sa.ForeignKey("message.id"), nullable=False),
    sa.Column("address", sa.String(512), nullable=False),
    sa.Column("rcpt_domain", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("due_at", sa.Float, nullable=False),
    sa.Column("lease_owner", sa.String(255)),
    sa.Column("last_reply", sa.Text),
    sa.Column("last_mx", sa.String(255)),
    sa.Column("last_tls", sa.Boolean),
    sa.Column("reason", sa.String(64)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_recipient_status_due", "status", "due_at"),
    sa.Index("ix_recipient_message", "message_id"),
    sa.Index("ix_recipient_address", "address"),
)

# event: the outbox. Every state change writes its row in the transaction that makes the
# change, so events never disagree with the queue. data is a JSON object.
event = sa.Table(
    "event",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("account_id", BigId, index=True),
    sa.Column("message_id", sa.String(32), index=True),
    sa.Column("recipient", sa.String(512)),
    sa.Column("data", sa.Text, nullable=False, server_default="{}"),
    sa.Column("node_id", sa.String(255), nullable=False, server_default=""),
)

# counter: fixed-window counts (auth failures per IP, rate windows, daily totals).
# key names the thing counted, window_start the window; rows past expires_at are pruned.
counter = sa.Table(
    "counter",
    metadata,
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("window_start", sa.Float, primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)
