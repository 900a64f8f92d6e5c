"""Running relay in production: readiness, sd_notify, SIGHUP reload, logs without secrets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import aiosmtplib
import pytest

from tests.support.net import LOOPBACK
from tests.support.relayproc import (
    MakeRelay,
    RelayProcess,
    make_message,
    submit,
    unverified_ssl_context,
)
from tests.support.sink import SMTPSink


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def authed_session(relay: RelayProcess, password: str = "secret-pass-1") -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(
        hostname=LOOPBACK,
        port=relay.submission_port,
        start_tls=True,
        tls_context=unverified_ssl_context(),
        timeout=20,
    )
    await client.connect()
    await client.ehlo()
    await client.auth_plain("alice", password)
    return client


# ---------------------------------------------------------------- health


def test_readyz_goes_unready_when_the_database_file_is_unreadable(make_relay: MakeRelay) -> None:
    relay = make_relay()
    relay.setup()
    relay.start()
    status, body = get_json(f"{relay.http_url}/healthz")
    assert (status, body["status"]) == (200, "ok")
    status, body = get_json(f"{relay.http_url}/readyz")
    assert status == 200, body
    assert body["checks"]["database_file"] is True

    os.chmod(relay.db_path, 0)
    try:
        status, body = get_json(f"{relay.http_url}/readyz")
        assert status == 503
        assert body["status"] == "unready"
        assert body["checks"]["database_file"] is False
        # Alive is not ready: the process still answers /healthz.
        assert get_json(f"{relay.http_url}/healthz")[0] == 200
    finally:
        os.chmod(relay.db_path, 0o644)
    status, body = get_json(f"{relay.http_url}/readyz")
    assert status == 200, body


# ---------------------------------------------------------------- systemd


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's; abstract name ('@...') as systemd uses."""
    name = f"relay-test-notify-{uuid.uuid4().hex[:12]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        yield sock
    finally:
        sock.close()


def states(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines() if "=" in line)


def test_systemd_receives_ready_after_listening_then_reloading_then_stopping(
    make_relay: MakeRelay, notify_socket: socket.socket
) -> None:
    relay = make_relay()
    relay.setup()
    relay.start()
    ready = states(notify_socket.recv(4096))
    assert ready["READY"] == "1"
    assert "listeners" in ready.get("STATUS", "")

    relay.send_signal(signal.SIGHUP)
    reloading = states(notify_socket.recv(4096))
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert states(notify_socket.recv(4096))["READY"] == "1"

    assert relay.stop() == 0
    assert states(notify_socket.recv(4096))["STOPPING"] == "1"


# ---------------------------------------------------------------- reload


async def test_sighup_applies_a_new_limit_without_dropping_an_open_session(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay()
    relay.setup()
    relay.start()
    client = await authed_session(relay)
    try:
        relay.config["smtp"]["max_recipients"] = 2
        relay.write_config()
        relay.send_signal(signal.SIGHUP)
        await asyncio.to_thread(relay.wait_for_log, r"reload applied .*smtp\.max_recipients")

        # The session opened before the reload is still there and sees the new limit.
        await client.mail("a@example.com")
        await client.rcpt("r1@example.org")
        await client.rcpt("r2@example.org")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("r3@example.org")
        assert refused.value.code == 452
        assert "at most 2" in refused.value.message
        reply = await client.data(make_message("a@example.com", ["r1@example.org"]))
        assert reply.code == 250
    finally:
        client.close()
    assert relay.running
    await asyncio.to_thread(sink.wait_for, 1)


async def test_sighup_with_a_broken_config_keeps_serving_the_old_one(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay()
    relay.setup()
    relay.start()
    relay.config["smtp"]["max_recipients"] = "lots"
    relay.write_config()
    relay.send_signal(signal.SIGHUP)
    line = await asyncio.to_thread(relay.wait_for_log, r"reload refused: config error: .*")
    assert "smtp.max_recipients" in line.group(0)

    # Still serving, with the old limit (50): three recipients go through.
    rcpts = ["r1@example.org", "r2@example.org", "r3@example.org"]
    refused, _reply = await submit(
        relay.submission_port,
        sender="a@example.com",
        recipients=rcpts,
        data=make_message("a@example.com", rcpts),
    )
    assert refused == {}
    assert relay.running
    assert get_json(f"{relay.http_url}/readyz")[0] == 200


# ---------------------------------------------------------------- logs


async def test_logs_of_a_failed_auth_contain_no_password(make_relay: MakeRelay) -> None:
    # debug: the most talkative level must still not print credentials.
    relay = make_relay({"log": {"level": "debug"}})
    relay.setup()
    relay.start()
    secret = "Sup3r-Secret-Pw-4711"
    for method in ("plain", "login"):
        client = aiosmtplib.SMTP(
            hostname=LOOPBACK,
            port=relay.submission_port,
            start_tls=True,
            tls_context=unverified_ssl_context(),
            timeout=20,
        )
        async with client:
            await client.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                if method == "plain":
                    await client.auth_plain("alice", secret)
                else:
                    await client.auth_login("alice", secret)
    await asyncio.to_thread(relay.wait_for_log, r"auth failed.*\n(.|\n)*auth failed")
    text = relay.log_text()
    assert secret not in text
    assert base64.b64encode(f"\0alice\0{secret}".encode()).decode() not in text
    assert base64.b64encode(secret.encode()).decode() not in text


async def test_json_logs_are_one_object_per_line_with_key_value_fields(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay({"log": {"format": "json"}})
    relay.setup()
    relay.start()
    rcpts = ["bob@example.org"]
    await submit(
        relay.submission_port,
        sender="a@example.com",
        recipients=rcpts,
        data=make_message("a@example.com", rcpts),
    )
    await asyncio.to_thread(relay.wait_for_log, r'"outcome": "queued"')
    records = [json.loads(line) for line in relay.log_text().splitlines() if line.startswith("{")]
    queued = [r for r in records if r.get("outcome") == "queued"]
    assert queued and queued[0]["listener"] == "submission"
    assert queued[0]["from"] == "a@example.com"
    assert {"ts", "level", "msg"} <= set(queued[0])
