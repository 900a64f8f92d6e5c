"""SMTP TLS reporting (RFC 8460), the reporting half: each UTC day's report to every
recipient domain that asks for one.

Once a day has ended (and ``tls_reports.send_after`` more, so every node has added its
counts: they flush each minute), one node takes the day's counts (queue/tlsrpt.py: the
take moves a mark in the same write, so no day is reported twice) and, for each domain
delivery had sessions to, looks up ``_smtp._tls.<domain>`` TXT (§3). A domain without
one gets nothing. A domain with one gets the report (§4: JSON, gzipped, §5.2) at each
of its ``rua`` URIs:
- ``https:``: POSTed as ``application/tlsrpt+gzip`` (§5.4), once; a failure is logged
  and counted, not retried (§5.4 leaves retries to the sender; a day later the report
  would be stale).
- ``mailto:``: queued in relay's own queue as a multipart/report message from
  ``tls_reports.sender`` under ``tls_reports.account`` (§5.3), so it is DKIM-signed with
  the sender domain's key, retried, and seen in events like any other mail.
Lookups go through delivery's resolver (``dns.nameservers``), never the system's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.policy
import email.utils
import gzip
import json
import logging
import secrets
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.resolver

from relay import metrics
from relay.config import Config, TLSReportsConfig
from relay.delivery.mtasts import DNSResolver, verifying_context
from relay.delivery.tlsrpt import ReportPolicy, Tally
from relay.errors import NotFound, RelayError
from relay.intake import new_queue_id
from relay.queue import tlsrpt as sql
from relay.queue.rollup import DAY
from relay.queue.store import NewMessage, NewRecipient, Store
from relay.queue.tlsrpt import SessionCount
from relay.tasks import every

log = logging.getLogger("relay.delivery")

# Counts leave memory for the database this often; the day's reports are looked for as often.
FLUSH_EVERY = 60.0
# §3: the record's version tag, which a TLSRPT record must begin with.
VERSION = "v=TLSRPTv1"
# §5.3 / §6: the gzipped report's media type.
MEDIA_TYPE = "application/tlsrpt+gzip"
# §5.5: a failed POST is retried "for up to 24 hours", "with exponential backoff".
RETRY_FIRST = 300.0
RETRY_MAX = 3600.0
RETRY_FOR = 86_400.0
RETRY_KEPT = 1_000  # POSTs waiting to be retried, at most (in memory: lost on restart)


def rua_of(records: Sequence[str]) -> list[str]:
    """The rua URIs of a domain's ``_smtp._tls`` TXT records (§3): only records that begin
    with the version; other than exactly one such record is as none."""
    ours = [r for r in records if r.replace(" ", "").startswith(VERSION + ";")]
    if len(ours) != 1:
        return []
    for field in ours[0].split(";")[1:]:
        name, _, value = field.strip().partition("=")
        if name.strip().lower() == "rua":
            return [u.strip() for u in value.split(",") if u.strip()]
    return []


def mailto_address(uri: str) -> str | None:
    """The address of a ``mailto:`` URI (RFC 6068; headers after ``?`` are ignored)."""
    if not uri.lower().startswith("mailto:"):
        return None
    address = urllib.parse.unquote(uri[len("mailto:") :].split("?", 1)[0]).strip()
    return address if "@" in address else None


def _utc(day: int, seconds: int = 0) -> str:
    moment = dt.datetime.fromtimestamp(day * DAY + seconds, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(
    day: int,
    domain: str,
    counts: Sequence[SessionCount],
    organization: str,
    contact: str,
    report_id: str,
) -> dict[str, Any]:
    """The JSON report (§4.4) of ``domain``'s sessions on ``day``."""
    by_policy: dict[tuple[str, str], list[SessionCount]] = defaultdict(list)
    for c in counts:
        by_policy[(c.policy_type, c.policy)].append(c)
    policies = []
    for (policy_type, text), rows in sorted(by_policy.items()):
        held_to = ReportPolicy.from_json(policy_type, text)
        policy: dict[str, Any] = {"policy-type": policy_type, "policy-domain": domain}
        if held_to.strings:
            policy["policy-string"] = list(held_to.strings)
        if held_to.mx_host:
            policy["mx-host"] = list(held_to.mx_host)
        failures = [r for r in rows if r.result]
        details = []
        for r in sorted(failures, key=lambda r: (r.result, r.mx, r.receiving_ip, r.detail)):
            detail: dict[str, Any] = {"result-type": r.result}
            if r.sending_ip:
                detail["sending-mta-ip"] = r.sending_ip
            if r.mx:
                detail["receiving-mx-hostname"] = r.mx
            if r.receiving_ip:
                detail["receiving-ip"] = r.receiving_ip
            detail["failed-session-count"] = r.n
            if r.detail:  # §4.4: "a TLS-related error code or error message"
                detail["failure-reason-code"] = r.detail
            details.append(detail)
        entry: dict[str, Any] = {
            "policy": policy,
            "summary": {
                "total-successful-session-count": sum(r.n for r in rows if not r.result),
                "total-failure-session-count": sum(r.n for r in failures),
            },
        }
        if details:
            entry["failure-details"] = details
        policies.append(entry)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _utc(day), "end-datetime": _utc(day, DAY - 1)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }


