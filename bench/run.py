"""relay vs Postfix on this machine, same load, same run: one table of ratios.

    python bench/run.py            # full matrix (several minutes)
    python bench/run.py --quick    # CI: a few scenarios, under ~2 minutes
    python bench/run.py --only relay --scenarios 2k-20x1

Both servers relay everything to one sink (bench/sink.py, its own process) and are driven
by the same load generator (bench/loadgen.py, its own process). Server CPU and memory are
read from /proc for the whole process tree (relay serve; Postfix's master and every child
it spawns: smtpd, cleanup, qmgr, smtp, trivial-rewrite, ...). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")
ACCOUNT, PASSWORD, DOMAIN = "bench", "bench-password-1", "example.com"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


# ----------------------------------------------------------------------------- /proc


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def cpu_seconds(root: int) -> float:
    """utime+stime+cutime+cstime over the tree: live processes count themselves, and
    exited ones were added to their parent's cutime/cstime when reaped."""
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])
        except (OSError, IndexError, ValueError):
            continue
    return total / CLK


def memory_kb(root: int) -> tuple[int, int]:
    """(PSS, RSS) sums over the tree in kB. PSS splits shared pages between processes,
    which is the fair measure for Postfix's many processes sharing one binary."""
    pss = rss = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
        except OSError:
            continue
    return pss, rss


