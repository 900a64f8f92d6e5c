"""SMTP listener processes: the main process supervises them; they meet it in the database.

One Python process runs on one core. With ``listen.processes: N`` the main process keeps
delivery, webhooks, the scheduler, HTTP and metrics, and starts N children that each
bind every SMTP listener with SO_REUSEPORT (the kernel spreads new connections over
them), as Postfix's smtpd processes feed qmgr through the queue directories. An accepted
message is in the database before its 250, so nothing is lost between processes; a
child only has to tell the main process "there is new mail" so delivery need not wait
for its next poll, and "my listeners are bound" so readiness (and systemd's READY=1)
waits for them.

Both travel over one pipe, a byte each (writes of one byte are atomic; a full pipe
means the main process has wake-ups pending already, so a dropped byte loses nothing).

A child that dies is started again (after 1 s, then up to 30 s while it keeps dying),
SIGHUP is passed on to every child, and on stop each child drains its own sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("relay")

WAKE_FD_ENV = "RELAY_PARENT_FD"
_WAKE = b"w"
_READY = b"r"


class ParentLink:
    """A listener process's end of the pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._pending = False

    @classmethod
    def from_env(cls) -> ParentLink | None:
        value = os.environ.get(WAKE_FD_ENV)
        return cls(int(value)) if value else None

    def _send(self, byte: bytes) -> None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self.fd, byte)

    def wake(self, *_: object) -> None:
        """New mail is queued (the queue id is unused): one byte per loop iteration."""
        if self._pending:
            return
        self._pending = True

        def flush() -> None:
            self._pending = False
            self._send(_WAKE)

        asyncio.get_running_loop().call_soon(flush)

    def ready(self) -> None:
        self._send(_READY)


@dataclass(eq=False)
class _Child:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    failures: int = 0


@dataclass(eq=False)
class ListenerProcesses:
    """The main process's side: start, watch, restart, signal and stop the children."""

    count: int
    config_path: str
    on_wake: Callable[[], None]
    children: list[_Child] = field(default_factory=list)
    ready_count: int = 0
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False
    _read_fd: int = -1
    _write_fd: int = -1
    _watchers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, ready_within: float = 60.0) -> None:
        """Start every child and wait until each has bound its listeners."""
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        asyncio.get_running_loop().add_reader(self._read_fd, self._on_readable)
        self.children = [_Child(i) for i in range(self.count)]
        for child in self.children:
            await self._spawn(child)
        try:
            await asyncio.wait_for(self._ready.wait(), ready_within)
        except TimeoutError:
            log.error(
                "listener processes: %d of %d ready after %.0f s",
                self.ready_count,
                self.count,
                ready_within,
            )

    @property
    def alive(self) -> bool:
        return bool(self.children) and all(
            c.proc is not None and c.proc.returncode is None for c in self.children
        )

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.alive

    async def _spawn(self, child: _Child) -> None:
        env = dict(os.environ)
        env[WAKE_FD_ENV] = str(self._write_fd)
        # systemd hears from the main process only (READY=1 once every child is bound).
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(key, None)
        # The child inherits SIGHUP ignored (exec keeps SIG_IGN) until its loop installs
        # the reload handler: a reload sent while it starts must not kill it (it reads
        # the config file then anyway).
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            child.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "relay",
                "-c",
                self.config_path,
                "serve",
                "--listener-process",
                pass_fds=(self._write_fd,),
                env=env,
            )
        finally:
            signal.signal(signal.SIGHUP, previous)
        child.started = time.monotonic()
        log.info("listener process %d started pid=%d", child.index, child.proc.pid)
        task = asyncio.create_task(self._watch(child, child.proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, child: _Child, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._stopping:
            return
        log.error("listener process %d (pid %d) exited with %s", child.index, proc.pid, code)
        # A child that keeps dying right after its start backs off (1, 2, 4 ... 30 s).
        lived = time.monotonic() - child.started
        child.failures = 0 if lived > 60 else child.failures + 1
        await asyncio.sleep(min(30.0, 2.0 ** max(0, child.failures - 1)))
        if not self._stopping:
            await self._spawn(child)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._read_fd, 4096)
        except BlockingIOError:
            return
        if _READY in data:
            self.ready_count += data.count(_READY)
            if self.ready_count >= self.count:
                self._ready.set()
        if _WAKE in data:
            self.on_wake()

    def signal_all(self, sig: int) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(sig)

    async def stop(self, grace: float) -> None:
        """SIGTERM: each child stops accepting and drains its sessions; SIGKILL after."""
        self._stopping = True
        self.signal_all(signal.SIGTERM)
        procs = [c.proc for c in self.children if c.proc is not None]
        waits = [asyncio.create_task(p.wait()) for p in procs]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace + 5.0)
            if pending:
                self.signal_all(signal.SIGKILL)
                await asyncio.wait(pending)
        for task in list(self._watchers):
            task.cancel()
        loop = asyncio.get_running_loop()
        if self._read_fd >= 0:
            loop.remove_reader(self._read_fd)
            os.close(self._read_fd)
            os.close(self._write_fd)
            self._read_fd = self._write_fd = -1