@dataclass(frozen=True, slots=True)
class MadeReport:
    """One domain's report for one day, gzipped, with the names it goes by."""

    day: int
    domain: str
    submitter: str  # the contact-info's domain (§5.3 TLS-Report-Submitter)
    report_id: str
    filename: str  # §5.1
    gz: bytes


def report_mail(sender: str, to: str, made: MadeReport, now: float) -> bytes:
    """The report as a message (§5.3): multipart/report; report-type="tlsrpt", a
    human-readable part and the gzipped report."""
    domain, submitter, day, report_id = made.domain, made.submitter, made.day, made.report_id
    msg = MIMEMultipart("report")
    msg.set_param("report-type", "tlsrpt")
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>"
    msg["Date"] = email.utils.formatdate(now, usegmt=True)
    msg["Message-ID"] = f"<{report_id}>"
    # §5.3: the two headers a receiver sorts reports by.
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg.attach(
        MIMEText(
            f"This is an aggregate TLS report (RFC 8460) from {submitter} for {domain},"
            f" covering {_utc(day)} to {_utc(day, DAY - 1)}.\n",
            "plain",
            "us-ascii",
        )
    )
    part = MIMEApplication(made.gz, "tlsrpt+gzip")
    part.add_header("Content-Disposition", "attachment", filename=made.filename)
    msg.attach(part)
    return msg.as_bytes(policy=email.policy.SMTP)


@dataclass(slots=True)
class _Retry:
    """A report POST that failed, waiting to be tried again."""

    url: str
    gz: bytes
    domain: str
    first: float
    due: float
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class Sent:
    """One report sent or queued to one rua URI (for logs and tests)."""

    domain: str
    day: int
    uri: str
    outcome: str  # "sent" (https), "queued" (mailto), "failed"
    report: dict[str, Any]