class MemSampler(threading.Thread):
    def __init__(self, root: int, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root, self.every = root, every
        self.peak_pss = self.peak_rss = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pss, rss = memory_kb(self.root)
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.stop.wait(self.every)


# ----------------------------------------------------------------------------- sink


class Sink:
    def __init__(self, workdir: Path) -> None:
        self.port, self.control = free_port(), free_port()
        self.log = open(workdir / "sink.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PY, str(HERE / "sink.py"), "--port", str(self.port), "--control", str(self.control)],
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "ready"
        self.sock = socket.create_connection(("127.0.0.1", self.control))
        self.rfile = self.sock.makefile("rb")

    def ask(self, line: str) -> dict[str, Any]:
        self.sock.sendall(line.encode() + b"\n")
        reply: dict[str, Any] = json.loads(self.rfile.readline())
        return reply

    def close(self) -> None:
        self.sock.close()
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


# ----------------------------------------------------------------------------- servers


class Server:
    name = ""
    port = 0
    root_pid = 0
    # Postfix has no SASL backend here: its "tls+auth" runs are STARTTLS via mynetworks.
    supports_auth = True

    def start(self) -> None: ...
    def stop(self) -> None: ...


class Relay(Server):
    name = "relay"

    def __init__(self, workdir: Path, sink_port: int, processes: int = 0) -> None:
        self.dir = workdir / "relay"
        self.dir.mkdir()
        self.port = free_port()
        self.cfg_path = self.dir / "relay.yaml"
        huge = 10**9
        cfg = {
            "node_id": "bench",
            "hostname": "relay.bench",
            "database": {"url": f"sqlite+aiosqlite:///{self.dir / 'relay.db'}"},
            "listen": {
                "submission": f"127.0.0.1:{self.port}",
                "smtps": None,
                "smtp": None,
                # The bench's plain runs send without AUTH, as Postfix's mynetworks clients.
                "trusted_networks": {"127.0.0.1/32": ACCOUNT},
                "processes": processes,
            },
            "http": {"listen": None},
            "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 1},
            "smtp": {"max_connections_per_ip": 0},
            "delivery": {"routes": {"example.org": f"127.0.0.1:{sink_port}"}},
            # The sending limits are product policy, not speed: lifted so they never refuse.
            "limits": {
                "rate": huge,
                "daily": huge,
                "hard_ceiling": huge,
                "levels": [huge],
                "per_recipient_hourly": huge,
            },
        }
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, stdin: str | None = None) -> None:
        subprocess.run(
            [PY, "-m", "relay", "-c", str(self.cfg_path), *args],
            input=stdin.encode() if stdin else None,
            check=True,
            cwd=ROOT,
            capture_output=True,
        )

    def start(self) -> None:
        self.cli("migrate")
        self.cli("account", "add", ACCOUNT, "--password-stdin", stdin=PASSWORD + "\n")
        self.cli("domain", "add", DOMAIN, "--account", ACCOUNT, "--verified", "--no-warmup")
        self.log = open(self.dir / "relay.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PY, "-m", "relay", "-c", str(self.cfg_path), "serve"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.root_pid = self.proc.pid
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.log.close()


class Postfix(Server):
    name = "postfix"
    supports_auth = False

    def __init__(self, workdir: Path, sink_port: int) -> None:
        self.dir = workdir / "postfix"
        self.conf = self.dir / "etc"
        self.conf.mkdir(parents=True)
        self.port = free_port()
        from relay.certs import write_self_signed

        cert, key = self.conf / "cert.pem", self.conf / "key.pem"
        write_self_signed(cert, key, "postfix.bench")
        main_cf = f"""
compatibility_level = 3.6
queue_directory = {self.dir / "queue"}
data_directory = {self.dir / "data"}
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
local_recipient_maps =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
maillog_file = {self.dir / "maillog"}
maillog_file_prefixes = {self.dir}
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = may
smtp_tls_security_level = none
smtputf8_enable = no
default_process_limit = 200
"""
        (self.conf / "main.cf").write_text(main_cf)
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        out = []
        for line in master:
            if line.startswith("smtp ") and " inet " in line:
                line = f"127.0.0.1:{self.port} inet n - n - - smtpd"
            elif line and not line[0].isspace() and not line.startswith("#"):
                cols = line.split()
                if len(cols) >= 8 and cols[4] == "y":  # no chroot: the queue is in /tmp
                    cols[4] = "n"
                    line = " ".join(cols)
            out.append(line)
        (self.conf / "master.cf").write_text("\n".join(out) + "\n")

    def _postfix(self, *args: str) -> None:
        done = subprocess.run(
            ["/usr/sbin/postfix", "-c", str(self.conf), *args], capture_output=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed: {done.stderr.decode()}")

    def start(self) -> None:
        (self.dir / "queue").mkdir(mode=0o755)
        (self.dir / "data").mkdir(mode=0o755)
        shutil.chown(self.dir / "data", "postfix", "postfix")
        self._postfix("start")
        wait_port(self.port)
        pidfile = self.dir / "queue" / "pid" / "master.pid"
        self.root_pid = int(pidfile.read_text().split()[0])

    def stop(self) -> None:
        try:
            self._postfix("stop")
        except RuntimeError as exc:
            print(exc, file=sys.stderr)


# ----------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    size: int
    sessions: int
    per_conn: int
    messages: int
    tls_auth: bool = False
    half_rate: bool = False  # offered at half of relay's best accept rate of `of`
    of: str = ""


def scenarios(quick: bool) -> list[Scenario]:
    k2, k100 = 2048, 100 * 1024
    if quick:
        return [
            Scenario("2k-20x1", k2, 20, 1, 1000),
            Scenario("2k-100x1", k2, 100, 1, 1000),
            Scenario("100k-20x1", k100, 20, 1, 300),
            Scenario("2k-20x1-tls+auth", k2, 20, 1, 500, tls_auth=True),
        ]
    return [
        Scenario("2k-1x1", k2, 1, 1, 500),
        Scenario("2k-20x1", k2, 20, 1, 4000),
        Scenario("2k-100x1", k2, 100, 1, 4000),
        Scenario("2k-20x100", k2, 20, 100, 4000),
        Scenario("2k-100x100", k2, 100, 100, 4000),
        Scenario("100k-20x1", k100, 20, 1, 1500),
        Scenario("100k-100x10", k100, 100, 10, 1500),
        Scenario("2k-20x1-tls+auth", k2, 20, 1, 2000, tls_auth=True),
        Scenario("2k-20x100-tls+auth", k2, 20, 100, 4000, tls_auth=True),
        Scenario("2k-20x1-half-rate", k2, 20, 1, 2000, half_rate=True, of="2k-20x1"),
    ]


@dataclass
class Row:
    scenario: str
    server: str
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    accept_rate: float = 0.0
    e2e_rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_ms_per_msg: float = 0.0
    peak_pss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    delivered: int = 0
    missing: int = 0
    duplicates: int = 0
    offered_rate: float = 0.0
    note: str = ""
    round: int = 1


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def run_one(
    server: Server, sink: Sink, sc: Scenario, run_id: str, rate: float, duration: float
) -> Row:
    row = Row(sc.name, server.name, offered_rate=rate)
    sink.ask("RESET")
    cmd = [
        PY,
        str(HERE / "loadgen.py"),
        "--port",
        str(server.port),
        "--sessions",
        str(sc.sessions),
        "--messages",
        str(sc.messages),
        "--per-conn",
        str(sc.per_conn),
        "--size",
        str(sc.size),
        "--run",
        run_id,
        "--rate",
        str(rate),
        "--duration",
        str(duration),
    ]
    if sc.tls_auth:
        cmd.append("--starttls")
        if server.supports_auth:
            cmd += ["--auth", f"{ACCOUNT}:{PASSWORD}"]
        else:
            row.note = "STARTTLS, no AUTH (no SASL backend)"
    mem = MemSampler(server.root_pid)
    cpu0 = cpu_seconds(server.root_pid)
    mem.start()
    out = subprocess.run(cmd, capture_output=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        mem.stop.set()
        row.note = f"loadgen failed: {out.stderr.decode()[-300:]}"
        return row
    gen = json.loads(out.stdout.decode().strip().splitlines()[-1])
    row.accepted, row.refused, row.errors = gen["accepted"], gen["refused"], gen["errors"]
    row.accept_rate = row.accepted / gen["elapsed"] if gen["elapsed"] else 0.0
    lat = gen["latencies_ms"]
    row.p50_ms, row.p99_ms = pct(lat, 50), pct(lat, 99)
    # End to end: wait until the sink has every accepted message (or it stops growing).
    last_count, stalled_since = -1, time.monotonic()
    while True:
        st = sink.ask("STATS")
        if st["unique"] >= row.accepted:
            break
        if st["count"] != last_count:
            last_count, stalled_since = st["count"], time.monotonic()
        elif time.monotonic() - stalled_since > 30:
            break
        time.sleep(0.05)
    cpu1 = cpu_seconds(server.root_pid)
    mem.stop.set()
    mem.join()
    row.delivered, row.duplicates = st["unique"], st["duplicates"]
    if row.delivered and st["last"]:
        row.e2e_rate = row.delivered / (st["last"] - gen["start"])
    row.cpu_ms_per_msg = (cpu1 - cpu0) * 1000 / max(1, row.accepted)
    row.peak_pss_mb, row.peak_rss_mb = mem.peak_pss / 1024, mem.peak_rss / 1024
    miss = sink.ask(f"MISSING {run_id} {sc.messages}")
    # Only accepted messages must arrive; refused ones are the loadgen's count.
    row.missing = max(0, row.accepted - row.delivered)
    if row.missing or row.duplicates or st["no_id"]:
        print(
            f"\n!!!!! LOSS/DUPLICATION {server.name} {sc.name}: accepted {row.accepted},"
            f" delivered {row.delivered}, duplicates {row.duplicates}, no id {st['no_id']},"
            f" first missing ids {miss['missing'][:10]} !!!!!\n",
            file=sys.stderr,
            flush=True,
        )
    if row.refused or row.errors:
        print(f"  {server.name} {sc.name}: refused {row.refused} errors {row.errors}", flush=True)
    return row


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def table(rows: list[Row]) -> str:
    by = {(r.scenario, r.server): r for r in rows}
    names = list(dict.fromkeys(r.scenario for r in rows))
    head = (
        "| scenario | server | accept msg/s | e2e msg/s | p50 ms | p99 ms | CPU ms/msg"
        " | peak PSS MB | lost/dup |"
    )
    lines = [head, "|" + "---|" * 9]
    for name in names:
        rel, pf = by.get((name, "relay")), by.get((name, "postfix"))
        for r in (rel, pf):
            if r is None:
                continue
            offered = f" @{r.offered_rate:.0f}/s" if r.offered_rate else ""
            lines.append(
                f"| {name}{offered} | {r.server} | {r.accept_rate:.0f} | {r.e2e_rate:.0f}"
                f" | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.cpu_ms_per_msg:.2f}"
                f" | {r.peak_pss_mb:.0f} | {r.missing}/{r.duplicates} |"
            )
        if rel and pf:
            lines.append(
                f"| {name} | **relay/postfix** | **{ratio(rel.accept_rate, pf.accept_rate)}**"
                f" | **{ratio(rel.e2e_rate, pf.e2e_rate)}** | {ratio(rel.p50_ms, pf.p50_ms)}"
                f" | {ratio(rel.p99_ms, pf.p99_ms)}"
                f" | {ratio(rel.cpu_ms_per_msg, pf.cpu_ms_per_msg)}"
                f" | {ratio(rel.peak_pss_mb, pf.peak_pss_mb)} | |"
            )
    notes = sorted({f"{r.server} {r.scenario}: {r.note}" for r in rows if r.note})
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


_MEDIAN_FIELDS = (
    "accept_rate",
    "e2e_rate",
    "p50_ms",
    "p99_ms",
    "cpu_ms_per_msg",
    "peak_pss_mb",
    "peak_rss_mb",
    "offered_rate",
)


def median_rows(rows: list[Row]) -> list[Row]:
    """One row per (scenario, server): the median of each figure over the rounds, and
    the sums of what was lost, duplicated, refused or failed (any loss must show)."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.scenario, r.server), []).append(r)
    out = []
    for (name, server), group in groups.items():
        m = Row(name, server, round=0)
        for f in _MEDIAN_FIELDS:
            setattr(m, f, statistics.median(getattr(r, f) for r in group))
        m.accepted = sum(r.accepted for r in group)
        m.delivered = sum(r.delivered for r in group)
        m.missing = sum(r.missing for r in group)
        m.duplicates = sum(r.duplicates for r in group)
        m.note = "; ".join(dict.fromkeys(r.note for r in group if r.note))
        out.append(m)
    return out


def round_ratios(rows: list[Row]) -> str:
    """relay/Postfix accept and end-to-end ratio of each round, and their median: the two
    servers of one round ran minutes apart at most, so each round's ratio is the fairest
    figure on a machine whose speed drifts."""
    by = {(r.scenario, r.server, r.round): r for r in rows}
    rounds = sorted({r.round for r in rows})
    names = list(dict.fromkeys(r.scenario for r in rows))
    head = "| scenario | " + " | ".join(f"round {n}" for n in rounds) + " | median |"
    lines = [head, "|" + "---|" * (len(rounds) + 2)]
    for name in names:
        pairs = []
        for n in rounds:
            rel, pf = by.get((name, "relay", n)), by.get((name, "postfix", n))
            if rel and pf and pf.accept_rate and pf.e2e_rate:
                pairs.append((rel.accept_rate / pf.accept_rate, rel.e2e_rate / pf.e2e_rate))
        if len(pairs) != len(rounds):
            continue
        cells = [f"{a:.2f} / {e:.2f}" for a, e in pairs]
        med = (statistics.median(a for a, _ in pairs), statistics.median(e for _, e in pairs))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{med[0]:.2f} / {med[1]:.2f}** |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="CI: a few scenarios, < ~2 minutes")
    ap.add_argument("--only", choices=["relay", "postfix"], help="run one server only")
    ap.add_argument("--scenarios", help="comma-separated scenario names")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="N independent rounds (fresh servers each); medians and each round's ratios",
    )
    ap.add_argument(
        "--duration", type=float, help="cap each load at S seconds (default: none; --quick: 8)"
    )
    ap.add_argument(
        "--relay-processes",
        type=int,
        default=max(0, min(4, (os.cpu_count() or 1) - 1)),
        help="relay's listen.processes (default: cores - 1, at most 4; 0: one process)",
    )
    args = ap.parse_args()
    if args.duration is None:
        args.duration = 8.0 if args.quick else 0.0
    if os.geteuid() != 0 and args.only != "relay":
        print(
            "Postfix needs root to start (postfix -c DIR start); use --only relay", file=sys.stderr
        )
        return 2
    if args.only != "relay" and not Path("/usr/sbin/postfix").exists():
        print(
            "Postfix is not installed: apt-get install postfix (or --only relay)", file=sys.stderr
        )
        return 2
    chosen = scenarios(args.quick)
    if args.scenarios:
        wanted = set(args.scenarios.split(","))
        chosen = [s for s in scenarios(False) + scenarios(True) if s.name in wanted]
        chosen = list({s.name: s for s in chosen}.values())
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    os.chmod(workdir, 0o755)  # Postfix's unprivileged processes must reach their queue
    started = time.monotonic()
    print(f"relay: listen.processes {args.relay_processes}", flush=True)
    sink = Sink(workdir)
    servers: list[Server] = []
    rows: list[Row] = []
    try:
        for rnd in range(1, args.repeat + 1):
            if args.repeat > 1:
                print(f"-- round {rnd} of {args.repeat}", flush=True)
            # Each round starts both servers afresh in a directory of its own: rounds are
            # independent runs (no queue, heap or database history carried over), so
            # their medians mean what a single run's figures mean.
            home = workdir / f"round{rnd}" if args.repeat > 1 else workdir
            home.mkdir(exist_ok=True)
            os.chmod(home, 0o755)
            servers = []
            if args.only != "postfix":
                servers.append(Relay(home, sink.port, args.relay_processes))
            if args.only != "relay":
                servers.append(Postfix(home, sink.port))
            for s in servers:
                s.start()
            best: dict[tuple[str, str], float] = {}
            for n, sc in enumerate(chosen):
                # Alternate who goes first so drift in the machine's load hurts both alike
                # (and swap again each round).
                order = servers if (n + rnd) % 2 == 1 else list(reversed(servers))
                for s in order:
                    rate = 0.0
                    if sc.half_rate:
                        rate = best.get((sc.of, "relay"), 0.0) / 2 or 100.0
                    print(f"{sc.name:<22} {s.name:<8} ...", end="", flush=True)
                    run_id = f"{sc.name}-{s.name}-{rnd}-{n}".replace("+", "_")
                    row = run_one(s, sink, sc, run_id, rate, args.duration)
                    row.round = rnd
                    best[(sc.name, s.name)] = row.accept_rate
                    rows.append(row)
                    print(
                        f" accept {row.accept_rate:.0f}/s e2e {row.e2e_rate:.0f}/s"
                        f" p99 {row.p99_ms:.1f} ms",
                        flush=True,
                    )
            for s in servers:
                s.stop()
            servers = []
    finally:
        for s in servers:
            s.stop()
        sink.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    load1 = os.getloadavg()[0]
    print()
    if args.repeat > 1:
        print(f"Medians of {args.repeat} rounds:\n")
        print(table(median_rows(rows)))
        print("\nrelay/postfix, accept / e2e, per round:\n")
        print(round_ratios(rows))
    else:
        print(table(rows))
    print(
        f"\n{os.cpu_count()} CPUs, load average {load1:.1f} at the end;"
        f" {time.monotonic() - started:.0f} s in all." + (f" Logs: {workdir}" if args.keep else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    lost = any(r.missing or r.duplicates for r in rows)
    return 3 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
