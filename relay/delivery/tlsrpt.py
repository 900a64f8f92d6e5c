"""SMTP TLS reporting (RFC 8460), the counting half: what each new delivery session's
TLS came to, per recipient domain and the policy it was held to.

A domain that publishes ``_smtp._tls`` asks its senders for a daily report of how their
TLS sessions to it went (tlsreports.py sends it): how many succeeded, and for each kind
of failure (§4.3: no STARTTLS, a certificate for another name, expired, untrusted, any
other failure) which MX host, from which of our addresses, how often. That is how a
domain owner learns that its certificate expired or that someone strips STARTTLS before
it enforces MTA-STS; Gmail, Microsoft and Yahoo send these reports, Postfix does not.

client.py reports each new session's TLS outcome (a session taken from the connection
cache was counted when it was opened); worker.py also counts an enforced policy that
lists none of the domain's MX hosts. Counts stay in memory and are added to the
database (queue/tlsrpt.py) every minute, so delivery pays no write per session; a crash
loses at most that minute's counts, which a statistical report can bear.
"""

from __future__ import annotations

import enum
import json
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from relay import metrics
from relay.delivery.mtasts import Mode, Policy, Unfetched
from relay.queue.rollup import DAY
from relay.queue.tlsrpt import SessionCount

# additional-information of a session to an MX host the domain's MTA-STS policy omits.
NOT_IN_POLICY = "MX host not listed in the domain's MTA-STS policy"


class Result(enum.Enum):
    """A session's TLS outcome: success, or one of §4.3.2.1's negotiation failures."""

    SUCCESS = ""
    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    # §4.3.2.2: the domain publishes an MTA-STS policy that could not be had.
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


# OpenSSL's X509_V_ERR_* (x509_vfy.h): not yet valid / expired, and the name check.
_EXPIRED = {9, 10}
_HOST_MISMATCH = {62}


def certificate_result(exc: ssl.SSLCertVerificationError) -> Result:
    if exc.verify_code in _EXPIRED:
        return Result.CERTIFICATE_EXPIRED
    if exc.verify_code in _HOST_MISMATCH:
        return Result.CERTIFICATE_HOST_MISMATCH
    return Result.CERTIFICATE_NOT_TRUSTED


@dataclass(frozen=True, slots=True)
class TlsAttempt:
    """One new session's TLS, as client.py saw it."""

    result: Result
    mx: str
    receiving_ip: str = ""
    sending_ip: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ReportPolicy:
    """The policy object of a report (§4.4): what the session was held to."""

    type: str  # "sts" or "no-policy-found" (relay does not do DANE: no "tlsa")
    strings: tuple[str, ...] = ()
    mx_host: tuple[str, ...] = ()

    @classmethod
    def of(cls, policy: Policy | None) -> ReportPolicy:
        if policy is None or policy.mode is Mode.NONE:
            return cls("no-policy-found")
        # §4.4: the policy as fetched, one string per line (ours, rebuilt from its fields).
        lines = (
            "version: STSv1",
            f"mode: {policy.mode.value}",
            *(f"mx: {mx}" for mx in policy.mx),
            f"max_age: {policy.max_age}",
        )
        return cls("sts", lines, policy.mx)

    def to_json(self) -> str:
        return json.dumps({"policy-string": list(self.strings), "mx-host": list(self.mx_host)})

    @classmethod
    def from_json(cls, policy_type: str, text: str) -> ReportPolicy:
        data = json.loads(text or "{}")
        return cls(
            policy_type,
            tuple(str(s) for s in data.get("policy-string", [])),
            tuple(str(s) for s in data.get("mx-host", [])),
        )


class Tally:
    """Sessions' TLS outcomes since the last take, counted in memory."""

    def __init__(
        self,
        enabled: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.enabled = enabled  # tls_reports.enabled, live across reloads
        self.clock = clock
        self._counts: Counter[SessionCount] = Counter()

    def recorder(
        self, domain: str, policy: Policy | None, unfetched: Unfetched | None = None
    ) -> Callable[[TlsAttempt], None]:
        """What client.py calls with each new session's outcome, for ``domain``.
        ``unfetched``: the domain publishes a policy that could not be had; each session
        is then a failure of that kind under policy-type sts, whatever its TLS did."""
        held_to = ReportPolicy("sts") if unfetched is not None else ReportPolicy.of(policy)
        policy_json = held_to.to_json()
        testing = policy is not None and policy.mode is Mode.TESTING

        def record(attempt: TlsAttempt) -> None:
            if unfetched is not None:
                attempt = replace(attempt, result=Result(unfetched.kind), detail=unfetched.reason)
            elif testing and policy is not None and not policy.allows(attempt.mx):
                # Delivered (testing mode), but enforce would not have used this host.
                attempt = replace(attempt, result=Result.VALIDATION_FAILURE, detail=NOT_IN_POLICY)
            success = attempt.result is Result.SUCCESS
            metrics.tls_session(attempt.result.value)  # metrics
            self._counts[
                SessionCount(
                    day=int(self.clock() // DAY),
                    policy_domain=domain,
                    policy_type=held_to.type,
                    policy=policy_json,
                    result=attempt.result.value,
                    # §4.4: a success is only counted; a failure says where and why.
                    mx="" if success else attempt.mx,
                    sending_ip="" if success else attempt.sending_ip,
                    receiving_ip="" if success else attempt.receiving_ip,
                    detail="" if success else attempt.detail,
                )
            ] += 1

        return record

    def restore(self, count: SessionCount) -> None:
        """Put back a count taken but not stored (its write failed)."""
        self._counts[replace(count, n=1)] += count.n

    def take(self) -> list[SessionCount]:
        """The counts since the last take (and forget them)."""
        counts, self._counts = self._counts, Counter()
        return [replace(c, n=n) for c, n in counts.items()]
