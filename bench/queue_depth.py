"""Claim time and memory against queue depth (issue 9: "a queue of 1,000,000 recipients:
claim time and memory do not grow with queue depth").

    python bench/queue_depth.py                          # 10k, 100k, 1M on SQLite
    python bench/queue_depth.py --depths 10000,100000 --pg-url postgresql+asyncpg://...

The queue is filled directly by a child process (executemany, in the schema ``relay
migrate`` made): half the recipients are due now (queued, oldest first), half deferred
to later hours, as in a backlog after an outage. Then ``Store.claim_due`` (the delivery
worker's call, batch 100) runs 30 times at each depth in this process; the table prints
its median and worst time, the ratio of the median to the smallest depth's (the
reference, same run), and this process's RSS (Python, SQLAlchemy, SQLite's page cache
and the database pages it has mapped). Claimed rows are leased and leave the due set,
as in a real worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relay.config import DatabaseConfig  # noqa: E402
from relay.queue.store import Store  # noqa: E402
from relay.queue.tables import message, recipient  # noqa: E402

PY = sys.executable


def rss_mb() -> tuple[float, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def fill(store: Store, start: int, stop: int, account_id: int, now: float) -> None:
    """Messages start..stop-1, one recipient each; even ones due, odd ones deferred."""
    chunk = 20_000
    for lo in range(start, stop, chunk):
        hi = min(stop, lo + chunk)
        msgs = [
            {
                "id": f"Q{i:012d}",
                "account_id": account_id,
                "mail_from": "bench@example.com",
                "size": 10,
                "body": b"Subject: x\r\n\r\nx\r\n",
                "created_at": now - 3600,
            }
            for i in range(lo, hi)
        ]
        rcpts = [
            {
                "message_id": f"Q{i:012d}",
                "address": f"r{i}@example.org",
                "rcpt_domain": "example.org",
                "status": "queued" if i % 2 == 0 else "deferred",
                # due: spread over the last hour; deferred: over the next six hours
                "due_at": now - 3600 + (i % 3600) if i % 2 == 0 else now + 600 + (i % 21600),
                "created_at": now - 3600,
                "updated_at": now - 3600,
            }
            for i in range(lo, hi)
        ]
        async with store.engine.begin() as conn:
            await conn.execute(message.insert(), msgs)
            await conn.execute(recipient.insert(), rcpts)


async def measure(store: Store, claims: int, batch: int) -> list[float]:
    times = []
    for n in range(claims):
        t0 = time.perf_counter()
        got = await store.claim_due(f"bench:{n}", 300, batch)
        times.append((time.perf_counter() - t0) * 1000)
        assert len(got) == batch, f"only {len(got)} due recipients claimed"
    return times


async def fill_only(url: str, start: int, stop: int, now: float) -> None:
    store = Store.open(DatabaseConfig(url=url))
    async with store.engine.connect() as conn:
        account_id = (await conn.execute(sa.text("SELECT id FROM account"))).scalar_one()
    await fill(store, start, stop, account_id, now)
    if store.dialect == "postgresql":
        async with store.engine.connect() as conn:
            await conn.execute(sa.text("ANALYZE recipient"))
            await conn.commit()
    await store.close()


async def run(url: str, depths: list[int], claims: int, batch: int) -> None:
    store = Store.open(DatabaseConfig(url=url))
    now = time.time()
    filled = 0
    ref = 0.0
    print(f"| depth | fill s | claim p50 ms | claim max ms | p50 / {depths[0]:,} | RSS MB |")
    print("|---|---|---|---|---|---|")
    for depth in depths:
        t0 = time.monotonic()
        # Filled by a child process: this one's memory is the claimer's alone.
        fill_cmd = [PY, __file__, "--url", url, "--fill", f"{filled},{depth},{now}"]
        child = await asyncio.create_subprocess_exec(*fill_cmd)
        if await child.wait() != 0:
            raise SystemExit("filling the queue failed")
        filled = depth
        fill_s = time.monotonic() - t0
        times = await measure(store, claims, batch)
        p50 = statistics.median(times)
        ref = ref or p50
        print(
            f"| {depth:,} | {fill_s:.0f} | {p50:.2f} | {max(times):.2f} |"
            f" {p50 / ref:.2f} | {rss_mb()[0]:.0f} |",
            flush=True,
        )
    await store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="10000,100000,1000000")
    ap.add_argument("--claims", type=int, default=30)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--pg-url", help="an empty PostgreSQL database instead of SQLite")
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--fill", help=argparse.SUPPRESS)  # START,STOP,NOW: the child's job
    args = ap.parse_args()
    if args.fill:
        start, stop, now = args.fill.split(",")
        asyncio.run(fill_only(args.url, int(start), int(stop), float(now)))
        return 0
    depths = [int(d) for d in args.depths.split(",")]
    work = Path(tempfile.mkdtemp(prefix="relay-depth-"))
    url = args.pg_url or f"sqlite+aiosqlite:///{work / 'relay.db'}"
    cfg = work / "relay.yaml"
    cfg.write_text(yaml.safe_dump({"database": {"url": url}}))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for cmd in (["migrate"], ["account", "add", "bench", "--password-stdin"]):
        subprocess.run(
            [PY, "-m", "relay", "-c", str(cfg), *cmd],
            input=b"bench-password-1\n",
            check=True,
            capture_output=True,
            env=env,
        )
    print(f"{'PostgreSQL' if args.pg_url else 'SQLite'}: {url}")
    asyncio.run(run(url, depths, args.claims, args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
