"""SMTP AUTH decisions: credentials against the store, and failure throttling per IP."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from relay.config import SMTPConfig
from relay.model import Account
from relay.passwords import DUMMY_HASH, verify_password
from relay.queue.store import Store

log = logging.getLogger("relay.auth")

# Failures are counted in one-minute buckets and summed over the configured window, so the
# window slides in one-minute steps and every node sharing the database sees the same count.
_BUCKET = 60.0


@dataclass(frozen=True, slots=True)
class AuthDecision:
    account: Account | None
    reply: str  # the SMTP reply to send

    @property
    def ok(self) -> bool:
        return self.account is not None


# A successful scrypt verification is remembered this long (seconds), like Dovecot's
# auth_cache: scrypt costs ~50 ms of CPU by design, and a client opening a connection
# per message would pay it every time (issue 9). The entry is a keyed hash of the login,
# the password AND the stored hash, so a password change (new stored hash, read fresh
# from the database on every AUTH) invalidates it at once. Failures are never cached.
_VERIFIED_SECONDS = 300.0
_VERIFIED_MAX = 10_000


class Authenticator:
    def __init__(self, store: Store, cfg: SMTPConfig) -> None:
        self.store = store
        self.cfg = cfg
        self._secret = secrets.token_bytes(32)
        self._verified: dict[bytes, float] = {}
        self._inflight: dict[bytes, asyncio.Future[bool]] = {}
        # scrypt runs on threads of its own, one per core: each holds 16 MiB while it
        # runs, and glibc keeps that memory in the arena of whichever thread ran it, so on
        # the shared default executor every one of its threads grew by 16 MiB for good.
        self._scrypt = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="scrypt")

    def _proof(self, login: str, password: str, stored: str) -> bytes:
        msg = b"\0".join((login.encode(), password.encode(), stored.encode()))
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    async def _check(self, login: str, password: str, stored: str) -> bool:
        proof = self._proof(login, password, stored)
        now = time.monotonic()
        until = self._verified.get(proof)
        if until is not None and until > now:
            return True
        # Sessions that present the same credentials at once (a client opening 20
        # connections) share one scrypt run; different ones take turns by core. Each run
        # holds 16 MiB: 20 at once were 320 MB of peak memory (issue 9, tls+auth bench).
        while (running := self._inflight.get(proof)) is not None:
            try:
                return await asyncio.shield(running)
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # this session was cancelled
                # the session that ran it was cancelled: run it here instead
        running = asyncio.get_running_loop().create_future()
        self._inflight[proof] = running
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self._scrypt, verify_password, password, stored)
        except BaseException:
            running.cancel()
            raise
        finally:
            self._inflight.pop(proof, None)
        running.set_result(ok)
        if ok:
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified.clear()
            self._verified[proof] = now + _VERIFIED_SECONDS
        return ok

    def _key(self, ip: str) -> str:
        return f"authfail:{ip}"

    async def throttled(self, ip: str) -> float:
        """Seconds until ``ip`` may try again (0 when it may now)."""
        if self.cfg.auth_fail_limit <= 0:
            return 0.0
        now = self.store.clock()
        failures = await self.store.counter_sum(self._key(ip), now - self.cfg.auth_fail_window)
        if failures < self.cfg.auth_fail_limit:
            return 0.0
        return float(max(_BUCKET, math.ceil(self.cfg.auth_fail_window / 2)))

    async def verify(self, login: str, password: str, ip: str) -> AuthDecision:
        wait = await self.throttled(ip)
        if wait:
            return AuthDecision(
                None,
                f"454 4.7.0 Too many failed authentications from {ip}"
                f" (limit {self.cfg.auth_fail_limit} in {int(self.cfg.auth_fail_window)} s);"
                f" try again in {int(wait)} s",
            )
        found = await self.store.account_credentials(login)
        stored = found[1] if found else DUMMY_HASH
        ok = await self._check(login, password, stored)
        if found is None or not ok:
            now = self.store.clock()
            window = now - now % _BUCKET
            await self.store.incr_counter(
                self._key(ip), window, 1, window + self.cfg.auth_fail_window + _BUCKET
            )
            log.info("auth failed client=%s user=%s", ip, login[:64])
            return AuthDecision(None, "535 5.7.8 Authentication credentials invalid")
        # A suspended account still authenticates; its refusal comes at MAIL with the reason.
        return AuthDecision(found[0], "235 2.7.0 Authentication successful")
