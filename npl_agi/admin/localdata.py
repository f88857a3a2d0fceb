"""The admin's own data, read from CSV files: numbers they know (``npl-agi local``) and the range
holders of number blocks (``npl-agi ranges``).

A file is checked whole before anything is stored: one bad line and nothing is imported, and
every bad line is named by its number (the first ``MAX_BAD_SHOWN``, the rest counted), so a file
is fixed in one go. Kept by the cache backend (``backends.base.LOCAL_KINDS``), so a cluster
sharing a Redis shares them too.

Both kinds of file are read by ``staged``, and a file of numbers may be a national portability
database of millions: ``staged`` reads it line by line into a temporary SQLite file, checks it
there (a key given twice with two networks, blocks that overlap) and hands it to the backend
``CHUNK`` rows at a time, so the memory it takes does not grow with the file.
"""

from __future__ import annotations

import csv
import heapq
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress

from npl_agi.admin.usage import UsageError
from npl_agi.config import NumberConfig
from npl_agi.core.errors import ConfigError, NplError

MAX_NOTE = 200  # characters of a note kept; it is for the admin, never sent anywhere
MAX_BAD_SHOWN = 20  # bad lines named in the error; the rest are counted
CHUNK = 20_000  # rows staged, then handed to the backend, at a time
REMOVE = "-"  # the mccmnc of a delta's line that removes its number
MIN_DIGITS = 7  # an international number has 7 to 15 digits (``core.number.normalise``)
MAX_LINE = 4096  # characters of one line of a file; a longer line is bad, and never held whole

Row = tuple[str, str, str]  # key (a number, a block or a prefix), mccmnc, note


def number_key(config: NumberConfig) -> Callable[[str], str]:
    """How a number of ``npl-agi local`` is read: in any form a call could dial it, normalised
    as a call's is (whatever its type); ``ValueError`` says why not."""
    from npl_agi.core.number import canonical

    anything = config._replace(lookup_types=("any",))

    def key(text: str) -> str:
        try:
            return canonical(text, anything)
        except NplError as e:
            raise ValueError(f"{text[:40]!r} is not a number: {e}") from None

    return key


def known_key(config: NumberConfig) -> Callable[[str], str]:
    """A key of ``npl-agi local``: a number (``number_key``), or a block ``FROM-TO`` (a ``-``
    between two parts of at least 7 digits each): two numbers read alike, of the same length,
    ``FROM`` <= ``TO``, kept as ``FROM-TO`` in international form. A number written with a
    hyphen in it is still that number when its parts are not both numbers."""
    number = number_key(config)

    def key(text: str) -> str:
        ends = text.split("-")
        if len(ends) != 2 or min(sum(c in "0123456789" for c in end) for end in ends) < MIN_DIGITS:
            return number(text)
        try:
            low, high = number(ends[0]), number(ends[1])
        except ValueError as e:
            try:
                return number(text)
            except ValueError:
                raise ValueError(f"block {text[:40]!r}: {e}") from None
        if len(low) != len(high):
            raise ValueError(f"block {text[:40]!r}: {low} and {high} are not of the same length")
        if low > high:
            raise ValueError(f"block {text[:40]!r}: {low} is above {high}")
        return f"{low}-{high}"

    return key


def prefix_key(text: str) -> str:
    """A prefix of ``npl-agi ranges``: international, 1 to 15 digits, a leading ``+`` allowed."""
    prefix = text.removeprefix("+")
    if not (prefix.isascii() and prefix.isdigit() and 1 <= len(prefix) <= 15):
        raise ValueError(f"prefix {text[:40]!r} is not 1 to 15 digits")
    return prefix


def row_of(key: Callable[[str], str], *, delta: bool = False) -> Callable[[list[str]], Row]:
    """A CSV line's ``key,mccmnc[,note]`` fields to a row, the key read by ``key``. With
    ``delta``, ``key,-`` is a row that removes the key (its note, if any, dropped)."""

    def row(cells: list[str]) -> Row:
        if len(cells) not in (2, 3):
            raise ValueError(f"{len(cells)} field(s); expected 2 or 3: key,mccmnc[,note]")
        if delta and cells[1] == REMOVE:
            return key(cells[0]), REMOVE, ""
        return key(cells[0]), mccmnc_cell(cells[1]), note_cell(cells[2] if len(cells) == 3 else "")

    return row


