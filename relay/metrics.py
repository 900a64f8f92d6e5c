"""Prometheus metrics: one registry, every metric relay exports, and the helpers the
pipeline calls where things happen.

Naming follows Prometheus conventions (base units, ``_total`` counters, ``_seconds``
histograms). Every label has a bounded value set: listener names, policy reasons (the
same ``Verdict.reason`` the SMTP reply and the event carry), recipient statuses, enhanced
status classes, and a top-N provider name for destination domains. Never an address, a
message id or an account name: those would make one series per customer.

Queue gauges are read from the store at scrape time (``QueueCollector``): the /metrics
handler refreshes one snapshot with two cheap aggregate queries, then renders.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from relay.model import WAITING_STATUSES, Outcome, RecipientStatus

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# ---------------------------------------------------------------- destination providers

# The mailbox providers that carry most consumer mail. Each maps its domains (exact match,
# lower case) to one label value; everything else is "other", so the label never has more
# values than this table has providers plus one.
_PROVIDER_DOMAINS: dict[str, tuple[str, ...]] = {
    "gmail.com": ("gmail.com", "googlemail.com"),
    "outlook.com": (
        "outlook.com",
        "hotmail.com",
        "live.com",
        "msn.com",
        "hotmail.co.uk",
        "hotmail.fr",
        "hotmail.de",
        "hotmail.it",
        "hotmail.es",
        "live.co.uk",
        "live.fr",
        "outlook.fr",
        "outlook.de",
    ),
    "yahoo.com": (
        "yahoo.com",
        "ymail.com",
        "rocketmail.com",
        "yahoo.co.uk",
        "yahoo.fr",
        "yahoo.de",
        "yahoo.co.jp",
        "yahoo.co.in",
        "yahoo.com.br",
    ),
    "aol.com": ("aol.com", "aim.com"),
    "icloud.com": ("icloud.com", "me.com", "mac.com"),
    "gmx": ("gmx.de", "gmx.net", "gmx.com", "gmx.at", "gmx.ch", "web.de"),
    "mail.ru": ("mail.ru", "inbox.ru", "list.ru", "bk.ru"),
    "yandex": ("yandex.ru", "yandex.com", "ya.ru"),
    "proton.me": ("proton.me", "protonmail.com", "pm.me"),
    "zoho.com": ("zoho.com", "zohomail.com"),
    "qq.com": ("qq.com", "foxmail.com"),
    "orange.fr": ("orange.fr", "wanadoo.fr"),
    "comcast.net": ("comcast.net",),
}
_PROVIDER_OF: dict[str, str] = {d: p for p, ds in _PROVIDER_DOMAINS.items() for d in ds}
PROVIDERS: frozenset[str] = frozenset({*_PROVIDER_DOMAINS, "other"})


def provider_of(domain: str) -> str:
    """The provider label for a recipient domain: a known provider's name, else "other"."""
    return _PROVIDER_OF.get(domain.strip().lower().rstrip("."), "other")


def status_class(outcome: Outcome) -> str:
    """The RFC 3463 class.subject of an outcome's reply ("5.1", "4.4", ...).

    Bounded: class is 2/4/5, subject 0-7 (RFC 3463 §3); anything unparseable falls back to
    the basic reply code's class (``"4.0"``) so the label stays in the same small set.
    """
    parts = outcome.reply.split()
    for token in parts[:2]:
        pieces = token.split(".")
        if len(pieces) == 3 and pieces[0] in ("2", "4", "5") and pieces[1].isdigit():
            subject = int(pieces[1])
            return f"{pieces[0]}.{subject if subject <= 7 else 0}"
    code = outcome.code
    if code is None and parts and parts[0][:3].isdigit():
        code = int(parts[0][:3])
    first = str(code)[0] if code is not None else ""
    if first not in ("2", "4", "5"):
        first = {
            RecipientStatus.DELIVERED: "2",
            RecipientStatus.BOUNCED: "5",
        }.get(outcome.status, "4")
    return f"{first}.0"


# ---------------------------------------------------------------- SMTP (inbound)

