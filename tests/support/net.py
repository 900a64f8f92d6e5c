"""Small networking helpers for tests: free loopback ports and waiting for listeners."""

from __future__ import annotations

import socket
import time

LOOPBACK = "127.0.0.1"


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """Return a port on 127.0.0.1 that is free right now (the kernel picks it).

    There is a small window in which another process could take it; tests accept that.
    """
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True if a TCP connection to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(port: int, host: str = LOOPBACK, timeout: float = 20.0) -> None:
    """Block until host:port accepts TCP connections, or raise AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_accepts(port, host):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing accepted TCP connections on {host}:{port} within {timeout}s")
