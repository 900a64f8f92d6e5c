"""Run the real relay as a subprocess (``python -m relay -c FILE ...``) and talk to it.

    proc = RelayProcess(tmp_path, dns_server, sink.port)
    proc.setup()          # migrate, account alice, domain example.com (verified), DNS
    proc.start()          # serve; returns when every listener accepts connections
    await submit(proc.submission_port, sender="a@example.com", recipients=["b@example.org"],
                 data=make_message("a@example.com", ["b@example.org"]))
    proc.stop()

Every RelayProcess ever started is killed at interpreter exit as a last resort; fixtures
call ``close()`` at teardown.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import copy
import email.utils
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any, Protocol

import aiosmtplib
import trustme
import yaml

from .dnsserver import DNSServer
from .net import LOOPBACK, free_port, port_accepts

PROJECT_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_ACCOUNT = "alice"
DEFAULT_PASSWORD = "secret-pass-1"
DEFAULT_DOMAIN = "example.com"

_LIVE: weakref.WeakSet[RelayProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        proc.kill()


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: base with extra merged in (nested dicts merged, anything else replaced)."""
    merged: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class MakeRelay(Protocol):
    """Type of the ``make_relay`` fixture (tests/conftest.py)."""

    def __call__(
        self,
        extra_config: Mapping[str, Any] | None = None,
        *,
        sink_port: int | None = None,
        name: str | None = None,
    ) -> RelayProcess: ...


class RelayError(AssertionError):
    """A relay command failed or the server did not behave; the message has the output."""


