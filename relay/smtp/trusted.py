"""Trusted networks: clients on these networks send as an account without AUTH.

Like Postfix's ``mynetworks`` (or Postal's IP credentials): an application on the same
host or LAN submits without a password, and its mail is attributed to the account the
operator mapped its network to (``listen.trusted_networks: {"127.0.0.0/8": alice}``). All
sending policy (suspension, limits, verified sender domains) still applies to that account.

A trusted session may still AUTH before its first MAIL, and then sends as the account it
authenticated as: the trust is applied at MAIL, not at connect.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from relay.errors import NotFound
from relay.model import Account
from relay.queue.store import Store

log = logging.getLogger("relay.smtp")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TrustedNetwork:
    network: Network
    account: str


def parse_networks(mapping: Mapping[str, str]) -> tuple[TrustedNetwork, ...]:
    """CIDR -> account name, most specific network first (so it wins the match).

    Raises ValueError naming the bad entry; relay/config.py validates the same way.
    """
    out: list[TrustedNetwork] = []
    for cidr, account in mapping.items():
        try:
            net = ipaddress.ip_network(str(cidr).strip(), strict=False)
        except ValueError as exc:
            raise ValueError(f"expected a network like 127.0.0.0/8, got {cidr!r}") from exc
        if not isinstance(account, str) or not account:
            raise ValueError(f"expected an account name for {cidr!r}, got {account!r}")
        out.append(TrustedNetwork(net, account))
    out.sort(key=lambda t: t.network.prefixlen, reverse=True)
    return tuple(out)


def account_name_for(networks: tuple[TrustedNetwork, ...], ip: str) -> str | None:
    """The account the client address ``ip`` sends as, or None if it is not trusted."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None  # a Unix socket or an unparsable peer is never trusted
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # dual-stack sockets report IPv4 clients as ::ffff:a.b.c.d
    for entry in networks:
        if addr.version == entry.network.version and addr in entry.network:
            return entry.account
    return None


class TrustedNetworks:
    """Resolves a client address to the Account it sends as, read per session through the
    store's row cache: a suspension made by this process applies to the next session at
    once, one made by another process within ``cache.CHECK_EVERY``."""

    def __init__(self, store: Store, mapping: Mapping[str, str]) -> None:
        self.store = store
        self.networks = parse_networks(mapping)
        # client address -> account name (or None): parsing the address and walking the
        # networks cost more than the cached account read, per session (issue 9).
        self._names: dict[str, str | None] = {}

    async def account_for(self, ip: str) -> Account | None:
        try:
            name = self._names[ip]
        except KeyError:
            name = account_name_for(self.networks, ip)
            if len(self._names) >= 4096:
                self._names.clear()
            self._names[ip] = name
        if name is None:
            return None
        try:
            return await self.store.get_account(name)
        except NotFound:
            # Deleted (or misspelt in the config): the client must AUTH like anyone else.
            log.warning("trusted network client=%s maps to unknown account %r", ip, name)
            return None


__all__ = ["TrustedNetwork", "TrustedNetworks", "account_name_for", "parse_networks"]
