"""Checking a domain's published DNS records against what relay expects.

Lookups go through dnspython's async resolver pointed at ``dns.nameservers``. SPF
authorization is decided by pyspf (RFC 7208 evaluation: include, a, mx, redirect, macros,
lookup limits) rather than a home-made subset; pyspf's lookups are blocking, so it runs in
a thread, and its lookup hook is pointed at the same configured nameservers through a
context variable (set only inside that thread, so nothing else in the process changes).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf

from relay.config import Config, DNSConfig
from relay.domains.records import ExpectedRecord, KeyRole, RecordKind, spf_mechanisms
from relay.model import DomainStatus


class CheckStatus(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"  # a recommended (not required) record that does not pass
    TEMP = "temperror"  # DNS did not answer: says nothing about the record


@dataclass(frozen=True, slots=True)
class RecordCheck:
    kind: RecordKind
    name: str
    rtype: str
    selector: str | None
    role: KeyRole
    required: bool
    expected: str
    current: str
    status: CheckStatus
    reason: str

    @property
    def label(self) -> str:
        if self.kind is RecordKind.DKIM:
            extra = "" if self.role is KeyRole.ACTIVE else f", {self.role.value}"
            return f"DKIM (selector {self.selector}{extra})"
        return self.kind.value.upper()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "name": self.name,
            "rtype": self.rtype,
            "selector": self.selector,
            "role": self.role.value,
            "required": self.required,
            "expected": self.expected,
            "current": self.current,
            "status": self.status.value,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecordCheck:
        return cls(
            kind=RecordKind(data["kind"]),
            name=str(data["name"]),
            rtype=str(data.get("rtype", "TXT")),
            selector=data.get("selector"),
            role=KeyRole(data.get("role", "active")),
            required=bool(data.get("required", True)),
            expected=str(data.get("expected", "")),
            current=str(data.get("current", "")),
            status=CheckStatus(data["status"]),
            reason=str(data.get("reason", "")),
        )


@dataclass(frozen=True, slots=True)
class DomainCheck:
    domain: str
    checked_at: float
    records: tuple[RecordCheck, ...]

    def deciding(self) -> list[RecordCheck]:
        return [r for r in self.records if r.required]

    @property
    def broken(self) -> list[RecordCheck]:
        return [r for r in self.deciding() if r.status is CheckStatus.FAIL]

    @property
    def temporary(self) -> list[RecordCheck]:
        return [r for r in self.deciding() if r.status is CheckStatus.TEMP]

    def outcome(self, current: DomainStatus) -> DomainStatus:
        """The domain's next status: any required record broken -> failed; all required
        pass -> verified; otherwise (DNS did not answer) the status stays as it is."""
        if self.broken:
            return DomainStatus.FAILED
        if self.temporary:
            return current
        return DomainStatus.VERIFIED

    def to_json(self) -> dict[str, Any]:
        return {"checked_at": self.checked_at, "records": [r.to_json() for r in self.records]}

    @classmethod
    def from_json(cls, domain: str, data: dict[str, Any]) -> DomainCheck | None:
        if not data or "records" not in data:
            return None
        try:
            records = tuple(RecordCheck.from_json(r) for r in data["records"])
        except (KeyError, ValueError, TypeError):
            return None
        return cls(domain, float(data.get("checked_at", 0.0)), records)


# --------------------------------------------------------------------------- lookups


@dataclass(frozen=True, slots=True)
class Lookup:
    values: tuple[str, ...] = ()
    problem: str = ""  # plain words, empty when the name answered
    temporary: bool = False


def make_async_resolver(cfg: DNSConfig) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=not cfg.nameservers)
    _configure(resolver, cfg)
    return resolver


def make_sync_resolver(cfg: DNSConfig) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=not cfg.nameservers)
    _configure(resolver, cfg)
    return resolver


def _configure(resolver: dns.resolver.BaseResolver, cfg: DNSConfig) -> None:
    if cfg.nameservers:
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in cfg.nameservers
        ]
    resolver.lifetime = cfg.timeout
    resolver.timeout = min(cfg.timeout, 2.0)
    # A verification must see what is published now, not an answer cached minutes ago.
    resolver.cache = None


def _txt_text(rdata: Any) -> str:
    # RFC 7208 §3.3 / RFC 6376 §3.6.2.2: the strings of one TXT record are concatenated.
    return b"".join(rdata.strings).decode("utf-8", "replace")


async def lookup(resolver: dns.asyncresolver.Resolver, name: str, rtype: str) -> Lookup:
    try:
        answer = await resolver.resolve(name + ".", rtype)
    except dns.resolver.NXDOMAIN:
        return Lookup(problem=f"{name} does not exist in DNS (NXDOMAIN)")
    except dns.resolver.NoAnswer:
        return Lookup(problem=f"no {rtype} record at {name} (the name exists, NOERROR/no answer)")
    except dns.resolver.NoNameservers:
        return Lookup(
            problem=f"DNS server failure looking up {rtype} {name} (SERVFAIL)", temporary=True
        )
    except dns.exception.Timeout:
        return Lookup(
            problem=f"DNS timeout looking up {rtype} {name} after {resolver.lifetime:g} s",
            temporary=True,
        )
    except dns.exception.DNSException as exc:
        return Lookup(problem=f"DNS error looking up {rtype} {name}: {exc}", temporary=True)
    if rtype == "TXT":
        return Lookup(tuple(_txt_text(r) for r in answer))
    if rtype == "MX":
        return Lookup(tuple(f"{r.preference} {r.exchange.to_text().lower()}" for r in answer))
    return Lookup(tuple(r.to_text() for r in answer))


# --------------------------------------------------------------------------- pyspf hook

_spf_resolver: contextvars.ContextVar[dns.resolver.Resolver | None] = contextvars.ContextVar(
    "relay_spf_resolver", default=None
)
_pyspf_lookup = spf.DNSLookup


def _spf_dns_lookup(
    name: str, qtype: str, strict: bool = True, timeout: float = 30
) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNSLookup contract (see spf.DNSLookup_dnspython), through our resolver."""
    resolver = _spf_resolver.get()
    if resolver is None:
        return list(_pyspf_lookup(name, qtype, strict, timeout))
    out: list[tuple[tuple[str, str], Any]] = []
    try:
        answers = resolver.resolve(name, qtype, lifetime=timeout, search=False)
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        return out
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    for rdata in answers:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out


