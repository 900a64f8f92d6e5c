"""listen.trusted_networks: parsing, matching and config validation (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import load_config
from relay.errors import ConfigError
from relay.smtp.trusted import account_name_for, parse_networks


def test_client_inside_a_trusted_network_sends_as_its_account() -> None:
    nets = parse_networks({"127.0.0.0/8": "alice", "10.1.0.0/16": "bob"})
    assert account_name_for(nets, "127.0.0.1") == "alice"
    assert account_name_for(nets, "10.1.2.3") == "bob"


def test_client_outside_every_trusted_network_is_not_trusted() -> None:
    nets = parse_networks({"127.0.0.0/8": "alice"})
    assert account_name_for(nets, "192.0.2.1") is None
    assert account_name_for(nets, "::1") is None


def test_most_specific_network_wins_whatever_the_config_order() -> None:
    nets = parse_networks({"10.0.0.0/8": "wide", "10.9.9.0/24": "narrow"})
    assert account_name_for(nets, "10.9.9.9") == "narrow"
    assert account_name_for(nets, "10.8.0.1") == "wide"


def test_ipv4_mapped_ipv6_client_matches_its_ipv4_network() -> None:
    nets = parse_networks({"127.0.0.0/8": "alice"})
    assert account_name_for(nets, "::ffff:127.0.0.5") == "alice"


def test_ipv6_network_and_unparsable_peer() -> None:
    nets = parse_networks({"::1/128": "alice"})
    assert account_name_for(nets, "::1") == "alice"
    assert account_name_for(nets, "/run/relay.sock") is None


def test_bad_network_is_refused() -> None:
    with pytest.raises(ValueError, match="not-a-net"):
        parse_networks({"not-a-net": "alice"})


def test_config_accepts_trusted_networks_and_normalises_them(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text('listen:\n  trusted_networks: {"127.0.0.1/8": alice}\n')
    cfg = load_config(path)
    assert dict(cfg.listen.trusted_networks) == {"127.0.0.0/8": "alice"}


def test_config_names_the_key_path_of_a_bad_network(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text('listen:\n  trusted_networks: {"300.1.1.1/8": alice, "::1": ""}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert 'listen.trusted_networks."300.1.1.1/8"' in text
    assert 'listen.trusted_networks."::1": expected an account name' in text


def test_config_refuses_a_list_for_trusted_networks(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("listen:\n  trusted_networks: [127.0.0.0/8]\n")
    with pytest.raises(ConfigError, match=r"listen\.trusted_networks: expected a mapping"):
        load_config(path)
