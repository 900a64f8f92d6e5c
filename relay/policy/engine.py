"""The policy engine: ordered checks per SMTP stage; the first refusal wins.

A check that raises or takes too long yields a temporary refusal (fail safe: never
accept on error). Checks only decide; counting lives in the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from relay.model import ACCEPT, Account, Stage, Verdict

log = logging.getLogger("relay.policy")

CHECK_FAILED = Verdict(451, "4.3.0", "Temporary policy failure, try again later", "policy_error")


@dataclass(frozen=True, slots=True)
class Request:
    """What the SMTP layer knows at a stage, in SMTP-free terms."""

    stage: Stage
    listener: str
    client_ip: str
    account: Account | None = None
    mail_from: str | None = None
    rcpt: str | None = None
    recipients: tuple[str, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0
    # The transaction's scratchpad (Haraka's transaction.notes): a check may leave what it
    # read at RCPT for a check at DATA, saving a database trip. Empty when the caller keeps
    # none; every check must still work then.
    notes: dict[str, object] = field(default_factory=dict)


class Check(Protocol):
    name: str
    stages: frozenset[Stage]

    async def __call__(self, request: Request) -> Verdict | None:
        """None (or an ok verdict) lets the request through."""
        ...


class Policy:
    def __init__(self, checks: Sequence[Check], timeout: float = 10.0) -> None:
        self.checks = list(checks)
        self.timeout = timeout

    async def check(self, request: Request) -> Verdict:
        for chk in self.checks:
            if request.stage not in chk.stages:
                continue
            try:
                # asyncio.timeout, not wait_for: wait_for ran each check in a Task of its
                # own (a Task, a timer and a trip through the event loop per check, about
                # 12 per message: ~5% of a listener's CPU, issue 9). Same deadline per
                # check; TimeoutError is an Exception like any other failure.
                async with asyncio.timeout(self.timeout):
                    verdict = await chk(request)
            except Exception:
                log.exception("policy check %s failed", chk.name)
                return CHECK_FAILED
            if verdict is not None and not verdict.ok:
                return verdict
        return ACCEPT