spf.DNSLookup = _spf_dns_lookup


def _spf_check_sync(cfg: DNSConfig, ip: str, sender: str, helo: str) -> tuple[str, str]:
    token = _spf_resolver.set(make_sync_resolver(cfg))
    try:
        result, explanation = spf.check2(i=ip, s=sender, h=helo, querytime=cfg.timeout * 4)
    finally:
        _spf_resolver.reset(token)
    return str(result), str(explanation)


# --------------------------------------------------------------------------- checks


def _tags(text: str) -> dict[str, str]:
    """Tag=value list (RFC 6376 §3.2): whitespace around tags and inside values ignored."""
    out: dict[str, str] = {}
    for part in text.replace('"', "").split(";"):
        if "=" in part:
            tag, _, value = part.partition("=")
            out[tag.strip().lower()] = "".join(value.split())
    return out


def _short(value: str, width: int = 60) -> str:
    return value if len(value) <= width else value[: width - 3] + "..."


class Verifier:
    def __init__(self, cfg: Config, resolver: dns.asyncresolver.Resolver | None = None) -> None:
        self.cfg = cfg
        self.resolver = resolver or make_async_resolver(cfg.dns)

    async def check(
        self, domain: str, expected: Sequence[ExpectedRecord], now: float
    ) -> DomainCheck:
        results = await asyncio.gather(*(self._check_one(domain, e) for e in expected))
        return DomainCheck(domain, now, tuple(results))

    async def _check_one(self, domain: str, e: ExpectedRecord) -> RecordCheck:
        try:
            if e.kind is RecordKind.DKIM:
                status, current, reason = await self._dkim(e)
            elif e.kind is RecordKind.SPF:
                status, current, reason = await self._spf(domain, e)
            elif e.kind is RecordKind.MX:
                status, current, reason = await self._mx(e)
            else:
                status, current, reason = await self._dmarc(e)
        except Exception as exc:  # a bug or odd answer must not crash a server task
            status, current, reason = CheckStatus.TEMP, "", f"check failed: {exc!r}"
        if status is CheckStatus.FAIL and not e.required:
            status = CheckStatus.WARN
            reason += " (recommended, not required)"
        return RecordCheck(
            e.kind,
            e.name,
            e.rtype,
            e.selector,
            e.role,
            e.required,
            e.display_value,
            current,
            status,
            reason,
        )

    async def _dkim(self, e: ExpectedRecord) -> tuple[CheckStatus, str, str]:
        found = await lookup(self.resolver, e.name, "TXT")
        if found.problem:
            status = CheckStatus.TEMP if found.temporary else CheckStatus.FAIL
            return status, "", found.problem
        current = " | ".join(found.values)
        keys = [_tags(v) for v in found.values]
        keys = [k for k in keys if "p" in k]
        if not keys:
            return CheckStatus.FAIL, current, f"TXT at {e.name} has no p= tag (not a DKIM key)"
        for k in keys:
            if k["p"] == e.public_key:
                return CheckStatus.PASS, current, "public key matches"
        if any(k["p"] == "" for k in keys):
            return CheckStatus.FAIL, current, "p= is empty: the key is revoked (RFC 6376 §3.6.1)"
        return (
            CheckStatus.FAIL,
            current,
            f"p= is not our public key (published {_short(keys[0]['p'], 24)},"
            f" expected {_short(e.public_key or '', 24)})",
        )

    async def _spf(self, domain: str, e: ExpectedRecord) -> tuple[CheckStatus, str, str]:
        found = await lookup(self.resolver, e.name, "TXT")
        if found.problem:
            status = CheckStatus.TEMP if found.temporary else CheckStatus.FAIL
            if not found.temporary:
                return status, "", f"no SPF record: {found.problem}"
            return status, "", found.problem
        spf_records = [
            v for v in found.values if v.lower() == "v=spf1" or v.lower().startswith("v=spf1 ")
        ]
        current = " | ".join(spf_records)
        if not spf_records:
            return CheckStatus.FAIL, current, f"no TXT record starting v=spf1 at {e.name}"
        if len(spf_records) > 1:
            # RFC 7208 §4.5: more than one record is a permerror for every receiver.
            return (
                CheckStatus.FAIL,
                current,
                f"{len(spf_records)} SPF records at {e.name}: receivers treat that as an"
                " error (RFC 7208 §4.5); merge them into one",
            )
        ips = self.cfg.domains.outbound_ips
        if not ips:
            wanted = spf_mechanisms(e.value)
            have = spf_mechanisms(spf_records[0])
            missing = [m for m in wanted if m not in have]
            if missing:
                return (
                    CheckStatus.FAIL,
                    current,
                    f"SPF record does not contain {' '.join(missing)}",
                )
            return (
                CheckStatus.PASS,
                current,
                f"SPF record contains {' '.join(wanted)} (set domains.outbound_ips to also"
                " test authorization of the sending addresses)",
            )
        sender = f"postmaster@{domain}"
        helo = self.cfg.delivery.helo_name
        for ip in ips:
            result, explanation = await asyncio.to_thread(
                _spf_check_sync, self.cfg.dns, ip, sender, helo
            )
            if result == "pass":
                continue
            if result == "temperror":
                return CheckStatus.TEMP, current, f"SPF check for {ip}: temperror {explanation}"
            return (
                CheckStatus.FAIL,
                current,
                f"SPF says {result} for outbound IP {ip} ({explanation}): the record must"
                f" authorize it, e.g. {e.value}",
            )
        return CheckStatus.PASS, current, f"SPF passes for {', '.join(ips)}"

    async def _mx(self, e: ExpectedRecord) -> tuple[CheckStatus, str, str]:
        found = await lookup(self.resolver, e.name, "MX")
        if found.problem:
            status = CheckStatus.TEMP if found.temporary else CheckStatus.FAIL
            return status, "", found.problem
        current = " | ".join(found.values)
        hosts = {v.split()[-1].rstrip(".") for v in found.values}
        if e.value in hosts:
            return CheckStatus.PASS, current, f"{e.value} is among the MX hosts"
        return CheckStatus.FAIL, current, f"MX hosts do not include {e.value}."

    async def _dmarc(self, e: ExpectedRecord) -> tuple[CheckStatus, str, str]:
        found = await lookup(self.resolver, e.name, "TXT")
        if found.problem:
            status = CheckStatus.TEMP if found.temporary else CheckStatus.FAIL
            return status, "", found.problem
        records = [v for v in found.values if v.replace(" ", "").lower().startswith("v=dmarc1")]
        current = " | ".join(records or found.values)
        if not records:
            return CheckStatus.FAIL, current, f"no TXT record starting v=DMARC1 at {e.name}"
        # RFC 7489 §6.3: v and p are the two required tags.
        if "p" not in _tags(records[0]):
            return CheckStatus.FAIL, current, "DMARC record has no p= tag"
        return CheckStatus.PASS, current, "v=DMARC1 with a p= tag"
