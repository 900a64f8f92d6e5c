"""The SMTP client side: one session to a destination, several messages over it.

STARTTLS is tried first whenever offered (opportunistic TLS, RFC 3207; an unverifiable
certificate still encrypts, as RFC 7435 allows). With ``require_tls`` a destination that
offers no STARTTLS is deferred rather than sent in clear.

Sessions outlive their batch: a healthy one is kept idle for ``cache_time`` seconds and
the next batch to the same MX hosts takes it instead of connecting, greeting and EHLO
(and STARTTLS) again, as Postfix's connection cache does (smtp_connection_cache_time_limit
2 s, smtp_connection_reuse_time_limit 300 s are its defaults and ours). At a steady trickle
every message was one batch, so every message paid a whole session (issue 9).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from relay import metrics
from relay.delivery.mtasts import verifying_context
from relay.delivery.mx import Target
from relay.delivery.smtpclient import Reply, ReplyError, SessionBroken, SMTPConnection
from relay.delivery.tlsrpt import Result, TlsAttempt, certificate_result
from relay.model import Outcome, RecipientStatus

log = logging.getLogger("relay.delivery")

# _connect's answer when a probe's certificate check failed: connect again, unchecked.
_AGAIN = Outcome(RecipientStatus.DEFERRED, "4.7.5 connect again without the check", None)


@dataclass
class Envelope:
    """One message to one destination: several recipients in one transaction."""

    message_id: str
    mail_from: str
    recipients: list[tuple[int, str]]  # (recipient_id, address)
    data: bytes
    outcomes: dict[int, Outcome] = field(default_factory=dict)


class _Pending:
    """The envelopes still to send: a list, or a source that prepares them as the session
    takes them (worker.py prepares a session's messages a few hundred KB ahead)."""

    def __init__(self, envelopes: Sequence[Envelope] | AsyncIterator[Envelope]) -> None:
        self._source: AsyncIterator[Envelope] | None = None
        if isinstance(envelopes, Sequence):
            self._items = deque(envelopes)
        else:
            self._items = deque()
            self._source = envelopes

    async def first(self) -> Envelope | None:
        """The next envelope to send (it stays pending until ``pop``); None at the end."""
        if not self._items and self._source is not None:
            try:
                self._items.append(await anext(self._source))
            except StopAsyncIteration:
                self._source = None
            except (SessionBroken, OSError) as exc:
                # The source's failure, not the session's: deliver() must not take it
                # for a broken connection and defer an envelope that was never sent.
                raise RuntimeError("preparing the next message failed") from exc
        return self._items[0] if self._items else None

    def pop(self) -> Envelope:
        return self._items.popleft()

    async def rest(self) -> list[Envelope]:
        """Every envelope not yet sent, the source's included; none is left pending."""
        if self._source is not None:
            async for env in self._source:
                self._items.append(env)
            self._source = None
        rest = list(self._items)
        self._items.clear()
        return rest


def classify(code: int, text: str, mx: str | None, tls: bool) -> Outcome:
    reply = f"{code} {text}".strip()
    if 200 <= code < 300:
        status = RecipientStatus.DELIVERED
    elif 500 <= code < 600:
        status = RecipientStatus.BOUNCED
    else:
        status = RecipientStatus.DEFERRED
    return Outcome(status, reply, mx, tls, code)


# Sessions are shared by destinations with the same MX hosts (as Postfix shares by
# address): the (name, port) of each target, in order.
# A session opened with a verified certificate (MTA-STS) is never reused for one that
# needs none, nor the other way round: the flag is part of the key.
CacheKey = tuple[bool, tuple[tuple[str, int], ...]]


def _cache_key(targets: Sequence[Target], verify: bool = False) -> CacheKey:
    return verify, tuple((t.name, t.port) for t in targets)


@dataclass(eq=False)
class _Idle:
    client: SMTPConnection
    mx: str
    tls: bool
    expiry: asyncio.TimerHandle | None = None


def _client_tls() -> ssl.SSLContext:
    # Opportunistic: encrypt even when the certificate cannot be verified (RFC 7435).
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class DestinationSession:
    def __init__(
        self,
        helo: str,
        require_tls: bool,
        connect_timeout: float,
        command_timeout: float,
        source_address: str | None = None,
        cache_time: float = 2.0,
        reuse_time: float = 300.0,
        max_idle: int = 50,
        ca_file: str | None = None,
    ) -> None:
        self.helo = helo
        self.require_tls = require_tls
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.source_address = source_address
        self.cache_time = cache_time
        self.reuse_time = reuse_time
        self.max_idle = max_idle
        self._tls = _client_tls()
        # MTA-STS (mtasts.py): the chain must verify and the name match (RFC 8461 §4.2).
        self._verified = verifying_context(ca_file)
        self._idle: dict[CacheKey, list[_Idle]] = {}

    @property
    def idle_sessions(self) -> int:
        return sum(map(len, self._idle.values()))

    def _take(self, key: CacheKey) -> _Idle | None:
        """The most recently parked session to these MX hosts that is still usable."""
        parked = self._idle.get(key)
        while parked:
            entry = parked.pop()
            if entry.expiry is not None:
                entry.expiry.cancel()
            if entry.client.is_idle_clean:
                metrics.delivery_session_reused()  # metrics
                return entry
            entry.client.close()
        if parked is not None and not parked:
            del self._idle[key]
        return None

    def _park(self, key: CacheKey, client: SMTPConnection, mx: str, tls: bool) -> bool:
        """Keep a healthy session for the next batch; False when it should QUIT now."""
        if (
            self.cache_time <= 0
            or self.idle_sessions >= self.max_idle
            # A session in clear (a "TLS-Required: No" batch's) must not carry the next
            # batch when TLS is required.
            or (self.require_tls and not tls)
            or not client.is_idle_clean
            or time.monotonic() - client.opened_at >= self.reuse_time
        ):
            return False
        entry = _Idle(client, mx, tls)
        entry.expiry = asyncio.get_running_loop().call_later(
            self.cache_time, self._expire, key, entry
        )
        self._idle.setdefault(key, []).append(entry)
        return True

    def _expire(self, key: CacheKey, entry: _Idle) -> None:
        parked = self._idle.get(key, [])
        if entry in parked:
            parked.remove(entry)
            if not parked:
                del self._idle[key]
        entry.client.quit_nowait()

    def close_idle(self) -> None:
        """QUIT every parked session (shutdown)."""
        for key, parked in list(self._idle.items()):
            for entry in list(parked):
                if entry.expiry is not None:
                    entry.expiry.cancel()
                self._expire(key, entry)

    async def _open(
        self,
        targets: Sequence[Target],
        verify: bool = False,
        on_tls: Callable[[TlsAttempt], None] | None = None,
        probe: bool = False,
        relaxed: bool = False,
    ) -> tuple[SMTPConnection, str, bool] | Outcome:
        """Connect to the first target that answers 2xx; an Outcome when none does.

        ``verify`` (the domain's MTA-STS policy is enforced): a target must offer
        STARTTLS and show a certificate valid for its MX name, or it is skipped.
        ``probe`` (its policy is in testing mode): the certificate is checked as
        ``verify`` would, and when it fails the failure is reported and the same
        address is connected to again with opportunistic TLS (RFC 8461 §5: testing
        reports, it does not refuse). ``on_tls``: each session's TLS outcome (tlsrpt.py).
        ``relaxed`` (RFC 8689 "TLS-Required: No"): ``require_tls`` is waived.
        """
        last = Outcome(RecipientStatus.DEFERRED, "4.4.1 No MX host could be reached", None)
        report = on_tls or (lambda _a: None)
        for target in targets:
            for addr in target.addresses:
                checking = verify or probe
                while True:
                    opened = await self._connect(target, addr, verify, checking, report, relaxed)
                    if isinstance(opened, tuple):
                        return opened
                    if opened is _AGAIN:
                        checking = False
                        continue
                    last = opened
                    break
        return last

    async def _connect(
        self,
        target: Target,
        addr: str,
        verify: bool,
        checking: bool,
        report: Callable[[TlsAttempt], None],
        relaxed: bool = False,
    ) -> tuple[SMTPConnection, str, bool] | Outcome:
        """One connection to ``addr``: the session, why there is none, or _AGAIN (a
        probe's certificate failed: connect again without the check)."""
        client: SMTPConnection | None = None
        stage = "connect"

        def failed(result: Result, detail: str) -> None:
            sending = client.local_ip if client is not None else ""
            report(TlsAttempt(result, target.name, addr, sending, detail))

        try:
            client = await SMTPConnection.open(
                addr,
                target.port,
                connect_timeout=self.connect_timeout,
                source_address=self.source_address,
            )
            client.timeout = self.command_timeout
            await client.ehlo(self.helo)
            tls = False
            if client.supports("STARTTLS"):
                stage = "starttls"
                await client.starttls(self._verified if checking else self._tls, target.name)
                stage = "ehlo"
                report(TlsAttempt(Result.SUCCESS, target.name, addr))
                await client.ehlo(self.helo)
                tls = True
            else:
                failed(Result.STARTTLS_NOT_SUPPORTED, "STARTTLS not in the EHLO reply")
                if verify:
                    await client.quit()
                    return Outcome(
                        RecipientStatus.DEFERRED,
                        f"4.7.5 {target.name} does not offer STARTTLS, which its domain's"
                        " MTA-STS policy requires",
                        target.name,
                    )
                if self.require_tls and not relaxed:
                    await client.quit()
                    return Outcome(
                        RecipientStatus.DEFERRED,
                        f"4.7.5 {target.name} does not offer STARTTLS and"
                        " delivery.require_tls is on",
                        target.name,
                    )
            metrics.delivery_connection(tls)  # metrics
            return client, target.name, tls
        except ReplyError as exc:
            if stage == "starttls":
                failed(Result.STARTTLS_NOT_SUPPORTED, f"STARTTLS answered {exc.code} {exc.text}")
            last = Outcome(
                RecipientStatus.DEFERRED,
                f"{exc.code} {exc.text} (greeting from {target.name})",
                target.name,
                code=exc.code,
            )
        except ssl.SSLCertVerificationError as exc:
            failed(certificate_result(exc), str(exc.verify_message))
            if not verify:  # a probe: report, then deliver as without a policy
                if client is not None:
                    client.abort()
                return _AGAIN
            last = Outcome(
                RecipientStatus.DEFERRED,
                f"4.7.5 Certificate of {target.name} does not verify"
                f" ({exc.verify_message}), which its domain's MTA-STS policy requires",
                target.name,
            )
        except (SessionBroken, OSError, TimeoutError) as exc:
            if stage == "starttls":
                failed(Result.VALIDATION_FAILURE, f"TLS handshake: {type(exc).__name__}: {exc}")
            last = Outcome(
                RecipientStatus.DEFERRED,
                f"4.4.1 Connection to {target.name} [{addr}]:{target.port} failed:"
                f" {type(exc).__name__}: {exc}".strip(),
                target.name,
            )
        if client is not None:
            await client.quit()
        return last

    async def deliver(
        self,
        targets: Sequence[Target],
        envelopes: Sequence[Envelope] | AsyncIterator[Envelope],
        on_done: Callable[[Envelope], None] | None = None,
        on_open: Callable[[], None] | None = None,
        verify: bool = False,
        give_back: Callable[[Outcome], bool] | None = None,
        on_tls: Callable[[TlsAttempt], None] | None = None,
        probe: bool = False,
        relaxed: bool = False,
    ) -> Outcome | None:
        """Deliver each envelope over one session; fill in every recipient's outcome.

        Returns why, when no MX host could be reached (every envelope is deferred or
        bounced with it); None once a session was had. ``on_open`` is called for each
        session opened or taken from the cache. ``verify``: TLS with a certificate valid
        for the MX name is required (MTA-STS, see _open); ``probe``, ``on_tls`` and
        ``relaxed``: see _open. ``give_back``: asked when no
        session could be opened; True leaves the envelopes not yet sent without an
        outcome (and ``on_done``), for the caller to try again.

        ``envelopes`` may be an async iterator: each is then taken only when the session
        is ready to send it, so the caller need not hold a whole session's prepared
        bodies at once.

        ``on_done`` is called as soon as an envelope's outcomes are final, so the caller
        can record them while the next message is sent: the shorter the time between
        the MX's 250 and our COMMIT, the fewer duplicates a crash can cause.
        """
        pending = _Pending(envelopes)
        done = on_done or (lambda _env: None)
        reconnects = 0
        key = _cache_key(targets, verify)
        while await pending.first() is not None:
            parked = self._take(key)
            if parked is not None:
                client, mx, tls = parked.client, parked.mx, parked.tls
            else:
                opened = await self._open(targets, verify, on_tls, probe, relaxed)
                if isinstance(opened, Outcome):
                    if give_back is not None and give_back(opened):
                        return opened
                    for env in await pending.rest():
                        for rid, _ in env.recipients:
                            env.outcomes[rid] = opened
                        done(env)
                    return opened
                client, mx, tls = opened
            if on_open is not None:
                on_open()
            healthy = False
            try:
                while (sending := await pending.first()) is not None:
                    started = time.monotonic()
                    await self._transaction(client, sending, mx, tls)
                    pending.pop()
                    # Sent: let the body go now, not when the whole session ends (with 100
                    # KB messages, 50 sessions of 20 held ~100 MB of sent bodies: issue 9).
                    sending.data = b""
                    done(sending)
                    for rid, addr in sending.recipients:
                        o = sending.outcomes[rid]
                        log.info(
                            "delivery qid=%s rcpt_domain=%s mx=%s tls=%s status=%s reply=%r"
                            " ms=%.0f",
                            sending.message_id,
                            addr.rpartition("@")[2],
                            mx,
                            int(tls),
                            o.status.value,
                            o.reply[:200],
                            (time.monotonic() - started) * 1000,
                        )
                healthy = True
            except (SessionBroken, OSError) as exc:
                if parked is not None and not client.body_sent:
                    # A parked session the server had dropped: the message never reached
                    # it (no body sent), so it goes again on a fresh session, no deferral.
                    log.debug("parked session to %s was closed: %r", mx, exc)
                    continue
                # The session died mid-way: the current envelope is unknown-state, so it
                # is deferred (never assumed delivered); the rest get one fresh session.
                env = pending.pop()
                for rid, _ in env.recipients:
                    env.outcomes.setdefault(
                        rid,
                        Outcome(
                            RecipientStatus.DEFERRED,
                            f"4.4.2 Connection to {mx} lost: {type(exc).__name__}",
                            mx,
                            tls,
                        ),
                    )
                done(env)
                reconnects += 1
                if reconnects > 1:
                    for rest in await pending.rest():
                        for rid, _ in rest.recipients:
                            rest.outcomes[rid] = Outcome(
                                RecipientStatus.DEFERRED,
                                f"4.4.2 Connection to {mx} lost repeatedly",
                                mx,
                                tls,
                            )
                        done(rest)
                    return None
                continue
            finally:
                if not (healthy and self._park(key, client, mx, tls)):
                    await client.quit()
        return None

    async def _transaction(self, client: SMTPConnection, env: Envelope, mx: str, tls: bool) -> None:
        options = [f"SIZE={len(env.data)}"]
        # bytes.isascii runs in C; a Python loop over each byte cost ~5 ms per 100 KB.
        if client.supports("8BITMIME") and not env.data.isascii():
            options.append("BODY=8BITMIME")
        addresses = [env.mail_from, *(a for _, a in env.recipients)]
        if not all(a.isascii() for a in addresses):
            if not client.supports("SMTPUTF8"):
                # RFC 6531 §3.4: without SMTPUTF8 such a message cannot be sent here.
                o = Outcome(
                    RecipientStatus.BOUNCED,
                    f"550 5.6.7 {mx} does not support SMTPUTF8, needed for a non-ASCII address",
                    mx,
                    tls,
                    550,
                )
                for rid, _ in env.recipients:
                    env.outcomes[rid] = o
                return
            options.append("SMTPUTF8")
        replies = await client.transaction(
            env.mail_from, options, [a for _, a in env.recipients], env.data
        )
        if not replies.mail.ok:
            o = _classify(replies.mail, mx, tls)
            for rid, _ in env.recipients:
                env.outcomes[rid] = o
            await _rset(client)
            return
        accepted: list[int] = []
        for (rid, _), reply in zip(env.recipients, replies.rcpts, strict=True):
            if reply.ok:
                accepted.append(rid)
            else:
                env.outcomes[rid] = _classify(reply, mx, tls)
        if not accepted:
            await _rset(client)
            return
        assert replies.data is not None  # DATA is sent whenever a recipient was accepted
        o = _classify(replies.data, mx, tls)
        if not replies.data.ok:
            await _rset(client)
        for rid in accepted:
            env.outcomes[rid] = o


def _classify(reply: Reply, mx: str, tls: bool) -> Outcome:
    return classify(reply.code, reply.text, mx, tls)


async def _rset(client: SMTPConnection) -> None:
    # A failed RSET leaves the session to fail on the next command, which defers it.
    with contextlib.suppress(SessionBroken, OSError):
        await client.rset()
