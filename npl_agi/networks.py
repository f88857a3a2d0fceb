"""The network directory: MCCMNC to country and network name (``NPL_COUNTRY``, ``NPL_NETWORK``).

The bundled table (``data/mccmnc.tsv``, with its source and date in its header) is searched as
text, not parsed into a dictionary: a call needs one entry, and that costs microseconds. Admins
add or correct entries in the ``[networks]`` section of the configuration:

    23415 = GB, Vodafone UK     ; country and name
    90170 = Example Mobile      ; name only: the country comes from the table's MCC row
"""

from __future__ import annotations

import os

TABLE = os.path.join(os.path.dirname(__file__), "data", "mccmnc.tsv")


class Directory:
    def __init__(self, table: str, overrides: dict[str, str] | None = None) -> None:
        self._table = "\n" + table
        self._overrides = {}
        for code, value in (overrides or {}).items():
            country, sep, name = value.partition(",")
            if not sep:
                country, name = "", value
            self._overrides[code] = (country.strip().upper(), name.strip())

    @classmethod
    def load(cls, overrides: dict[str, str] | None = None) -> Directory:
        with open(TABLE, encoding="utf-8") as f:
            return cls(f.read(), overrides)

    def _row(self, code: str) -> tuple[str, str]:
        if code in self._overrides:
            return self._overrides[code]
        start = self._table.find(f"\n{code}\t")
        if start < 0:
            return "", ""
        end = self._table.find("\n", start + 1)
        _, country, name = self._table[start + 1 : end if end > 0 else None].split("\t", 2)
        return country, name

    def describe(self, mccmnc: str) -> tuple[str, str]:
        """(ISO country code, network name); empty strings for what is not known."""
        country, name = self._row(mccmnc)
        return country or self._row(mccmnc[:3])[0], name
