"""A deliberately dumb SMTP client on raw sockets: it sends exactly the bytes a test
gives it (no dot-stuffing, no line-end fixing), so hostile input reaches the server as is.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl

from tests.support.relayproc import DEFAULT_ACCOUNT, DEFAULT_PASSWORD, unverified_ssl_context


class Closed(Exception):
    """The server closed the connection."""


class Raw:
    def __init__(
        self,
        port: int,
        *,
        source: str = "127.0.0.1",
        implicit_tls: bool = False,
        timeout: float = 20.0,
        greet: bool = True,
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        self.sock: socket.socket | ssl.SSLSocket = sock
        if implicit_tls:
            self.sock = unverified_ssl_context().wrap_socket(sock)
        self.buf = b""
        self.greeting = self.reply() if greet else (0, "")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed(f"connection closed; unread: {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: (code, text of every line joined by \\n)."""
        lines: list[str] = []
        while True:
            line = self._line().decode(errors="replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, line: bytes | str) -> tuple[int, str]:
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def starttls(self) -> None:
        code, text = self.cmd("STARTTLS")
        assert code == 220, text
        assert not self.buf, f"bytes after the STARTTLS reply: {self.buf!r}"
        self.sock = unverified_ssl_context().wrap_socket(self.sock)

    def login(self, user: str = DEFAULT_ACCOUNT, password: str = DEFAULT_PASSWORD) -> None:
        code, text = self.auth_plain(user, password)
        assert code == 235, text

    def auth_plain(self, user: str, password: str) -> tuple[int, str]:
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.cmd(f"AUTH PLAIN {blob}")

    def ready(self, *, tls: bool = True, login: bool = True) -> Raw:
        """EHLO, STARTTLS, EHLO, AUTH: a session ready for MAIL."""
        code, text = self.cmd("EHLO hostile.test")
        assert code == 250, text
        if tls:
            self.starttls()
            code, text = self.cmd("EHLO hostile.test")
            assert code == 250, text
        if login:
            self.login()
        return self
