"""MTA-STS (RFC 8461): a recipient domain's published demand for verified TLS.

Opportunistic STARTTLS (RFC 7435) encrypts but trusts any certificate, so an attacker on
the path can strip STARTTLS or answer with their own certificate. A domain that
publishes an MTA-STS policy says which MX hosts are genuine and that mail must reach
them over TLS with a certificate valid for the MX name. Gmail, Outlook and Yahoo publish
one; Postfix needs a separate resolver daemon for it, KumoMTA has it built in, as here.

Discovery (§3): a TXT record ``_mta-sts.<domain>`` "v=STSv1; id=..." says a policy
exists; the policy itself is fetched over HTTPS from
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (a valid WebPKI certificate for that
name, no redirects, §3.3). It is cached for its ``max_age``, in memory and in the
database (relay/queue/mtasts.py: across restarts, shared by nodes), refetched when the
TXT id changes, and kept when the TXT record or the fetch fails meanwhile (§5.1: that is
the point of caching: an attacker who blocks the fetch must not downgrade the domain).

Names are resolved by delivery's own resolver (``dns.nameservers``), never the system's,
and the HTTPS port is ``delivery.mta_sts_port`` (443; tests point it at their server).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.resolver
from aiohttp.abc import AbstractResolver, ResolveResult

from relay.errors import RelayError
from relay.queue import mtasts as sql
from relay.queue.store import Store

log = logging.getLogger("relay.delivery")

# §3.2: a policy body is small; read no more than this.
MAX_POLICY_BYTES = 64 * 1024
# §3.2: max_age is at most 31557600 s (a year).
MAX_AGE_LIMIT = 31_557_600
# A failed discovery or fetch for a domain with no cached policy is retried after this,
# not on every session (the domain then gets opportunistic TLS, as without a policy).
NEGATIVE_TTL = 300.0
# A cached policy's TXT id is looked up again (§5.1: has the policy changed?) at most this
# often, not for every session: a busy destination would otherwise cost a DNS query each.
TXT_RECHECK = 300.0
PRUNE_AT = 10_000  # domains remembered before the expired ones are dropped


class Mode(enum.Enum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


class PolicyError(Exception):
    """the MTA-STS policy is not valid"""


class PolicyFetchError(PolicyError):
    """the MTA-STS policy could not be fetched"""


@dataclass(frozen=True, slots=True)
class Unfetched:
    """Why a domain that publishes a policy has none in force (RFC 8460 §4.3.2.2 names
    it in TLS reports): ``kind`` is sts-policy-fetch-error, sts-policy-invalid or
    sts-webpki-invalid, ``reason`` the error."""

    kind: str
    reason: str


def unfetched(exc: BaseException) -> Unfetched:
    """The RFC 8460 name of a failed policy fetch."""
    reason = str(exc)[:200] or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
        return Unfetched("sts-webpki-invalid", reason)
    if isinstance(exc, PolicyError | ValueError) and not isinstance(exc, PolicyFetchError):
        return Unfetched("sts-policy-invalid", reason)
    return Unfetched("sts-policy-fetch-error", reason)


@dataclass(frozen=True, slots=True)
class Policy:
    id: str  # the TXT record's id when it was fetched
    mode: Mode
    mx: tuple[str, ...]  # patterns: "mx.example.net" or "*.example.net"
    max_age: int

    def allows(self, host: str) -> bool:
        return any(mx_matches(host, p) for p in self.mx)


def mx_matches(host: str, pattern: str) -> bool:
    """§4.1: a pattern is a host name, or "*." and a name, which stands for exactly one
    more label on the left ("*.example.net" matches "mx1.example.net", not
    "a.b.example.net" nor "example.net")."""
    host, pattern = host.lower().rstrip("."), pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return host == pattern


_TXT_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


def parse_txt(strings: list[str]) -> str | None:
    """The id of a "v=STSv1; id=..." record (§3.1), or None when it is not one."""
    text = "".join(strings)
    fields = [f.strip() for f in text.split(";") if f.strip()]
    if not fields or fields[0] != "v=STSv1":
        return None
    for f in fields[1:]:
        key, _, value = f.partition("=")
        if key.strip() == "id" and _TXT_ID.match(value.strip()):
            return value.strip()
    return None


def parse_policy(text: str, policy_id: str) -> Policy:
    """The policy file (§3.2): "key: value" lines, CRLF or LF."""
    version = mode = max_age = None
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"not a key: value line: {line[:80]!r}")
        key, value = key.strip(), value.strip()
        if key == "version":
            version = value
        elif key == "mode":
            mode = value
        elif key == "max_age":
            max_age = value
        elif key == "mx":
            mx.append(value)
    if version != "STSv1":
        raise PolicyError(f"version is {version!r}, not STSv1")
    try:
        parsed_mode = Mode(mode)
    except ValueError:
        raise PolicyError(f"mode is {mode!r}, not enforce, testing or none") from None
    if max_age is None or not max_age.isdigit() or len(max_age) > 10:
        raise PolicyError(f"max_age is {max_age!r}, not a number of seconds")
    if parsed_mode is not Mode.NONE and not mx:
        raise PolicyError("no mx line")
    return Policy(policy_id, parsed_mode, tuple(mx), min(int(max_age), MAX_AGE_LIMIT))


def verifying_context(ca_file: str | None) -> ssl.SSLContext:
    """The system's trusted CAs, plus ``ca_file`` (``delivery.tls_ca_file``) if given."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


