"""The admin's own data in the SQLite cache file, and how it is loaded at national scale.

Numbers you know are two tables: ``known_numbers``, one number a row, keyed by the number as an
INTEGER (the table's rowid: about 18 bytes a number on disk, a third less than a text key), and
``known_blocks``, one ``FROM-TO`` block a row, keyed by (first, last). A number is found by one
seek in each: blocks do not overlap, so the block starting at or before it is the only one that
may hold it. Ranges are ``own_ranges``, keyed by prefix. The three replace the ``local_data``
table of earlier versions, whose rows move over when such a file is first opened (``SCHEMA``).

A load is staged first, into a table of its own beside each live one, one short transaction a
part (``local_load.STAGE_ROWS`` rows), so a call storing its answer meanwhile waits for one part
at most. Then it is applied in one short transaction: ``replace`` renames the staged table over
the live one, so a call sees the whole old set or the whole new one; a small ``add`` or
``delta`` (``APPLY_AT_ONCE`` rows) is copied in; a larger one first copies the live rows it
leaves alone into the staged table, part by part, and is swapped in as ``replace`` is, so no
transaction grows with the load (its cost grows with the live set instead). A failure or a
crash before the swap leaves the live tables as they were; a staged table a crash left is
dropped by the next load. A big table is dropped part by part too. One load of a kind at a time:
a second one started meanwhile drops the first one's staged rows, and the first one fails.
"""

