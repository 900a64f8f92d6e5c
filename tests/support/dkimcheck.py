"""DKIM verification with dkimpy against the keys the test DNS server publishes."""

from __future__ import annotations

import dkim
import dns.resolver

from tests.support.dnsserver import DNSServer


def dkim_verifies(data: bytes, dns_server: DNSServer) -> bool:
    """True when every DKIM-Signature in ``data`` verifies with the published key."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_server.port

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except Exception:
            return b""
        return b"".join(b"".join(r.strings) for r in answer)

    return bool(dkim.verify(data, dnsfunc=dnsfunc))
