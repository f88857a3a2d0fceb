"""What loading the admin's own data means, whichever backend keeps it: the modes, the keys (a
number, a ``FROM-TO`` block, a prefix), rows cut into parts of one short write each, and the
guard that no two blocks overlap. No I/O: both backends read a load the same way.

Loads are rare (an import, a day's delta) and may be national (tens of millions of rows), so
everything here streams; the call's side (``is_number``) is the only part a lookup uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

ADD, REPLACE, DELTA = "add", "replace", "delta"
MODES = (ADD, REPLACE, DELTA)
REMOVE = "-"  # a delta row's mccmnc: the key is removed
MAX_DIGITS = 15  # E.164; a 15-digit number is also exact as a double (a Redis sorted set's score)
# Rows a backend writes at once while staging: a few milliseconds of SQLite's write lock, or of
# Redis's one thread, so a call storing its answer meanwhile waits for no more than that.
STAGE_ROWS = 5000

Row = tuple[str, str, str]  # key, mccmnc, note
Block = tuple[int, int, str, str]  # first, last, mccmnc, note


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"load mode {mode!r} is not one of {', '.join(MODES)}")


def is_number(key: str) -> bool:
    """Whether ``key`` can be a number held, on its own or in a block: international digits,
    no leading zero (an integer keeps every digit), at most ``MAX_DIGITS``."""
    return key.isascii() and key.isdigit() and key[0] != "0" and len(key) <= MAX_DIGITS


def is_prefix(key: str) -> bool:
    """Whether ``key`` can be a range's prefix: 1 to ``MAX_DIGITS`` digits."""
    return key.isascii() and key.isdigit() and 1 <= len(key) <= MAX_DIGITS


def block_of(key: str) -> tuple[int, int] | None:
    """A ``FROM-TO`` key's first and last numbers; None for a key without a dash. Numbers of the
    same length, so a block holds only numbers of its own length, and its integers lie apart
    from every other length's (no leading zero)."""
    first, dash, last = key.partition("-")
    if not dash:
        return None
    if not (is_number(first) and is_number(last) and len(first) == len(last) and first <= last):
        raise ValueError(f"block {key[:40]!r} is not FROM-TO, two numbers of one length, FROM <= TO")
    return int(first), int(last)


def block_key(first: int, last: int) -> str:
    return f"{first}-{last}"


def split(rows: list[Row], mode: str, *, blocks: bool) -> tuple[list[Row], list[Block]]:
    """A part's rows as single keys and blocks (``blocks``: the kind has them), each checked
    again as a last guard: what reaches a backend is answered to calls as it is."""
    keys: list[Row] = []
    found: list[Block] = []
    removes = mode == DELTA
    single = is_number if blocks else is_prefix
    for row in rows:
        key, mccmnc, _ = row
        if not (mccmnc.isascii() and mccmnc.isdigit() and len(mccmnc) in (5, 6)) and not (removes and mccmnc == REMOVE):
            raise ValueError(f"{key[:40]!r}: mccmnc {mccmnc[:40]!r} is not 5 or 6 digits")
        span = block_of(key) if blocks else None
        if span is not None:
            found.append((*span, mccmnc, row[2]))
        elif single(key):
            keys.append(row)
        else:
            raise ValueError(f"{key[:40]!r} is not a key of this kind")
    return keys, found


def parts(chunks: Iterable[list[Row]], size: int = STAGE_ROWS) -> Iterator[list[Row]]:
    """The rows of ``chunks`` again, ``size`` at a time (the last part shorter): each part is one
    staged write, whatever size the chunks come in."""
    part: list[Row] = []
    for chunk in chunks:
        start = 0
        while start < len(chunk):
            take = chunk[start : start + size - len(part)]
            part.extend(take)
            start += len(take)
            if len(part) == size:
                yield part
                part = []
    if part:
        yield part


def check_blocks(staged: Iterable[Block], live: Iterable[Block] = ()) -> list[Block]:
    """Raise ``ValueError`` naming the first two blocks that would overlap once the load is
    applied. Both sorted by (first, last); a staged block replaces the live one of its key, and
    a staged ``REMOVE`` takes it away. Returns the staged blocks given again under a key staged
    already (a store that keeps such rows apart drops them)."""
    import heapq

    tagged = heapq.merge(
        ((first, last, 0, mccmnc, note) for first, last, mccmnc, note in staged),
        ((first, last, 1, mccmnc, note) for first, last, mccmnc, note in live),
        key=lambda b: b[:3],
    )
    repeated: list[Block] = []
    key = held = None  # the key seen last; the block held last, once the load is applied
    for first, last, origin, mccmnc, note in tagged:
        if (first, last) == key:  # a staged row again, or the live block a staged row changes
            if origin == 0:
                repeated.append((first, last, mccmnc, note))
            continue
        key = first, last
        if mccmnc == REMOVE:
            continue
        if held is not None and first <= held[1]:
            raise ValueError(f"blocks {block_key(*held)} and {block_key(first, last)} overlap")
        held = key
    return repeated
