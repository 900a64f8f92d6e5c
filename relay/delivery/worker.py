"""Delivery workers: claim due recipients, deliver per destination, record outcomes.

A claim is a lease (``delivery.lease_seconds``) renewed while the attempt runs; a worker
that dies simply stops renewing, and another claims the rows when the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from relay import metrics
from relay.config import DeliveryConfig
from relay.delivery import dkim
from relay.delivery.client import DestinationSession, Envelope
from relay.delivery.destinations import Destinations
from relay.delivery.dsn import build_dsn
from relay.delivery.mtasts import KeptPolicies, Mode, Policy, PolicyCache
from relay.delivery.mx import DNSPermanent, DNSTemporary, MXResolver, Target
from relay.delivery.render import Rendered
from relay.delivery.render import Renderer as ReputationRenderer
from relay.delivery.tlsrpt import NOT_IN_POLICY, Result, Tally, TlsAttempt
from relay.errors import StoreUnavailable
from relay.intake import first_address, new_queue_id
from relay.model import Claim, Domain, Outcome, RecipientStatus
from relay.queue import holds
from relay.queue.operate import flushed_since
from relay.queue.retry import is_expired, next_delay
from relay.queue.store import NewMessage, NewRecipient, OutcomeUpdate, Store
from relay.tasks import drain

log = logging.getLogger("relay.delivery")

#: Per-recipient rendering before DKIM (open pixel: relay/events/tracking.py):
#: (body, account id, claim) -> new body, or None when this message is not rendered.
Renderer = Callable[[bytes, int, Claim], Awaitable[bytes | None]]


@dataclass(frozen=True, slots=True)
class Prepared:
    data: bytes  # not yet signed
    mail_from: str
    signers: tuple[Domain, ...] = ()  # DKIM keys to sign with, in order


class DeliveryWorker:
    def __init__(
        self,
        store: Store,
        cfg: DeliveryConfig,
        resolver: MXResolver,
        owner: str,
        clock: Callable[[], float] = time.time,
        render: Renderer | None = None,
        reputation: ReputationRenderer | None = None,
        after_outcomes: Callable[[Sequence[Claim], dict[int, Outcome]], Awaitable[None]]
        | None = None,
    ) -> None:
        self.reputation = reputation
        self.after_outcomes = after_outcomes
        self.store = store
        self.cfg = cfg
        self.resolver = resolver
        self.render = render
        self.owner = owner
        self.clock = clock
        self.session = DestinationSession(
            cfg.helo_name,
            cfg.require_tls,
            cfg.connect_timeout,
            cfg.command_timeout,
            cache_time=cfg.connection_cache_time,
            reuse_time=cfg.connection_reuse_time,
            max_idle=cfg.concurrency,
            ca_file=cfg.tls_ca_file,
        )
        self.mta_sts = PolicyCache(
            lambda: self.resolver.resolver,
            lambda: self.cfg.mta_sts_port,
            cfg.tls_ca_file,
            timeout=cfg.connect_timeout,
            clock=clock,
            kept=KeptPolicies(store),
        )
        self._wake = asyncio.Event()
        self._stopping = False
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self.destinations = Destinations(
            lambda: self.cfg.destination_concurrency,
            lambda: self.cfg.retry_first if self.cfg.destination_suspend else 0.0,
            wall=clock,
            # Twice retry_first: the mail a refusal deferred retries under the lowered limit.
            remember_for=lambda: (
                2.0 * self.cfg.retry_first if self.cfg.concurrency_feedback else 0.0
            ),
        )
        metrics.SUSPENDED.count = lambda: len(self.destinations.snapshot())
        # Sessions past their destination's gate: delivering, or waiting for a worker.
        self._admitted = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: set[int] = set()
        self._domains: dict[str, tuple[float, Domain | None]] = {}
        self._holds: dict[str, holds.Hold] = {}
        self._holds_read = 0.0  # monotonic time the holds are read again
        self._extra_keys: dict[str, tuple[float, list[Domain]]] = {}
        self.running = False
        # Each new session's TLS outcome while tls_reports.enabled, for RFC 8460 reports
        # (set by app.py, whose TlsReporter flushes it; None: not counted).
        self.tls_tally: Tally | None = None

    def wake(self, *_: object) -> None:
        self._wake.set()

    async def run(self) -> None:
        self.running = True
        renewer = asyncio.create_task(self._renew_loop())
        try:
            while not self._stopping:
                try:
                    full = await self._claim()
                except StoreUnavailable as exc:
                    log.warning("claim failed, database unavailable: %s", exc)
                    await self._sleep(min(5.0, self.cfg.poll_interval * 5))
                    continue
                except Exception:
                    # Never let one bad claim end delivery on this node for good.
                    log.exception("claim failed unexpectedly")
                    await self._sleep(min(5.0, self.cfg.poll_interval * 5))
                    continue
                # Everything due was taken: wait for an accept's wake-up (or the poll).
                # Claiming again at once found nothing at a steady trickle, and an empty
                # claim is still a write transaction (issue 9).
                if not full and await self._sleep(self.cfg.poll_interval):
                    await self._gather()
        finally:
            renewer.cancel()
            self.running = False

    async def _sleep(self, seconds: float) -> bool:
        """Wait for a wake-up or ``seconds``; True when woken."""
        woken = True
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            woken = False
        self._wake.clear()
        return woken

    async def _gather(self) -> None:
        """Let mail accepted just after the wake-up join the claim (delivery.claim_delay)."""
        if self.cfg.claim_delay > 0 and not self._stopping:
            await asyncio.sleep(self.cfg.claim_delay)

    async def _claim(self) -> bool:
        """Claim what is due; True when the claim was full (more may be waiting)."""
        # Sessions waiting for their destination (delivery.destination_concurrency) do not
        # hold the claim back: mail to other destinations is claimed and goes past them,
        # as Postfix's queue manager serves every destination in its active queue. What
        # one node holds leased at once is bounded by delivery.active_limit.
        free = self.cfg.concurrency - self._admitted
        room = self.cfg.active_limit - len(self._inflight)
        if free <= 0 or room <= 0:
            await self._sleep(self.cfg.poll_interval)
            return True
        limit = min(self.cfg.batch_size, free * self.cfg.messages_per_connection, room)
        claims = await self.store.claim_due(self.owner, self.cfg.lease_seconds, limit)
        if not claims:
            return False
        by_domain: dict[str, list[Claim]] = defaultdict(list)
        for c in claims:
            by_domain[c.rcpt_domain].append(c)
        held = await self._held()
        for rcpt_domain, group in by_domain.items():
            hold = held.get(rcpt_domain)
            if hold is not None:
                await self._postpone(group, hold)
                continue
            self._inflight.update(c.recipient_id for c in group)
            for chunk in _sessions(group, self.cfg.messages_per_connection):
                task = asyncio.create_task(self._deliver_domain(rcpt_domain, chunk))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return len(claims) >= limit

    async def _held(self) -> dict[str, holds.Hold]:
        """The operator's holds (relay/queue/holds.py), read at most every HOLDS_REFRESH."""
        now = time.monotonic()
        if now >= self._holds_read:
            self._holds = await holds.active(self.store)
            self._holds_read = now + HOLDS_REFRESH
        return self._holds

    async def _postpone(self, claims: list[Claim], cached: holds.Hold) -> None:
        """Give a held destination's claims back untried, due when the hold is looked at
        next (no attempt counted, no event: the mail did not move). The hold is read
        again with the write: the cached one may have been released since."""
        hold: holds.Hold | None = cached
        for ids in _batches([c.recipient_id for c in claims]):
            hold = await holds.postpone(self.store, self.owner, cached.domain, ids)
        if hold is None:
            self._holds_read = 0.0  # released meanwhile: read them again at the next claim
            return
        log.info(
            "delivery to %s held by the operator (%s): %d recipients wait until %s",
            hold.domain,
            hold.reason or "no reason given",
            len(claims),
            "released" if hold.until is None else time.strftime(_UTC, time.gmtime(hold.until)),
        )

    async def _renew_loop(self) -> None:
        # Renew at a third of the lease so two missed renewals still leave margin.
        interval = max(1.0, self.cfg.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            for ids in _batches(sorted(self._inflight)):
                try:
                    await self.store.renew_leases(self.owner, ids, self.cfg.lease_seconds)
                except StoreUnavailable as exc:
                    log.warning("lease renewal failed: %s", exc)
                    break

    async def _sender_domain(self, name: str) -> Domain | None:
        now = time.monotonic()
        hit = self._domains.get(name)
        if hit is not None and hit[0] > now:
            return hit[1]
        d = await self.store.get_domain(name)
        self._domains[name] = (now + 30.0, d)
        return d

    async def _extra_signers(self, d: Domain) -> list[Domain]:
        """Dual-signing keys of a domain (relay/queue/domains.py), cached like the domain."""
        from relay.queue.domains import extra_signers

        now = time.monotonic()
        hit = self._extra_keys.get(d.name)
        if hit is not None and hit[0] > now:
            return hit[1]
        signers = await extra_signers(self.store, d)
        self._extra_keys[d.name] = (now + 30.0, signers)
        return signers

    async def _prepare_group(
        self, message_id: str, group: list[Claim], loaded: tuple[bytes, str, int] | None = None
    ) -> list[tuple[list[Claim], Prepared]]:
        """One envelope for the group, or one per recipient when rendering changes it."""
        # The body is read once per message and group, not once per rendered recipient.
        if loaded is None:
            loaded = await self.store.message_for_delivery(message_id)
        body, mail_from, account_id = loaded
        if self.render is None and self.reputation is None:
            return [(group, await self._prepare(message_id, loaded=loaded))]
        rendered: list[bytes | None] = [None] * len(group)
        if self.render is not None:
            rendered = [await self.render(body, account_id, c) for c in group]
        if self.reputation is None:
            if all(r is None for r in rendered):
                return [(group, await self._prepare(message_id, loaded=loaded))]
            return [
                ([c], await self._prepare(message_id, r, loaded=loaded))
                for c, r in zip(group, rendered, strict=True)
            ]
        # List-Unsubscribe and VERP (relay/delivery/render.py) after the body renderers.
        parts: list[Rendered] = []
        if all(r is None for r in rendered):
            parts = await self.reputation.render(body, mail_from, account_id, group)
        else:
            for c, r in zip(group, rendered, strict=True):
                data = body if r is None else r
                parts.extend(await self.reputation.render(data, mail_from, account_id, [c]))
        return [
            (list(p.claims), await self._prepare(message_id, p.data, p.mail_from, loaded=loaded))
            for p in parts
        ]

    async def _prepare(
        self,
        message_id: str,
        rendered: bytes | None = None,
        envelope_from: str | None = None,
        *,
        loaded: tuple[bytes, str, int] | None = None,
    ) -> Prepared:
        if loaded is None:
            loaded = await self.store.message_for_delivery(message_id)
        body, mail_from, _account = loaded
        if rendered is not None:
            body = rendered
        dom = mail_from.rpartition("@")[2].lower()
        header_dom = _header_from_domain(body)
        signer = None
        for name in (header_dom, dom):
            if name:
                signer = await self._sender_domain(name)
                if signer is not None:
                    break
        signers: tuple[Domain, ...] = ()
        if signer is not None:
            signers = (signer, *await self._extra_signers(signer))
        return Prepared(body, envelope_from or mail_from, signers)

    async def _deliver_domain(self, rcpt_domain: str, claims: list[Claim]) -> None:
        # A session refused for being one too many (concurrency_feedback) gives its mail
        # back untried: it waits for another slot under the lowered limit, that is until
        # another session to the destination ends, rather than being deferred for
        # retry_first. Bounded, so mail is never passed over for good.
        for turn in range(GIVE_BACKS + 1):
            async with self.destinations.slot(rcpt_domain):
                self._admitted += 1
                try:
                    claims = await self._session(rcpt_domain, claims, turn == GIVE_BACKS)
                finally:
                    self._admitted -= 1
            if not claims:
                return

    async def _session(self, rcpt_domain: str, claims: list[Claim], last: bool) -> list[Claim]:
        """Attempt the claims; those given back to wait for another slot (see above)."""
        given_back: list[Claim] = []
        async with self._slots:
            if self._stopping:
                return []  # not begun: the claims stay leased, and stop() gives them back
            try:
                suspension = self.destinations.suspended(rcpt_domain)
                if suspension is not None and await flushed_since(
                    self.store, rcpt_domain, suspension.since
                ):
                    self.destinations.lift(rcpt_domain)
                    suspension = None
                if suspension is None:
                    given_back = await self._attempt(rcpt_domain, claims, last)
                else:
                    metrics.delivery_suspended(len(claims))
                    o = Outcome(
                        RecipientStatus.DEFERRED,
                        f"4.4.1 Delivery to {rcpt_domain} temporarily suspended:"
                        f" {suspension.reason}",
                    )
                    await self._record_all(claims, o)
            except Exception:
                log.exception("delivery to %s failed unexpectedly", rcpt_domain)
                # Defer rather than lose: the lease would expire anyway, this is sooner.
                outcome = Outcome(RecipientStatus.DEFERRED, "4.3.0 Internal error in relay")
                await self._record_all(claims, outcome)
            finally:
                kept = {c.recipient_id for c in given_back}
                for c in claims:
                    if c.recipient_id not in kept:
                        self._inflight.discard(c.recipient_id)
        return given_back

    async def _attempt(self, rcpt_domain: str, claims: list[Claim], last: bool) -> list[Claim]:
        """Deliver the claims over a session; those given back untried (see
        _deliver_domain), unless ``last``."""
        relaxed = [c for c in claims if c.tls_optional]
        if relaxed and len(relaxed) < len(claims):
            # RFC 8689 "TLS-Required: No" mail goes in a session of its own, without the
            # domain's TLS demands; the rest keeps them.
            strict = [c for c in claims if not c.tls_optional]
            back = await self._attempt(rcpt_domain, strict, last)
            return back + await self._attempt(rcpt_domain, relaxed, last)
        return await self._attempt_session(rcpt_domain, claims, last, bool(relaxed))

    async def _attempt_session(
        self, rcpt_domain: str, claims: list[Claim], last: bool, relaxed: bool
    ) -> list[Claim]:
        """_attempt for claims that all have ``relaxed`` (TLS-Required: No) or none."""
        outcomes: dict[int, Outcome] = {}
        try:
            targets = await self.resolver.targets(rcpt_domain)
        except DNSPermanent as exc:
            metrics.dns_failure("permanent")  # metrics
            o = Outcome(RecipientStatus.BOUNCED, f"550 {exc.enhanced} {exc}", None, code=550)
            await self._record_all(claims, o)
            return []
        except DNSTemporary as exc:
            metrics.dns_failure("temporary")  # metrics
            o = Outcome(RecipientStatus.DEFERRED, f"4.4.3 {exc}", None)
            await self._record_all(claims, o)
            return []
        plan = await self._tls_plan(rcpt_domain, targets, relaxed)
        if isinstance(plan, Outcome):
            await self._record_all(claims, plan)
            return []
        by_id = {c.recipient_id: c for c in claims}
        by_message: dict[str, list[Claim]] = defaultdict(list)
        for c in claims:
            by_message[c.message_id].append(c)
        ahead = _Ahead(self._prepare_chunk, _chunks(by_message, PREPARE_AHEAD_BYTES))
        recording: list[asyncio.Task[None]] = []
        recorded: set[int] = set()
        gave_back = False

        def give_back(refusal: Outcome) -> bool:
            # Only when other sessions to it are under way: a busy destination, not a dead one.
            nonlocal gave_back
            gave_back = (
                not last
                and self.cfg.concurrency_feedback
                and _says_busy(refusal)
                and self.destinations.others(rcpt_domain) > 0
            )
            return gave_back

        def done(env: Envelope) -> None:
            # Record each message's outcome the moment it is known (its COMMIT overlaps
            # the next message's transfer): a crash then repeats at most the deliveries
            # whose commit was in flight, not the whole connection's worth.
            env_claims = [by_id[rid] for rid, _ in env.recipients]
            recorded.update(rid for rid, _ in env.recipients)
            recording.append(asyncio.create_task(self._record(env_claims, dict(env.outcomes))))
            codes = {o.code for o in env.outcomes.values()}
            if 421 in codes:  # RFC 5321 §3.8: the server is closing; too busy for us
                reply = next(o.reply for o in env.outcomes.values() if o.code == 421)
                self._refused(rcpt_domain, reply)
            elif codes != {None}:  # the server answered the transaction
                self.destinations.delivered(rcpt_domain)

        self.destinations.started(rcpt_domain)
        try:
            unreachable = await self.session.deliver(
                plan.targets,
                ahead,
                on_done=done,
                on_open=lambda: self.destinations.reached(rcpt_domain),
                verify=plan.verify,
                give_back=give_back,
                on_tls=plan.on_tls,
                probe=plan.probe,
                relaxed=relaxed,
            )
            if unreachable is not None:
                self._unreachable(rcpt_domain, unreachable, gave_back)
        finally:
            ahead.close()
            self.destinations.ended(rcpt_domain)
        await asyncio.gather(*recording)
        missing = [c for c in claims if c.recipient_id not in recorded]
        if gave_back:
            log.info(
                "delivery to %s: %d recipients wait for another session", rcpt_domain, len(missing)
            )
            return missing
        if missing:
            await self._record(missing, outcomes)
        return []

    async def _tls_plan(
        self, rcpt_domain: str, targets: list[Target], relaxed: bool
    ) -> _TlsPlan | Outcome:
        """What a session to the domain demands of TLS (its MTA-STS policy) and reports
        of it (RFC 8460); the deferral when the policy lists none of its MX hosts."""
        policy: Policy | None = None
        # RFC 8689 §5: "TLS-Required: No" waives the recipient domain's MTA-STS policy
        # (and require_tls); RFC 8460 §3: such a session (a TLS report's) is not counted.
        # A routed domain (a smart host) is neither held to nor told about its policy.
        routed = rcpt_domain in self.resolver.routes
        if self.cfg.mta_sts and not relaxed and not routed:
            policy = await self.mta_sts.policy(rcpt_domain)
        tally = self.tls_tally
        on_tls = None
        if tally is not None and tally.enabled() and not relaxed and not routed:
            missing = self.mta_sts.unfetched(rcpt_domain) if policy is None else None
            on_tls = tally.recorder(rcpt_domain, policy, missing)
        if policy is None or policy.mode is Mode.NONE:
            return _TlsPlan(targets, False, False, on_tls)
        allowed = [t for t in targets if policy.allows(t.name)]
        if policy.mode is Mode.TESTING:
            if len(allowed) < len(targets):
                metrics.mta_sts("testing_mismatch")
                log.warning(
                    "mta-sts testing: MX hosts of %s not in its policy (%s): %s",
                    rcpt_domain,
                    ", ".join(policy.mx),
                    ", ".join(t.name for t in targets if t not in allowed),
                )
            # With TLS reports on, certificates are checked as enforce would, to report
            # what enforcing would refuse (client.py _open's probe); delivered anyway.
            return _TlsPlan(targets, False, on_tls is not None, on_tls)
        if not allowed:
            metrics.mta_sts("refused")
            if on_tls is not None:
                first = targets[0].name if targets else ""
                on_tls(TlsAttempt(Result.VALIDATION_FAILURE, first, detail=NOT_IN_POLICY))
            return Outcome(
                RecipientStatus.DEFERRED,
                f"4.7.5 The MTA-STS policy of {rcpt_domain} lists none of its MX"
                f" hosts ({', '.join(t.name for t in targets)}; policy:"
                f" {', '.join(policy.mx)})",
            )
        metrics.mta_sts("enforced")
        return _TlsPlan(allowed, True, False, on_tls)

    def _unreachable(self, rcpt_domain: str, refusal: Outcome, gave_back: bool) -> None:
        """No session to the destination could be opened: lower its limit, and suspend it
        unless its mail was given back (another session to it is under way)."""
        if not _says_busy(refusal):
            # The MX answered; our TLS demand (MTA-STS, require_tls) was not met. Not a
            # dead destination: mail that waives the demand (RFC 8689) must still go.
            return
        self._refused(rcpt_domain, refusal.reply)
        if gave_back:
            return
        suspended = self.destinations.unreachable(rcpt_domain, refusal.reply)
        if suspended:
            log.warning(
                "delivery to %s suspended for %.0f s: no MX host could be reached (%s)",
                rcpt_domain,
                suspended,
                refusal.reply,
            )

    def _refused(self, rcpt_domain: str, reply: str) -> None:
        lowered = self.destinations.refused(rcpt_domain)
        if lowered is not None:
            metrics.concurrency_lowered()
            log.warning(
                "delivery to %s: sessions at once lowered to %d after a refusal (%s)",
                rcpt_domain,
                lowered,
                reply,
            )

    async def _prepare_chunk(self, chunk: list[tuple[str, list[Claim]]]) -> list[Envelope]:
        """A chunk of a session's messages, rendered and DKIM-signed, as envelopes."""
        envelopes: list[Envelope] = []
        # The chunk's bodies in one read (issue 9: a read per message was ~10% of the
        # delivery loop); one that vanished meanwhile is read alone and reported.
        bodies = await self.store.messages_for_delivery([message_id for message_id, _ in chunk])
        unsigned: list[tuple[bytes, tuple[Domain, ...]]] = []
        for message_id, group in chunk:
            loaded = bodies.pop(message_id, None)  # the raw body is not kept past here
            for sub, prepared in await self._prepare_group(message_id, group, loaded):
                envelopes.append(
                    Envelope(
                        message_id,
                        prepared.mail_from,
                        [(c.recipient_id, c.address) for c in sub],
                        b"",
                    )
                )
                unsigned.append((prepared.data, prepared.signers))
        # The chunk signed in one trip to a thread: a trip per message (the executor's
        # wake-up, the loop's self-pipe) was ~12% of the delivery process (issue 9).
        # DKIM is the last change to the bytes.
        if any(signers for _, signers in unsigned):
            signed = await asyncio.to_thread(dkim.sign_each, unsigned)
        else:
            signed = [data for data, _ in unsigned]
        for env, data in zip(envelopes, signed, strict=True):
            env.data = data
        return envelopes

    async def _record_all(self, claims: list[Claim], outcome: Outcome) -> None:
        """The same outcome for every one of ``claims`` (a refusal before any session)."""
        await self._record(claims, {c.recipient_id: outcome for c in claims})

    async def _record(self, claims: list[Claim], outcomes: dict[int, Outcome]) -> None:
        now = self.clock()
        updates: list[OutcomeUpdate] = []
        for c in claims:
            o = outcomes.get(c.recipient_id) or Outcome(
                RecipientStatus.DEFERRED, "4.3.0 No outcome recorded"
            )
            next_due = None
            if o.status is RecipientStatus.DEFERRED:
                delay = next_delay(c.attempts + 1, self.cfg.retry_first, self.cfg.retry_max)
                if is_expired(c.created_at, now, delay, self.cfg.max_age):
                    o = Outcome(
                        RecipientStatus.EXPIRED,
                        f"{o.reply} (gave up after {int(self.cfg.max_age)} s, max_age)",
                        o.mx,
                        o.tls,
                        o.code,
                    )
                else:
                    next_due = now + delay
            metrics.delivery_outcome(o, c.rcpt_domain, c.created_at, now)  # metrics
            updates.append(OutcomeUpdate(c.recipient_id, o, next_due, c.account_id))
        for attempt in range(20):
            try:
                await self.store.record_outcomes(self.owner, updates)
                break
            except StoreUnavailable as exc:
                # Keep the outcome and retry: the lease is renewed meanwhile, and if we die
                # the rows are retried by another worker (at-least-once, never lost).
                log.warning("recording outcomes failed (try %d): %s", attempt + 1, exc)
                await asyncio.sleep(min(5.0, 0.5 * (attempt + 1)))
        else:
            return
        if self.cfg.dsn:
            try:
                await self._send_dsns(claims, {u.recipient_id: u.outcome for u in updates})
            except Exception:
                # The outcome is recorded and its event emitted; a lost DSN is logged.
                log.exception("queueing a DSN failed")
        if self.after_outcomes is not None:
            try:
                await self.after_outcomes(claims, {u.recipient_id: u.outcome for u in updates})
            except Exception:
                # Bounce bookkeeping (blocklist, suspension) never blocks delivery.
                log.exception("after-outcome processing failed")

    async def _send_dsns(self, claims: list[Claim], outcomes: dict[int, Outcome]) -> None:
        """delivery.dsn: queue one RFC 3464 DSN per message for its final failures."""
        failed: dict[str, list[tuple[Claim, Outcome]]] = defaultdict(list)
        for c in claims:
            o = outcomes.get(c.recipient_id)
            # Never a DSN about a DSN (null sender): RFC 5321 §4.5.5.
            if o is not None and o.status in _FINAL_FAILURES and c.mail_from:
                failed[c.message_id].append((c, o))
        for message_id, items in failed.items():
            first = items[0][0]
            original, _mail_from, _account = await self.store.message_for_delivery(message_id)
            body = build_dsn(
                reporting_mta=self.cfg.helo_name,
                sender=first.mail_from,
                original=original,
                failures=[(c.address, o) for c, o in items],
                arrival=first.created_at,
                now=self.clock(),
            )
            qid = new_queue_id(self.clock())
            await self.store.accept(
                NewMessage(
                    id=qid,
                    account_id=first.account_id,
                    mail_from="",
                    body=body,
                    recipients=(NewRecipient(first.mail_from),),
                    header_from=f"MAILER-DAEMON@{self.cfg.helo_name}",
                    subject="Undelivered Mail Returned to Sender",
                )
            )
            log.info("dsn qid=%s for=%s to=<%s>", qid, message_id, first.mail_from)
        if failed:
            self.wake()

    async def stop(self, grace: float) -> None:
        """Stop claiming; let in-flight attempts finish within ``grace`` seconds."""
        self._stopping = True
        self.wake()
        await drain(self._tasks, grace)
        self.session.close_idle()
        await self.mta_sts.close()
        # Anything still leased by us goes back to the queue now, not after lease expiry.
        with contextlib.suppress(StoreUnavailable):
            for ids in _batches(sorted(self._inflight)):
                await self.store.release_leases(self.owner, ids)


# Leases renewed or released per statement: up to delivery.active_limit ids are held,
# and a statement takes at most 32,767 parameters (asyncpg; SQLite's default too).
LEASE_BATCH = 1000


def _batches(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + LEASE_BATCH] for i in range(0, len(ids), LEASE_BATCH)]


