"""Load and crash: many concurrent sessions while the relay delivers, and SIGKILLs of the
relay in the middle of a submission storm.

Sizes come from the environment so a CI box or a laptop can scale them:
RELAY_TEST_LOAD_SESSIONS (50) x RELAY_TEST_LOAD_MESSAGES (40) for the load test,
RELAY_TEST_CRASH_MESSAGES (2000), RELAY_TEST_CRASH_SESSIONS (40), RELAY_TEST_CRASH_KILLS (3).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import random
import time
from typing import Any

import aiosmtplib
import pytest

from relay import config as relay_config
from tests.support.relayproc import (
    DEFAULT_PASSWORD,
    MakeRelay,
    RelayProcess,
    unverified_ssl_context,
)
from tests.support.sink import SMTPSink

pytestmark = pytest.mark.slow

SESSIONS = int(os.environ.get("RELAY_TEST_LOAD_SESSIONS", "50"))
PER_SESSION = int(os.environ.get("RELAY_TEST_LOAD_MESSAGES", "40"))
CRASH_MESSAGES = int(os.environ.get("RELAY_TEST_CRASH_MESSAGES", "2000"))
CRASH_SESSIONS = int(os.environ.get("RELAY_TEST_CRASH_SESSIONS", "40"))
CRASH_KILLS = int(os.environ.get("RELAY_TEST_CRASH_KILLS", "3"))


def _no_quotas() -> dict[str, Any]:
    """Lift sending quotas (the seeds' 20/s, 500/day) so the test measures the pipeline,
    not the policy; only keys this checkout's config knows are set."""
    extra: dict[str, Any] = {}
    limits_cls = getattr(relay_config, "LimitsConfig", None)
    if limits_cls is not None:
        known = {f.name for f in dataclasses.fields(limits_cls)}
        wanted: dict[str, Any] = {
            "rate": 1_000_000,
            "daily": 10_000_000,
            "levels": [10_000_000],
            "hard_ceiling": 10_000_000,
            "per_recipient_hourly": 1_000_000,
        }
        extra["limits"] = {k: v for k, v in wanted.items() if k in known}
    return extra


def _message(tag: str, n: int) -> bytes:
    return (
        f"From: a@example.com\r\nTo: r{n}@example.org\r\nSubject: {tag} {n}\r\n"
        f"X-Test-Id: {tag}-{n}\r\n\r\nmessage {n} of the {tag} test\r\n"
    ).encode()


def _duplicate_sources(sink: SMTPSink, tag: str) -> tuple[int, int]:
    """(submission, delivery) duplicates. The test messages carry no Message-ID, so the
    relay makes one per accepted copy: copies with different Message-IDs were accepted
    twice (a 250 lost in a crash, the client resent); copies with the same one were
    delivered twice (a delivery whose result was not committed before the crash)."""
    seen: dict[str, list[str]] = collections.defaultdict(list)
    with sink._lock:
        messages = list(sink.messages)
    for m in messages:
        test_id = m.header("X-Test-Id")
        if test_id and test_id.startswith(f"{tag}-"):
            seen[test_id].append(m.header("Message-ID") or "")
    submission = sum(len(set(ids)) - 1 for ids in seen.values())
    delivery = sum(len(ids) - len(set(ids)) for ids in seen.values())
    return submission, delivery


def _ids(sink: SMTPSink, tag: str) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    with sink._lock:
        messages = list(sink.messages)
    for m in messages:
        test_id = m.header("X-Test-Id")
        if test_id and test_id.startswith(f"{tag}-"):
            counts[test_id] += 1
    return counts


async def _wait_delivered(
    sink: SMTPSink, tag: str, want: set[str], within: float
) -> collections.Counter[str]:
    deadline = time.monotonic() + within
    while True:
        got = _ids(sink, tag)
        if want <= set(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.25)


async def test_fifty_concurrent_sessions_of_forty_messages_all_accepted_and_delivered(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay({**_no_quotas(), "delivery": {"poll_interval": 0.2}})
    relay.setup()
    relay.start()
    errors: list[str] = []
    accepted: set[str] = set()

    async def session(s: int) -> None:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=relay.submission_port,
            start_tls=True,
            validate_certs=False,
            tls_context=unverified_ssl_context(),
            timeout=120,
        )
        async with client:
            await client.login("alice", DEFAULT_PASSWORD)
            for i in range(PER_SESSION):
                n = s * PER_SESSION + i
                try:
                    await client.sendmail(
                        "a@example.com", [f"r{n}@example.org"], _message("load", n)
                    )
                    accepted.add(f"load-{n}")
                except aiosmtplib.SMTPException as exc:
                    errors.append(f"{n}: {exc}")

    started = time.monotonic()
    await asyncio.gather(*(session(s) for s in range(SESSIONS)))
    submit_s = time.monotonic() - started
    total = SESSIONS * PER_SESSION
    assert not errors, f"{len(errors)} error replies, first: {errors[:3]}"
    assert len(accepted) == total
    got = await _wait_delivered(sink, "load", accepted, within=max(60.0, total / 20))
    done_s = time.monotonic() - started
    missing = accepted - set(got)
    dupes = sum(c - 1 for c in got.values() if c > 1)
    print(
        f"\nload: {SESSIONS} sessions x {PER_SESSION} = {total} messages; submitted in "
        f"{submit_s:.1f} s ({total / submit_s:.0f}/s), all delivered after {done_s:.1f} s; "
        f"missing={len(missing)} duplicates={dupes}"
    )
    assert not missing, f"{len(missing)} accepted messages never delivered: {sorted(missing)[:5]}"


async def test_every_accepted_message_is_delivered_across_three_sigkills_and_restarts(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay: RelayProcess = make_relay(
        {
            **_no_quotas(),
            # A killed node's claims come back after the lease; short here so the test
            # does not wait out the default.
            "delivery": {"poll_interval": 0.2, "lease_seconds": 10},
        }
    )
    relay.setup()
    relay.start()
    rng = random.Random(int(os.environ.get("RELAY_TEST_CRASH_SEED", "20261125")))
    kill_at = sorted(rng.sample(range(CRASH_MESSAGES // 10, CRASH_MESSAGES * 9 // 10), CRASH_KILLS))
    accepted: set[str] = set()
    refused: collections.Counter[str] = collections.Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(CRASH_MESSAGES):
        queue.put_nowait(n)
    restarting = asyncio.Event()
    restarting.set()  # set = relay is up
    kills: list[str] = []

    async def killer() -> None:
        for threshold in kill_at:
            while len(accepted) < threshold and (not queue.empty() or len(accepted) == 0):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            await asyncio.sleep(rng.random() * 0.5)  # not always right after a 250
            restarting.clear()
            await asyncio.to_thread(relay.kill)
            kills.append(f"kill at {len(accepted)} accepted")
            await asyncio.to_thread(relay.start)
            restarting.set()

    async def worker() -> None:
        client: aiosmtplib.SMTP | None = None
        n: int | None = None
        while True:
            if n is None:
                if queue.empty():
                    break
                n = queue.get_nowait()
            try:
                if client is None or not client.is_connected:
                    await restarting.wait()
                    client = aiosmtplib.SMTP(
                        hostname="127.0.0.1",
                        port=relay.submission_port,
                        start_tls=True,
                        validate_certs=False,
                        tls_context=unverified_ssl_context(),
                        timeout=60,
                    )
                    await client.connect()
                    await client.login("alice", DEFAULT_PASSWORD)
                await client.sendmail("a@example.com", [f"r{n}@example.org"], _message("crash", n))
                accepted.add(f"crash-{n}")
                n = None
            except (aiosmtplib.SMTPException, OSError) as exc:
                # No 250: like any client, keep the message and try again (if the relay
                # had committed it before dying, this is where a duplicate comes from).
                refused[type(exc).__name__] += 1
                if client is not None:
                    client.close()
                client = None
                await asyncio.sleep(0.1)
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()

    started = time.monotonic()
    kill_task = asyncio.create_task(killer())
    await asyncio.gather(*(worker() for _ in range(CRASH_SESSIONS)))
    await kill_task
    assert len(accepted) == CRASH_MESSAGES
    got = await _wait_delivered(sink, "crash", accepted, within=max(90.0, CRASH_MESSAGES / 15))
    missing = accepted - set(got)
    dupes = sum(c - 1 for c in got.values() if c > 1)
    resubmitted, redelivered = _duplicate_sources(sink, "crash")
    print(
        f"\ncrash: {CRASH_MESSAGES} messages, {CRASH_SESSIONS} sessions, {len(kills)} SIGKILLs "
        f"({'; '.join(kills)}); client retries={dict(refused)}; delivered={len(got)} "
        f"missing={len(missing)} DUPLICATES={dupes} (accepted twice={resubmitted},"
        f" delivered twice={redelivered}) in {time.monotonic() - started:.1f} s"
    )
    assert len(kills) == CRASH_KILLS
    assert not missing, (
        f"{len(missing)} messages got 250 but were never delivered: {sorted(missing)[:5]}"
    )
