"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

With ``Type=notify`` systemd considers the service started only when READY=1 arrives
(so dependants start after the listeners are bound), shows STATUS= in ``systemctl
status``, and tracks reloads through RELOADING=1 ... READY=1. The protocol is a plain
AF_UNIX datagram of newline-separated KEY=VALUE lines; a name starting with '@' is an
abstract socket (Linux), addressed with a leading NUL byte.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("relay")


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. "READY=1", "STATUS=...") to the service manager.

    Returns False when relay is not run by systemd (no $NOTIFY_SOCKET) or the send fails;
    a failed notify is logged, never fatal: the service keeps running.
    """
    name = os.environ.get("NOTIFY_SOCKET")
    if not name or not states:
        return False
    payload = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A datagram to a local socket either queues at once or fails: no blocking wait.
            sock.setblocking(False)
            sock.sendto(payload, _address(name))
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", name, exc)
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def stopping(status: str = "") -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    # MONOTONIC_USEC lets Type=notify-reload (systemd 253+) match the reload to this signal.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")
