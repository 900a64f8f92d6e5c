"""Retention in a running relay: a finished message's body goes, one in flight stays;
old records go, their statistics stay."""

from __future__ import annotations

import asyncio
import datetime
import json
import signal
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


def _shift(relay: RelayProcess, days: float) -> None:
    """Move every message, recipient and event ``days`` into the past, in one commit."""
    delta = days * DAY
    with sqlite3.connect(relay.db_path, timeout=30) as db:
        db.execute("UPDATE message SET created_at = created_at - ?", (delta,))
        db.execute(
            "UPDATE recipient SET created_at = created_at - ?, updated_at = updated_at - ?,"
            " due_at = due_at - ?",
            (delta, delta, delta),
        )
        db.execute("UPDATE event SET at = at - ?", (delta,))


def _counts(relay: RelayProcess) -> list[dict[str, object]]:
    """The statistics of the last 30 days, each day without its date."""
    today = datetime.datetime.now(datetime.UTC).date()
    since = (today - datetime.timedelta(days=30)).isoformat()
    out = relay.cli("stats", "--from", since, "--to", today.isoformat(), "--json").stdout
    return [{k: v for k, v in d.items() if k != "day"} for d in json.loads(out)]


async def test_old_records_go_and_their_day_still_counts_in_the_statistics(
    make_relay: MakeRelay, sink: SMTPSink
) -> None:
    # Switched on later: the sweep only ever sees days gone by, never mail moved into a
    # day it has already passed (as _shift does).
    relay = make_relay(
        {"retention": {"purge_records": False, "records": 10 * DAY, "sweep_interval": 1}}
    )
    relay.setup()
    relay.start()
    qids = [await send_one(relay, f"r{i}@example.org") for i in range(3)]
    sink.wait_for(3)
    for qid in qids:
        await _wait_status(relay, qid, "delivered")
    counts = _counts(relay)
    assert [(d["accepted"], d["delivered"]) for d in counts] == [(3, 3)]

    _shift(relay, 12)
    relay.config["retention"]["purge_records"] = True
    relay.write_config()
    relay.send_signal(signal.SIGHUP)
    relay.wait_for_log(r"retention: 1 days counted into stats_day, 3 messages deleted")
    for qid in qids:
        assert relay.cli("queue", "show", qid, check=False).returncode != 0
    assert _counts(relay) == counts  # that day, twelve days ago, from its daily counts
    metrics = scrape(f"{relay.http_url}/metrics")
    assert value(metrics, "relay_retention_rows_deleted_total", table="message") == 3
