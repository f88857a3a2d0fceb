"""Range holders: the network a number's block was originally allocated to (MCCMNC).

That is the right network for every number that was never ported. The bundled table
(``data/ranges.tsv``, built by ``tools/build_ranges.py``, its source and date in its header) has
one ``prefix<TAB>mccmnc`` line per block, sorted by prefix; the longest prefix of a number wins.
An empty MCCMNC marks a block whose holder is not known inside a block whose holder is: such a
number's holder is unknown, not the outer block's.

The process script runs once per call, so the table is not parsed into a dictionary: its text is
read once and each candidate prefix is found by a binary search over its lines, a few dozen
string comparisons per number. Admins add or correct blocks with a CSV of their own
(``npl-agi ranges import``, read by ``localdata``); the cache backend keeps them, and the
chain hands those among a number's prefixes to ``holder``.
"""

from __future__ import annotations

import os

TABLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "ranges.tsv")

_bundled: RangeTable | None = None


def prefixes(msisdn: str) -> list[str]:
    """The number's prefixes, longest first: the order in which a longer block wins."""
    return [msisdn[:n] for n in range(len(msisdn), 0, -1)]


class RangeTable:
    """A sorted ``prefix<TAB>mccmnc`` table after its ``#`` header, searched as text.

    ``source`` is the header: where the table came from and when.
    """

    def __init__(self, text: str) -> None:
        if text and not text.endswith("\n"):
            text += "\n"
        start = 0
        while text.startswith("#", start):
            start = text.index("\n", start) + 1
        self._text = text
        self._start = start
        self.source = text[:start]

    @classmethod
    def load(cls) -> RangeTable:
        """The bundled table, read once per process (a call needs it at most once)."""
        global _bundled
        if _bundled is None:
            with open(TABLE, encoding="utf-8") as f:
                _bundled = cls(f.read())
        return _bundled

    def __len__(self) -> int:
        """Rows in the table (counted when asked: a call never needs it)."""
        return self._text.count("\n", self._start)

    def _find(self, prefix: str) -> str | None:
        """The MCCMNC of exactly this prefix, or None: a binary search over the lines' offsets."""
        text = self._text
        low, high = self._start, len(text)  # low is always a line's start
        while low < high:
            start = max(low, text.rfind("\n", low, (low + high) // 2) + 1)
            end = text.index("\n", start)
            tab = text.find("\t", start, end)
            key = text[start : tab if tab >= 0 else end]
            if key == prefix:
                return text[tab + 1 : end] if tab >= 0 else ""
            if key < prefix:
                low = end + 1
            else:
                high = start
        return None

    def longest(self, msisdn: str) -> tuple[str, str] | None:
        """(prefix, mccmnc) of the number's longest prefix in the table, or None."""
        for prefix in prefixes(msisdn):
            mccmnc = self._find(prefix)
            if mccmnc is not None:
                return prefix, mccmnc
        return None


def holder(msisdn: str, table: RangeTable, admin: dict[str, str] | None = None) -> str:
    """The range holder's MCCMNC, "" when unknown.

    ``admin`` holds the admin's own blocks (at least those among the number's prefixes). Across
    both, the longest prefix wins, as a block carved out of a larger one belongs to someone else;
    on a tie the admin's entry wins: it is the admin's correction of the bundled data.
    """
    found = table.longest(msisdn)
    bundled_length, mccmnc = (len(found[0]), found[1]) if found else (0, "")
    if admin:
        for prefix in prefixes(msisdn):
            if len(prefix) < bundled_length:
                break
            if prefix in admin:
                return admin[prefix]
    return mccmnc
