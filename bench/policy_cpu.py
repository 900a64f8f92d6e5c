"""CPU per message of the listener's policy stage and accept, in one process (issue 9).

    python bench/policy_cpu.py                 # 2000 messages, prints CPU ms per message
    python bench/policy_cpu.py -n 5000 --repeat 3

What the SMTP handler does for one message of the bench's plain runs (bench/run.py: a
trusted-network sender, limits lifted, 2 KB, one recipient ``r{i % 1000}@example.org``,
one message per connection), minus the SMTP protocol itself: the trusted-network account
lookup, ``Policy.check`` at MAIL, RCPT and DATA with the checks ``relay serve`` builds
(``relay.app.build_checks``), then ``Intake.accept`` (rate take, ``Limits.plan`` and the
accept transaction, one fsync) on a real SQLite file in a temp dir. Messages run one
after another, so the process CPU (``time.process_time``: the event loop plus aiosqlite's
threads) measured around each part is that part's. The main thread's alone
(``time.thread_time``) is what competes with aiosmtpd in a listener process.

Run it on two versions of the code (``git stash``) alternately; it prints its own figures
only, no reference.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relay.config import Config, DatabaseConfig, LimitsConfig, ListenConfig  # noqa: E402
from relay.intake import Intake, parse  # noqa: E402
from relay.model import Stage  # noqa: E402
from relay.policy.engine import Policy, Request  # noqa: E402
from relay.policy.limits import Limits, RateLimit  # noqa: E402
from relay.queue.store import NewRecipient, RateTake, Store  # noqa: E402
from relay.smtp.trusted import TrustedNetworks  # noqa: E402

try:
    from relay.policy.build import build_checks
except ImportError:  # code from before relay/policy/build.py (to compare with)
    from relay.app import build_checks

ACCOUNT, DOMAIN, SENDER = "bench", "example.com", "app@example.com"
HUGE = 10**9


def message(i: int, rcpt: str, size: int = 2048) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: bench {i}\r\n"
        f"Message-ID: <bench-{i}@example.com>\r\nDate: Thu, 26 Nov 2026 04:00:00 +0000\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def run(n: int, warm: int, tmp: Path) -> dict[str, float]:
    cfg = Config(
        node_id="bench",
        hostname="relay.bench",
        database=DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp / 'relay.db'}"),
        listen=ListenConfig(trusted_networks={"127.0.0.1/32": ACCOUNT}),
        limits=LimitsConfig(
            rate=HUGE, daily=HUGE, hard_ceiling=HUGE, levels=(HUGE,), per_recipient_hourly=HUGE
        ),
    )
    store = Store.open(cfg.database, node_id=cfg.node_id)
    await store.migrate()
    acct = await store.add_account(ACCOUNT, "x")
    await store.add_domain(DOMAIN, acct.id, "relay", "k", verified=True, warmup=False)

    policy = Policy(build_checks(cfg, store))
    intake = Intake(store, cfg.hostname)
    intake.planner = Limits(cfg.limits, store)

    async def rate_take(account_id: int, recipients: int) -> RateTake | None:
        # as RelayApp._rate_take
        for chk in policy.checks:
            if isinstance(chk, RateLimit):
                account = await store.get_account_by_id(account_id)
                return await chk.take(account, recipients)
        return None

    intake.rate = rate_take
    trusted = TrustedNetworks(store, cfg.listen.trusted_networks)
    ip = "127.0.0.1"

    times = {"policy": 0.0, "accept": 0.0, "policy_thread": 0.0, "accept_thread": 0.0}
    for i in range(warm + n):
        rcpt = f"r{i % 1000}@example.org"
        parsed = parse(message(i, rcpt))
        headers = parsed.headers
        p0, t0 = time.process_time(), time.thread_time()
        account = await trusted.account_for(ip)
        assert account is not None
        v = await policy.check(Request(Stage.MAIL, "submission", ip, account, SENDER))
        assert v.ok, v
        v = await policy.check(
            Request(Stage.RCPT, "submission", ip, account, SENDER, rcpt=rcpt, recipients=())
        )
        assert v.ok, v
        v = await policy.check(
            Request(
                Stage.DATA,
                "submission",
                ip,
                account,
                SENDER,
                recipients=(rcpt,),
                headers=headers,
                size=len(parsed.data),
            )
        )
        assert v.ok, v
        p1, t1 = time.process_time(), time.thread_time()
        await intake.accept(
            account_id=account.id,
            mail_from=SENDER,
            recipients=[NewRecipient(rcpt)],
            parsed=parsed,
            helo="bench",
            client_ip=ip,
            protocol="ESMTP",
        )
        p2, t2 = time.process_time(), time.thread_time()
        if i >= warm:
            times["policy"] += p1 - p0
            times["accept"] += p2 - p1
            times["policy_thread"] += t1 - t0
            times["accept_thread"] += t2 - t1
    await store.close()
    return {k: v * 1000 / n for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="messages measured (default 2000)")
    ap.add_argument("--warm", type=int, default=100, help="messages run first, not measured")
    ap.add_argument("--repeat", type=int, default=1, help="runs, fresh database each")
    args = ap.parse_args()
    rows = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="relay-policy-cpu-") as tmp:
            rows.append(asyncio.run(run(args.n, args.warm, Path(tmp))))
    keys = ("policy", "accept", "policy_thread", "accept_thread")
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    print(
        f"CPU ms/message (n={args.n}, runs={args.repeat}, median):"
        f" policy {med['policy']:.3f} + accept {med['accept']:.3f}"
        f" = {med['policy'] + med['accept']:.3f} (process);"
        f" main thread: policy {med['policy_thread']:.3f} + accept {med['accept_thread']:.3f}"
        f" = {med['policy_thread'] + med['accept_thread']:.3f}"
    )


if __name__ == "__main__":
    main()
