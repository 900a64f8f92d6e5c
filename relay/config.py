"""The only reader of the YAML config file and of RELAY_* environment variables.

Every key is validated up front; a bad value is reported with its dotted path
(``delivery.port: expected a port number 1-65535, got 'not-a-port'``) so the operator
knows exactly which line to fix. ``config.example.yaml`` documents every key.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from relay.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/relay/relay.yaml"


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url: str = "sqlite+aiosqlite:////var/lib/relay/relay.db"
    pool_size: int = 10
    statement_timeout: float = 30.0
    # Seconds this process keeps slow-changing rows (accounts, domains, limit overrides,
    # reputation levels) between reads: a backstop, since other processes' changes show
    # within cache.CHECK_EVERY (0.5 s) through row_change's generation.
    cache_seconds: float = 5.0

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class ListenConfig:
    submission: HostPort | None = HostPort("127.0.0.1", 587)
    smtps: HostPort | None = HostPort("127.0.0.1", 465)
    smtp: HostPort | None = None
    # CIDR -> account name: clients on these networks send as that account without AUTH,
    # on every listener (like Postfix mynetworks); see relay/smtp/trusted.py.
    trusted_networks: Mapping[str, str] = field(default_factory=dict)
    # SMTP listener processes (SO_REUSEPORT, the kernel spreads connections over them);
    # 0: the listeners run in the main process beside delivery. See relay/processes.py.
    processes: int = 0


@dataclass(frozen=True, slots=True)
class HTTPConfig:
    listen: HostPort | None = HostPort("127.0.0.1", 8025)
    public_url: str | None = None


@dataclass(frozen=True, slots=True)
class DNSConfig:
    nameservers: tuple[HostPort, ...] = ()
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class SMTPConfig:
    # 4 MB: the seeds' maximum message size including attachments.
    max_message_size: int = 4 * 1024 * 1024
    max_recipients: int = 50
    timeout: float = 300.0
    # RFC 4954 §4 leaves throttling to the server; 5 failures in 5 minutes is fail2ban's
    # common default for SMTP AUTH.
    auth_fail_limit: int = 5
    auth_fail_window: float = 300.0
    max_connections_per_ip: int = 100
    # Postfix's queue_minfree: below this much free space where the SQLite queue lives,
    # MAIL gets 452 4.3.1 (RFC 1870 §6.2, RFC 3463 X.3.1) instead of a body the disk
    # cannot take, and what is queued can still drain: the write-ahead log alone grows
    # to 16 MB (queue/checkpoint.py), and each delivery writes its outcome. A declared
    # SIZE must fit above it too. 0: no check. PostgreSQL's disk is the server's.
    min_free_space: int = 50 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class DKIMConfig:
    selector: str = "relay"
    key_bits: int = 2048


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    port: int = 25
    routes: Mapping[str, HostPort] = field(default_factory=dict)
    require_tls: bool = False
    helo_name: str = field(default_factory=socket.getfqdn)
    concurrency: int = 50
    # A destination's due messages are split into sessions of at most this many, run in
    # parallel (bounded by concurrency): reuse without one slow session holding them all.
    messages_per_connection: int = 20
    # Sessions to one destination (recipient domain) at once: Postfix's
    # default_destination_concurrency_limit. Big receivers answer more with 421.
    destination_concurrency: int = 20
    # A destination none of whose MX hosts answered, and none of whose sessions opened
    # for retry_first, is not tried again for retry_first: its mail is deferred at once
    # (relay/delivery/destinations.py), as Postfix's dead destination waits out its
    # minimal_backoff_time. false: always try.
    destination_suspend: bool = True
    # A destination that refuses a session (421, or no MX host answered) while k sessions
    # to it are open gets at most max(1, k) at once, growing back by one per k messages
    # it takes: Postfix's destination concurrency feedback (relay/delivery/destinations.py).
    concurrency_feedback: bool = True
    # MTA-STS (RFC 8461, relay/delivery/mtasts.py): a recipient domain that publishes a
    # policy in enforce mode gets its mail only over TLS with a certificate valid for an
    # MX host its policy lists. On by default, as KumoMTA has it. The policy's HTTPS port
    # is configurable for tests (as delivery.port is); tls_ca_file adds trusted CAs to
    # the system's for that check (a private CA, or a test's).
    mta_sts: bool = True
    mta_sts_port: int = 443
    tls_ca_file: str | None = None
    # Recipients one node holds leased at once, delivering or waiting for their
    # destination: Postfix's active queue (qmgr_message_recipient_limit, 20,000).
    active_limit: int = 10_000
    # Postfix's smtp_connection_cache_time_limit / smtp_connection_reuse_time_limit: a
    # session is kept idle this long for the next batch to the same MX hosts (0: QUIT
    # after each batch), and is not reused once this old.
    connection_cache_time: float = 2.0
    connection_reuse_time: float = 300.0
    batch_size: int = 200
    poll_interval: float = 1.0
    # New mail wakes delivery, which waits this long before it claims, so that mail
    # accepted meanwhile goes out with it: one claim transaction, one DKIM trip to a
    # thread and shared sessions instead of one of each per message, and fewer writes
    # contending with the accepts' commits. At 300 msg/s 0.05 s cut delivery's CPU per
    # message from 2.2 to 1.4 ms (issue 9). 0.2 s saved no more there, and its larger
    # bursts of delivery work doubled the accepts' p99. A message waits at most this.
    claim_delay: float = 0.05
    lease_seconds: float = 120.0
    connect_timeout: float = 30.0
    command_timeout: float = 120.0
    # RFC 5321 §4.5.4.1: retry no sooner than 30 minutes is the classic advice; for a
    # sending service a 5-minute first retry doubling to 1 hour is what peers use.
    retry_first: float = 300.0
    retry_max: float = 3600.0
    # 72 h: the seeds' retry window for temporarily refused mail.
    max_age: float = 72 * 3600.0
    dsn: bool = False


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    # Postfix deletes a queue file once its last recipient is done; Postal keeps raw
    # messages for a while so that an operator can still look at what went out. A body
    # is dropped this long after acceptance, once every recipient is final (the message,
    # recipient and event rows stay: status, events and statistics read them). A week is
    # past the 72 h max_age, so a message is normally final long before.
    purge_bodies: bool = True
    bodies: float = 7 * 86400.0
    # The records (message, recipients, events, webhook POSTs; refusals, the bounce log,
    # inbound reports) go after a quarter, as Postal's message retention does after its
    # days: enough to answer "what happened to my mail to X last month", bounded growth
    # (~0.55 KB a message) after. Statistics of those days stay, counted per day.
    purge_records: bool = True
    records: float = 90 * 86400.0
    sweep_interval: float = 300.0


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    grace_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "keyvalue"


@dataclass(frozen=True, slots=True)
class DomainsConfig:
    """Sender domains: the DNS records relay asks for and how it checks them."""

    # SPF: ``include:<spf_include>`` when set, else ``ip4:``/``ip6:`` of outbound_ips, else
    # ``a:<hostname>`` (the host relay sends from when nothing else is known).
    spf_include: str | None = None
    outbound_ips: tuple[str, ...] = ()
    # MX target for bounces; None means the relay's ``hostname``.
    bounce_host: str | None = None
    # Records that must pass for a domain to be verified; the others are recommended.
    required: tuple[str, ...] = ("dkim", "spf", "mx")
    # 6 h: how often verified and failed domains are re-checked by the server.
    recheck_interval: float = 6 * 3600.0
    # 10: the seeds' number of sender domains per account (account setting max_domains wins).
    max_domains_per_account: int = 10
    # rsa (2048-bit, dkim.key_bits) | ed25519 (RFC 8463) | both (dual signing)
    dkim_algorithm: str = "rsa"


@dataclass(frozen=True, slots=True)
class ReputationConfig:
    """Blocklist, unsubscribe, bounce/complaint processing and automatic suspension."""

    # 14 days: the seeds' blocklist period (they also mention 180; configurable).
    blocklist_days: float = 14.0
    # The seeds: sending stops "when 8% of your emails are blocklisted"; 0.1% complaints
    # is the Gmail/Yahoo bulk-sender ceiling.
    bounce_threshold: float = 0.08
    complaint_threshold: float = 0.001
    window_seconds: float = 24 * 3600.0
    # Rates over fewer recipients than this say nothing: no suspension below it.
    min_sample: int = 100
    # Domain of the VERP envelope sender bounce+TOKEN@...; None: the relay's hostname.
    bounce_domain: str | None = None
    # Base URL of the unsubscribe link; None: http.public_url, else http://<http.listen>.
    public_url: str | None = None
    # HMAC key of unsubscribe/VERP tokens (env RELAY_SECRET); None: one is generated and
    # kept in the database so every node and restart agree.
    secret: str | None = None
    list_unsubscribe: bool = True
    verp: bool = True


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # A dedicated address for GET /metrics (it is on http.listen too); null = none.
    listen: HostPort | None = None


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    """Outgoing webhook delivery (relay/events/webhooks.py)."""

    # 24 h: how long an event POST is retried on timeouts and non-2xx before it is dropped.
    retry_for: float = 24 * 3600.0
    timeout: float = 10.0
    # POSTs in flight at once, over all receivers: a slow receiver holds at most this many.
    concurrency: int = 10
    retry_first: float = 10.0
    retry_max: float = 3600.0
    poll_interval: float = 0.5
    lease_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class TLSReportsConfig:
    """SMTP TLS reports (RFC 8460, relay/delivery/tlsreports.py) to the recipient domains
    that publish ``_smtp._tls``: a daily count of delivery's TLS sessions to them."""

    enabled: bool = False
    # The mailto: reports' From and the account they are queued under. The address's
    # domain should be a verified sender domain of that account: its DKIM key signs the
    # report, which §3 asks of email reports. Both null: reports go only to https: URIs.
    sender: str | None = None
    account: str | None = None
    # §4.4 organization-name and contact-info; null: hostname and the sender.
    organization: str | None = None
    contact: str | None = None
    # A day's reports are made this long after it ends (UTC), so that every node has
    # added its counts (they flush each minute); §5.1 asks for them within the next day.
    send_after: float = 900.0
    # Each HTTPS POST of a report (a failed one is retried for 24 h, §5.5).
    http_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class APIConfig:
    """The HTTP API (relay/http/api.py)."""

    # Bearer key for admin endpoints (env RELAY_ADMIN_KEY); None: admin routes are off.
    admin_key: str | None = None
    # Request bodies above this get 413 with code request_too_large.
    max_body: int = 64 * 1024
    page_size: int = 100