def mccmnc_cell(text: str) -> str:
    if not (text.isascii() and text.isdigit() and len(text) in (5, 6)):
        raise ValueError(f"mccmnc {text[:40]!r} is not 5 or 6 digits")
    return text


def note_cell(text: str) -> str:
    if not text.isprintable():
        raise ValueError("the note has control characters")
    return text[:MAX_NOTE]


class BadLines:
    """The bad lines of a file: every one counted, the first ``MAX_BAD_SHOWN`` (by line number,
    whatever order they were found in) kept to be named."""

    def __init__(self) -> None:
        self.count = 0
        self._first: list[tuple[int, int, str]] = []  # a heap of (-line, -found, reason): the last on top

    def add(self, line: int, reason: str) -> None:
        self.count += 1
        item = (-line, -self.count, reason)
        if len(self._first) < MAX_BAD_SHOWN:
            heapq.heappush(self._first, item)
        elif item > self._first[0]:
            heapq.heapreplace(self._first, item)

    def check(self, where: str) -> None:
        """``ConfigError`` naming them, if there are any."""
        if not self.count:
            return
        shown = "\n  ".join(f"line {-line}: {reason}" for line, _, reason in sorted(self._first, reverse=True))
        more = f"\n  … and {self.count - MAX_BAD_SHOWN} more" if self.count > MAX_BAD_SHOWN else ""
        raise ConfigError(f"{where}: {self.count} bad line(s), nothing imported:\n  {shown}{more}")


def lines_of(lines: Iterable[str], bad: BadLines) -> Iterator[tuple[int, list[str]]]:
    """Each data line of a CSV file as (line number, stripped fields).

    Blank lines and ``#`` comments are skipped, and a first line whose first field is a word (a
    header such as ``number,mccmnc,note``); a spreadsheet's byte order mark is dropped. A line
    ``csv`` cannot read (a runaway quote, a field past its limit) goes to ``bad``.
    """
    first = True
    reader = csv.reader(bounded(lines, bad) if hasattr(lines, "readline") else lines)
    while True:
        try:
            cells = next(reader, None)
        except csv.Error as e:
            bad.add(reader.line_num, str(e))
            continue
        if cells is None:
            return
        n, cells = reader.line_num, [c.strip() for c in cells]
        if n == 1 and cells:
            cells[0] = cells[0].removeprefix("\ufeff").strip()
        if not any(cells) or cells[0].startswith("#"):
            continue
        if first and cells[0].isalpha():
            first = False
            continue
        first = False
        yield n, cells


def bounded(f, bad: BadLines) -> Iterator[str]:
    """The lines of a file; one longer than ``MAX_LINE`` goes to ``bad``, read in pieces and
    standing as an empty line."""
    n = 0
    while line := f.readline(MAX_LINE + 1):
        n += 1
        if len(line) > MAX_LINE and not line.endswith("\n"):
            while (rest := f.readline(65536)) and not rest.endswith("\n"):
                pass
            bad.add(n, f"longer than {MAX_LINE} characters")
            line = "\n"
        yield line


_STAGING = """
    PRAGMA journal_mode = OFF;
    PRAGMA synchronous = OFF;
    PRAGMA locking_mode = EXCLUSIVE;
    PRAGMA cache_size = -32768;
    CREATE TABLE staged (
        key TEXT NOT NULL, line INTEGER NOT NULL, mccmnc TEXT NOT NULL, note TEXT NOT NULL,
        PRIMARY KEY (key, line)
    ) WITHOUT ROWID;
    CREATE TABLE blocks (low TEXT NOT NULL, high TEXT NOT NULL, line INTEGER NOT NULL);
"""