class RelayProcess:
    """One relay node: its config file, certificates, database and ``serve`` process.

    Listener values in ``extra_config["listen"]`` (and ``http.listen``) may be "auto":
    a free loopback port is picked. ``listen.smtp`` is off unless set.
    """

    def __init__(
        self,
        tmp_path: Path,
        dns: DNSServer,
        sink_port: int,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.dir = Path(tmp_path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dns = dns
        self.sink_port = sink_port
        self.log_path = self.dir / "relay.log"
        self.config_path = self.dir / "relay.yaml"
        self.db_path = self.dir / "relay.db"

        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert("relay.test", "localhost", LOOPBACK)
        self.cert_path = self.dir / "relay-cert.pem"
        self.key_path = self.dir / "relay-key.pem"
        self.ca_path = self.dir / "relay-ca.pem"
        self.cert_path.write_bytes(b"".join(b.bytes() for b in self.server_cert.cert_chain_pems))
        self.server_cert.private_key_pem.write_to_path(str(self.key_path))
        self.ca.cert_pem.write_to_path(str(self.ca_path))

        base: dict[str, Any] = {
            "node_id": "test-node",
            "hostname": "relay.test",
            "database": {"url": f"sqlite+aiosqlite:///{self.db_path}"},
            "tls": {"cert": str(self.cert_path), "key": str(self.key_path)},
            "listen": {"submission": "auto", "smtps": "auto", "smtp": None},
            "http": {"listen": "auto"},
            "dns": {"nameservers": [dns.nameserver]},
            "dkim": {"selector": "relay"},
            "delivery": {
                "port": sink_port,
                "routes": {},
                "require_tls": False,
                "helo_name": "relay.test",
                "retry_first": 1,
                "retry_max": 2,
                "max_age": 259200,
                "poll_interval": 0.2,
                "lease_seconds": 30,
            },
            "smtp": {"max_message_size": 4 * 1024 * 1024},
        }
        self.config: dict[str, Any] = deep_merge(base, extra_config or {})
        self._assign_ports()
        self.write_config()

        self.process: subprocess.Popen[bytes] | None = None
        self.returncodes: list[int] = []

    # ------------------------------------------------------------------ config

    def _assign_ports(self) -> None:
        listen = self.config.get("listen") or {}
        for key, value in list(listen.items()):
            if value == "auto":
                listen[key] = f"{LOOPBACK}:{free_port()}"
        http = self.config.get("http")
        if isinstance(http, dict) and http.get("listen") == "auto":
            http["listen"] = f"{LOOPBACK}:{free_port()}"

    def write_config(self) -> None:
        """(Re)write the YAML file from ``self.config`` (tests may edit it, then restart)."""
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def _listen_port(self, key: str) -> int | None:
        value = (self.config.get("listen") or {}).get(key)
        return _port_of(value)

    def _require_port(self, key: str) -> int:
        port = self._listen_port(key)
        if port is None:
            raise RuntimeError(f"listener {key!r} is not enabled in this relay's config")
        return port

    @property
    def submission_port(self) -> int:
        return self._require_port("submission")

    @property
    def smtps_port(self) -> int:
        return self._require_port("smtps")

    @property
    def smtp_port(self) -> int:
        """Port 25-style listener; only when extra_config sets listen.smtp ("auto")."""
        return self._require_port("smtp")

    @property
    def http_port(self) -> int:
        http = self.config.get("http") or {}
        port = _port_of(http.get("listen"))
        if port is None:
            raise RuntimeError("http.listen is not enabled in this relay's config")
        return port

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def db_url(self) -> str:
        url: str = self.config["database"]["url"]
        return url

    def listen_ports(self) -> list[int]:
        """Every TCP port the running relay should accept connections on."""
        listen = self.config.get("listen") or {}
        ports = [_port_of(listen.get(k)) for k in ("submission", "smtps", "smtp")]
        ports.append(_port_of((self.config.get("http") or {}).get("listen")))
        return [p for p in ports if p is not None]

    def client_ssl_context(self, verify: bool = True) -> ssl.SSLContext:
        """Client TLS context for the relay's listeners; verify=True trusts the test CA
        (names: relay.test, localhost, 127.0.0.1)."""
        if not verify:
            return unverified_ssl_context()
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    # ------------------------------------------------------------------ CLI

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + path if path else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "relay", "-c", str(self.config_path), *args]

    def cli(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run one relay command to completion (text mode)."""
        cmd = self.command(*args)
        try:
            result = subprocess.run(
                cmd,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.dir,
                env=self.env(),
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise RelayError(
                f"`relay {' '.join(args)}` did not finish within {timeout}s\n"
                f"--- stdout ---\n{_text(exc.stdout)}\n--- stderr ---\n{_text(exc.stderr)}"
            ) from None
        if check and result.returncode != 0:
            raise RelayError(
                f"`relay {' '.join(args)}` exited with {result.returncode}\n"
                f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
            )
        return result

    def setup(
        self,
        account: str = DEFAULT_ACCOUNT,
        password: str = DEFAULT_PASSWORD,
        domain: str | None = DEFAULT_DOMAIN,
        *,
        warmup: bool = False,
        publish_dns: bool = True,
    ) -> None:
        """migrate; account add; domain add --verified (--no-warmup unless warmup);
        publish the domain's DNS records (from ``domain records --format bind``) if that
        command works."""
        self.cli("migrate")
        self.add_account(account, password)
        if domain is not None:
            self.add_domain(domain, account, warmup=warmup, publish_dns=publish_dns)

    def add_account(self, name: str, password: str) -> None:
        self.cli("account", "add", name, "--password-stdin", input=password + "\n")

    def add_domain(
        self, domain: str, account: str, *, warmup: bool = False, publish_dns: bool = True
    ) -> None:
        args = ["domain", "add", domain, "--account", account, "--verified"]
        if not warmup:
            args.append("--no-warmup")
        self.cli(*args)
        if publish_dns:
            self.publish_dns(domain)

    def domain_records(self, domain: str) -> str | None:
        """``domain records DOMAIN --format bind`` output, or None if the command failed."""
        result = self.cli("domain", "records", domain, "--format", "bind", check=False)
        return result.stdout if result.returncode == 0 else None

    def publish_dns(self, domain: str) -> bool:
        """Publish what the relay says the domain's DNS should hold; False if it can't say."""
        text = self.domain_records(domain)
        if text is None or not text.strip():
            return False
        try:
            self.dns.add_zone_text(text)
        except Exception as exc:
            raise RelayError(
                f"`relay domain records {domain} --format bind` printed text that is not "
                f"a BIND zone fragment: {exc}\n--- output ---\n{text}"
            ) from exc
        return True

    # ------------------------------------------------------------------ serve

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self, timeout: float = 20.0) -> RelayProcess:
        """Launch ``serve``; return once every configured listener accepts TCP."""
        if self.running:
            raise RuntimeError("relay is already running")
        with self.log_path.open("ab") as log:
            log.write(f"===== relay serve starting at {time.strftime('%X')} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command("serve"),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=self.env(),
                start_new_session=True,
            )
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        waiting = self.listen_ports()
        while waiting:
            if self.process.poll() is not None:
                code = self.process.returncode
                self._reap()
                raise RelayError(
                    f"relay serve exited with {code} before listening\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RelayError(
                    f"relay serve did not listen on {waiting} within {timeout}s\n{self.log_tail()}"
                )
            waiting = [p for p in waiting if not port_accepts(p, timeout=0.2)]
            if waiting:
                time.sleep(0.05)
        return self

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait for exit (graceful drain); return the exit code.

        If it has not exited within timeout: SIGKILL and raise RelayError."""
        proc = self.process
        if proc is None:
            raise RuntimeError("relay was not started")
        if proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RelayError(
                    f"relay did not exit within {timeout}s of SIGTERM\n{self.log_tail()}"
                ) from None
        code = proc.returncode
        self._reap()
        return code

    def kill(self) -> int | None:
        """SIGKILL the whole process group (a crash); return the exit code if any."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        code = proc.returncode
        self._reap()
        return code

    def restart(self, timeout: float = 20.0) -> RelayProcess:
        if self.running:
            self.stop(timeout)
        return self.start(timeout)

    def close(self) -> None:
        """Teardown: make sure nothing is left running (never raises)."""
        with contextlib.suppress(Exception):
            self.kill()  # also kills whatever is left in the process's session

    def send_signal(self, sig: int) -> None:
        """Send a signal to the serve process itself (e.g. SIGHUP)."""
        if self.process is None:
            raise RuntimeError("relay was not started")
        self.process.send_signal(sig)

    def _signal(self, sig: int) -> None:
        proc = self.process
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def _reap(self) -> None:
        proc = self.process
        if proc is not None and proc.returncode is not None:
            self.returncodes.append(proc.returncode)
            # Kill anything still in its session (a stray child would hold ports).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.process = None
            _LIVE.discard(self)

    # ------------------------------------------------------------------ logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def wait_for_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Block until the regex pattern appears in the log; return the match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if time.monotonic() > deadline:
                raise RelayError(
                    f"{pattern!r} did not appear in the relay log within {timeout}s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _port_of(value: object) -> int | None:
    """Port of a listen value: "127.0.0.1:2525" / 2525 -> 2525; None/False/"" -> None."""
    if value is None or value is False or value == "" or isinstance(value, Mapping):
        return None  # off, or not an address (listen.trusted_networks)
    if isinstance(value, int):
        return value
    text = str(value)
    return int(text.rsplit(":", 1)[-1])


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# ---------------------------------------------------------------------- SMTP clients


def unverified_ssl_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def make_message(
    sender: str,
    recipients: Sequence[str],
    subject: str = "Test message",
    body: str = "Hello from the relay tests.\n",
    *,
    headers: Mapping[str, str] | None = None,
    message_id: bool = True,
    date: bool = True,
    html: str | None = None,
) -> bytes:
    """A simple RFC 5322 message (CRLF line ends) as bytes."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    if date:
        msg["Date"] = email.utils.formatdate(localtime=False)
    if message_id:
        domain = sender.rpartition("@")[2] or "test.invalid"
        msg["Message-ID"] = email.utils.make_msgid(domain=domain)
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg.as_bytes()


async def submit(
    port: int,
    *,
    sender: str,
    recipients: Sequence[str],
    data: bytes | str,
    username: str | None = DEFAULT_ACCOUNT,
    password: str | None = DEFAULT_PASSWORD,
    implicit_tls: bool = False,
    starttls: bool = True,
    host: str = LOOPBACK,
    tls_context: ssl.SSLContext | None = None,
    command_timeout: float = 30,
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    """Submit one message over SMTP; return aiosmtplib's ``sendmail`` result
    ``(refused recipients -> response, final DATA reply text)``.

    Raises aiosmtplib's errors (SMTPRecipientsRefused, SMTPDataError, SMTPAuthenticationError
    ...) exactly as aiosmtplib does. username=None skips AUTH."""
    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        use_tls=implicit_tls,
        start_tls=False if implicit_tls else starttls,
        validate_certs=False,
        tls_context=tls_context or unverified_ssl_context(),
        timeout=command_timeout,
    )
    payload = data.encode() if isinstance(data, str) else data
    async with client:
        if username is not None:
            await client.login(username, password or "")
        return await client.sendmail(sender, list(recipients), payload)


def submit_sync(port: int, **kwargs: Any) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    """``submit`` for synchronous tests (runs its own event loop)."""
    return asyncio.run(submit(port, **kwargs))


_QUEUE_ID = re.compile(r"queued as <?([A-Za-z0-9._:-]+)>?")


def wait_status(relay: RelayProcess, qid: str, word: str, timeout: float = 30) -> str:
    """``relay status QID`` once it shows ``word`` (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = relay.cli("status", qid).stdout
        if word in out:
            return out
        time.sleep(0.2)
    raise AssertionError(f"status of {qid} never showed {word!r}:\n{out}")


async def send_one(relay: RelayProcess, rcpt: str, sender: str = "a@example.com") -> str:
    """Submit one message to ``rcpt`` (subject "to RCPT"); its queue id."""
    msg = make_message(sender, [rcpt], subject=f"to {rcpt}")
    reply = await submit(relay.submission_port, sender=sender, recipients=[rcpt], data=msg)
    qid = queue_id(reply)
    assert qid, reply
    return qid


def queue_id(reply: str | tuple[dict[str, aiosmtplib.SMTPResponse], str]) -> str | None:
    """The id in "250 2.0.0 Ok: queued as <id>" (accepts ``submit``'s result too)."""
    text = reply[1] if isinstance(reply, tuple) else reply
    match = _QUEUE_ID.search(text)
    return match.group(1) if match else None