class TlsReporter:
    """Flushes delivery's tally each minute and makes each ended day's reports."""

    def __init__(
        self,
        store: Store,
        cfg: Callable[[], Config],
        tally: Tally,
        resolver: Callable[[], dns.asyncresolver.Resolver],
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.tally = tally
        self.resolver = resolver
        self.wake = wake  # delivery: a mail report was queued
        self.clock = clock
        self._through: int | None = None  # the last day known to be reported
        self._http: aiohttp.ClientSession | None = None
        self._retry: list[_Retry] = []

    @property
    def settings(self) -> TLSReportsConfig:
        return self.cfg().tls_reports

    async def flush(self) -> None:
        """Add the counts in memory to the database."""
        counts = self.tally.take()
        try:
            await sql.add(self.store, counts)
        except BaseException:
            for c in counts:  # keep them for the next flush
                self.tally.restore(c)
            raise

    async def tick(self) -> list[Sent]:
        """Flush, retry the POSTs that are due, then report the last ended day if nobody
        has yet."""
        await self.flush()
        if not self.settings.enabled:
            return []
        await self._retry_due()
        day = int((self.clock() - self.settings.send_after) // DAY) - 1
        if self._through is not None and self._through >= day:
            return []
        taken = await sql.take_through(self.store, day)
        self._through = day
        return await self.report(taken or [])

    async def report(self, counts: Sequence[SessionCount]) -> list[Sent]:
        """Report ``counts`` to their domains, one report per domain and day."""
        groups: dict[tuple[int, str], list[SessionCount]] = defaultdict(list)
        for c in counts:
            groups[(c.day, c.policy_domain)].append(c)
        sent: list[Sent] = []
        for (day, domain), rows in sorted(groups.items()):
            uris = await self.rua(domain)
            if not uris:
                continue
            sent.extend(await self._send(day, domain, rows, uris))
        return sent

    async def rua(self, domain: str) -> list[str]:
        """The rua URIs of ``domain``'s TLSRPT record; none without one (§3)."""
        try:
            answer = await self.resolver().resolve(f"_smtp._tls.{domain}", "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            log.warning("tls report: TXT lookup for _smtp._tls.%s failed: %s", domain, exc)
            return []
        records = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        return rua_of(records)

    async def _send(
        self, day: int, domain: str, rows: Sequence[SessionCount], uris: Sequence[str]
    ) -> list[Sent]:
        cfg = self.cfg()
        s = cfg.tls_reports
        contact = s.contact or s.sender or f"postmaster@{cfg.hostname}"
        # §5.3: TLS-Report-Submitter "MUST match" the domain of the contact-info.
        submitter = contact.rpartition("@")[2]
        token = secrets.token_hex(8)
        report_id = f"{_utc(day)[:10]}.{token}.{domain}@{submitter}"
        report = build_report(day, domain, rows, s.organization or cfg.hostname, contact, report_id)
        gz = gzip.compress(json.dumps(report, indent=1).encode())
        # §5.1: sender!policy-domain!begin!end!unique-id.json.gz (seconds since the epoch).
        filename = f"{submitter}!{domain}!{day * DAY}!{day * DAY + DAY - 1}!{token}.json.gz"
        made = MadeReport(day, domain, submitter, report_id, filename, gz)
        out: list[Sent] = []
        for uri in uris:
            if uri.lower().startswith("https:"):
                outcome = await self._post(uri, gz, domain)
                if outcome == "failed" and len(self._retry) < RETRY_KEPT:
                    now = self.clock()
                    self._retry.append(_Retry(uri, gz, domain, now, now + RETRY_FIRST))
            elif (address := mailto_address(uri)) is not None:
                outcome = await self._mail(address, made)
                metrics.tls_report("mailto", outcome)  # metrics
            else:
                log.info("tls report: %s of %s is neither https: nor mailto:", uri, domain)
                continue
            out.append(Sent(domain, day, uri, outcome, report))
        return out

    async def _retry_due(self) -> None:
        now = self.clock()
        waiting: list[_Retry] = []
        for r in self._retry:
            if r.due > now:
                waiting.append(r)
                continue
            if await self._post(r.url, r.gz, r.domain) == "sent":
                continue
            r.attempts += 1
            r.due = now + min(RETRY_MAX, RETRY_FIRST * 2 ** (r.attempts - 1))
            if r.due - r.first > RETRY_FOR:
                log.warning("tls report: %s: gave up on %s after 24 h", r.domain, r.url)
                metrics.tls_report("https", "dropped")  # metrics
                continue
            waiting.append(r)
        self._retry = waiting

    async def _post(self, url: str, gz: bytes, domain: str) -> str:
        outcome = await self._post_once(url, gz, domain)
        metrics.tls_report("https", outcome)  # metrics
        return outcome

    async def _post_once(self, url: str, gz: bytes, domain: str) -> str:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=DNSResolver(self.resolver))
            )
        timeout = aiohttp.ClientTimeout(total=self.settings.http_timeout)
        tls = verifying_context(self.cfg().delivery.tls_ca_file)
        try:
            async with self._http.post(
                url,
                data=gz,
                headers={"Content-Type": MEDIA_TYPE},
                ssl=tls,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                if 200 <= resp.status < 300:
                    log.info("tls report: %s POSTed to %s", domain, url)
                    return "sent"
                log.warning("tls report: %s: %s answered HTTP %d", domain, url, resp.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("tls report: %s: POST to %s failed: %s", domain, url, exc)
        return "failed"

    async def _mail(self, address: str, made: MadeReport) -> str:
        """Queue the report to ``address``: "queued", or "failed" (not configured)."""
        domain = made.domain
        s = self.settings
        if s.sender is None or s.account is None:
            log.warning(
                "tls report: %s asks for mail to %s, but tls_reports.sender is not set",
                domain,
                address,
            )
            return "failed"
        try:
            account = await self.store.get_account(s.account)
        except NotFound:
            log.warning("tls report: tls_reports.account %r does not exist", s.account)
            return "failed"
        now = self.clock()
        body = report_mail(s.sender, address, made, now)
        qid = new_queue_id(now)
        await self.store.accept(
            NewMessage(
                id=qid,
                account_id=account.id,
                mail_from=s.sender,
                body=body,
                recipients=(NewRecipient(address),),
                header_from=s.sender,
                subject=f"Report Domain: {domain}",
                message_id_header=f"<{made.report_id}>",
                # §3: reports are delivered "despite any TLS-related failures" (RFC 8689).
                tls_optional=True,
            )
        )
        self.wake()
        log.info("tls report: %s queued to <%s> qid=%s", domain, address, qid)
        return "queued"

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


async def run(reporter: TlsReporter, stop: asyncio.Event) -> None:
    """The reporter's loop: a tick each FLUSH_EVERY until ``stop``, then a last flush."""
    await every(stop, lambda: FLUSH_EVERY, reporter.tick, "tls reports")
    try:
        await reporter.flush()
    except RelayError as exc:
        log.warning("tls reports: the last counts were not stored: %s", exc)
    finally:
        await reporter.close()