_FINAL_FAILURES = (RecipientStatus.BOUNCED, RecipientStatus.EXPIRED)

# How far ahead of the send a session's messages are read, rendered and signed, in
# bytes of message (at least one message): the next chunk is prepared while this one is
# sent. Preparing a whole session first kept ~260 signed 100 KB copies alive at once at
# 100 sessions (issue 9: delivery's peak memory); 2 KB messages still go in one chunk.
PREPARE_AHEAD_BYTES = 512 * 1024


def _chunks(by_message: dict[str, list[Claim]], budget: int) -> list[list[tuple[str, list[Claim]]]]:
    """The session's messages in order, in chunks of at most ``budget`` bytes (a larger
    message is a chunk of its own)."""
    chunks: list[list[tuple[str, list[Claim]]]] = []
    size = 0
    for message_id, group in by_message.items():
        weight = group[0].size
        if not chunks or size + weight > budget:
            chunks.append([])
            size = 0
        chunks[-1].append((message_id, group))
        size += weight
    return chunks


# An operator's hold (or release) reaches every node's delivery within this many seconds:
# one read of a table of a few rows, beside claims that run many times a second.
HOLDS_REFRESH = 2.0
_UTC = "%Y-%m-%dT%H:%M:%SZ"

# How often a session refused while others to its destination are under way waits for
# another slot before its refusal is recorded (a deferral). A refusal after a slot came
# free is a race with the closing session's teardown or a probe of a raised limit, and
# the next turn usually goes through; ten makes a deferral rare without a loop that never ends.
GIVE_BACKS = 10


