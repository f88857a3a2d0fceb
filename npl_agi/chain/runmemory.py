"""What one run of ``npl-agi lookup`` was answered, so that it asks each number at most once.

A bulk file is streamed ``batch_size`` lines at a time, and the cache keeps only what deserves
keeping (``cache.ttl_for``), or nothing (``backend = none``): a number repeated further apart
than one batch would be paid for again. Every answer the service gave in the run (an absent
subscriber, a cut-short line) is kept here instead, in an SQLite file on disk, so memory stays
flat however long the file. The file lives in a private temporary directory that goes with the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from npl_agi import log
from npl_agi.core.protocol import Answer

FIELDS = Answer._fields[:7]  # what the service said; the dialled form and the names are filled in later
PLACEHOLDERS = 500  # numbers per SELECT, well under SQLite's limit on bound parameters


class RunMemory:
    """The service's answers of one run, by msisdn, until ``close`` removes them.

    Nothing is on disk until the first answer is kept, so a run of one batch costs nothing.
    Never raises: a memory that fails (a full disk) is given up after one log line, and the
    run goes on, asking again what it can no longer remember.
    """

    def __init__(self, directory: str | None = None) -> None:
        """``directory``: where the private temporary directory is made (default: ``$TMPDIR``)."""
        self.directory = directory
        self.broken = False
        self._tmp = None  # the tempfile.TemporaryDirectory, once something is kept
        self._db = None

    def __enter__(self) -> RunMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_many(self, msisdns: list[str]) -> dict[str, Answer]:
        """The answers kept for ``msisdns``; numbers not asked in this run are absent."""
        if self._db is None or self.broken:
            return {}
        found: dict[str, Answer] = {}
        try:
            for start in range(0, len(msisdns), PLACEHOLDERS):
                part = msisdns[start : start + PLACEHOLDERS]
                rows = self._db.execute(
                    f"SELECT {', '.join(FIELDS)} FROM answers WHERE msisdn IN ({','.join('?' * len(part))})",  # noqa: S608 - placeholders only
                    part,
                )
                found.update((row[0], Answer(*row)) for row in rows)
        except Exception as e:
            self._give_up("read", e)
            return {}
        return found

    def put_many(self, answers: Iterable[Answer]) -> None:
        """Keep these answers (whatever they are) for the rest of the run."""
        rows = [tuple(a[: len(FIELDS)]) for a in answers]
        if not rows or self.broken:
            return
        try:
            db = self._open()
            with db:  # one transaction
                db.executemany(f"INSERT OR REPLACE INTO answers VALUES ({','.join('?' * len(FIELDS))})", rows)  # noqa: S608
        except Exception as e:
            self._give_up("write", e)

    def close(self) -> None:
        """Remove the file and its directory; the memory is empty afterwards."""
        db, self._db = self._db, None
        tmp, self._tmp = self._tmp, None
        if db is not None:
            db.close()
        if tmp is not None:
            tmp.cleanup()

    def _open(self):
        if self._db is None:
            import sqlite3
            import tempfile

            self._tmp = tempfile.TemporaryDirectory(
                prefix="npl-agi-run-", dir=self.directory, ignore_cleanup_errors=True
            )
            db = sqlite3.connect(f"{self._tmp.name}/answers.sqlite")
            db.execute("PRAGMA journal_mode = OFF")  # nothing to recover: the file dies with the run
            db.execute("PRAGMA synchronous = OFF")
            db.execute(f"CREATE TABLE answers ({', '.join(FIELDS)}, PRIMARY KEY (msisdn)) WITHOUT ROWID")
            self._db = db
        return self._db

    def _give_up(self, what: str, e: Exception) -> None:
        self.broken = True
        log.warning(
            "run memory %s failed (%s: %s); numbers repeated later in this run may be asked again",
            what,
            e.__class__.__name__,
            e,
        )
        with contextlib.suppress(Exception):  # already reported; the run goes on
            self.close()
