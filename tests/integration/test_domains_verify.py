"""Domain verification against a real DNS server on 127.0.0.1 and a real SQLite store.

Each test publishes exactly what relay says to publish (the bind lines of
``expected_records``), then breaks one thing, and checks status, reason and events.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from relay.config import Config, DatabaseConfig, DNSConfig, DomainsConfig, HostPort
from relay.domains import service
from relay.domains.recheck import Rechecker
from relay.domains.records import KeyRole, RecordKind
from relay.domains.verify import CheckStatus, DomainCheck, Verifier
from relay.errors import Conflict
from relay.model import Domain, DomainStatus, EventKind, RecipientStatus
from relay.passwords import hash_password
from relay.queue.store import NewMessage, NewRecipient, Store
from relay.queue.tables import event
from tests.support.dnsserver import DNSServer
from tests.support.store import Clock


@dataclasses.dataclass
class World:
    store: Store
    cfg: Config
    dns: DNSServer
    clock: Clock

    def with_domains(self, **changes: Any) -> World:
        cfg = dataclasses.replace(
            self.cfg, domains=dataclasses.replace(self.cfg.domains, **changes)
        )
        return dataclasses.replace(self, cfg=cfg)

    async def add(self, name: str = "news.example.net", **kw: Any) -> Domain:
        return await service.add_domain(self.store, self.cfg, name, "alice", **kw)

    async def publish(self, d: Domain, skip: set[RecordKind] | None = None) -> None:
        lines = [
            e.bind_line()
            for e in await service.expected_for(self.store, self.cfg, d)
            if e.kind not in (skip or set())
        ]
        self.dns.add_zone_text("\n".join(lines) + "\n")

    async def verify(self, name: str = "news.example.net") -> service.VerifyResult:
        d = await service.get(self.store, name)
        return await service.verify(self.store, self.cfg, d, Verifier(self.cfg))

    async def events(self, kind: EventKind) -> list[dict[str, Any]]:
        async with self.store._read() as conn:
            rows = (await conn.execute(sa.select(event).where(event.c.kind == kind.value))).all()
        return [json.loads(r.data) for r in rows]


@pytest.fixture
async def world(tmp_path: Path, dns_server: DNSServer) -> AsyncIterator[World]:
    clock = Clock()
    cfg = Config(
        hostname="relay.test",
        database=DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"),
        dns=DNSConfig(nameservers=(HostPort("127.0.0.1", dns_server.port),), timeout=1.0),
    )
    store = Store.open(cfg.database, clock=clock)
    await store.migrate()
    await store.add_account("alice", hash_password("secret-pass-1"))
    try:
        yield World(store, cfg, dns_server, clock)
    finally:
        await store.close()


def _record(check: DomainCheck, kind: RecordKind) -> Any:
    return next(r for r in check.records if r.kind is kind and r.role is KeyRole.ACTIVE)


async def test_publishing_the_printed_records_verifies_a_pending_domain(world: World) -> None:
    d = await world.add()
    assert d.status is DomainStatus.PENDING
    await world.publish(d)
    result = await world.verify()
    assert result.status is DomainStatus.VERIFIED, result.check
    assert [r.status for r in result.check.records] == [CheckStatus.PASS] * 4
    assert (await service.get(world.store, d.name)).status is DomainStatus.VERIFIED
    assert len(await world.events(EventKind.DOMAIN_VERIFIED)) == 1


async def test_missing_dkim_record_fails_naming_dkim_and_nxdomain(world: World) -> None:
    d = await world.add()
    await world.publish(d, skip={RecordKind.DKIM})
    result = await world.verify()
    assert result.status is DomainStatus.FAILED
    dkim = _record(result.check, RecordKind.DKIM)
    assert dkim.status is CheckStatus.FAIL and "NXDOMAIN" in dkim.reason
    assert [r.kind for r in result.check.broken] == [RecordKind.DKIM]
    failed = await world.events(EventKind.DOMAIN_FAILED)
    assert failed and "DKIM" in failed[0]["records"][0]["record"]


async def test_wrong_dkim_key_fails_with_key_mismatch(world: World) -> None:
    d = await world.add()
    other = await world.add("other.example.net")
    await world.publish(d)
    good = await service.expected_for(world.store, world.cfg, other)
    world.dns.set(f"relay._domainkey.{d.name}", "TXT", [good[0].bind_line().split(" TXT ", 1)[1]])
    result = await world.verify()
    dkim = _record(result.check, RecordKind.DKIM)
    assert result.status is DomainStatus.FAILED
    assert "not our public key" in dkim.reason


async def test_dkim_published_with_odd_splitting_and_spaces_still_passes(world: World) -> None:
    d = await world.add()
    await world.publish(d)
    expected = (await service.expected_for(world.store, world.cfg, d))[0]
    key = expected.public_key or ""
    # A DNS console that splits at 100 bytes and adds spaces after semicolons.
    value = f"v=DKIM1;  k=rsa;  p={key[:100]} {key[100:]}"
    chunks = " ".join(f'"{value[i : i + 100]}"' for i in range(0, len(value), 100))
    world.dns.set(f"relay._domainkey.{d.name}", "TXT", [chunks])
    assert (await world.verify()).status is DomainStatus.VERIFIED


async def test_two_spf_records_fail(world: World) -> None:
    d = await world.add()
    await world.publish(d)
    world.dns.add(d.name, "TXT", '"v=spf1 include:_spf.other.example ~all"')
    result = await world.verify()
    spf = _record(result.check, RecordKind.SPF)
    assert result.status is DomainStatus.FAILED
    assert spf.status is CheckStatus.FAIL and "2 SPF records" in spf.reason


async def test_spf_must_authorize_every_outbound_ip_via_pyspf(world: World) -> None:
    w = world.with_domains(outbound_ips=("192.0.2.10", "2001:db8::10"))
    d = await w.add()
    await w.publish(d)
    assert (await w.verify()).status is DomainStatus.VERIFIED
    w.dns.set(d.name, "TXT", ['"v=spf1 ip4:192.0.2.10 ~all"'])
    result = await w.verify()
    spf = _record(result.check, RecordKind.SPF)
    assert result.status is DomainStatus.FAILED
    assert "softfail" in spf.reason and "2001:db8::10" in spf.reason


async def test_spf_include_is_followed_through_the_configured_dns_server(world: World) -> None:
    w = world.with_domains(spf_include="_spf.relay.test", outbound_ips=("192.0.2.10",))
    d = await w.add()
    await w.publish(d)
    assert "include:_spf.relay.test" in _record((await w.verify()).check, RecordKind.SPF).expected
    # The include target does not exist yet: pyspf sees no authorization.
    assert (await w.verify()).status is DomainStatus.FAILED
    w.dns.add("_spf.relay.test", "TXT", '"v=spf1 ip4:192.0.2.0/24 -all"')
    result = await w.verify()
    assert result.status is DomainStatus.VERIFIED, result.check
    assert w.dns.query_count("_spf.relay.test", "TXT") >= 1


async def test_missing_mx_fails(world: World) -> None:
    d = await world.add()
    await world.publish(d, skip={RecordKind.MX})
    result = await world.verify()
    mx = _record(result.check, RecordKind.MX)
    assert result.status is DomainStatus.FAILED
    assert mx.status is CheckStatus.FAIL and "no MX record" in mx.reason


async def test_mx_without_the_bounce_host_fails(world: World) -> None:
    d = await world.add()
    await world.publish(d)
    world.dns.set(d.name, "MX", ["10 mx.elsewhere.example."])
    result = await world.verify()
    mx = _record(result.check, RecordKind.MX)
    assert result.status is DomainStatus.FAILED
    assert "do not include relay.test" in mx.reason
    assert "mx.elsewhere.example" in mx.current


async def test_dmarc_without_p_tag_is_only_a_warning(world: World) -> None:
    d = await world.add()
    await world.publish(d)
    world.dns.set(f"_dmarc.{d.name}", "TXT", ['"v=DMARC1; rua=mailto:x@example.net"'])
    result = await world.verify()
    dmarc = _record(result.check, RecordKind.DMARC)
    assert result.status is DomainStatus.VERIFIED
    assert dmarc.status is CheckStatus.WARN and "no p= tag" in dmarc.reason


@pytest.mark.parametrize("mode", ["servfail", "timeout"])
async def test_dns_failure_keeps_the_status(world: World, mode: str) -> None:
    d = await world.add()
    await world.publish(d)
    assert (await world.verify()).status is DomainStatus.VERIFIED
    world.dns.fail(f"relay._domainkey.{d.name}", mode)  # type: ignore[arg-type]
    result = await world.verify()
    dkim = _record(result.check, RecordKind.DKIM)
    assert result.status is DomainStatus.VERIFIED
    assert dkim.status is CheckStatus.TEMP
    assert ("SERVFAIL" if mode == "servfail" else "timeout") in dkim.reason
    assert not await world.events(EventKind.DOMAIN_FAILED)


async def test_subdomain_is_its_own_domain_and_verifies(world: World) -> None:
    await world.add("example.net")
    sub = await world.add("abc.example.net")
    await world.publish(sub)
    assert (await world.verify("abc.example.net")).status is DomainStatus.VERIFIED
    assert (await service.get(world.store, "example.net")).status is DomainStatus.PENDING


async def test_eleventh_domain_of_an_account_is_refused(world: World) -> None:
    w = world.with_domains(dkim_algorithm="ed25519")  # fast keys
    for i in range(10):
        await w.add(f"d{i}.example.net")
    with pytest.raises(Conflict, match="limit is 10"):
        await w.add("d10.example.net")


async def test_recheck_flips_verified_to_failed_and_back(world: World) -> None:
    w = world.with_domains(recheck_interval=3600.0)
    d = await w.add()
    await w.publish(d)
    assert (await w.verify()).status is DomainStatus.VERIFIED
    rechecker = Rechecker(w.store, w.cfg)
    assert await rechecker.once() == 0  # checked just now: not due
    w.dns.remove(f"relay._domainkey.{d.name}")
    w.clock.now += 3601
    assert await rechecker.once() == 1
    assert (await service.get(w.store, d.name)).status is DomainStatus.FAILED
    await w.publish(d)
    w.clock.now += 3601
    assert await rechecker.once() == 1
    assert (await service.get(w.store, d.name)).status is DomainStatus.VERIFIED


async def test_key_rotation_switches_selector_only_after_the_new_record_verifies(
    world: World,
) -> None:
    d = await world.add()
    await world.publish(d)
    await world.verify()
    selector = await service.rotate_key(world.store, world.cfg, d)
    assert selector.startswith("relay-")
    expected = await service.expected_for(world.store, world.cfg, d)
    assert [e.selector for e in expected if e.kind is RecordKind.DKIM] == ["relay", selector]
    result = await world.verify()  # new record not yet published
    assert result.rotated_to is None
    assert (await service.get(world.store, d.name)).dkim_selector == "relay"
    await world.publish(d)
    result = await world.verify()
    assert result.rotated_to == selector and result.status is DomainStatus.VERIFIED
    now = await service.get(world.store, d.name)
    assert now.dkim_selector == selector and now.dkim_private_key != d.dkim_private_key
    await service.rotate_key(world.store, world.cfg, now)
    with pytest.raises(Conflict, match="already waiting"):
        await service.rotate_key(world.store, world.cfg, now)


async def test_remove_refuses_while_mail_is_queued_unless_forced(world: World) -> None:
    d = await world.add()
    await world.store.accept(
        NewMessage(
            id="m1",
            account_id=d.account_id,
            mail_from=f"a@{d.name}",
            body=b"Subject: x\r\n\r\nhi\r\n",
            recipients=(NewRecipient("b@example.org"),),
        )
    )
    with pytest.raises(Conflict, match="1 message"):
        await service.remove(world.store, d, force=False)
    assert await service.remove(world.store, d, force=True) == 1
    assert await world.store.get_domain(d.name) is None
    view = await world.store.message_view("m1")
    assert view.recipients[0].status == RecipientStatus.DELETED.value


async def test_dual_signing_domain_publishes_and_verifies_both_keys(world: World) -> None:
    d = await world.add(algorithm="both")
    expected = await service.expected_for(world.store, world.cfg, d)
    dkim = [e for e in expected if e.kind is RecordKind.DKIM]
    assert [e.selector for e in dkim] == ["relay", "relay-ed25519"]
    assert "k=ed25519" in dkim[1].value
    await world.publish(d)
    assert (await world.verify()).status is DomainStatus.VERIFIED
    world.dns.remove(f"relay-ed25519._domainkey.{d.name}")
    assert (await world.verify()).status is DomainStatus.FAILED


def test_domains_config_defaults_match_the_seeds() -> None:
    cfg = DomainsConfig()
    assert cfg.max_domains_per_account == 10
    assert cfg.recheck_interval == 6 * 3600
    assert cfg.required == ("dkim", "spf", "mx")
