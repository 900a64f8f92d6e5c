"""The DNS records a sender domain must publish, and how to write them down.

Pure functions of the config and the domain's keys: ``relay domain records`` prints them,
``relay domain verify`` checks the live DNS against them.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from relay.config import Config
from relay.domains.keys import dkim_txt_value, public_key_b64

# RFC 1035 §3.3.14 / RFC 6376 §3.6.2.2: one TXT character-string holds at most 255 bytes.
TXT_CHUNK = 255
#: TTL written in zone-file lines: an hour lets a fix propagate quickly.
TTL = 3600
#: Preference of the MX record (a single target, so any number works).
MX_PREFERENCE = 10


class RecordKind(enum.StrEnum):
    DKIM = "dkim"
    SPF = "spf"
    MX = "mx"
    DMARC = "dmarc"


class KeyRole(enum.StrEnum):
    """Why a DKIM key exists: the one relay signs with, a rotation target, a second signer."""

    ACTIVE = "active"
    PENDING = "pending"
    EXTRA = "extra"


@dataclass(frozen=True, slots=True)
class DkimKey:
    selector: str
    algorithm: str  # rsa-sha256 | ed25519-sha256
    private_key: str
    role: KeyRole = KeyRole.ACTIVE


@dataclass(frozen=True, slots=True)
class ExpectedRecord:
    kind: RecordKind
    rtype: str  # TXT | MX
    name: str  # absolute, lower case, without the trailing dot
    value: str  # TXT text, or the MX target host (without trailing dot)
    required: bool
    selector: str | None = None
    role: KeyRole = KeyRole.ACTIVE
    public_key: str | None = None  # DKIM: the p= value we expect

    @property
    def fqdn(self) -> str:
        return f"{self.name}."

    @property
    def label(self) -> str:
        if self.kind is RecordKind.DKIM:
            extra = "" if self.role is KeyRole.ACTIVE else f", {self.role.value}"
            return f"DKIM (selector {self.selector}{extra})"
        return self.kind.value.upper()

    @property
    def display_value(self) -> str:
        if self.rtype == "MX":
            return f"{MX_PREFERENCE} {self.value}."
        return self.value

    def bind_line(self) -> str:
        """One zone-file line, absolute owner name (trailing dot), ready to paste."""
        rdata = self.display_value if self.rtype == "MX" else txt_strings(self.value)
        return f"{self.fqdn} {TTL} IN {self.rtype} {rdata}"


def txt_strings(value: str) -> str:
    """TXT rdata in zone-file syntax: quoted strings of at most 255 bytes each."""
    raw = value.encode()
    parts = [raw[i : i + TXT_CHUNK] for i in range(0, len(raw), TXT_CHUNK)] or [b""]
    out = []
    for part in parts:
        text = part.decode("ascii", "backslashreplace").replace("\\", "\\\\").replace('"', '\\"')
        out.append(f'"{text}"')
    return " ".join(out)


def bounce_host(cfg: Config) -> str:
    return (cfg.domains.bounce_host or cfg.hostname).lower().rstrip(".")


def spf_value(cfg: Config) -> str:
    """The SPF record relay asks for (RFC 7208), ``~all`` as the seeds' steps do."""
    d = cfg.domains
    if d.spf_include:
        mechanisms = [f"include:{d.spf_include.rstrip('.')}"]
    elif d.outbound_ips:
        mechanisms = [f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in d.outbound_ips]
    else:
        # Nothing says where mail leaves from: the relay's own host name is the honest guess.
        mechanisms = [f"a:{cfg.hostname.rstrip('.')}"]
    return "v=spf1 " + " ".join(mechanisms) + " ~all"


def spf_mechanisms(value: str) -> list[str]:
    """The terms of an SPF record after ``v=spf1``, lower case, without ``all``."""
    terms = value.split()[1:]
    return [t.lower() for t in terms if t.lower().lstrip("+-~?") != "all"]


DMARC_VALUE = "v=DMARC1; p=none"


def dkim_algorithm_tag(pem: str) -> str:
    return "ed25519-sha256" if "k=ed25519" in dkim_txt_value(pem) else "rsa-sha256"


def expected_records(domain: str, keys: Sequence[DkimKey], cfg: Config) -> list[ExpectedRecord]:
    """Every record for ``domain``: one DKIM record per key, then SPF, MX, DMARC."""
    required = set(cfg.domains.required)
    out = [
        ExpectedRecord(
            RecordKind.DKIM,
            "TXT",
            f"{k.selector}._domainkey.{domain}",
            dkim_txt_value(k.private_key),
            # A pending rotation key is checked but never decides the domain's status.
            required="dkim" in required and k.role is not KeyRole.PENDING,
            selector=k.selector,
            role=k.role,
            public_key=public_key_b64(k.private_key),
        )
        for k in keys
    ]
    out.append(ExpectedRecord(RecordKind.SPF, "TXT", domain, spf_value(cfg), "spf" in required))
    out.append(ExpectedRecord(RecordKind.MX, "MX", domain, bounce_host(cfg), "mx" in required))
    out.append(
        ExpectedRecord(
            RecordKind.DMARC, "TXT", f"_dmarc.{domain}", DMARC_VALUE, "dmarc" in required
        )
    )
    return out


# Second-level labels under a country code that act as public suffixes (co.uk, com.au, ...):
# a heuristic, good enough to tell a DNS console user which "host record" to type.
_SLD_SUFFIXES = {"co", "com", "net", "org", "gov", "ac", "edu", "ne", "or", "go"}


def zone_apex(domain: str) -> str:
    """The zone a DNS console most likely shows for ``domain`` (its registered domain)."""
    labels = domain.lower().rstrip(".").split(".")
    keep = 2
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SLD_SUFFIXES:
        keep = 3
    return ".".join(labels[-keep:])


def host_record(name: str, domain: str) -> str:
    """The relative "host record" (``@``, ``relay._domainkey``, ``_dmarc.abc``)."""
    apex = zone_apex(domain)
    name = name.lower().rstrip(".")
    if name == apex:
        return "@"
    if name.endswith("." + apex):
        return name[: -len(apex) - 1]
    return name + "."