class Staged:
    """The checked rows of a file in a temporary SQLite file: ``keys`` distinct keys (``removed``
    of them removals), handed over in key order by ``chunks``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.keys = 0
        self.removed = 0

    def chunks(self, size: int = CHUNK) -> Iterator[list[Row]]:
        """Each key's row (its first line's, when given twice alike), ``size`` rows at a time."""
        chunk: list[Row] = []
        last = None
        for key, mccmnc, note in self.db.execute("SELECT key, mccmnc, note FROM staged ORDER BY key, line"):
            if key == last:
                continue
            last = key
            chunk.append((key, mccmnc, note))
            if len(chunk) >= size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def read(self, lines: Iterable[str], row: Callable[[list[str]], Row], bad: BadLines) -> None:
        rows: list[tuple[str, int, str, str]] = []
        blocks: list[tuple[str, str, int]] = []
        self.db.execute("BEGIN")
        for n, cells in lines_of(lines, bad):
            try:
                key, mccmnc, note = row(cells)
            except ValueError as e:
                bad.add(n, str(e))
                continue
            rows.append((key, n, mccmnc, note))
            if "-" in key:
                low, _, high = key.partition("-")
                blocks.append((low, high, n))
            if len(rows) >= CHUNK:
                self._insert(rows, blocks)
        self._insert(rows, blocks)
        self.db.execute("COMMIT")

    def _insert(self, rows: list, blocks: list) -> None:
        self.db.executemany("INSERT INTO staged VALUES (?, ?, ?, ?)", rows)
        self.db.executemany("INSERT INTO blocks VALUES (?, ?, ?)", blocks)
        rows.clear()
        blocks.clear()

    def check_twice(self, bad: BadLines) -> None:
        """A key given twice with two networks (or given and removed) is a bad line; count the
        keys."""
        last = first_line = first_mccmnc = None
        for key, line, mccmnc in self.db.execute("SELECT key, line, mccmnc FROM staged ORDER BY key, line"):
            if key != last:
                last, first_line, first_mccmnc = key, line, mccmnc
                self.keys += 1
                self.removed += mccmnc == REMOVE
            elif mccmnc != first_mccmnc:
                bad.add(line, f"{key} is {first_mccmnc} on line {first_line} and {mccmnc} here")

    def check_overlaps(self, bad: BadLines) -> None:
        """Two blocks that share a number are bad: the later line names the earlier."""
        query = "SELECT low, high, MIN(line) FROM blocks GROUP BY low, high ORDER BY length(low), low, high"
        reach: tuple[str, str, int] | None = None  # the block reaching furthest so far: high, key, line
        for low, high, line in self.db.execute(query):
            if reach is not None and len(reach[0]) == len(low) and low <= reach[0]:
                (earlier, other), (later, this) = sorted([(line, f"{low}-{high}"), (reach[2], reach[1])])
                bad.add(later, f"block {this} overlaps block {other} on line {earlier}")
            if reach is None or len(reach[0]) != len(low) or high > reach[0]:
                reach = (high, f"{low}-{high}", line)


@contextmanager
def staged(
    lines: Iterable[str], row: Callable[[list[str]], Row], where: str = "<file>", directory: str | None = None
) -> Iterator[Staged]:
    """Every row of a file of numbers, checked and staged in a temporary SQLite file in
    ``directory`` (the system's temp dir by default), removed on leaving whatever happens.

    Raises ``ConfigError`` naming each bad line: a line that is not ``key,mccmnc[,note]`` as
    ``row`` reads it, a key given twice with two networks (given twice alike, it counts once:
    its first line's note is kept), a block overlapping another of the file.
    """
    try:
        fd, path = tempfile.mkstemp(prefix=".npl-agi-import-", suffix=".sqlite", dir=directory)
    except OSError as e:
        raise UsageError(
            f"{where}: cannot stage the checked rows in {directory or tempfile.gettempdir()}: {e}"
        ) from None
    os.close(fd)
    db = None
    try:
        # A backend may read the chunks from a thread of its own (one at a time: never at once).
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.executescript(_STAGING)
        stage, bad = Staged(db), BadLines()
        try:
            stage.read(lines, row, bad)
            stage.check_twice(bad)
            stage.check_overlaps(bad)
        except sqlite3.Error as e:  # a full disk
            raise UsageError(f"{where}: cannot stage the checked rows in {os.path.dirname(path)}: {e}") from None
        bad.check(where)
        yield stage
    finally:
        if db is not None:
            db.close()
        for leftover in (path, f"{path}-journal"):
            with suppress(FileNotFoundError):
                os.unlink(leftover)