SMTP_CONNECTIONS = Counter(
    "relay_smtp_connections_total",
    "SMTP connections by listener; outcome=refused when the per-IP limit turned them away",
    ["listener", "outcome"],
    registry=REGISTRY,
)
SMTP_TLS = Counter(
    "relay_smtp_tls_sessions_total",
    "Inbound SMTP sessions that are encrypted, by listener and mode (starttls, implicit)",
    ["listener", "mode"],
    registry=REGISTRY,
)
SMTP_AUTH = Counter(
    "relay_smtp_auth_total",
    "SMTP AUTH attempts by listener and outcome (success, failure, throttled)",
    ["listener", "outcome"],
    registry=REGISTRY,
)
SMTP_TRANSACTIONS = Counter(
    "relay_smtp_transactions_total",
    "SMTP transactions that reached the end of DATA, by listener and outcome"
    " (queued, refused, failed)",
    ["listener", "outcome"],
    registry=REGISTRY,
)
SMTP_TRANSACTION_SECONDS = Histogram(
    "relay_smtp_transaction_duration_seconds",
    "Time from the end of DATA to the reply (parse, policy, durable accept)",
    ["listener"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
MESSAGES_ACCEPTED = Counter(
    "relay_messages_accepted_total",
    "Messages durably queued (250 after DATA), by listener",
    ["listener"],
    registry=REGISTRY,
)
RECIPIENTS_ACCEPTED = Counter(
    "relay_recipients_accepted_total",
    "Recipients of durably queued messages, by listener",
    ["listener"],
    registry=REGISTRY,
)
MESSAGES_REFUSED = Counter(
    "relay_messages_refused_total",
    "Policy refusals at MAIL, RCPT or DATA, by listener and reason (Verdict.reason)",
    ["listener", "reason"],
    registry=REGISTRY,
)

# ---------------------------------------------------------------- delivery (outbound)

DELIVERY_RECIPIENTS = Counter(
    "relay_delivery_recipients_total",
    "Recipient delivery attempt outcomes by status (delivered, deferred, bounced, expired),"
    " RFC 3463 class.subject and destination provider",
    ["status", "class", "provider"],
    registry=REGISTRY,
)
DELIVERY_LATENCY = Histogram(
    "relay_delivery_latency_seconds",
    "Time from accept to delivery of a recipient, by destination provider",
    ["provider"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 72 * 3600),
    registry=REGISTRY,
)
DELIVERY_CONNECTIONS = Counter(
    "relay_delivery_connections_total",
    "Outbound SMTP sessions opened to a destination, by whether STARTTLS was used",
    ["tls"],
    registry=REGISTRY,
)
DELIVERY_SESSIONS_REUSED = Counter(
    "relay_delivery_sessions_reused_total",
    "Delivery batches sent over a session kept open from an earlier batch (connection cache)",
    registry=REGISTRY,
)
DNS_FAILURES = Counter(
    "relay_dns_failures_total",
    "MX/address lookups that failed, by kind (temporary: SERVFAIL/timeout;"
    " permanent: NXDOMAIN/null MX)",
    ["kind"],
    registry=REGISTRY,
)

# ---------------------------------------------------------------- other areas

WEBHOOK_DELIVERIES = Counter(
    "relay_webhook_deliveries_total",
    "Webhook POSTs by outcome (delivered, retried, failed)",
    ["outcome"],
    registry=REGISTRY,
)
WARMUP_HOLDS = Counter(
    "relay_warmup_holds_total",
    "Recipients held back by a domain's warm-up budget",
    registry=REGISTRY,
)
QUOTA_REFUSALS = Counter(
    "relay_quota_refusals_total",
    "Submissions refused by a sending quota or rate limit, by quota name",
    ["quota"],
    registry=REGISTRY,
)
DELIVERY_SUSPENDED = Counter(
    "relay_delivery_suspended_total",
    "Recipients deferred without a connection attempt: their destination was suspended "
    "after no MX host of it could be reached (delivery.destination_suspend)",
    registry=REGISTRY,
)
CONCURRENCY_LOWERED = Counter(
    "relay_delivery_concurrency_lowered_total",
    "Times a destination's sessions at once were lowered because it refused one "
    "(delivery.concurrency_feedback)",
    registry=REGISTRY,
)
MTA_STS = Counter(
    "relay_delivery_mta_sts_total",
    "Delivery sessions under a recipient domain's MTA-STS policy: enforced (verified TLS "
    "to a listed MX), refused (no MX listed: deferred), testing_mismatch (testing mode, "
    "an MX not listed)",
    ["outcome"],
    registry=REGISTRY,
)
TLS_SESSIONS = Counter(
    "relay_delivery_tls_sessions_total",
    "New delivery sessions by TLS outcome as RFC 8460 reports name it (success, "
    "starttls-not-supported, certificate-*, validation-failure); counted with "
    "tls_reports.enabled",
    ["result"],
    registry=REGISTRY,
)
TLS_REPORTS = Counter(
    "relay_tls_reports_total",
    "SMTP TLS reports (RFC 8460) by transport (https, mailto) and outcome (sent, queued, "
    "failed; dropped: a POST given up after 24 h of retries)",
    ["transport", "outcome"],
    registry=REGISTRY,
)
BODIES_PURGED = Counter(
    "relay_retention_bodies_purged_total",
    "Message bodies emptied by the retention sweep (every recipient final, older than "
    "retention.bodies)",
    registry=REGISTRY,
)
RECORDS_DELETED = Counter(
    "relay_retention_rows_deleted_total",
    "Rows deleted by the record retention (older than retention.records), by table",
    ["table"],
    registry=REGISTRY,
)
RELOADS = Counter(
    "relay_config_reloads_total",
    "SIGHUP config reloads by outcome (applied, rejected)",
    ["outcome"],
    registry=REGISTRY,
)


# ---------------------------------------------------------------- call sites

# labels() validates, takes a lock and builds its key on every call (~1 us); the call sites
# that run per message take each labelled child from this dict instead. Label values are
# bounded (see the module docstring), so it stays small.
_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def _child(metric: Counter | Histogram, *values: str) -> Any:
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def smtp_connection(listener: str, tls: bool, starttls: bool) -> None:
    """A session started (or, with starttls, upgraded to TLS)."""
    if starttls:
        _child(SMTP_TLS, listener, "starttls").inc()
        return
    _child(SMTP_CONNECTIONS, listener, "accepted").inc()
    if tls:
        _child(SMTP_TLS, listener, "implicit").inc()


def smtp_connection_refused(listener: str) -> None:
    SMTP_CONNECTIONS.labels(listener, "refused").inc()


def smtp_auth(listener: str, reply: str) -> None:
    """Count an AUTH decision from the reply relay sends (235 / 454 / 535)."""
    if reply.startswith("2"):
        outcome = "success"
    elif reply.startswith("454"):
        outcome = "throttled"
    else:
        outcome = "failure"
    SMTP_AUTH.labels(listener, outcome).inc()


def smtp_transaction(listener: str, outcome: str, started: float, recipients: int = 0) -> None:
    """End of DATA: outcome is queued, refused or failed; started is time.monotonic()."""
    _child(SMTP_TRANSACTIONS, listener, outcome).inc()
    _child(SMTP_TRANSACTION_SECONDS, listener).observe(max(0.0, time.monotonic() - started))
    if outcome == "queued":
        _child(MESSAGES_ACCEPTED, listener).inc()
        _child(RECIPIENTS_ACCEPTED, listener).inc(recipients)


def smtp_refused(listener: str, reason: str) -> None:
    MESSAGES_REFUSED.labels(listener, reason).inc()


def delivery_outcome(outcome: Outcome, rcpt_domain: str, created_at: float, now: float) -> None:
    """One recipient's attempt result; delivered ones feed the accept-to-delivery latency."""
    provider = provider_of(rcpt_domain)
    _child(DELIVERY_RECIPIENTS, outcome.status.value, status_class(outcome), provider).inc()
    if outcome.status is RecipientStatus.DELIVERED:
        _child(DELIVERY_LATENCY, provider).observe(max(0.0, now - created_at))


def delivery_connection(tls: bool) -> None:
    DELIVERY_CONNECTIONS.labels("yes" if tls else "no").inc()


def delivery_session_reused() -> None:
    DELIVERY_SESSIONS_REUSED.inc()


def delivery_suspended(count: int) -> None:
    DELIVERY_SUSPENDED.inc(count)


def concurrency_lowered() -> None:
    CONCURRENCY_LOWERED.inc()


def mta_sts(outcome: str) -> None:
    MTA_STS.labels(outcome).inc()


def tls_session(result: str) -> None:
    TLS_SESSIONS.labels(result or "success").inc()


def tls_report(transport: str, outcome: str) -> None:
    TLS_REPORTS.labels(transport, outcome).inc()


def dns_failure(kind: str) -> None:
    DNS_FAILURES.labels(kind).inc()


def webhook_delivery(outcome: str) -> None:
    WEBHOOK_DELIVERIES.labels(outcome).inc()


def warmup_hold(count: int = 1) -> None:
    WARMUP_HOLDS.inc(count)


def quota_refusal(quota: str) -> None:
    QUOTA_REFUSALS.labels(quota).inc()


# ---------------------------------------------------------------- queue gauges

#: statuses the queue gauge reports (final ones are history, not queue)
QUEUE_STATUSES: tuple[str, ...] = tuple(s.value for s in WAITING_STATUSES)


class QueueCollector:
    """Queue size by status and age of the oldest waiting recipient.

    ``collect()`` is synchronous (prometheus-client calls it while rendering), so the
    async /metrics handler calls ``refresh()`` with fresh numbers from the store first.
    Before the first refresh, or when the database is down, no queue samples are emitted
    (an absent series is honest; a stale zero would look like an empty queue).
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] | None = None
        self.oldest_age: float | None = None
        self.scrape_ok = False

    def refresh(self, counts: dict[str, int] | None, oldest: float | None, now: float) -> None:
        self.scrape_ok = counts is not None
        self.counts = counts
        self.oldest_age = max(0.0, now - oldest) if oldest is not None else 0.0

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily(
            "relay_queue_scrape_ok",
            "1 when the queue gauges below were read from the database for this scrape",
        )
        up.add_metric([], 1.0 if self.scrape_ok else 0.0)
        yield up
        if self.counts is None:
            return
        size = GaugeMetricFamily(
            "relay_queue_recipients",
            "Recipients waiting in the queue, by status",
            labels=["status"],
        )
        for status in QUEUE_STATUSES:
            size.add_metric([status], float(self.counts.get(status, 0)))
        yield size
        age = GaugeMetricFamily(
            "relay_queue_oldest_age_seconds",
            "Age of the oldest recipient not yet delivered, bounced or expired (0 if none)",
        )
        age.add_metric([], float(self.oldest_age or 0.0))
        yield age


QUEUE = QueueCollector()
REGISTRY.register(QUEUE)


class SuspendedCollector:
    """relay_delivery_destinations_suspended, read from the delivery worker at scrape time
    (main process only; a collector, as the queue gauges, because a Gauge with a function
    cannot be summed across processes)."""

    def __init__(self) -> None:
        self.count: Callable[[], int] | None = None

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        g = GaugeMetricFamily(
            "relay_delivery_destinations_suspended",
            "Recipient domains whose delivery is suspended now (no MX host reachable)",
        )
        g.add_metric([], float(self.count() if self.count is not None else 0))
        yield g


SUSPENDED = SuspendedCollector()
REGISTRY.register(SUSPENDED)


def render() -> bytes:
    """The text exposition of every relay metric."""
    if _MULTIPROC_DIR is None:
        return bytes(generate_latest(REGISTRY))
    # Listener processes (relay/processes.py): counters and histograms are summed over the
    # files every process writes (a dead process's counts stay, so no counter goes back);
    # queue gauges come from the database; process_* describe the main process.
    summed = CollectorRegistry()
    multiprocess.MultiProcessCollector(summed, _MULTIPROC_DIR)  # type: ignore[no-untyped-call]
    return bytes(generate_latest(summed)) + bytes(generate_latest(_LOCAL))


_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
_LOCAL = CollectorRegistry()
if _MULTIPROC_DIR is not None:
    ProcessCollector(registry=_LOCAL)
    PlatformCollector(registry=_LOCAL)
    _LOCAL.register(QUEUE)
    _LOCAL.register(SUSPENDED)
