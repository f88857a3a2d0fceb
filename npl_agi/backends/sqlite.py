"""The SQLite backend: one file per PBX, shared by every process that looks numbers up."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from npl_agi import log
from npl_agi.backends.base import RANGES, Cache, _answer, _record, _stats
from npl_agi.backends.local_load import is_number
from npl_agi.backends.permissions import create_shared_file, shared_directory, sharing_problems
from npl_agi.backends.queue import SqliteQueue
from npl_agi.config import ApiConfig, CacheConfig
from npl_agi.core.protocol import Answer

SQLITE_BUSY_TIMEOUT = 0.5  # seconds; a call waits at most this long for another writer
SQLITE_BACKGROUND_BUSY_TIMEOUT = 10.0  # a request finishing in the background can wait to store its answers
SQLITE_FILE_CHECK_EVERY = 1.0  # seconds between checks that the open file is still the one at the path

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which a cache hit does not use
if TYPE_CHECKING:
    from npl_agi.backends.sqlite_local import LocalTables

# The numbers the admin knows among those asked, 500 a statement (a call's few in one, so one
# snapshot even while a load swaps the tables): held on its own, else by the block starting at
# or before it, if that block reaches it. Index seeks only, whatever the number of rows held.
_KNOWN = (
    "WITH asked(n) AS (VALUES {}) SELECT n, coalesce("
    "(SELECT mccmnc FROM known_numbers WHERE number = n), "
    "(SELECT mccmnc FROM known_blocks"
    " WHERE first = (SELECT max(first) FROM known_blocks WHERE first <= n) AND last >= n)"
    ") FROM asked"
)


class SqliteCache(Cache):
    """One SQLite file shared by every AGI process on the machine (WAL, short busy timeout)."""

    name = "sqlite"
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS answers (
            msisdn TEXT PRIMARY KEY, mccmnc TEXT, msc TEXT, imsi TEXT, error TEXT,
            stored REAL NOT NULL, expires REAL NOT NULL);
        CREATE INDEX IF NOT EXISTS answers_expires ON answers(expires);
        CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value REAL NOT NULL);
        INSERT OR IGNORE INTO counters VALUES ('created', strftime('%s','now')), ('hits', 0), ('misses', 0);
        CREATE TABLE IF NOT EXISTS local_data (
            kind TEXT NOT NULL, key TEXT NOT NULL, mccmnc TEXT NOT NULL, note TEXT NOT NULL,
            PRIMARY KEY (kind, key)) WITHOUT ROWID;
    """  # local_data: earlier versions' numbers and ranges, moved into tables of their own (sqlite_local)
    NEWEST_TABLE = "known_blocks"  # a file without it was made by an older version: the schema is run again

    keeps_data = reads_cheaply = True
    announce_replaced = True  # warn when the file under the path is not the one open
    longest_wait = SQLITE_BUSY_TIMEOUT
    background_wait = SQLITE_BACKGROUND_BUSY_TIMEOUT

    def __init__(self, cfg: CacheConfig, clock: Callable[[], float] = time.time, **tuning) -> None:
        """``tuning``: as ``Cache``'s (``timer``, ``retry``, ``recent``)."""
        super().__init__(cfg, clock, **tuning)
        if self.fail_fast:  # a reader beside the writer's connection, which says it
            self.announce_replaced = False
        self._db = None
        self._busy_ms = -1  # the connection's busy timeout as last set
        self._opened: tuple[int, int] | None = None  # st_dev, st_ino of the file open
        self._next_check = -math.inf

    def queue(self, api: ApiConfig) -> SqliteQueue:
        """The queue of waiting numbers, a table of this file (see ``backends.queue``): the file is
        the PBX's, ``api`` names no other scope."""
        return SqliteQueue(self)

    def close(self) -> None:
        db, self._db = self._db, None
        self._busy_ms = -1
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()

    def _conn(self, create: bool = True, wait: float = SQLITE_BUSY_TIMEOUT):
        """The open database, waiting at most ``wait`` seconds for another writer; ``None`` if
        it does not exist and ``create`` is false.

        Admin commands do not create it. When a lookup as root does, the file still belongs to
        the directory's owner and group (see ``create_shared_file``), so Asterisk can write it.
        """
        if self._db is not None and self._replaced():
            self.close()
        if self._db is None:
            import sqlite3

            path = self.cfg.path
            if not create and not os.path.exists(path):
                return None
            shared_directory(os.path.dirname(path) or ".")
            if not os.path.exists(path):
                create_shared_file(path)
            db = sqlite3.connect(path, timeout=wait, isolation_level=None)
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                if not db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (self.NEWEST_TABLE,)).fetchone():
                    from npl_agi.backends.sqlite_local import SCHEMA

                    db.executescript(self.SCHEMA)
                    db.executescript(SqliteQueue.SCHEMA)
                    db.executescript(SCHEMA)  # last: it makes NEWEST_TABLE
            except BaseException:
                db.close()
                raise
            self._db = db
            self._opened = _identity(path)
            self._next_check = self.timer() + SQLITE_FILE_CHECK_EVERY
        # Another process's write makes us wait, but never past the call's deadline.
        busy_ms = int(wait * 1000)
        if busy_ms != self._busy_ms:
            self._db.execute(f"PRAGMA busy_timeout = {busy_ms}")
            self._busy_ms = busy_ms
        return self._db

    def _replaced(self) -> bool:
        """Whether the path no longer names the file open (deleted, or another file moved there),
        checked at most every ``SQLITE_FILE_CHECK_EVERY`` seconds. A long-lived process would
        otherwise go on storing what it paid for in a file that nobody else can read."""
        now = self.timer()
        if now < self._next_check:
            return False
        self._next_check = now + SQLITE_FILE_CHECK_EVERY
        if _identity(self.cfg.path) == self._opened:
            return False
        if self.announce_replaced:
            log.warning("cache file %s was deleted or replaced while open, opening it again", self.cfg.path)
        return True

    @contextmanager
    def _writing(self, wait: float = SQLITE_BUSY_TIMEOUT) -> Iterator:
        """One write transaction: others see all of it or none, and it takes the lock once."""
        db = self._conn(wait=wait)
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _get_many(self, msisdns: list[str], wait: float) -> dict[str, tuple[Answer, float]]:
        rows = self._select("expires > ?", [self.clock()], msisdns, wait)
        return {row[0]: (_answer(*row[:5]), row[5]) for row in rows}

    def _select(self, where: str, params: list, msisdns: list[str], wait: float) -> Iterator[tuple]:
        """The answer rows of ``msisdns`` that match ``where`` (500 placeholders a query)."""
        query = f"SELECT msisdn, mccmnc, msc, imsi, error, expires FROM answers WHERE {where} AND msisdn IN "  # noqa: S608 - placeholders only
        return _select_in(self._conn(wait=wait), query, params, msisdns)

    def _record(self, hits: int, misses: int, wait: float) -> None:
        with self._writing(wait) as db:
            db.executemany("UPDATE counters SET value = value + ? WHERE name = ?", [(hits, "hits"), (misses, "misses")])

    def _put_many(self, rows: list[tuple[Answer, float, float]], wait: float) -> None:
        with self._writing(wait) as db:
            db.executemany(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(a.msisdn, *_record(a), stored, expires) for a, stored, expires in rows],
            )
            # Expired entries stay for stale_ttl: get_stale_many serves them while the service fails.
            db.execute("DELETE FROM answers WHERE expires <= ?", (self.clock() - self.cfg.stale_ttl,))

    def _get_stale_many(self, msisdns: list[str], wait: float) -> dict[str, Answer]:
        now = self.clock()
        where = "expires <= ? AND expires > ? AND error = '' AND mccmnc != ''"
        rows = self._select(where, [now, now - self.cfg.stale_ttl], msisdns, wait)
        return {row[0]: _answer(*row[:5])._replace(source="stale") for row in rows}

    def _get_local_many(self, kind: str, keys: list[str], wait: float) -> dict[str, str]:
        db = self._conn(wait=wait)
        if kind == RANGES:
            return dict(_select_in(db, "SELECT prefix, mccmnc FROM own_ranges WHERE prefix IN ", [], keys))
        asked = {int(k): k for k in keys if is_number(k)}  # no other key can be held
        found = {}
        numbers = list(asked)
        for start in range(0, len(numbers), 500):
            part = numbers[start : start + 500]
            rows = db.execute(_KNOWN.format(",".join(["(?)"] * len(part))), part)
            found.update((asked[n], mccmnc) for n, mccmnc in rows if mccmnc is not None)
        return found

    # -- the admin's data, loaded and read by ``sqlite_local`` (off a call's path) --
    def _local(self) -> LocalTables:
        from npl_agi.backends.sqlite_local import LocalTables

        # The admin's writes may wait as long as a background request's for calls' writes.
        return LocalTables(
            lambda create: self._conn(create=create, wait=SQLITE_BACKGROUND_BUSY_TIMEOUT),
            lambda: self._writing(SQLITE_BACKGROUND_BUSY_TIMEOUT),
        )

    def load_local(self, kind: str, chunks: Iterable[list[tuple[str, str, str]]], *, mode: str = "add") -> int:
        return self._local().load(kind, chunks, mode)

    def local_size(self, kind: str) -> dict[str, int]:
        return self._local().size(kind)

    def local_items(self, kind: str) -> Iterator[tuple[str, str, str]]:
        return self._local().items(kind)

    def delete_local(self, kind: str, keys: list[str] | None = None) -> int:
        return self._local().delete(kind, keys)

    def stats(self) -> dict:
        db = self._conn(create=False)
        if db is None:
            return _stats(self.name, self.cfg.path, 0, None, {})
        now = self.clock()
        counters = dict(db.execute("SELECT name, value FROM counters"))
        entries, oldest = db.execute("SELECT count(*), min(stored) FROM answers WHERE expires > ?", (now,)).fetchone()
        path = self.cfg.path
        sharer, unwritable = sharing_problems(os.path.dirname(path) or ".", [path, f"{path}-wal", f"{path}-shm"])
        return {**_stats(self.name, path, entries, oldest, counters), "shared_with": sharer, "unwritable": unwritable}

    def purge(self, msisdns: list[str] | None = None) -> int:
        """Delete entries; the count is of live ones, as ``stats`` counts them."""
        if self._conn(create=False) is None:
            return 0
        with self._writing() as db:
            db.execute("DELETE FROM answers WHERE expires <= ?", (self.clock(),))
            if msisdns is None:
                return db.execute("DELETE FROM answers").rowcount
            return sum(db.execute("DELETE FROM answers WHERE msisdn = ?", (m,)).rowcount for m in msisdns)

    def export(self) -> Iterator[dict]:
        """Live entries by msisdn. The query runs now, so a broken file fails before any output."""
        db = self._conn(create=False)
        if db is None:
            return iter(())
        rows = db.execute(
            "SELECT msisdn, mccmnc, msc, imsi, error, stored, expires FROM answers WHERE expires > ? ORDER BY msisdn",
            (self.clock(),),
        )
        return (
            {**_answer(msisdn, mccmnc, msc, imsi, error).as_dict(), "stored": stored, "expires": expires}
            for msisdn, mccmnc, msc, imsi, error, stored, expires in rows
        )


def _select_in(db, query: str, params: list, keys: list[str]) -> Iterator[tuple]:
    """The rows of ``query`` (ending in ``IN``) for ``keys``, 500 placeholders a statement."""
    for start in range(0, len(keys), 500):
        part = keys[start : start + 500]
        yield from db.execute(f"{query}({','.join('?' * len(part))})", [*params, *part])


def _identity(path: str) -> tuple[int, int] | None:
    """The file a path names (device, inode), or None when there is none. Taken when the
    database is opened: sqlite3 does not give its file descriptor for an ``fstat``."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