# ruff: noqa: S608 - the names in statements are this module's tables; every value is bound

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from npl_agi.backends.base import KNOWN_NUMBERS, RANGES
from npl_agi.backends.local_load import (
    ADD,
    MAX_DIGITS,
    REMOVE,
    REPLACE,
    Row,
    block_key,
    block_of,
    check_blocks,
    check_mode,
    is_number,
    parts,
    split,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from contextlib import AbstractContextManager

# Each table: its columns, its key (what a row is deleted and paged by), what follows the columns.
_TABLES = {
    "known_numbers": ("number INTEGER PRIMARY KEY, mccmnc TEXT NOT NULL, note TEXT NOT NULL", "number", ""),
    "known_blocks": (
        "first INTEGER NOT NULL, last INTEGER NOT NULL, mccmnc TEXT NOT NULL, note TEXT NOT NULL,"
        " PRIMARY KEY (first, last)",
        "first, last",
        " WITHOUT ROWID",
    ),
    "own_ranges": ("prefix TEXT PRIMARY KEY, mccmnc TEXT NOT NULL, note TEXT NOT NULL", "prefix", " WITHOUT ROWID"),
}
TABLES_OF = {KNOWN_NUMBERS: ("known_numbers", "known_blocks"), RANGES: ("own_ranges",)}
STAGED, OLD = "_staged", "_old"  # suffixes of a load's tables: the new rows; the live ones swapped out
APPLY_AT_ONCE = 10_000  # staged rows an add or delta copies in one transaction (some 0.1 s at most)
COPY_ROWS = 10_000  # rows a transaction when a larger one is merged with the live set (some 20 ms)
DROP_ROWS = 20_000  # rows deleted a transaction when a table is dropped (some 10 ms)


def _create(name: str, table: str) -> str:
    columns, _, after = _TABLES[table]
    return f"CREATE TABLE IF NOT EXISTS {name} ({columns}){after}"


def _key(name: str) -> str:
    """The key columns of a table or of its staged or old copy."""
    return _TABLES[name.removesuffix(STAGED).removesuffix(OLD)][1]


# Run in a file made by a version without the newest table (``known_blocks``, made last): the
# tables, and the rows of ``local_data`` moved into them, in one transaction, so a second run
# (another process opening the file at once, or after a crash) finds all done or nothing.
SCHEMA = f"""
    BEGIN IMMEDIATE;
    {_create("known_numbers", "known_numbers")};
    {_create("own_ranges", "own_ranges")};
    INSERT OR IGNORE INTO known_numbers SELECT CAST(key AS INTEGER), mccmnc, note FROM local_data
        WHERE kind = '{KNOWN_NUMBERS}' AND key GLOB '[1-9]*' AND key NOT GLOB '*[^0-9]*'
        AND length(key) <= {MAX_DIGITS};
    INSERT OR IGNORE INTO own_ranges SELECT key, mccmnc, note FROM local_data WHERE kind = '{RANGES}';
    DELETE FROM local_data;
    {_create("known_blocks", "known_blocks")};
    COMMIT;
"""


class LocalTables:
    """The admin's data of one SQLite cache file (see the module's docstring)."""

    def __init__(
        self,
        connect: Callable[[bool], sqlite3.Connection | None],
        writing: Callable[[], AbstractContextManager[sqlite3.Connection]],
    ) -> None:
        """``connect(create)``: the file's connection, None when the file does not exist and
        ``create`` is false; ``writing()``: one write transaction on it."""
        self._connect = connect
        self._writing = writing

    def load(self, kind: str, chunks: Iterable[list[Row]], mode: str) -> int:
        """``Cache.load_local``: staged, checked, then applied (see the module's docstring)."""
        check_mode(mode)
        tables = _tables_of(kind)
        staged, old = [t + STAGED for t in tables], [t + OLD for t in tables]
        self._drop(*staged, *old)  # what a crashed load left
        with self._writing() as db:
            for table in tables:
                db.execute(_create(table + STAGED, table))
        try:
            self._stage(kind, chunks, mode)
            if kind == KNOWN_NUMBERS:
                self._check_blocks(mode)
            count = self._count(*staged)
            self._apply(tables, mode, count)
        except BaseException:
            with contextlib.suppress(Exception):  # else the next load drops them
                self._drop(*staged)
            raise
        self._drop(*staged, *old)
        return count

    def _stage(self, kind: str, chunks: Iterable[list[Row]], mode: str) -> None:
        """Each part in a transaction of its own. A number is bound as text: the INTEGER key's
        affinity makes it an integer (checked digits, no leading zero), with no Python work."""
        keys_into = f"INSERT OR REPLACE INTO {TABLES_OF[kind][0]}{STAGED} VALUES (?, ?, ?)"
        blocks_into = f"INSERT OR REPLACE INTO known_blocks{STAGED} VALUES (?, ?, ?, ?)"
        for part in parts(chunks):
            keys, blocks = split(part, mode, blocks=kind == KNOWN_NUMBERS)
            with self._writing() as db:
                db.executemany(keys_into, keys)
                if blocks:
                    db.executemany(blocks_into, blocks)

    def _check_blocks(self, mode: str) -> None:
        """No two blocks overlap once applied (``local_load.check_blocks``), read in key order."""
        db = self._connect(True)
        query = "SELECT first, last, mccmnc, note FROM {} ORDER BY first, last"
        # The cursors are closed whatever happens: a table being read cannot be dropped.
        with contextlib.closing(db.execute(query.format(f"known_blocks{STAGED}"))) as staged:
            if mode == REPLACE:
                check_blocks(staged)
                return
            with contextlib.closing(db.execute(query.format("known_blocks"))) as live:
                check_blocks(staged, live)

    def _apply(self, tables: tuple[str, ...], mode: str, count: int) -> None:
        if mode != REPLACE and count <= APPLY_AT_ONCE:
            with self._writing() as db:
                for table in tables:
                    key = _key(table)
                    db.execute(
                        f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table}{STAGED} WHERE mccmnc = ?)",
                        (REMOVE,),
                    )
                    db.execute(
                        f"INSERT OR REPLACE INTO {table} SELECT * FROM {table}{STAGED} WHERE mccmnc != ?", (REMOVE,)
                    )
            return
        if mode != REPLACE:  # the staged table becomes the whole set: the live rows it leaves alone join it
            for table in tables:
                self._by_parts(table, f"INSERT OR IGNORE INTO {table}{STAGED} SELECT * FROM {table} WHERE {{}}")
                if mode != ADD:
                    self._by_parts(table + STAGED, f"DELETE FROM {table}{STAGED} WHERE {{}} AND mccmnc = '{REMOVE}'")
        with self._writing() as db:  # the swap: every table at once
            for table in tables:
                db.execute(f"ALTER TABLE {table} RENAME TO {table}{OLD}")
                db.execute(f"ALTER TABLE {table}{STAGED} RENAME TO {table}")

    def _by_parts(self, table: str, statement: str) -> None:
        """Run ``statement`` (its ``{}`` a condition on the key) over ``table`` in key order,
        ``COPY_ROWS`` rows a transaction, each part's bounds read in that transaction."""
        column, size = _key(table).partition(",")[0], COPY_ROWS
        low = None
        while True:
            with self._writing() as db:
                after = "" if low is None else f"WHERE {column} > ?"
                params = () if low is None else (low,)
                high = db.execute(
                    f"SELECT max({column}) FROM (SELECT {column} FROM {table} {after} ORDER BY {column} LIMIT {size})",
                    params,
                ).fetchone()[0]
                if high is None:
                    return
                condition = f"{column} <= ?" + ("" if low is None else f" AND {column} > ?")
                db.execute(statement.format(condition), (high, *params))
            low = high

    def _drop(self, *names: str) -> None:
        """Drop these tables where they exist, ``DROP_ROWS`` rows a transaction: dropping a
        national set at once would hold the write lock for as long as freeing its pages takes."""
        for name in names:
            key = _key(name)
            while True:
                with self._writing() as db:
                    if not db.execute(
                        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
                    ).fetchone():
                        break
                    deleting = f"DELETE FROM {name} WHERE ({key}) IN (SELECT {key} FROM {name} LIMIT {DROP_ROWS})"
                    if db.execute(deleting).rowcount < DROP_ROWS:
                        db.execute(f"DROP TABLE {name}")
                        break

    def _count(self, *tables: str) -> int:
        db = self._connect(True)
        return sum(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in tables)

    def items(self, kind: str) -> Iterator[Row]:
        """``Cache.local_items``, read as it is written out. Numbers sort by length and then by
        value as integers: each length is read in order by itself, and the lengths merged by
        key as text. The queries run now, so a broken file fails before any output."""
        import heapq

        _tables_of(kind)
        db = self._connect(False)
        if db is None:
            return iter(())
        if kind == RANGES:
            return db.execute("SELECT prefix, mccmnc, note FROM own_ranges ORDER BY prefix")
        runs = []
        for digits in range(1, MAX_DIGITS + 1):
            span = (10 ** (digits - 1), 10**digits)
            numbers = db.execute(
                "SELECT number, mccmnc, note FROM known_numbers WHERE number >= ? AND number < ? ORDER BY number", span
            )
            blocks = db.execute(
                "SELECT first, last, mccmnc, note FROM known_blocks"
                " WHERE first >= ? AND first < ? ORDER BY first, last",
                span,
            )
            runs.append((str(number), mccmnc, note) for number, mccmnc, note in numbers)
            runs.append((block_key(first, last), mccmnc, note) for first, last, mccmnc, note in blocks)
        return heapq.merge(*runs, key=lambda row: row[0])

    def delete(self, kind: str, keys: list[str] | None) -> int:
        """``Cache.delete_local``. A key that is none of this kind's is held nowhere: 0."""
        tables = _tables_of(kind)
        if self._connect(False) is None:
            return 0
        if keys is None:  # an empty set swapped in, the old one dropped part by part
            count = self._count(*tables)
            self.load(kind, (), REPLACE)
            return count
        deleted = 0
        with self._writing() as db:
            for key in keys:
                with contextlib.suppress(ValueError):
                    span = block_of(key) if kind == KNOWN_NUMBERS else None
                    if span is not None:
                        deleted += db.execute("DELETE FROM known_blocks WHERE first = ? AND last = ?", span).rowcount
                    elif kind == RANGES:
                        deleted += db.execute("DELETE FROM own_ranges WHERE prefix = ?", (key,)).rowcount
                    elif is_number(key):
                        deleted += db.execute("DELETE FROM known_numbers WHERE number = ?", (int(key),)).rowcount
        return deleted

    def size(self, kind: str) -> dict[str, int]:
        """``Cache.local_size``."""
        tables = _tables_of(kind)
        db = self._connect(False)
        if db is None:
            return {"entries": 0, "blocks": 0, "bytes": 0}
        blocks = self._count(*tables[1:])
        return {"entries": self._count(tables[0]), "blocks": blocks, "bytes": self._bytes(db, tables)}

    def _bytes(self, db: sqlite3.Connection, tables: tuple[str, ...]) -> int:
        """The pages of the tables' b-trees, measured by the ``dbstat`` table where SQLite was
        built with it (SQLITE_ENABLE_DBSTAT_VTAB, as most distributions build it)."""
        import sqlite3

        marks = ", ".join("?" * len(tables))
        try:
            return db.execute(
                f"SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name IN ({marks})", tables
            ).fetchone()[0]
        except sqlite3.OperationalError:  # no such table: dbstat
            return self.estimated_bytes(db, tables)

    def estimated_bytes(self, db: sqlite3.Connection, tables: tuple[str, ...]) -> int:
        """Without ``dbstat``: the file's pages in use, shared out by rows among its tables (rows
        of the cache and of the queue are longer than numbers: an estimate, on the high side)."""
        names = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = {name: self._count(name) for name in names if not name.startswith("sqlite_")}
        pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
        used = pages * db.execute("PRAGMA page_size").fetchone()[0]
        total = sum(rows.values())
        return used * sum(rows.get(t, 0) for t in tables) // total if total else 0


def _tables_of(kind: str) -> tuple[str, ...]:
    if kind not in TABLES_OF:
        raise ValueError(f"no local data of kind {kind!r}")
    return TABLES_OF[kind]
