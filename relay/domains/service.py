"""Domain operations shared by the CLI and the server: add, expected records, verify and
record the result (status, event), key rotation, removal."""

from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass

from relay.config import Config
from relay.domains.keys import generate_ed25519, generate_rsa
from relay.domains.records import DkimKey, ExpectedRecord, KeyRole, expected_records
from relay.domains.verify import CheckStatus, DomainCheck, Verifier
from relay.errors import Conflict, NotFound
from relay.model import Domain, DomainStatus, EventKind
from relay.queue import domains as sql
from relay.queue.store import Store

log = logging.getLogger("relay.domains")

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"


def _normalise(name: str) -> str:
    return name.strip().lower().rstrip(".")


async def _new_key(cfg: Config, algorithm: str) -> str:
    if algorithm == ED25519:
        return generate_ed25519()
    # RSA generation takes tens of milliseconds to seconds: off the event loop.
    return await asyncio.to_thread(generate_rsa, cfg.dkim.key_bits)


async def add_domain(
    store: Store,
    cfg: Config,
    name: str,
    account_name: str,
    *,
    verified: bool = False,
    warmup: bool = True,
    algorithm: str | None = None,
) -> Domain:
    name = _normalise(name)
    if not name or "." not in name or any(not label for label in name.split(".")):
        raise Conflict(f"{name!r} is not a domain name")
    account = await store.get_account(account_name)
    cap = cfg.domains.max_domains_per_account
    override = account.settings.get("max_domains")
    if isinstance(override, int) and not isinstance(override, bool) and override >= 0:
        cap = override
    choice = algorithm or cfg.domains.dkim_algorithm
    selector = cfg.dkim.selector
    extra: list[sql.NewKey] = []
    if choice == "ed25519":
        main = sql.NewKey(selector, ED25519, await _new_key(cfg, ED25519), "active")
    else:
        main = sql.NewKey(selector, RSA, await _new_key(cfg, RSA), "active")
        if choice == "both":
            # RFC 8463 §3 suggests signing with both until Ed25519 is widely verified.
            extra.append(
                sql.NewKey(f"{selector}-ed25519", ED25519, await _new_key(cfg, ED25519), "extra")
            )
    return await sql.add_domain_capped(
        store, name, account.id, main, extra, cap=cap, verified=verified, warmup=warmup
    )


async def get(store: Store, name: str) -> Domain:
    d = await store.get_domain(_normalise(name))
    if d is None:
        raise NotFound(f"no domain named {name!r}")
    return d


async def dkim_keys(store: Store, d: Domain) -> list[DkimKey]:
    """The signing key first, then extra (dual-signing) keys, then a pending rotation."""
    keys = [DkimKey(d.dkim_selector, d.dkim_algorithm, d.dkim_private_key, KeyRole.ACTIVE)]
    for k in await sql.keys_of(store, d.id, ("extra", "pending")):
        keys.append(DkimKey(k.selector, k.algorithm, k.private_key, KeyRole(k.status)))
    return keys


async def expected_for(store: Store, cfg: Config, d: Domain) -> list[ExpectedRecord]:
    return expected_records(d.name, await dkim_keys(store, d), cfg)


async def last_check(store: Store, d: Domain) -> DomainCheck | None:
    return DomainCheck.from_json(d.name, await sql.stored_checks(store, d.name))


@dataclass(frozen=True, slots=True)
class VerifyResult:
    domain: Domain
    check: DomainCheck
    status: DomainStatus
    rotated_to: str | None = None


async def verify(store: Store, cfg: Config, d: Domain, verifier: Verifier) -> VerifyResult:
    """Check DNS, store the per-record results and the new status (event on change)."""
    expected = await expected_for(store, cfg, d)
    check = await verifier.check(d.name, expected, store.clock())
    status = check.outcome(d.status)
    kind: EventKind | None = None
    data: dict[str, object] = {"domain": d.name}
    if status is DomainStatus.VERIFIED and d.status is not DomainStatus.VERIFIED:
        kind = EventKind.DOMAIN_VERIFIED
    elif status is DomainStatus.FAILED and d.status is not DomainStatus.FAILED:
        kind = EventKind.DOMAIN_FAILED
        data["records"] = [
            {"record": r.label, "name": r.name, "seen": r.current, "reason": r.reason}
            for r in check.broken
        ]
    await sql.save_check(store, d, status, check.to_json(), kind, data)
    rotated_to = None
    pending = [
        r for r in check.records if r.role is KeyRole.PENDING and r.status is CheckStatus.PASS
    ]
    if pending:
        # The new selector is visible in DNS: from now on sign with it (the worker's
        # 30 s domain cache picks the switch up).
        for k in await sql.keys_of(store, d.id, ("pending",)):
            if k.selector == pending[0].selector:
                await sql.promote_key(store, d, k.id)
                rotated_to = k.selector
                log.info("domain %s: DKIM key rotated to selector %s", d.name, k.selector)
    if kind is not None:
        log.info("domain %s: %s -> %s", d.name, d.status.value, status.value)
    if rotated_to is not None and status is not DomainStatus.VERIFIED:
        # The old selector may be what failed (its record already replaced by the new
        # one): judge the domain again with the key it now signs with.
        again = await verify(store, cfg, await get(store, d.name), verifier)
        return VerifyResult(again.domain, again.check, again.status, rotated_to)
    return VerifyResult(d, check, status, rotated_to)


async def rotate_key(store: Store, cfg: Config, d: Domain) -> str:
    """Create a pending key under a new selector; returns the selector."""
    used = await sql.selectors_in_use(store, d.id)
    stamp = datetime.datetime.fromtimestamp(store.clock(), datetime.UTC).strftime("%Y%m%d")
    base = f"{cfg.dkim.selector}-{stamp}"
    selector, n = base, 2
    while selector in used:
        selector, n = f"{base}-{n}", n + 1
    algorithm = ED25519 if d.dkim_algorithm == ED25519 else RSA
    key = await _new_key(cfg, algorithm)
    await sql.add_key(store, d.id, sql.NewKey(selector, algorithm, key, "pending"))
    return selector


async def remove(store: Store, d: Domain, *, force: bool) -> int:
    """Delete the domain; with queued mail from it only when forced (that mail is deleted
    too, since it could no longer be signed). Returns the number of messages deleted."""
    queued = await sql.queued_messages_from(store, d.name)
    if queued and not force:
        raise Conflict(
            f"{len(queued)} message(s) from {d.name} are still queued: wait until they are"
            " delivered, or use --force to delete them with the domain"
        )
    for message_id in queued:
        await store.delete_message(message_id)
    await sql.delete_domain(store, d)
    return len(queued)


def broken_summary(check: DomainCheck) -> str:
    """One line naming each broken required record and why (for SMTP replies)."""
    return "; ".join(f"{r.label} record {r.name}: {r.reason}" for r in check.broken)
