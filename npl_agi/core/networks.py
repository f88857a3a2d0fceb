"""The network directory: MCCMNC to country and network name (``NPL_COUNTRY``, ``NPL_NETWORK``).

The bundled table (``data/mccmnc.tsv``, with its source and date in its header) is searched as
text, not parsed into a dictionary: a call needs one entry, and that costs microseconds. Admins
add or correct entries in the ``[networks]`` section of the configuration:

    23415 = GB, Vodafone UK     ; country and name
    90170 = Example Mobile      ; name only: the country comes from the table
"""

from __future__ import annotations

import os

TABLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "mccmnc.tsv")


class Directory:
    """Country and network name of an MCCMNC, from the admin's overrides, then the bundled table."""

    def __init__(self, table: str, overrides: dict[str, str] | None = None) -> None:
        self._table = "\n" + table
        self._overrides = {code: parse_override(value) for code, value in (overrides or {}).items()}

    @classmethod
    def load(cls, overrides: dict[str, str] | None = None) -> Directory:
        """The bundled table with the ``[networks]`` overrides of the configuration."""
        with open(TABLE, encoding="utf-8") as f:
            return cls(f.read(), overrides)

    def _row(self, code: str) -> tuple[str, str]:
        start = self._table.find(f"\n{code}\t")
        if start < 0:
            return "", ""
        end = self._table.find("\n", start + 1)
        _, country, name = self._table[start + 1 : end if end > 0 else None].split("\t", 2)
        return country, name

    def describe(self, mccmnc: str) -> tuple[str, str]:
        """(ISO country code, network name); empty strings for what is not known.

        What an override leaves out comes from the table: the code's own row (an MNC may be
        in another country than its MCC, e.g. 31059 is in Bermuda), then its MCC's row.
        """
        country, name = self._overrides.get(mccmnc, ("", ""))
        if not (country and name):
            row_country, row_name = self._row(mccmnc)
            country = country or row_country or self._row(mccmnc[:3])[0]
            name = name or row_name
        return country, name


def parse_override(value: str) -> tuple[str, str]:
    """``GB, Vodafone UK`` or ``Vodafone UK`` to (country, name).

    Only two letters before the first comma are a country: network names have commas of their
    own (``Syniverse Technologies, LLC``).
    """
    head, sep, rest = value.partition(",")
    if sep and len(head.strip()) == 2 and head.strip().isalpha():
        return head.strip().upper(), rest.strip()
    return "", value.strip()
