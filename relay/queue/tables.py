"""The schema: one table per noun. SQLAlchemy Core, portable between SQLite and PostgreSQL.

Times are float seconds since the epoch (UTC) everywhere: one representation on both
dialects, and trivial to drive from an injected clock in tests.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# The Alembic head revision(s) of relay/migrations/versions, sorted: what these tables
# are. Store.check_schema compares the database with it without loading Alembic; a
# migration added without updating it is caught by tests/unit/test_queue_schema_head.py.
SCHEMA_HEAD: tuple[str, ...] = ("0007",)

# BIGINT on PostgreSQL, INTEGER on SQLite (where only INTEGER PRIMARY KEY is the rowid alias).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

#: Informational only. The schema version that `relay serve` checks is the Alembic
#: revision (relay/migrations, relay/queue/migrate.py): a schema change after the first
#: release is a new revision with explicit op.* changes, not an edit here.
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
    # RFC 8689 "TLS-Required: No" (the sender's, or relay's own TLS reports): delivered
    # without the recipient domain's MTA-STS policy and delivery.require_tls.
    sa.Column("tls_optional", sa.Boolean, nullable=False, server_default=sa.false()),
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

# domain_key: DKIM keys besides the one on the domain row (which is the key relay signs with).
# status: pending (rotation: published under a new selector, not yet seen in DNS) -> on the
# first passing check it swaps places with the domain row's key, which becomes retired.
# extra (dual signing, e.g. Ed25519 beside RSA): signs too, verified like the main key.
domain_key = sa.Table(
    "domain_key",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("domain_id", BigId, sa.ForeignKey("domain.id"), nullable=False, index=True),
    sa.Column("selector", sa.String(63), nullable=False),
    sa.Column("algorithm", sa.String(32), nullable=False),
    sa.Column("private_key", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("changed_at", sa.Float, nullable=False),
)

# webhook: an account-level (sender NULL: every event of the account) or sender-level
# (only events of messages with that envelope sender) callback URL. events: comma list of
# event kinds ("" = all). cursor: the highest event.id already fanned out to this webhook
# (set to the newest event at creation, so a new webhook gets no history).
webhook = sa.Table(
    "webhook",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("account_id", BigId, sa.ForeignKey("account.id"), nullable=False, index=True),
    sa.Column("sender", sa.String(512)),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("secret", sa.String(128), nullable=False),
    sa.Column("events", sa.Text, nullable=False, server_default=""),
    sa.Column("cursor", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
)

# webhook_delivery: one row per (webhook, event) to POST; the attempt record.
#   pending  due_at = when it may be tried (next retry after a failure)
#   sending  leased by lease_owner until due_at; past it any node may claim it again
#   done     the receiver answered 2xx
#   failed   retry_for ran out (or the webhook was removed); last_error says why
# A row is claimable only when no earlier event of the same message for the same webhook
# is still pending/sending: that keeps per-message order.
webhook_delivery = sa.Table(
    "webhook_delivery",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("webhook_id", BigId, nullable=False),
    sa.Column("event_id", BigId, nullable=False),
    sa.Column("message_id", sa.String(32)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("due_at", sa.Float, nullable=False),
    sa.Column("lease_owner", sa.String(255)),
    sa.Column("last_code", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("webhook_id", "event_id", name="uq_webhook_delivery"),
    sa.Index("ix_webhook_delivery_status_due", "status", "due_at"),
    sa.Index("ix_webhook_delivery_message", "webhook_id", "message_id", "event_id"),
    sa.Index("ix_webhook_delivery_created", "created_at"),  # the record retention, by age
)

# api_key: bearer tokens for the HTTP API, one account each. Only the SHA-256 of the token
# is stored (tokens are 256-bit random, so a fast hash is enough); prefix identifies a key
# in listings without revealing it.
api_key = sa.Table(
    "api_key",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("account_id", BigId, sa.ForeignKey("account.id"), nullable=False, index=True),
    sa.Column("prefix", sa.String(32), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_used_at", sa.Float),
)

# blocklist: recipients no account may send to (shared by all accounts, as in the seeds).
# Added on a recipient-class hard bounce (5.1.x, 5.2.1, "user unknown") or by hand; a row
# past expires_at is ignored and pruned. address is lower-case.
blocklist = sa.Table(
    "blocklist",
    metadata,
    sa.Column("address", sa.String(512), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),  # bounce | dsn | manual
    sa.Column("account_id", BigId),
    sa.Column("message_id", sa.String(32)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)

# suppression: (sender domain, address) pairs that may not be sent to any more: unsubscribe
# (link, one-click POST, mailto), complaint (ARF) or by hand. Per sender domain, as in the
# seeds: the address still receives from other domains. Both columns lower-case.
suppression = sa.Table(
    "suppression",
    metadata,
    sa.Column("domain", sa.String(255), primary_key=True),
    sa.Column("address", sa.String(512), primary_key=True),
    sa.Column("reason", sa.String(32), nullable=False),  # unsubscribe | complaint | manual
    sa.Column("account_id", BigId),
    sa.Column("message_id", sa.String(32)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_suppression_address", "address"),
)

# bounce_log: every hard bounce, synchronous or from a DSN, with its class (recipient |
# reputation | other); the suspension window counts recipient-class rows per account.
bounce_log = sa.Table(
    "bounce_log",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("account_id", BigId),
    sa.Column("message_id", sa.String(32)),
    sa.Column("address", sa.String(512), nullable=False),
    sa.Column("bounce_class", sa.String(16), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),  # smtp | dsn
    sa.Column("reply", sa.Text, nullable=False, server_default=""),
    sa.Column("mx", sa.String(255)),
    sa.Index("ix_bounce_log_account_at", "account_id", "at"),
    sa.Index("ix_bounce_log_at", "at"),  # the record retention deletes by age
)

# inbound_report: every mail accepted on port 25 for a bounce/unsubscribe address, kept
# whole whether or not it parsed (kind: dsn | arf | unsubscribe | unparsed): never lost.
inbound_report = sa.Table(
    "inbound_report",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("mail_from", sa.String(512), nullable=False, server_default=""),
    sa.Column("rcpt", sa.String(512), nullable=False, server_default=""),
    sa.Column("summary", sa.Text, nullable=False, server_default=""),
    sa.Column("body", sa.LargeBinary, nullable=False),
)

# account_reputation: the suspension state beside account.status (active | suspended):
# why and when it was suspended, and where the rate window restarts after a resume.
account_reputation = sa.Table(
    "account_reputation",
    metadata,
    sa.Column("account_id", BigId, sa.ForeignKey("account.id"), primary_key=True),
    sa.Column("window_reset_at", sa.Float, nullable=False, server_default="0"),
    sa.Column("suspended_at", sa.Float),
    sa.Column("suspended_reason", sa.Text),
)

# limit_override: per-account and per-domain overrides of limits.* (scope: account | domain;
# name: the account or domain name; key: e.g. daily, rate, queue_over_quota, warmup_daily).
limit_override = sa.Table(
    "limit_override",
    metadata,
    sa.Column("scope", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# limit_state: one float per key, updated read-modify-write inside one transaction;
# rate:<account_id> holds the token bucket's theoretical arrival time (GCRA).
limit_state = sa.Table(
    "limit_state",
    metadata,
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
)

# account_level: the reputation level of an account (index into limits.levels) and when it
# was last evaluated (local date, limits.timezone) / last changed.
account_level = sa.Table(
    "account_level",
    metadata,
    sa.Column("account_id", BigId, sa.ForeignKey("account.id"), primary_key=True),
    sa.Column("level", sa.Integer, nullable=False, server_default="0"),
    sa.Column("changed_at", sa.Float, nullable=False),
    sa.Column("evaluated_day", sa.String(10), nullable=False, server_default=""),
    sa.Column("why", sa.Text, nullable=False, server_default=""),
)

# warmup_start: day 1 of a sender domain's warm-up (its first sending day, local date).
warmup_start = sa.Table(
    "warmup_start",
    metadata,
    sa.Column("domain", sa.String(255), primary_key=True),
    sa.Column("first_day", sa.String(10), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
)

# stats_day: the statistics of a UTC day whose event rows the record retention deleted
# (relay/queue/rollup.py): per account (0 = none) and sender domain, one count per event
# kind, counted as the live statistics count them. day = days since the epoch.
stats_day = sa.Table(
    "stats_day",
    metadata,
    sa.Column("day", sa.Integer, primary_key=True),
    sa.Column("account_id", BigId, primary_key=True, autoincrement=False),
    sa.Column("sender_domain", sa.String(255), primary_key=True),
    sa.Column("kind", sa.String(32), primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
)

# mta_sts_policy: each recipient domain's last fetched MTA-STS policy (RFC 8461 §5.1:
# kept until it expires, so that blocking the next fetch, or a restart, cannot turn
# it off; relay/delivery/mtasts.py). Times are wall-clock seconds.
mta_sts_policy = sa.Table(
    "mta_sts_policy",
    metadata,
    sa.Column("domain", sa.String(255), primary_key=True),
    sa.Column("policy_id", sa.String(32), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("mx", sa.Text, nullable=False),  # one pattern a line
    sa.Column("max_age", sa.Integer, nullable=False),
    sa.Column("fetched_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

# delivery_hold: recipient domains an operator paused (``relay queue hold``,
# relay/queue/holds.py). Their mail stays queued, untried, until the hold ends or is
# released. ``until`` NULL: until released. Times are wall-clock seconds.
delivery_hold = sa.Table(
    "delivery_hold",
    metadata,
    sa.Column("domain", sa.String(255), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("until", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

# row_change: one row whose ``generation`` every write to a table the row cache holds
# bumps (relay/queue/cache.py CACHED_TABLES), by triggers migration 0005 creates, so a
# write from any process (the CLI, another node, the sqlite3 shell) reaches every other
# process's cache within cache.CHECK_EVERY instead of its TTL.
row_change = sa.Table(
    "row_change",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("generation", sa.BigInteger, nullable=False),
)

# tls_report_count: the TLS outcome of delivery's sessions per UTC day and recipient
# (policy) domain, for the SMTP TLS reports of RFC 8460 (relay/delivery/tlsrpt.py). One
# row per distinct outcome; ``n`` sessions had it. ``key`` is a digest of every column
# after it, so the upsert's conflict target stays short whatever the policy text.
# ``result`` "" is a success; the others are §4.3's result types. Rows of a day are
# deleted when its reports are made (queue/tlsrpt.py take_through).
tls_report_count = sa.Table(
    "tls_report_count",
    metadata,
    sa.Column("day", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("policy_domain", sa.String(255), nullable=False),
    sa.Column("policy_type", sa.String(32), nullable=False),
    sa.Column("policy", sa.Text, nullable=False),  # JSON: policy-string and mx-host
    sa.Column("result", sa.String(64), nullable=False),
    sa.Column("mx", sa.String(255), nullable=False),
    sa.Column("sending_ip", sa.String(64), nullable=False),
    sa.Column("receiving_ip", sa.String(64), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
)
