"""Facts about the SQLite database that are not SQL: is its file usable, how much room
is left beside it?

An open SQLite connection keeps working after its file is made unreadable, renamed or
deleted (the descriptor stays valid), so ``SELECT 1`` alone would report a database
that the next process start, or a new pooled connection, cannot open.
"""

from __future__ import annotations

import os
import stat

from relay.config import DatabaseConfig

_PREFIX = "sqlite+aiosqlite:///"


def sqlite_path(db: DatabaseConfig) -> str | None:
    if not db.url.startswith(_PREFIX):
        return None
    path = db.url[len(_PREFIX) :].split("?", 1)[0]
    return None if path in ("", ":memory:") else path


def free_space(db: DatabaseConfig) -> int | None:
    """Bytes an unprivileged writer may still use on the SQLite file's filesystem (None:
    PostgreSQL, or it cannot be read). One statfs(2): microseconds on a local disk."""
    path = sqlite_path(db)
    if path is None:
        return None
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def room_for(free: int | None, min_free: int, size: int = 0) -> bool:
    """Whether ``size`` more bytes fit above the ``min_free`` reserve (smtp.min_free_space;
    0: no reserve). Unknown free space (PostgreSQL) never refuses."""
    return min_free <= 0 or free is None or free >= min_free + size


def database_file_ok(db: DatabaseConfig) -> bool:
    """True unless the configured SQLite file is missing or not readable and writable."""
    path = sqlite_path(db)
    if path is None:
        return True
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if os.geteuid() == 0:
        # root passes every access() check: judge by the owner's permission bits, which
        # is what the service user (User=relay owns the file) will meet.
        return st.st_mode & (stat.S_IRUSR | stat.S_IWUSR) == (stat.S_IRUSR | stat.S_IWUSR)
    return os.access(path, os.R_OK | os.W_OK)