class DNSResolver(AbstractResolver):
    """aiohttp's name lookups through delivery's resolver (never the system's)."""

    def __init__(self, resolver: Callable[[], dns.asyncresolver.Resolver]) -> None:
        self.resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        out: list[ResolveResult] = []
        for rdtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            try:
                answer = await self.resolver().resolve(host, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            out.extend(
                ResolveResult(
                    hostname=host, host=r.to_text(), port=port, family=fam, proto=0, flags=0
                )
                for r in answer
            )
        if not out:
            raise OSError(f"{host} has no address")
        return out

    async def close(self) -> None:
        return None


class PolicyStore(Protocol):
    """Where policies outlive the process (relay/queue/mtasts.py through the worker)."""

    async def load(self, domain: str) -> tuple[Policy, float] | None: ...

    async def save(self, domain: str, policy: Policy, expires_at: float) -> None: ...


@dataclass(frozen=True, slots=True)
class _Cached:
    policy: Policy | None  # None: no policy (negative entry)
    expires: float  # on the clock below
    checked: float = 0.0  # when the TXT id was last seen to match (0: never)
    failed: Unfetched | None = None  # a negative entry's: the TXT said there is a policy


class PolicyCache:
    """Each recipient domain's current policy, discovered and fetched as §3 and §5 say."""

    def __init__(
        self,
        resolver: Callable[[], dns.asyncresolver.Resolver],
        port: Callable[[], int] = lambda: 443,
        ca_file: str | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        kept: PolicyStore | None = None,
    ) -> None:
        # Callables: a reload may replace delivery's resolver and change the port.
        self.resolver = resolver
        self.port = port
        self.timeout = timeout
        self.clock = clock  # wall-clock: expiry times are kept in the database
        self.kept = kept
        # §3.3: the policy host's certificate must be valid for its name (WebPKI).
        self._tls = verifying_context(ca_file)
        self._cache: dict[str, _Cached] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._http: aiohttp.ClientSession | None = None

    async def policy(self, domain: str) -> Policy | None:
        """The domain's policy, or None when it has none (or none could be had)."""
        domain = domain.lower().rstrip(".")
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:  # one discovery per domain at a time, however many sessions ask
            found = await self._policy(domain)
        if len(self._locks) > PRUNE_AT:  # forget what is not in use
            self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            now = self.clock()
            self._cache = {k: v for k, v in self._cache.items() if v.expires > now}
        return found

    def unfetched(self, domain: str) -> Unfetched | None:
        """Why ``domain`` has no policy although its TXT record says it has one (the
        last fetch failed, and is not retried before NEGATIVE_TTL); None otherwise."""
        cached = self._cache.get(domain.lower().rstrip("."))
        if cached is None or cached.policy is not None or cached.expires <= self.clock():
            return None
        return cached.failed

    async def _policy(self, domain: str) -> Policy | None:
        now = self.clock()
        cached = self._cache.get(domain)
        if cached is None and self.kept is not None:
            # A restart, or a policy another node fetched: still in force until it expires.
            try:
                stored = await self.kept.load(domain)
            except RelayError as exc:
                log.warning("mta-sts: kept policy of %s could not be read: %s", domain, exc)
                stored = None
            if stored is not None:
                cached = self._cache[domain] = _Cached(stored[0], stored[1])
        if cached is not None and cached.policy is None and cached.expires > now:
            return None
        live = cached.policy if cached is not None and cached.expires > now else None
        if live is not None and cached is not None and now - cached.checked < TXT_RECHECK:
            return live  # the TXT id was checked moments ago: no query per session
        try:
            txt_id = await self._txt_id(domain)
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            log.info("mta-sts: TXT lookup for %s failed (%s), using the cache", domain, exc)
            return live
        except dns.exception.DNSException as exc:  # a name DNS cannot ask for, and such
            log.info("mta-sts: no TXT lookup for %s: %s", domain, exc)
            txt_id = None
        if txt_id is None:
            # §5.1: a TXT record gone while a policy is cached does not end the policy.
            if live is None:
                self._cache[domain] = _Cached(None, now + NEGATIVE_TTL)
            return live
        if live is not None and cached is not None and live.id == txt_id:
            self._cache[domain] = _Cached(live, cached.expires, now)
            return live
        try:
            fetched = await self._fetch(domain, txt_id)
        except (PolicyError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning("mta-sts: policy of %s could not be fetched: %s", domain, exc)
            if live is None:
                self._cache[domain] = _Cached(None, now + NEGATIVE_TTL, failed=unfetched(exc))
            return live
        self._cache[domain] = _Cached(fetched, now + fetched.max_age, now)
        if self.kept is not None:
            try:
                await self.kept.save(domain, fetched, now + fetched.max_age)
            except RelayError as exc:
                log.warning("mta-sts: policy of %s could not be kept: %s", domain, exc)
        log.info(
            "mta-sts: policy of %s: mode=%s mx=%s max_age=%d",
            domain,
            fetched.mode.value,
            ",".join(fetched.mx),
            fetched.max_age,
        )
        return fetched

    async def _txt_id(self, domain: str) -> str | None:
        try:
            answer = await self.resolver().resolve(f"_mta-sts.{domain}", "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        ids = {
            i
            for r in answer
            if (i := parse_txt([s.decode("ascii", "replace") for s in r.strings])) is not None
        }
        # §3.1: more than one STSv1 record is as none.
        return ids.pop() if len(ids) == 1 else None

    async def _fetch(self, domain: str, txt_id: str) -> Policy:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=DNSResolver(self.resolver)),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        host = f"mta-sts.{domain}"
        port = "" if self.port() == 443 else f":{self.port()}"
        url = f"https://{host}{port}/.well-known/mta-sts.txt"
        async with self._http.get(url, ssl=self._tls, allow_redirects=False) as resp:
            if resp.status != 200:
                raise PolicyFetchError(f"{url} answered HTTP {resp.status}")
            if resp.content_type != "text/plain":
                raise PolicyError(f"{url} is {resp.content_type}, not text/plain")
            body = await resp.content.read(MAX_POLICY_BYTES + 1)
        if len(body) > MAX_POLICY_BYTES:
            raise PolicyError(f"{url} is larger than {MAX_POLICY_BYTES} bytes")
        return parse_policy(body.decode("utf-8"), txt_id)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


class KeptPolicies:
    """Policies kept in the database (relay/queue/mtasts.py): a PolicyStore."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def load(self, domain: str) -> tuple[Policy, float] | None:
        found = await sql.load(self.store, domain)
        if found is None:
            return None
        try:
            mode = Mode(found.mode)
        except ValueError:
            return None
        return Policy(found.policy_id, mode, found.mx, found.max_age), found.expires_at

    async def save(self, domain: str, policy: Policy, expires_at: float) -> None:
        kept = sql.StoredPolicy(policy.id, policy.mode.value, policy.mx, policy.max_age, expires_at)
        await sql.save(self.store, domain, kept)
