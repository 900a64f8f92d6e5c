"""The expected DNS records: zone-file syntax, TXT splitting, host records, SPF text."""

from __future__ import annotations

import dataclasses

import dns.rdatatype
import dns.zone
import pytest

from relay.config import Config, DomainsConfig, load_config
from relay.domains.keys import generate_ed25519, generate_rsa
from relay.domains.records import (
    DkimKey,
    KeyRole,
    RecordKind,
    expected_records,
    host_record,
    spf_mechanisms,
    spf_value,
    txt_strings,
    zone_apex,
)
from relay.domains.verify import _tags
from relay.errors import ConfigError

RSA_PEM = generate_rsa(2048)


def cfg(**domains: object) -> Config:
    return Config(hostname="relay.example.com", domains=DomainsConfig(**domains))  # type: ignore[arg-type]


def test_txt_values_longer_than_255_bytes_are_split_into_quoted_strings() -> None:
    text = txt_strings("a" * 600)
    assert text == '"' + "a" * 255 + '" "' + "a" * 255 + '" "' + "a" * 90 + '"'


def test_bind_lines_parse_as_a_zone_and_join_back_to_the_expected_values() -> None:
    records = expected_records("news.example.net", [DkimKey("relay", "rsa-sha256", RSA_PEM)], cfg())
    text = "\n".join(r.bind_line() for r in records)
    assert all(line.split()[0].endswith(".") for line in text.splitlines())
    zone = dns.zone.from_text(
        text, origin="news.example.net.", relativize=False, check_origin=False
    )
    txt = {
        str(name): b"".join(rdata.strings).decode()
        for name, _ttl, rdata in zone.iterate_rdatas(dns.rdatatype.TXT)
        if not b"".join(rdata.strings).startswith(b"v=spf1")
    }
    dkim = records[0]
    assert txt["relay._domainkey.news.example.net."] == dkim.value
    assert len(dkim.value) > 255
    mx = [str(r) for _n, _t, r in zone.iterate_rdatas(dns.rdatatype.MX)]
    assert mx == ["10 relay.example.com."]


def test_required_records_follow_the_config() -> None:
    records = expected_records(
        "x.example", [DkimKey("relay", "ed25519-sha256", generate_ed25519())], cfg()
    )
    assert {r.kind: r.required for r in records} == {
        RecordKind.DKIM: True,
        RecordKind.SPF: True,
        RecordKind.MX: True,
        RecordKind.DMARC: False,
    }
    assert "k=ed25519" in records[0].value


def test_pending_rotation_key_is_listed_but_never_required() -> None:
    keys = [
        DkimKey("relay", "rsa-sha256", RSA_PEM),
        DkimKey("relay-2", "ed25519-sha256", generate_ed25519(), KeyRole.PENDING),
    ]
    dkim = [r for r in expected_records("x.example", keys, cfg()) if r.kind is RecordKind.DKIM]
    assert [(r.selector, r.required) for r in dkim] == [("relay", True), ("relay-2", False)]


@pytest.mark.parametrize(
    ("domains", "value"),
    [
        ({"spf_include": "spf.relay.example"}, "v=spf1 include:spf.relay.example ~all"),
        (
            {"outbound_ips": ("192.0.2.1", "2001:db8::1")},
            "v=spf1 ip4:192.0.2.1 ip6:2001:db8::1 ~all",
        ),
        ({}, "v=spf1 a:relay.example.com ~all"),
    ],
)
def test_spf_value_prefers_include_then_addresses_then_hostname(
    domains: dict[str, object], value: str
) -> None:
    assert spf_value(cfg(**domains)) == value


def test_spf_mechanisms_ignore_all_and_case() -> None:
    assert spf_mechanisms("v=spf1 A:Relay.example.com include:x ?all") == [
        "a:relay.example.com",
        "include:x",
    ]


@pytest.mark.parametrize(
    ("name", "domain", "host"),
    [
        ("example.com", "example.com", "@"),
        ("relay._domainkey.example.com", "example.com", "relay._domainkey"),
        ("_dmarc.abc.example.com", "abc.example.com", "_dmarc.abc"),
        ("relay._domainkey.abc.example.com", "abc.example.com", "relay._domainkey.abc"),
        ("abc.example.com", "abc.example.com", "abc"),
        ("_dmarc.shop.example.co.uk", "shop.example.co.uk", "_dmarc.shop"),
    ],
)
def test_host_record_is_relative_to_the_registered_domain(
    name: str, domain: str, host: str
) -> None:
    assert host_record(name, domain) == host


def test_zone_apex_knows_two_level_country_suffixes() -> None:
    assert zone_apex("a.b.example.co.uk") == "example.co.uk"
    assert zone_apex("a.b.example.com") == "example.com"


def test_dkim_tags_tolerate_whitespace_and_stray_quotes() -> None:
    assert _tags('v=DKIM1; k=rsa;\tp=MIIB AQAB "" ')["p"] == "MIIBAQAB"


def test_domains_config_rejects_bad_values_naming_the_key(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "relay.yaml"
    path.write_text(
        "domains:\n  outbound_ips: [not-an-ip]\n  required: [dkim, spam]\n  dkim_algorithm: dsa\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = "\n".join(err.value.problems)
    assert "domains.outbound_ips[0]" in text
    assert "domains.required[1]" in text
    assert "domains.dkim_algorithm" in text


def test_domains_config_values_are_read() -> None:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write("domains:\n  outbound_ips: ['192.0.2.5']\n  recheck_interval: 60\n")
        f.flush()
        c = load_config(f.name)
    assert c.domains == dataclasses.replace(
        DomainsConfig(), outbound_ips=("192.0.2.5",), recheck_interval=60.0
    )
