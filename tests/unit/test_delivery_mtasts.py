"""MTA-STS policy parsing and MX matching (RFC 8461 §3 and §4.1)."""

from __future__ import annotations

import pytest

from relay.delivery.mtasts import Mode, PolicyError, mx_matches, parse_policy, parse_txt

RFC_EXAMPLE = (
    "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    "mx: backupmx.example.com\r\nmax_age: 604800\r\n"
)


def test_the_rfcs_example_policy_parses_with_crlf_or_lf() -> None:
    for text in (RFC_EXAMPLE, RFC_EXAMPLE.replace("\r\n", "\n")):
        p = parse_policy(text, "20160831085700Z")
        assert p.mode is Mode.ENFORCE and p.max_age == 604800 and p.id == "20160831085700Z"
        assert p.mx == ("mail.example.com", "*.example.net", "backupmx.example.com")


def test_a_wildcard_stands_for_exactly_one_leftmost_label() -> None:
    assert mx_matches("mx1.example.net", "*.example.net")
    assert mx_matches("MX1.Example.NET.", "*.example.net")
    assert not mx_matches("a.b.example.net", "*.example.net")
    assert not mx_matches("example.net", "*.example.net")
    assert mx_matches("mail.example.com", "mail.example.com")
    assert not mx_matches("mail.example.com.evil", "mail.example.com")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("mode: enforce\nmx: a.example\nmax_age: 86400\n", "version"),
        ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 86400\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 86400\n", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: soon\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 86400\n", "no mx"),
        ("version: STSv1\nmode enforce\nmx: a.example\nmax_age: 86400\n", "key: value"),
    ],
)
def test_an_invalid_policy_is_refused_naming_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_policy(text, "1")


def test_max_age_is_capped_at_a_year_and_mode_none_needs_no_mx() -> None:
    p = parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999\n", "1")
    assert p.mode is Mode.NONE and p.mx == () and p.max_age == 31_557_600


def test_only_a_stsv1_txt_record_with_an_id_counts() -> None:
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=STSv1; ", "id=abc123"]) == "abc123"  # strings are joined
    assert parse_txt(["v=spf1 -all"]) is None
    assert parse_txt(["v=STSv1;"]) is None
    assert parse_txt(["v=STSv1; id=has-dash"]) is None
