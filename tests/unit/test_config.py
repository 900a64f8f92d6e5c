from pathlib import Path

import pytest

from relay.config import load_config, parse_hostport
from relay.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "relay.yaml"
    p.write_text(text)
    return p


def test_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[2] / "config.example.yaml")
    assert cfg.delivery.port == 25
    assert cfg.smtp.max_message_size == 4 * 1024 * 1024


def test_bad_values_are_reported_with_their_key_path(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        'delivery:\n  port: not-a-port\n  routes: {"example.org": "x:y"}\nlisten:\n  smtp: 25\n',
    )
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    text = str(exc.value)
    assert "delivery.port" in text
    assert 'delivery.routes."example.org": expected host:port' in text
    assert "listen.smtp" in text


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "delivery:\n  prot: 25\n"))
    assert "delivery.prot: unknown key" in str(exc.value)


def test_null_listener_is_off_and_nameserver_port_defaults_to_53(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, 'listen: {smtps: null}\ndns: {nameservers: ["127.0.0.1:5353", "::1"]}\n')
    )
    assert cfg.listen.smtps is None
    assert [(n.host, n.port) for n in cfg.dns.nameservers] == [("127.0.0.1", 5353), ("::1", 53)]


def test_database_url_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_DATABASE_URL", "postgresql+asyncpg://u@h/db")
    assert load_config(write(tmp_path, "{}\n")).database.url == "postgresql+asyncpg://u@h/db"


def test_hostport_forms() -> None:
    assert parse_hostport("[::1]:25").port == 25
    with pytest.raises(ValueError):
        parse_hostport("host:0")


def test_listener_processes_are_a_count_up_to_64(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "listen:\n  processes: 2\n")).listen.processes == 2
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "listen:\n  processes: 65\n"))
    assert "listen.processes: expected 0-64, got 65" in str(exc.value)


def test_claim_delay_outside_0_to_10_seconds_is_refused(tmp_path: Path) -> None:
    for bad, says in (("-0.1", "expected a number of seconds >= 0"), ("11", "expected 0-10")):
        with pytest.raises(ConfigError) as exc:
            load_config(write(tmp_path, f"delivery:\n  claim_delay: {bad}\n"))
        assert f"delivery.claim_delay: {says}" in str(exc.value)
    assert load_config(write(tmp_path, "delivery:\n  claim_delay: 0\n")).delivery.claim_delay == 0


def test_event_loop_is_uvloop_by_default_or_asyncio_and_nothing_else(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "hostname: r.test\n")).event_loop == "uvloop"
    assert load_config(write(tmp_path, "event_loop: asyncio\n")).event_loop == "asyncio"
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "event_loop: trio\n"))
    assert "event_loop: expected uvloop or asyncio, got 'trio'" in str(exc.value)


def test_retention_below_an_hour_is_refused_and_the_default_is_a_week(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "retention:\n  bodies: 60\n"))
    assert "retention.bodies: expected at least 3600 seconds (1 hour)" in str(exc.value)
    cfg = load_config(write(tmp_path, "retention:\n  purge_bodies: false\n"))
    assert (cfg.retention.purge_bodies, cfg.retention.bodies) == (False, 7 * 86400)


def test_records_are_kept_a_quarter_and_never_less_than_what_reads_them(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert (cfg.retention.purge_records, cfg.retention.records) == (True, 90 * 86400)
    for yaml_text in (
        "retention:\n  records: 86400\n",  # below the reputation level's 7 + 1 days
        "retention:\n  records: 777600\n  bodies: 864000\n",  # 9 days, below the bodies' 10
    ):
        with pytest.raises(ConfigError) as exc:
            load_config(write(tmp_path, yaml_text))
        assert "retention.records: expected at least retention.bodies and 8 days" in str(exc.value)
    assert load_config(write(tmp_path, "retention:\n  records: 691200\n")).retention.records == (
        8 * 86400
    )


def test_destination_limits_default_to_postfixs_and_refuse_nonsense(tmp_path: Path) -> None:
    d = load_config(write(tmp_path, "")).delivery
    assert (d.destination_concurrency, d.destination_suspend, d.active_limit) == (20, True, 10_000)
    with pytest.raises(ConfigError) as exc:
        load_config(
            write(tmp_path, "delivery:\n  destination_concurrency: 0\n  active_limit: 100\n")
        )
    assert "delivery.destination_concurrency: must be >= 1" in str(exc.value)
    assert "delivery.active_limit: must be >= delivery.batch_size" in str(exc.value)
