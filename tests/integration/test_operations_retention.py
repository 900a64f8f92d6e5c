"""Retention in a running relay: a finished message's body goes, one in flight stays."""

from __future__ import annotations

import asyncio
import sqlite3

from tests.integration.test_operations_metrics import scrape, value
from tests.support.relayproc import MakeRelay, RelayProcess, send_one
from tests.support.sink import SMTPSink

DAY = 86400


async def _wait_status(relay: RelayProcess, qid: str, status: str) -> str:
    out = ""
    for _ in range(100):
        out = relay.cli("queue", "show", qid).stdout
        if f" {status} " in out.split("events:")[0]:
            return out
        await asyncio.sleep(0.2)
    raise AssertionError(f"{qid} never became {status}:\n{out}")


def _age(relay: RelayProcess, days: float) -> None:
    """Make every message look accepted ``days`` earlier (what a week of waiting does)."""
    with sqlite3.connect(relay.db_path, timeout=30) as db:
        db.execute("UPDATE message SET created_at = created_at - ?", (days * DAY,))


async def test_the_sweep_empties_a_delivered_body_after_the_retention_period_only(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    sink.set_rcpt_reply("later@example.org", "451 4.3.0 try again later")
    # max_age above the retention period: a message may be in flight when its time comes.
    relay = make_relay(
        {"retention": {"bodies": 3 * DAY, "sweep_interval": 1}, "delivery": {"max_age": 10 * DAY}}
    )
    relay.setup()
    relay.start()
    done = await send_one(relay, "b@example.org")
    waiting = await send_one(relay, "later@example.org")
    sink.wait_for(1)
    await _wait_status(relay, done, "delivered")
    await _wait_status(relay, waiting, "deferred")
    await asyncio.sleep(2)  # sweeps run: both are younger than 3 days
    assert "purged" not in relay.cli("queue", "show", done).stdout

    _age(relay, 4)
    relay.wait_for_log(r"retention: 1 bodies purged, 1 messages older than 259200 s still in")
    shown = relay.cli("queue", "show", done).stdout
    assert "body:       purged" in shown
    assert "delivered" in shown and "b@example.org" in shown  # the record stays
    assert "purged" not in relay.cli("queue", "show", waiting).stdout
    assert value(scrape(f"{relay.http_url}/metrics"), "relay_retention_bodies_purged_total") == 1

    # The message still in flight is delivered from its kept body once the MX takes it.
    sink.set_rcpt_reply("later@example.org", None)
    relay.cli("queue", "retry", waiting)
    (got,) = [m for m in sink.wait_for(2) if m.rcpt_tos == ("later@example.org",)]
    assert "to later@example.org" in got.text
