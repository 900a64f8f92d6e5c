"""SQLite WAL checkpoints mostly on a thread of their own, not in an accept's COMMIT.

In WAL mode SQLite checkpoints by itself: the COMMIT that takes the log past
``wal_autocheckpoint`` pages (default 1,000, ~4 MB) copies the log into the database
file and fsyncs that file before it returns. Under a steady accept load that COMMIT is
often an accept batch's, and it runs under the cross-process write lock
(writelock.py), so every few seconds every writer of every process waited for a 4 MB
copy and its fsync before the next 250 (issue 9: half-rate accept p99).

``relay serve`` raises ``wal_autocheckpoint`` on its connections to
``BACKSTOP_PAGES`` and its main process runs this thread: a PASSIVE checkpoint every
``CHECKPOINT_EVERY`` seconds on a connection of its own. PASSIVE never waits for and
never blocks a writer or a reader, so it does the copying and the database fsync off
every writer's path. It cannot restart the log by itself, though: while writers keep
appending, the log is never completely copied at the moment a writer begins, and only
then does SQLite start the log again from the top (a log that grew to 169 MB in 8,000
commits when the automatic checkpoint was off altogether, issue 9). The automatic
checkpoint, kept at the higher mark, does that: when a COMMIT passes it, the thread has
already copied nearly all of the log, so that checkpoint is short, and the next writer
restarts the log. The log thus stays within ~``BACKSTOP_PAGES`` pages (16 MB).

The CLI keeps SQLite's default (its writes are rare and nobody waits on them).
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger("relay")

# Four times a second: at full load (~4 MB of log a second) each checkpoint copies about
# what one automatic checkpoint did, a quarter of the time.
CHECKPOINT_EVERY = 0.25
# The automatic checkpoint of relay serve's connections: the backstop that restarts the
# log (see above). Four times SQLite's default.
BACKSTOP_PAGES = 4000


class Checkpointer:
    def __init__(self, path: str, every: float = CHECKPOINT_EVERY) -> None:
        self.path = path
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.checkpoints = 0  # PASSIVE checkpoints run (tests, diagnostics)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Blocking (joins the thread): call it from a thread, not the event loop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while not self._stop.wait(self.every):
                try:
                    if conn is None:
                        conn = sqlite3.connect(self.path, isolation_level=None)
                        conn.execute("PRAGMA busy_timeout=1000")
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:
                    # Tried again next round; meanwhile the automatic checkpoint at
                    # BACKSTOP_PAGES keeps the log bounded on its own.
                    log.warning("sqlite checkpoint failed: %s", exc)
                    if conn is not None:
                        conn.close()
                        conn = None
        finally:
            if conn is not None:
                conn.close()
