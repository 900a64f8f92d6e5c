"""A full disk under the SQLite queue: 452 4.3.1, nothing lost, mail flows once there is room.

The database lives on a small tmpfs that the test fills for real (mounting one needs
root; the test command runs as root, as it installs Debian packages).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiosmtplib
import pytest

from relay.config import DatabaseConfig
from relay.errors import NotFound, StorageFull
from relay.queue.store import NewMessage, NewRecipient, Store
from tests.conftest import PG_ENV, _pg_admin
from tests.integration.test_operations_lifecycle import authed_session, get_json
from tests.support.relayproc import MakeRelay, make_message, queue_id, submit
from tests.support.sink import SMTPSink

MB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MB tmpfs (requested before make_relay: unmounted after the relay stopped)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (bash scripts/test.sh runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path: Path) -> None:
    """Write zeros until the file system says it is full."""
    chunk = b"\0" * MB
    with open(path, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


async def test_a_full_disk_refuses_with_452_and_mail_flows_again_once_there_is_room(
    small_disk: Path, make_relay: MakeRelay, sink: SMTPSink
) -> None:
    relay = make_relay(
        {
            "database": {"url": f"sqlite+aiosqlite:///{small_disk}/relay.db"},
            # First the disk itself runs out (no reserve). Messages up to 64 MB: a
            # declared SIZE larger than the free space passes that check.
            "smtp": {"min_free_space": 0, "max_message_size": 64 * MB},
        }
    )
    relay.setup()
    relay.start()
    first = make_message("a@example.com", ["before@example.org"], subject="before")
    before = await submit(
        relay.submission_port, sender="a@example.com", recipients=["before@example.org"], data=first
    )
    qid = queue_id(before)
    assert qid
    sink.wait_for(1)
    # Its outcome recorded too, before the disk fills (or that write would fail).
    for _ in range(100):
        if " delivered " in relay.cli("queue", "show", qid).stdout.split("events:")[0]:
            break
        await asyncio.sleep(0.2)

    filler = small_disk / "filler"
    _fill(filler)
    # 3 MB: more than the write-ahead log holds yet, so the COMMIT must grow the file.
    big = make_message("a@example.com", ["big@example.org"], subject="big", body="x" * 3 * MB)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await submit(
            relay.submission_port, sender="a@example.com", recipients=["big@example.org"], data=big
        )
    assert refused.value.code == 452
    assert refused.value.message.startswith("4.3.1 Insufficient system storage")

    # With the guard on (a reload applies it), MAIL is refused before any body is sent.
    relay.config["smtp"]["min_free_space"] = 4 * MB
    relay.write_config()
    relay.send_signal(signal.SIGHUP)
    await asyncio.to_thread(relay.wait_for_log, r"reload applied .*smtp\.min_free_space")
    client = await authed_session(relay)
    code, text = await client.execute_command(b"MAIL", b"FROM:<a@example.com>")
    assert code == 452, text
    assert "4.3.1 Insufficient system storage" in text and "smtp.min_free_space" in text
    status, body = get_json(f"{relay.http_url}/readyz")
    assert status == 503 and body["checks"]["queue_space"] is False
    await client.quit()

    filler.unlink()
    await asyncio.sleep(1.1)  # the free space is read again at most once a second
    assert get_json(f"{relay.http_url}/readyz")[0] == 200
    # A declared SIZE must fit above the reserve as well.
    client = await authed_session(relay)
    code, text = await client.execute_command(b"MAIL", b"FROM:<a@example.com> SIZE=30000000")
    assert code == 452 and "30000000 bytes declared (SIZE)" in text, text
    await client.quit()
    after = await submit(
        relay.submission_port, sender="a@example.com", recipients=["big@example.org"], data=big
    )
    assert queue_id(after)
    got = sink.wait_for(2)
    assert [m.rcpt_tos for m in got] == [("before@example.org",), ("big@example.org",)]
    assert got[1].header("Subject") == "big" and len(got[1].data) > 3 * MB


@pytest.fixture
def pg_on_small_disk() -> Iterator[str]:
    """A PostgreSQL database whose tables live on an 8 MB tmpfs (a tablespace there)."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set (run `bash scripts/test.sh`)")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (bash scripts/test.sh runs as root)")
    # Not under pytest's tmp_path: the server runs as postgres and must reach it.
    top = Path(tempfile.mkdtemp(prefix="relay-pgfull."))
    top.chmod(0o755)
    disk = top / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    name = f"relay_full_{uuid.uuid4().hex[:8]}"
    try:
        shutil.chown(disk, "postgres", "postgres")
        disk.chmod(0o700)
        _pg_admin(base, f"CREATE TABLESPACE {name} LOCATION '{disk}'")
        _pg_admin(base, f'CREATE DATABASE "{name}" TABLESPACE {name}')
        yield urlunsplit(urlsplit(base)._replace(path=f"/{name}"))
    finally:
        _pg_admin(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        _pg_admin(base, f"DROP TABLESPACE IF EXISTS {name}")
        subprocess.run(["umount", "-l", str(disk)], check=False)
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.postgres
async def test_a_full_postgresql_disk_is_storage_full_not_a_crash(pg_on_small_disk: str) -> None:
    store = Store.open(DatabaseConfig(url=pg_on_small_disk), node_id="t")
    try:
        await store.migrate()
        acct = await store.add_account("alice", "x")
        body = os.urandom(MB)  # incompressible: TOAST cannot shrink it
        accepted = 0
        with pytest.raises(StorageFull):
            for i in range(64):  # 64 MB could never fit on 8 MB
                await store.accept(
                    NewMessage(f"m{i}", acct.id, "a@example.com", body, (NewRecipient("r@x.org"),))
                )
                accepted += 1
        assert 0 < accepted < 8
        # The store still answers: what fitted is there, whole, and reads work.
        assert (await store.message_for_delivery(f"m{accepted - 1}"))[0] == body
        with pytest.raises(NotFound):
            await store.message_view(f"m{accepted}")
    finally:
        await store.close()