@dataclass(frozen=True, slots=True)
class _TlsPlan:
    """A session's TLS: the MX hosts it may use, whether their certificates must verify
    (enforce), whether they are checked only to report (testing), and the recorder of
    its outcome (RFC 8460; None: not counted)."""

    targets: list[Target]
    verify: bool
    probe: bool
    on_tls: Callable[[TlsAttempt], None] | None


def _says_busy(refusal: Outcome) -> bool:
    """Whether a session that could not be opened tells of the destination's load: a
    refusal or a failed connection does; a certificate that does not verify (4.7.5,
    MTA-STS, require_tls) does not."""
    return not refusal.reply.startswith("4.7.5")


class _Ahead:
    """A session's envelopes as an async iterator, each chunk prepared while the one
    before it is sent: at most two chunks' bodies are held at a time."""

    def __init__(
        self,
        prepare: Callable[[list[tuple[str, list[Claim]]]], Awaitable[list[Envelope]]],
        chunks: list[list[tuple[str, list[Claim]]]],
    ) -> None:
        self._prepare = prepare
        self._chunks = deque(chunks)
        self._ready: deque[Envelope] = deque()
        self._next: asyncio.Future[list[Envelope]] | None = None
        self.produced: list[Envelope] = []

    def __aiter__(self) -> _Ahead:
        return self

    async def __anext__(self) -> Envelope:
        while not self._ready:
            if self._next is None:
                if not self._chunks:
                    raise StopAsyncIteration
                self._next = asyncio.ensure_future(self._prepare(self._chunks.popleft()))
            current, self._next = self._next, None
            self._ready.extend(await current)
            self.produced.extend(self._ready)
            if self._chunks:
                self._next = asyncio.ensure_future(self._prepare(self._chunks.popleft()))
        return self._ready.popleft()

    def close(self) -> None:
        """Stop preparing ahead (the session ended early or failed)."""
        if self._next is not None:
            if self._next.done():
                # Retrieve it, so a failed prepare nobody waited for is not logged.
                self._next.cancelled() or self._next.exception()
            else:
                self._next.cancel()
            self._next = None


def _sessions(claims: list[Claim], per_session: int) -> list[list[Claim]]:
    """Split one destination's claims into sessions of at most ``per_session`` messages;
    the recipients of one message stay together (one transaction, RFC 5321 §3.3)."""
    by_message: dict[str, list[Claim]] = defaultdict(list)
    for c in claims:
        by_message[c.message_id].append(c)
    groups = list(by_message.values())
    return [
        [c for g in groups[i : i + per_session] for c in g]
        for i in range(0, len(groups), per_session)
    ]


def _header_from_domain(body: bytes) -> str:
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[:end]
    lines = head.split(b"\r\n")
    for i, line in enumerate(lines):
        if line[:5].lower() == b"from:":
            value = line[5:]
            for cont in lines[i + 1 :]:
                if cont[:1] in (b" ", b"\t"):
                    value += cont
                else:
                    break
            return first_address(value.decode("utf-8", "replace")).rpartition("@")[2].lower()
    return ""
