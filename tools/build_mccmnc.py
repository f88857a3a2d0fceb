#!/usr/bin/env python3
"""Rebuild npl_agi/data/mccmnc.tsv, the network directory, from its source.

The source is Wikipedia's lists of mobile network codes (CC BY-SA 3.0), as captured in the
``mcc-mnc-p1`` package on PyPI (its ``raw/wikip_mnc.json`` and ``raw/wikip_mcc.json``):

    python3 -m venv /tmp/mcc && /tmp/mcc/bin/pip install --no-deps mcc-mnc-p1==1.1.0
    /tmp/mcc/bin/python tools/build_mccmnc.py > npl_agi/data/mccmnc.tsv

``--raw DIR`` reads the two JSON files from DIR instead of the installed package. ITU regions
2xx to 7xx and the shared codes 9xx (satellite, maritime, IoT) are kept; not the test codes 0xx.

How a row is chosen, where Wikipedia lists a code more than once (a UK code also under the
Isle of Man, a US code under Guam): the entry of the MCC's home country (the country with the
most codes under that MCC), else the first. Its country is its first ISO 3166 code, its name
the brand, else the operator. A 3-digit row gives the home country of the MCC, for codes not
listed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections import Counter

PACKAGE, VERSION, RELEASED = "mcc-mnc-p1", "1.1.0", "2026-09"
REGIONS = "2345679"
# Wikipedia's codes for territories without an ISO 3166 code of their own.
COUNTRY_FIXES = {"GE-AB": "AB", "RS-KM": "XK"}
HEADER = """\
# MCCMNC to country (ISO 3166 alpha-2) and network name, for NPL_NETWORK and NPL_COUNTRY.
# Source: Wikipedia, "Mobile Network Codes in ITU region 2xx-7xx" (CC BY-SA 3.0),
# as captured in the {package} {version} package on PyPI ({released}). Extracted {today}.
# Name is the network's brand, else its operator. A 3-digit code row gives the country of
# an MCC's codes that are not listed. Admins override or add entries in the [networks]
# section of npl-agi.conf. Columns: code<TAB>country<TAB>network
"""


def raw_dir() -> str:
    import mcc_mnc_genlib  # the mcc-mnc-p1 package

    return os.path.join(os.path.dirname(mcc_mnc_genlib.__file__), "raw")


def country(codes: list[str] | str) -> str:
    code = (codes[0] if codes else "") if isinstance(codes, list) else codes
    return COUNTRY_FIXES.get(code, code)


def clean(text: str) -> str:
    """One line of text: no tabs or newlines, single spaces."""
    return " ".join((text or "").split())


def build(mnc_entries: list[dict], mcc_entries: list[dict]) -> list[tuple[str, str, str]]:
    """The table's rows, sorted by code."""
    entries = [e for e in mnc_entries if e["mcc"][:1] in REGIONS and clean(e["brand"] or e["operator"])]
    counts: dict[str, Counter] = {}
    for e in entries:
        counts.setdefault(e["mcc"], Counter())[country(e["codes_alpha_2"])] += 1
    home = {mcc: c.most_common(1)[0][0] for mcc, c in counts.items()}
    for m in mcc_entries:  # an MCC whose codes name no country: the MCC list's own
        if not home.get(m["mcc"]) and m["mcc"] in counts:
            home[m["mcc"]] = country(m["code_alpha_2"])
    rows: dict[str, tuple[str, str]] = {}
    for e in entries:
        code, cc = e["mcc"] + e["mnc"], country(e["codes_alpha_2"]) or home[e["mcc"]]
        if code not in rows or (cc == home[e["mcc"]] and rows[code][0] != cc):
            rows[code] = (cc, clean(e["brand"] or e["operator"]))
    for mcc, cc in home.items():
        if cc:
            rows[mcc] = (cc, "")
    return [(code, rows[code][0], rows[code][1]) for code in sorted(rows, key=_order)]


def _order(code: str) -> tuple[str, int, str]:
    """By MCC: its own row, then its 2-digit MNCs, then its 3-digit ones."""
    return code[:3], len(code), code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild npl_agi/data/mccmnc.tsv on stdout.")
    parser.add_argument("--raw", metavar="DIR", help="directory of wikip_mnc.json and wikip_mcc.json")
    parser.add_argument("--date", help="the extraction date for the header (default: today)")
    args = parser.parse_args(argv)
    directory = args.raw or raw_dir()
    with open(os.path.join(directory, "wikip_mnc.json"), encoding="utf-8") as f:
        _, by_region = json.load(f)
    with open(os.path.join(directory, "wikip_mcc.json"), encoding="utf-8") as f:
        _, mcc_entries = json.load(f)
    rows = build([e for region in by_region.values() for e in region], mcc_entries)
    today = args.date or datetime.date.today().isoformat()
    sys.stdout.write(HEADER.format(package=PACKAGE, version=VERSION, released=RELEASED, today=today))
    sys.stdout.writelines(f"{code}\t{cc}\t{name}\n" for code, cc, name in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
