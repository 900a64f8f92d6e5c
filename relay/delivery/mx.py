"""Where to deliver: MX lookup per RFC 5321 §5.1 with dnspython's async resolver.

MX records in preference order (equal preferences shuffled, §5.1), the domain's own
A/AAAA when it has no MX (implicit MX), null MX (RFC 7505) as a permanent failure, and
``delivery.routes`` (like Postfix transport maps) before any DNS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from relay.config import DNSConfig, HostPort


class DNSTemporary(Exception):
    """DNS lookup failed temporarily (SERVFAIL or timeout)."""


class DNSPermanent(Exception):
    """The domain cannot receive mail (NXDOMAIN or null MX)."""

    def __init__(self, message: str, enhanced: str = "5.1.2") -> None:
        super().__init__(message)
        self.enhanced = enhanced


@dataclass(frozen=True, slots=True)
class Target:
    """One host to try: its name (for logs and events), addresses and port."""

    name: str
    addresses: tuple[str, ...]
    port: int


def make_resolver(cfg: DNSConfig) -> dns.asyncresolver.Resolver:
    if not cfg.nameservers:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in cfg.nameservers
        ]
    resolver.lifetime = cfg.timeout
    resolver.timeout = min(cfg.timeout, 2.0)
    return resolver


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class MXResolver:
    def __init__(
        self,
        cfg: DNSConfig,
        port: int,
        routes: dict[str, HostPort] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.resolver = make_resolver(cfg)
        self.port = port
        self.routes = dict(routes or {})
        self.rng = rng or random.Random()

    async def addresses(self, host: str) -> tuple[str, ...]:
        """A then AAAA addresses of host; () when it has none."""
        if _is_ip(host):
            return (host,)
        found: list[str] = []
        temp_error: Exception | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.resolve(host, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
                temp_error = exc
                continue
            found.extend(r.to_text() for r in answer)
        if not found and temp_error is not None:
            raise DNSTemporary(f"address lookup for {host} failed: {type(temp_error).__name__}")
        return tuple(found)

    async def targets(self, domain: str) -> list[Target]:
        domain = domain.lower().rstrip(".")
        route = self.routes.get(domain)
        if route is not None:
            addrs = await self.addresses(route.host)
            if not addrs:
                raise DNSTemporary(f"route host {route.host} for {domain} has no address")
            return [Target(route.host, addrs, route.port)]
        try:
            answer = await self.resolver.resolve(domain, "MX")
            records = [(r.preference, r.exchange.to_text().rstrip(".").lower()) for r in answer]
        except dns.resolver.NXDOMAIN as exc:
            raise DNSPermanent(f"domain {domain} does not exist (NXDOMAIN)", "5.1.2") from exc
        except dns.resolver.NoAnswer:
            records = []
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise DNSTemporary(f"MX lookup for {domain} failed: {type(exc).__name__}") from exc
        if any(name in ("", ".") for _, name in records):
            # RFC 7505 §3: a null MX says the domain accepts no mail at all.
            raise DNSPermanent(f"domain {domain} accepts no mail (null MX, RFC 7505)", "5.1.10")
        if not records:
            # RFC 5321 §5.1: no MX -> the domain itself is the implicit MX.
            addrs = await self.addresses(domain)
            if not addrs:
                raise DNSPermanent(f"domain {domain} has no MX and no address", "5.1.2")
            return [Target(domain, addrs, self.port)]
        self.rng.shuffle(records)
        records.sort(key=lambda r: r[0])  # stable: equal preferences stay shuffled
        targets: list[Target] = []
        temp: DNSTemporary | None = None
        for _, name in records:
            try:
                addrs = await self.addresses(name)
            except DNSTemporary as exc:
                temp = exc
                continue
            if addrs:
                targets.append(Target(name, addrs, self.port))
        if not targets:
            if temp is not None:
                raise temp
            raise DNSTemporary(f"no MX host of {domain} has an address")
        return targets
