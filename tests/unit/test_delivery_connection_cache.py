"""delivery/client.py's connection cache: a healthy session outlives its batch for
``cache_time`` seconds and the next batch to the same MX hosts uses it, as Postfix's
smtp_connection_cache_time_limit does; a parked session the server dropped costs a
reconnect, never a deferral. A real loopback MX counts connections and messages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from relay import metrics
from relay.delivery.client import DestinationSession, Envelope
from relay.delivery.mx import Target
from relay.model import RecipientStatus


class CountingMX:
    """Accepts everything with PIPELINING; counts connections, messages and QUITs, and
    can drop every open connection without a word (as a server's idle timeout may)."""

    def __init__(self) -> None:
        self.connections = 0
        self.messages = 0
        self.quits = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        writer.write(b"220 mx.test ESMTP\r\n")
        in_body = False
        try:
            while line := await reader.readline():
                if in_body:
                    if line == b".\r\n":
                        in_body = False
                        self.messages += 1
                        writer.write(b"250 2.0.0 queued\r\n")
                    continue
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-mx.test\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    in_body = True
                elif verb == b"QUIT":
                    self.quits += 1
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
        except ConnectionError:
            pass
        finally:
            writer.close()

    def drop_all(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()


def envelope(n: int) -> Envelope:
    body = b"Subject: t\r\n\r\nhi\r\n"
    return Envelope(f"m{n}", "a@example.com", [(n, f"r{n}@example.org")], body)


@pytest.fixture
async def mx() -> AsyncIterator[tuple[CountingMX, list[Target]]]:
    server_side = CountingMX()
    server = await asyncio.start_server(server_side.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield server_side, [Target("mx.test", ("127.0.0.1",), port)]
    server.close()
    await server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[DestinationSession]:
    session = DestinationSession("relay.test", False, 5.0, 5.0, cache_time=2.0)
    yield session
    session.close_idle()


def statuses(envs: list[Envelope]) -> list[RecipientStatus]:
    return [o.status for env in envs for o in env.outcomes.values()]


async def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.02)


async def test_the_next_batch_to_the_same_mx_reuses_the_parked_session(
    mx: tuple[CountingMX, list[Target]], client: DestinationSession
) -> None:
    server, targets = mx
    reused = metrics.DELIVERY_SESSIONS_REUSED._value.get()
    batches = [[envelope(i)] for i in range(5)]
    for batch in batches:
        await client.deliver(targets, batch)
    assert statuses([e for b in batches for e in b]) == [RecipientStatus.DELIVERED] * 5
    assert server.messages == 5
    assert server.connections == 1 and server.quits == 0
    assert client.idle_sessions == 1
    assert metrics.DELIVERY_SESSIONS_REUSED._value.get() - reused == 4


async def test_a_parked_session_the_server_dropped_is_replaced_without_a_deferral(
    mx: tuple[CountingMX, list[Target]], client: DestinationSession
) -> None:
    server, targets = mx
    await client.deliver(targets, [envelope(1)])
    server.drop_all()  # no 421, no FIN seen yet by the client: a silent idle timeout
    second = [envelope(2), envelope(3)]
    await client.deliver(targets, second)
    assert statuses(second) == [RecipientStatus.DELIVERED] * 2
    assert server.messages == 3 and server.connections == 2


async def test_a_parked_session_is_quit_after_the_cache_time(
    mx: tuple[CountingMX, list[Target]], client: DestinationSession
) -> None:
    server, targets = mx
    client.cache_time = 0.2
    await client.deliver(targets, [envelope(1)])
    assert client.idle_sessions == 1 and server.quits == 0
    await wait_until(lambda: server.quits == 1)
    assert server.quits == 1 and client.idle_sessions == 0
    await client.deliver(targets, [envelope(2)])
    assert server.connections == 2


async def test_cache_time_zero_quits_after_every_batch(
    mx: tuple[CountingMX, list[Target]], client: DestinationSession
) -> None:
    server, targets = mx
    client.cache_time = 0
    for i in range(3):
        await client.deliver(targets, [envelope(i)])
    assert server.connections == 3 and server.quits == 3 and client.idle_sessions == 0


async def test_close_idle_quits_every_parked_session(
    mx: tuple[CountingMX, list[Target]], client: DestinationSession
) -> None:
    server, targets = mx
    # Two batches at once need two sessions; both are parked afterwards.
    await asyncio.gather(
        client.deliver(targets, [envelope(1)]), client.deliver(targets, [envelope(2)])
    )
    assert client.idle_sessions == 2
    client.close_idle()
    await wait_until(lambda: server.quits == 2)
    assert server.quits == 2 and client.idle_sessions == 0


async def test_envelopes_from_a_source_are_taken_only_as_the_session_sends_them(
    mx: tuple[CountingMX, list[Target]], client: DestinationSession
) -> None:
    server, targets = mx
    sent_before: list[int] = []
    envs = [envelope(i) for i in range(4)]

    async def source() -> AsyncIterator[Envelope]:
        for env in envs:
            # Asked for the next one only once the one before it was accepted.
            sent_before.append(server.messages)
            yield env

    await client.deliver(targets, source())
    assert sent_before == [0, 1, 2, 3]
    assert statuses(envs) == [RecipientStatus.DELIVERED] * 4
    assert server.connections == 1


async def test_a_source_whose_mx_cannot_be_reached_has_every_envelope_deferred(
    client: DestinationSession,
) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()  # nothing listens there now: connection refused
    envs = [envelope(i) for i in range(3)]

    async def source() -> AsyncIterator[Envelope]:
        for env in envs:
            yield env

    done: list[str] = []
    await client.deliver(
        [Target("mx.test", ("127.0.0.1",), port)],
        source(),
        on_done=lambda e: done.append(e.message_id),
    )
    assert statuses(envs) == [RecipientStatus.DEFERRED] * 3
    assert done == ["m0", "m1", "m2"]