@dataclass(frozen=True, slots=True)
class TrackingConfig:
    """Open tracking: a 1x1 pixel in HTML parts (accounts may turn it off)."""

    enabled: bool = True
    # Base URL of the pixel; None: http.public_url, else http://<http.listen>.
    public_url: str | None = None
    # Opens this soon after delivery are prefetchers/scanners, not people.
    bot_window: float = 10.0


@dataclass(frozen=True, slots=True)
class WarmupStep:
    """One row of the warm-up table: days first..last, budgets interpolated inside."""

    first_day: int
    last_day: int
    daily_from: int
    daily_to: int
    hourly_from: int | None
    hourly_to: int | None


# The seeds' "Email warm-up (vital)" table; after day 30 the daily budget doubles.
DEFAULT_WARMUP: tuple[WarmupStep, ...] = (
    WarmupStep(1, 1, 1000, 1000, 200, 200),
    WarmupStep(2, 2, 1500, 1500, 200, 200),
    WarmupStep(3, 3, 2000, 2000, 400, 400),
    WarmupStep(4, 4, 3000, 3000, 400, 400),
    WarmupStep(5, 5, 4500, 4500, 500, 500),
    WarmupStep(6, 10, 6000, 8000, 500, 1000),
    WarmupStep(11, 15, 8000, 10000, 800, 2000),
    WarmupStep(16, 20, 10000, 15000, 1000, 3000),
    WarmupStep(21, 30, 15000, 25000, 3000, 5000),
)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Sending limits (issue 4); every number is the seeds' default, overridable per
    account (and per domain for warm-up) with `relay limits set`."""

    max_subject: int = 998  # RFC 5322 §2.1.1 line limit; the seeds' subject limit
    rate: int = 20  # recipients per second per account (seeds)
    daily: int = 500  # recipients per rolling 24 h for a new account (seeds)
    levels: tuple[int, ...] = (500, 2000, 10000, 50000, 300000)
    hard_ceiling: int = 300000  # seeds' FailedOperation.ExceedSendLimit
    level_window_days: int = 7
    level_min_usage: float = 0.8
    level_max_bounce_rate: float = 0.05
    level_max_complaint_rate: float = 0.001
    per_recipient_hourly: int = 10  # seeds: max sends to the same address per hour
    queue_over_quota: bool = False
    timezone: str = "UTC"
    warmup: tuple[WarmupStep, ...] = DEFAULT_WARMUP
    scheduler_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class Config:
    node_id: str = field(default_factory=socket.gethostname)
    hostname: str = field(default_factory=socket.getfqdn)
    # uvloop (libuv, in C) or Python's own asyncio loop, in every relay serve process.
    # uvloop took ~15% off the listener's CPU per message at 300 msg/s (one loop turn per
    # SMTP command there) and the accept p99 from ~29 to ~18 ms (issue 9); "asyncio" is
    # the fallback should a platform lack it.
    event_loop: str = "uvloop"
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    api: APIConfig = field(default_factory=APIConfig)
    tls_reports: TLSReportsConfig = field(default_factory=TLSReportsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    path: str | None = None


# --------------------------------------------------------------------------- parsing


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


def parse_hostport(value: object, default_port: int | None = None) -> HostPort:
    """Parse ``host:port`` (``[v6]:port``; a bare host when a default port exists)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected host:port, got {value!r}")
    text = value.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"expected [ipv6]:port, got {value!r}")
        host, rest = text[1:end], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not port_text:
        if default_port is None:
            raise ValueError(f"expected host:port, got {value!r}")
        return HostPort(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected host:port with a port 1-65535, got {value!r}")
    if not host:
        raise ValueError(f"expected host:port, got {value!r}")
    return HostPort(host, int(port_text))


def _convert(path: str, value: object, default: object, problems: _Problems) -> object:
    """Convert a YAML value to the type of ``default``; record a problem on failure."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        problems.add(path, f"expected true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            if path.endswith("port") and not 0 < value < 65536:
                problems.add(path, f"expected a port number 1-65535, got {value!r}")
            return value
        what = "a port number 1-65535" if path.endswith("port") else "a whole number >= 0"
        problems.add(path, f"expected {what}, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
        problems.add(path, f"expected a number of seconds >= 0, got {value!r}")
    elif isinstance(default, str):
        if value is None:
            return default  # null means "the default" (hostname, FQDN, ...)
        if isinstance(value, str) and value:
            return value
        problems.add(path, f"expected a non-empty string, got {value!r}")
    return default


_HOSTPORT_FIELDS = {
    "listen.submission",
    "listen.smtps",
    "listen.smtp",
    "http.listen",
    "metrics.listen",
}
_OPTIONAL_STR_FIELDS = {"tls.cert", "tls.key", "http.public_url"}
_OPTIONAL_STR_FIELDS |= {"api.admin_key", "tracking.public_url"}
_OPTIONAL_STR_FIELDS |= {"tls_reports.sender", "tls_reports.account"}
_OPTIONAL_STR_FIELDS |= {"tls_reports.organization", "tls_reports.contact"}
_OPTIONAL_STR_FIELDS |= {"domains.spf_include", "domains.bounce_host", "delivery.tls_ca_file"}
_OPTIONAL_STR_FIELDS |= {
    "reputation.bounce_domain",
    "reputation.public_url",
    "reputation.secret",
}


def _build(cls: type[Any], data: object, path: str, problems: _Problems) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.add(path or "(top level)", f"expected a mapping, got {data!r}")
        return cls()
    defaults = cls()
    kwargs: dict[str, object] = {}
    known = {f.name for f in dataclasses.fields(cls)} - {"path"}
    for key in data:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            problems.add(where, f"unknown key (known: {', '.join(sorted(known))})")
    for f in dataclasses.fields(cls):
        if f.name not in data or f.name == "path":
            continue
        value = data[f.name]
        where = f"{path}.{f.name}" if path else f.name
        default = getattr(defaults, f.name)
        if where in _HOSTPORT_FIELDS:
            if value is None:
                kwargs[f.name] = None
                continue
            try:
                kwargs[f.name] = parse_hostport(value)
            except ValueError as exc:
                problems.add(where, str(exc))
        elif where in _OPTIONAL_STR_FIELDS:
            if value is None or (isinstance(value, str) and value):
                kwargs[f.name] = value
            else:
                problems.add(where, f"expected a path string or null, got {value!r}")
        elif where == "dns.nameservers":
            kwargs[f.name] = _nameservers(where, value, problems)
        elif where == "delivery.routes":
            kwargs[f.name] = _routes(where, value, problems)
        elif where == "listen.trusted_networks":
            kwargs[f.name] = _trusted_networks(where, value, problems)
        elif where in ("domains.outbound_ips", "domains.required"):
            kwargs[f.name] = _domains_list(where, value, problems)
        elif where == "limits.levels":
            kwargs[f.name] = _levels(where, value, problems)
        elif where == "limits.warmup":
            kwargs[f.name] = _warmup(where, value, problems)
        elif dataclasses.is_dataclass(default):
            kwargs[f.name] = _build(type(default), value, where, problems)
        else:
            kwargs[f.name] = _convert(where, value, default, problems)
    return cls(**kwargs)


def _nameservers(path: str, value: object, problems: _Problems) -> tuple[HostPort, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.add(path, f"expected a list of host or host:port, got {value!r}")
        return ()
    out = []
    for i, item in enumerate(value):
        try:
            out.append(parse_hostport(item, default_port=53))
        except ValueError as exc:
            problems.add(f"{path}[{i}]", str(exc))
    return tuple(out)


def _routes(path: str, value: object, problems: _Problems) -> dict[str, HostPort]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping of domain to host:port, got {value!r}")
        return {}
    out: dict[str, HostPort] = {}
    for domain, target in value.items():
        try:
            out[str(domain).lower().rstrip(".")] = parse_hostport(target, default_port=25)
        except ValueError:
            problems.add(f'{path}."{domain}"', f"expected host:port, got {target!r}")
    return out


def _trusted_networks(path: str, value: object, problems: _Problems) -> dict[str, str]:
    import ipaddress

    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping of network (CIDR) to account, got {value!r}")
        return {}
    out: dict[str, str] = {}
    for cidr, account_name in value.items():
        try:
            net = ipaddress.ip_network(str(cidr).strip(), strict=False)
        except ValueError:
            problems.add(f'{path}."{cidr}"', f"expected a network like 127.0.0.0/8, got {cidr!r}")
            continue
        if not isinstance(account_name, str) or not account_name:
            problems.add(f'{path}."{cidr}"', f"expected an account name, got {account_name!r}")
            continue
        out[str(net)] = account_name
    return out


_DOMAIN_RECORDS = ("dkim", "spf", "mx", "dmarc")


def _domains_list(path: str, value: object, problems: _Problems) -> tuple[str, ...]:
    import ipaddress

    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add(path, f"expected a list of strings, got {value!r}")
        return ()
    out = []
    for i, item in enumerate(value):
        if path == "domains.required":
            if item.lower() not in _DOMAIN_RECORDS:
                problems.add(f"{path}[{i}]", f"expected one of {_DOMAIN_RECORDS}, got {item!r}")
            out.append(item.lower())
            continue
        try:
            out.append(str(ipaddress.ip_address(item.strip())))
        except ValueError:
            problems.add(f"{path}[{i}]", f"expected an IPv4 or IPv6 address, got {item!r}")
    return tuple(out)


def _levels(path: str, value: object, problems: _Problems) -> tuple[int, ...]:
    ok = isinstance(value, list) and value and all(isinstance(v, int) and v > 0 for v in value)
    if not ok or not isinstance(value, list) or value != sorted(value):
        problems.add(path, f"expected an increasing list of daily quotas, got {value!r}")
        return LimitsConfig().levels
    return tuple(value)


def _range(text: object) -> tuple[int, int] | None:
    """``1000`` or ``"6000-8000"`` -> (lo, hi); None when not that shape."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text, text
    if isinstance(text, str):
        lo, _, hi = text.replace(",", "").replace("–", "-").partition("-")
        if lo.strip().isdigit() and (not hi or hi.strip().isdigit()):
            return int(lo), int(hi or lo)
    return None


def _warmup(path: str, value: object, problems: _Problems) -> tuple[WarmupStep, ...]:
    """A list of {days: "6-10", daily: "6000-8000", hourly: "500-1000"}; [] turns it off."""
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.add(path, f"expected a list of {{days, daily, hourly}} rows, got {value!r}")
        return DEFAULT_WARMUP
    steps: list[WarmupStep] = []
    expected_day = 1
    for i, row in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(row, dict) or set(row) - {"days", "daily", "hourly"}:
            problems.add(where, f"expected {{days, daily, hourly}}, got {row!r}")
            continue
        days, daily = _range(row.get("days")), _range(row.get("daily"))
        hourly = None if row.get("hourly") is None else _range(row.get("hourly"))
        if days is None or days[0] != expected_day or days[1] < days[0]:
            problems.add(f"{where}.days", f"expected day {expected_day} or a range from it")
            continue
        if daily is None:
            problems.add(f"{where}.daily", f"expected a number or LO-HI, got {row.get('daily')!r}")
            continue
        if row.get("hourly") is not None and hourly is None:
            problems.add(f"{where}.hourly", f"expected a number or LO-HI, got {row['hourly']!r}")
            continue
        steps.append(
            WarmupStep(
                days[0],
                days[1],
                daily[0],
                daily[1],
                None if hourly is None else hourly[0],
                None if hourly is None else hourly[1],
            )
        )
        expected_day = days[1] + 1
    return tuple(steps)


def _validate(cfg: Config, problems: _Problems) -> None:
    if cfg.event_loop not in {"uvloop", "asyncio"}:
        problems.add("event_loop", f"expected uvloop or asyncio, got {cfg.event_loop!r}")
    if cfg.log.level.lower() not in {"debug", "info", "warning", "error"}:
        problems.add("log.level", f"expected debug, info, warning or error, got {cfg.log.level!r}")
    if cfg.log.format not in {"keyvalue", "json"}:
        problems.add("log.format", f"expected keyvalue or json, got {cfg.log.format!r}")
    if not cfg.database.url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        problems.add(
            "database.url",
            "expected sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB",
        )
    if cfg.database.cache_seconds < 0:
        problems.add("database.cache_seconds", "must be >= 0 (0 turns the cache off)")
    if (cfg.tls.cert is None) != (cfg.tls.key is None):
        problems.add("tls", "set both tls.cert and tls.key, or neither")
    if cfg.listen.processes > 64:
        problems.add("listen.processes", f"expected 0-64, got {cfg.listen.processes}")
    if cfg.delivery.retry_first <= 0:
        problems.add("delivery.retry_first", "must be > 0")
    if cfg.delivery.lease_seconds < 5:
        problems.add("delivery.lease_seconds", "must be >= 5 seconds")
    if cfg.delivery.concurrency < 1:
        problems.add("delivery.concurrency", "must be >= 1")
    if cfg.delivery.messages_per_connection < 1:
        problems.add("delivery.messages_per_connection", "must be >= 1")
    if cfg.delivery.destination_concurrency < 1:
        problems.add("delivery.destination_concurrency", "must be >= 1")
    if cfg.delivery.active_limit < cfg.delivery.batch_size:
        problems.add("delivery.active_limit", "must be >= delivery.batch_size")
    if not 0 <= cfg.delivery.claim_delay <= 10:
        problems.add("delivery.claim_delay", "expected 0-10 seconds (0: claim at once)")
    if cfg.delivery.connection_cache_time < 0:
        problems.add("delivery.connection_cache_time", "must be >= 0")
    if cfg.delivery.connection_reuse_time <= 0:
        problems.add("delivery.connection_reuse_time", "must be > 0")
    if cfg.retention.bodies < 3600:
        # A sweep's cut must lie well behind every accept still committing (and behind
        # other nodes' clocks), or a message could fall behind its mark unswept.
        problems.add("retention.bodies", "expected at least 3600 seconds (1 hour)")
    # The reputation level reads delivered/bounced recipients and complaints over
    # limits.level_window_days; the records they are read from must outlive it.
    keep_days = max(cfg.limits.level_window_days + 1, 2)
    if cfg.retention.records < max(cfg.retention.bodies, keep_days * 86400):
        problems.add(
            "retention.records",
            f"expected at least retention.bodies and {keep_days} days"
            " (limits.level_window_days + 1)",
        )
    if cfg.retention.sweep_interval < 1:
        problems.add("retention.sweep_interval", "must be >= 1 second")
    if cfg.webhooks.concurrency < 1:
        problems.add("webhooks.concurrency", "must be >= 1")
    if cfg.webhooks.timeout <= 0:
        problems.add("webhooks.timeout", "must be > 0")
    if cfg.webhooks.retry_first <= 0:
        problems.add("webhooks.retry_first", "must be > 0")
    if cfg.webhooks.lease_seconds <= cfg.webhooks.timeout:
        # A POST still running when its lease ends would be sent twice.
        problems.add("webhooks.lease_seconds", "must be longer than webhooks.timeout")
    if cfg.api.admin_key is not None and len(cfg.api.admin_key) < 16:
        problems.add("api.admin_key", "must be at least 16 characters")
    for key in ("bounce_threshold", "complaint_threshold"):
        if not 0 < getattr(cfg.reputation, key) <= 1:
            problems.add(f"reputation.{key}", "expected a fraction between 0 and 1 (0.08 = 8%)")
    if cfg.domains.dkim_algorithm not in {"rsa", "ed25519", "both"}:
        problems.add(
            "domains.dkim_algorithm",
            f"expected rsa, ed25519 or both, got {cfg.domains.dkim_algorithm!r}",
        )
    if cfg.domains.recheck_interval < 1:
        problems.add("domains.recheck_interval", "must be >= 1 second")
    reports = cfg.tls_reports
    if (reports.sender is None) != (reports.account is None):
        problems.add(
            "tls_reports", "set both tls_reports.sender and tls_reports.account, or neither"
        )
    if reports.sender is not None and "@" not in reports.sender:
        problems.add("tls_reports.sender", f"expected an email address, got {reports.sender!r}")
    if not 0 <= reports.send_after <= 86400:
        problems.add("tls_reports.send_after", "expected 0-86400 seconds")
    if reports.http_timeout <= 0:
        problems.add("tls_reports.http_timeout", "must be > 0")
    _validate_limits(cfg.limits, problems)


def _validate_limits(lim: LimitsConfig, problems: _Problems) -> None:
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(lim.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problems.add("limits.timezone", f"expected an IANA time zone, got {lim.timezone!r}")
    for key in ("level_min_usage", "level_max_bounce_rate", "level_max_complaint_rate"):
        if not 0 <= getattr(lim, key) <= 1:
            problems.add(f"limits.{key}", "expected a fraction between 0 and 1")
    for key in ("rate", "daily", "hard_ceiling", "per_recipient_hourly", "max_subject"):
        if getattr(lim, key) < 1:
            problems.add(f"limits.{key}", "must be >= 1")
    if lim.scheduler_interval <= 0:
        problems.add("limits.scheduler_interval", "must be > 0")


def _env_overrides(data: dict[str, Any]) -> None:
    """Secrets may come from the environment rather than the file."""
    admin_key = os.environ.get("RELAY_ADMIN_KEY")
    if admin_key:
        data.setdefault("api", {})
        if isinstance(data["api"], dict):
            data["api"]["admin_key"] = admin_key
    secret = os.environ.get("RELAY_SECRET")
    if secret:
        data.setdefault("reputation", {})
        if isinstance(data["reputation"], dict):
            data["reputation"]["secret"] = secret
    url = os.environ.get("RELAY_DATABASE_URL")
    if url:
        data.setdefault("database", {})
        if isinstance(data["database"], dict):
            data["database"]["url"] = url


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate the config file; raise ConfigError naming every bad key."""
    data: dict[str, Any] = {}
    source: str | None = None
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read config file ({exc.strerror})"]) from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"{path}: the top level must be a mapping"])
        data = loaded or {}
    _env_overrides(data)
    problems = _Problems()
    cfg: Config = _build(Config, data, "", problems)
    _validate(cfg, problems)
    if problems.items:
        raise ConfigError(problems.items)
    return dataclasses.replace(cfg, path=source)


def config_path_from(arg: str | None) -> str | None:
    """The -c option, else $RELAY_CONFIG, else the system path if it exists."""
    if arg:
        return arg
    env = os.environ.get("RELAY_CONFIG")
    if env:
        return env
    return DEFAULT_CONFIG_PATH if Path(DEFAULT_CONFIG_PATH).exists() else None
