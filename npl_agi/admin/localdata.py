"""The admin's own data, read from CSV files: numbers they know (``npl-agi local``) and the range
holders of number blocks (``npl-agi ranges``).

A file is checked whole before anything is stored: one bad line and nothing is imported, and
every bad line is named by its number, so a file is fixed in one go. Kept by the cache backend
(``cache.base.LOCAL_KINDS``), so a cluster sharing a Redis shares them too.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable

from npl_agi.config import NumberConfig
from npl_agi.core.errors import ConfigError, NplError

MAX_NOTE = 200  # characters of a note kept; it is for the admin, never sent anywhere
MAX_BAD_SHOWN = 20  # bad lines named in the error; the rest are counted

Row = tuple[str, str, str]  # key (a number or a prefix), mccmnc, note


def number_key(config: NumberConfig) -> Callable[[str], str]:
    """How a number of ``npl-agi local`` is read: in any form a call could dial it, normalised
    as a call's is (whatever its type); ``ValueError`` says why not."""
    from npl_agi.core.number import normalise, validate

    anything = config._replace(lookup_types=("any",))

    def key(text: str) -> str:
        try:
            return validate(normalise(text, anything), anything)
        except NplError as e:
            raise ValueError(f"{text[:40]!r} is not a number: {e}") from None

    return key


def prefix_key(text: str) -> str:
    """A prefix of ``npl-agi ranges``: international, 1 to 15 digits, a leading ``+`` allowed."""
    prefix = text.removeprefix("+")
    if not (prefix.isascii() and prefix.isdigit() and 1 <= len(prefix) <= 15):
        raise ValueError(f"prefix {text[:40]!r} is not 1 to 15 digits")
    return prefix


def row_of(key: Callable[[str], str]) -> Callable[[list[str]], Row]:
    """A CSV line's ``key,mccmnc[,note]`` fields to a row, the key read by ``key``."""

    def row(cells: list[str]) -> Row:
        if len(cells) not in (2, 3):
            raise ValueError(f"{len(cells)} field(s); expected 2 or 3: key,mccmnc[,note]")
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


def read_rows(lines: Iterable[str], row: Callable[[list[str]], Row], where: str = "<file>") -> list[Row]:
    """Every row of a CSV file, or ``ConfigError`` naming each bad line (nothing half-read).

    Blank lines and ``#`` comments are skipped, and a first line whose first field is not a
    number (a header such as ``number,mccmnc,note``). A key given twice with two networks is
    an error; given twice alike, it is kept once.
    """
    rows: dict[str, tuple[int, Row]] = {}
    bad: list[str] = []
    first = True
    reader = csv.reader(lines)
    while True:
        try:
            cells = next(reader, None)
        except csv.Error as e:  # a runaway quote, a field past csv's limit
            bad.append(f"line {reader.line_num}: {e}")
            continue
        if cells is None:
            break
        n, cells = reader.line_num, [c.strip() for c in cells]
        if n == 1 and cells:
            cells[0] = cells[0].removeprefix("\ufeff").strip()  # a spreadsheet's byte order mark
        if not any(cells) or cells[0].startswith("#"):
            continue
        if first and cells[0].isalpha():
            first = False
            continue
        first = False
        try:
            key, mccmnc, note = row(cells)
        except ValueError as e:
            bad.append(f"line {n}: {e}")
            continue
        if key in rows and rows[key][1][1] != mccmnc:
            bad.append(f"line {n}: {key} is {rows[key][1][1]} on line {rows[key][0]} and {mccmnc} here")
            continue
        rows.setdefault(key, (n, (key, mccmnc, note)))
    if bad:
        more = f"\n  … and {len(bad) - MAX_BAD_SHOWN} more" if len(bad) > MAX_BAD_SHOWN else ""
        shown = "\n  ".join(bad[:MAX_BAD_SHOWN])
        raise ConfigError(f"{where}: {len(bad)} bad line(s), nothing imported:\n  {shown}{more}")
    return [r for _, r in rows.values()]
