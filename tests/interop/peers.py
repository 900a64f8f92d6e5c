"""Real third-party peers for the interop tests: Postfix as the destination MX, Perl's
Mail::DKIM as an independent DKIM verifier, and lookups of the Debian programs.

Nothing here is written by us on the other side of the wire: these helpers only configure
and start the real programs in temporary directories.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import trustme

from tests.support.net import LOOPBACK, free_port, port_accepts


def have(*programs: str) -> str | None:
    """None if every program is on PATH, else the name of the first missing one."""
    for program in programs:
        if shutil.which(program) is None and not Path(program).exists():
            return program
    return None


def perl_has(*modules: str) -> bool:
    if shutil.which("perl") is None:
        return False
    args = ["perl"] + [f"-M{m}" for m in modules] + ["-e", "1"]
    return subprocess.run(args, capture_output=True).returncode == 0


_MASTER_CF = """\
{listen} inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix instance (``postfix -c DIR``) on 127.0.0.1:PORT with STARTTLS,
    delivering every recipient of ``domain`` into one Maildir under its temp directory.

    Needs root (Postfix's master runs as root and drops to mail_owner=postfix).
    """

    def __init__(self, domain: str = "example.org", hostname: str = "mx.example.org") -> None:
        self.domain = domain
        self.hostname = hostname
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are mode 700 and Postfix's daemons run
        # as the postfix user, which must reach the queue and the maildir.
        self.dir = Path(tempfile.mkdtemp(prefix="relay-postfix-"))
        os.chmod(self.dir, 0o755)
        self.conf = self.dir / "conf"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.mail = self.dir / "mail"
        self.log_path = self.dir / "postfix.log"
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert(hostname, "localhost", LOOPBACK)
        self.started = False

    @property
    def maildir(self) -> Path:
        return self.mail / "inbox"

    def _write_config(self) -> None:
        owner = pwd.getpwnam("postfix")
        for d in (self.conf, self.queue, self.data, self.mail):
            d.mkdir(parents=True, exist_ok=True)
        os.chown(self.data, owner.pw_uid, owner.pw_gid)
        os.chown(self.mail, owner.pw_uid, owner.pw_gid)
        cert = self.conf / "cert.pem"
        key = self.conf / "key.pem"
        cert.write_bytes(b"".join(b.bytes() for b in self.cert.cert_chain_pems))
        self.cert.private_key_pem.write_to_path(str(key))
        os.chmod(key, 0o600)
        main_cf = {
            "compatibility_level": "3.6",
            "config_directory": str(self.conf),
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.domain,
            "myorigin": self.hostname,
            "mydestination": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": "",
            "smtpd_banner": "$myhostname ESMTP Postfix (relay interop test)",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(cert),
            "smtpd_tls_key_file": str(key),
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "message_size_limit": str(20 * 1024 * 1024),
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": str(self.mail),
            "virtual_mailbox_maps": "static:inbox/",  # trailing slash: Maildir format
            "virtual_uid_maps": f"static:{owner.pw_uid}",
            "virtual_gid_maps": f"static:{owner.pw_gid}",
            "virtual_transport": "virtual",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.dir),
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtputf8_enable": "yes",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main_cf.items()))
        (self.conf / "master.cf").write_text(_MASTER_CF.format(listen=f"{LOOPBACK}:{self.port}"))

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 30) -> Postfix:
        self._write_config()
        result = self._postfix("start")
        if result.returncode != 0:
            raise RuntimeError(
                f"postfix start failed ({result.returncode}): {result.stderr}{result.stdout}"
                f"\n{self.log_tail()}"
            )
        self.started = True
        deadline = time.monotonic() + timeout
        while not port_accepts(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"postfix did not listen on {self.port}\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(Exception):
                self._postfix("stop", timeout=30)
            self.started = False

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def delivered(self) -> list[Path]:
        new = self.maildir / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def wait_delivered(self, n: int, timeout: float = 60) -> list[Path]:
        deadline = time.monotonic() + timeout
        while True:
            files = self.delivered()
            if len(files) >= n:
                return files
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"postfix maildir has {len(files)} of {n} messages after {timeout}s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.2)

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_PERL_DKIM = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Mail::DKIM::DNS; use Net::DNS::Resolver;
my ($port) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $port, recurse => 0, retry => 2, udp_timeout => 5));
binmode STDIN;
my $v = Mail::DKIM::Verifier->new();
while (<STDIN>) { s/\r?\n\z/\r\n/; $v->PRINT($_); }
$v->CLOSE();
foreach my $sig ($v->signatures) {
    printf "signature d=%s s=%s result=%s detail=%s\n",
        $sig->domain, $sig->selector, $sig->result, $sig->result_detail;
}
print "result=", $v->result, "\n";
print "detail=", $v->result_detail, "\n";
"""


def mail_dkim_verify(message: bytes, dns_port: int) -> str:
    """Verify with Perl's Mail::DKIM against the test DNS server; returns its report
    (a line ``result=pass`` when the message verifies)."""
    result = subprocess.run(
        ["perl", "-e", _PERL_DKIM, str(dns_port)],
        input=message,
        capture_output=True,
        timeout=60,
    )
    return (result.stdout + result.stderr).decode(errors="replace")
