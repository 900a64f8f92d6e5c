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
    batch_size: int = 200
    poll_interval: float = 1.0
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
class ShutdownConfig:
    grace_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "keyvalue"


@dataclass(frozen=True, slots=True)
class Config:
    node_id: str = field(default_factory=socket.gethostname)
    hostname: str = field(default_factory=socket.getfqdn)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    log: LogConfig = field(default_factory=LogConfig)
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
}
_OPTIONAL_STR_FIELDS = {"tls.cert", "tls.key", "http.public_url"}


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


def _validate(cfg: Config, problems: _Problems) -> None:
    if cfg.log.level.lower() not in {"debug", "info", "warning", "error"}:
        problems.add("log.level", f"expected debug, info, warning or error, got {cfg.log.level!r}")
    if cfg.log.format not in {"keyvalue", "json"}:
        problems.add("log.format", f"expected keyvalue or json, got {cfg.log.format!r}")
    if not cfg.database.url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        problems.add(
            "database.url",
            "expected sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB",
        )
    if (cfg.tls.cert is None) != (cfg.tls.key is None):
        problems.add("tls", "set both tls.cert and tls.key, or neither")
    if cfg.delivery.retry_first <= 0:
        problems.add("delivery.retry_first", "must be > 0")
    if cfg.delivery.lease_seconds < 5:
        problems.add("delivery.lease_seconds", "must be >= 5 seconds")
    if cfg.delivery.concurrency < 1:
        problems.add("delivery.concurrency", "must be >= 1")


def _env_overrides(data: dict[str, Any]) -> None:
    """Secrets may come from the environment rather than the file."""
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
