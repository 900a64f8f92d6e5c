"""listen.processes: SMTP listener processes beside the main (delivery) process.

The relay must look like one relay from outside: every connection is served, every
accepted message is delivered once, /metrics adds up what every process counted, a
listener process that dies is replaced, SIGHUP reloads them all and SIGTERM stops them all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from tests.integration.test_operations_metrics import scrape, value
from tests.support.net import LOOPBACK, free_port
from tests.support.relayproc import MakeRelay, RelayProcess, make_message, queue_id, submit
from tests.support.sink import SMTPSink


def listener_children(parent: int) -> list[int]:
    """PIDs of the ``serve --listener-process`` children of ``parent``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"--listener-process" in cmdline:
            out.append(int(entry.name))
    return sorted(out)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def wait_children(
    parent: int, n: int, avoid: frozenset[int] = frozenset(), timeout: float = 20.0
) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        kids = listener_children(parent)
        if len(kids) == n and not (set(kids) & avoid):
            return kids
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {n} listener processes, found {kids}")
        time.sleep(0.1)


def start_with_one_listener_process(make_relay: MakeRelay) -> tuple[RelayProcess, int]:
    """A relay with ``listen.processes: 1``, started; it and its listener process's pid."""
    relay = make_relay({"listen": {"processes": 1}})
    relay.setup()
    relay.start()
    assert relay.pid is not None
    (kid,) = wait_children(relay.pid, 1)
    return relay, kid


async def reload_all(relay: RelayProcess, processes: int) -> None:
    """SIGHUP the main process; wait until every process has applied the reload."""
    relay.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while relay.log_text().count("reload applied") < processes:
        assert time.monotonic() < deadline, relay.log_tail()
        await asyncio.sleep(0.1)


async def send(port: int, n: int, tag: str) -> list[str]:
    ids = []
    for i in range(n):
        rcpt = [f"{tag}{i}@example.org"]
        reply = await submit(
            port, sender="a@example.com", recipients=rcpt, data=make_message("a@example.com", rcpt)
        )
        qid = queue_id(reply)
        assert qid is not None
        ids.append(qid)
    return ids


async def test_listener_processes_serve_deliver_count_restart_and_stop(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    metrics_port = free_port()
    relay = make_relay(
        {"listen": {"processes": 2}, "metrics": {"listen": f"{LOOPBACK}:{metrics_port}"}}
    )
    relay.setup()
    relay.start()
    assert relay.pid is not None
    relay_pid = relay.pid
    kids = wait_children(relay_pid, 2)

    # Every connection is a new 4-tuple: the kernel spreads them over both processes.
    ids = await send(relay.submission_port, 12, "first")
    assert len(set(ids)) == 12
    received = await sink.wait_for_async(12)
    assert sorted(r for m in received for r in m.rcpt_tos) == sorted(
        f"first{i}@example.org" for i in range(12)
    )
    relay.wait_for_log(r"listener process 1 started")

    # /metrics (main process) adds up the listener processes' counters.
    deadline = time.monotonic() + 10
    while True:
        m = scrape(f"http://{LOOPBACK}:{metrics_port}/metrics")
        if value(m, "relay_messages_accepted_total") >= 12 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert value(m, "relay_messages_accepted_total") == 12
    assert value(m, "relay_smtp_connections_total") >= 12
    assert value(m, "relay_queue_scrape_ok") == 1

    # A listener process that dies is replaced; mail keeps flowing meanwhile.
    os.kill(kids[0], signal.SIGKILL)
    relay.wait_for_log(r"listener process 0 \(pid \d+\) exited")
    await send(relay.submission_port, 4, "during")  # the other process serves meanwhile
    replaced = wait_children(relay.pid, 2, avoid=frozenset({kids[0]}))
    await send(relay.submission_port, 4, "after")
    received = await sink.wait_for_async(20)
    assert len(received) == 20
    # A dead process's counts stay in the sum: counters never go back.
    m = scrape(f"http://{LOOPBACK}:{metrics_port}/metrics")
    assert value(m, "relay_messages_accepted_total") >= 12

    # SIGHUP reaches every process: each re-reads the config.
    for pid in replaced:
        relay.wait_for_log(rf"relay listener process started .*pid={pid}\b")
    await reload_all(relay, processes=3)
    assert "exited" not in relay.log_text().split("reload applied", 1)[1]

    assert relay.stop() == 0
    # The main process waited for its children: none is left behind.
    assert not [pid for pid in replaced if alive(pid)]


def native_packages(pid: int) -> set[str]:
    """The site-packages packages whose compiled modules ``pid`` has mapped."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1]
        if "site-packages/" in path and path.endswith(".so"):
            found.add(path.split("site-packages/", 1)[1].split("/", 1)[0])
    return found


async def test_listener_processes_never_load_delivery_dkim_or_http_code(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    # aiohttp (HTTP, webhooks), cryptography (DKIM, keys, certificates) and PyNaCl are the
    # main process's; a listener process that loaded them (through relay.app or a CLI
    # module) carried ~26 MB more at rest (issue 9: peak memory of all processes).
    relay, kid = start_with_one_listener_process(make_relay)
    await send(relay.submission_port, 2, "light")
    await sink.wait_for_async(2)
    heavy = {"aiohttp", "cryptography", "nacl"}
    assert {"aiohttp", "cryptography"} <= native_packages(relay.pid)
    assert not native_packages(kid) & heavy, native_packages(kid)
    # A reload (SIGHUP) in the listener process loads none of them either.
    relay.wait_for_log(rf"relay listener process started .*pid={kid}\b")
    await reload_all(relay, processes=2)
    assert not native_packages(kid) & heavy, native_packages(kid)
    assert relay.stop() == 0


async def test_both_processes_freeze_their_start_up_heap_and_still_deliver(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    # A full collection that walks the start-up heap stopped every session in a process
    # for 43-87 ms every few seconds under load (issue 9: half-rate p99); frozen, the
    # heap is left out of every collection (relay/heap.py).
    relay, kid = start_with_one_listener_process(make_relay)
    main = relay.wait_for_log(r"relay started .*heap_frozen=(\d+)")
    child = relay.wait_for_log(rf"relay listener process started .*pid={kid} .*heap_frozen=(\d+)")
    # Tens of thousands of objects each (70,000-100,000 measured): the heap, not a few.
    assert int(main.group(1)) > 20_000 and int(child.group(1)) > 20_000
    await send(relay.submission_port, 3, "frozen")
    await sink.wait_for_async(3)
    await reload_all(relay, processes=2)
    await send(relay.submission_port, 2, "reloaded")
    await sink.wait_for_async(5)
    assert relay.stop() == 0
