"""One relay for the whole hostile module (starting one takes seconds): short SMTP
timeout, a small per-IP connection cap and a 1 MiB message limit, so every limit is
reachable quickly. Tests that would poison shared state (AUTH throttling, the per-IP
cap) connect from their own loopback address (127.0.0.X)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.dnsserver import DNSServer
from tests.support.relayproc import RelayProcess
from tests.support.sink import SMTPSink

HOSTILE_TIMEOUT = float(os.environ.get("RELAY_TEST_HOSTILE_TIMEOUT", "3"))
HOSTILE_PER_IP = int(os.environ.get("RELAY_TEST_PER_IP_CAP", "40"))
HOSTILE_MAX_SIZE = 1024 * 1024
HOSTILE_AUTH_FAIL_LIMIT = 5


@pytest.fixture(scope="module")
def hostile_world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RelayProcess, SMTPSink]]:
    with DNSServer() as dns, SMTPSink() as sink:
        dns.add("example.org", "MX", "10 mx.example.org.")
        dns.add("mx.example.org", "A", "127.0.0.1")
        proc = RelayProcess(
            tmp_path_factory.mktemp("hostile-relay"),
            dns,
            sink.port,
            {
                "smtp": {
                    "timeout": HOSTILE_TIMEOUT,
                    "max_connections_per_ip": HOSTILE_PER_IP,
                    "max_message_size": HOSTILE_MAX_SIZE,
                    "auth_fail_limit": HOSTILE_AUTH_FAIL_LIMIT,
                },
                # One relay serves the whole module and its tests send many messages in
                # seconds: the sending limits (tested in their own files) stay out of it.
                "limits": {"rate": 100000, "per_recipient_hourly": 100000, "daily": 100000},
            },
        )
        try:
            proc.setup()
            proc.start()
            yield proc, sink
        finally:
            proc.close()


@pytest.fixture
def hostile(hostile_world: tuple[RelayProcess, SMTPSink]) -> RelayProcess:
    relay, sink = hostile_world
    if not relay.running:
        relay.start()
    sink.reset()
    return relay


@pytest.fixture
def hostile_sink(hostile_world: tuple[RelayProcess, SMTPSink]) -> SMTPSink:
    return hostile_world[1]
