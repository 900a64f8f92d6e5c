"""A full database is told apart from other database errors: 452 4.3.1, not 451 4.3.0."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from relay.errors import StorageFull, StoreUnavailable
from relay.queue.store import _unavailable


def _full_error(path: Path) -> sqlite3.OperationalError:
    """SQLite's own SQLITE_FULL: max_page_count makes a file "full" as a full disk does."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (b BLOB)")
    db.execute("PRAGMA max_page_count = 3")
    with pytest.raises(sqlite3.OperationalError) as exc:
        db.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
    db.close()
    return exc.value


def test_sqlite_full_becomes_storage_full_bare_or_wrapped(tmp_path: Path) -> None:
    bare = _full_error(tmp_path / "a.db")
    assert bare.sqlite_errorcode == sqlite3.SQLITE_FULL
    assert isinstance(_unavailable(bare), StorageFull)
    wrapped = sa.exc.OperationalError("INSERT", {}, bare)
    assert isinstance(_unavailable(wrapped), StorageFull)


def test_other_operational_errors_stay_plain_unavailable(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "b.db")
    with pytest.raises(sqlite3.OperationalError) as exc:
        db.execute("SELECT * FROM missing")
    found = _unavailable(exc.value)
    assert isinstance(found, StoreUnavailable) and not isinstance(found, StorageFull)
