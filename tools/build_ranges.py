#!/usr/bin/env python3
"""Rebuild npl_agi/data/ranges.tsv, the range holders, from phonenumbers' carrier data.

The range holder of a number is the network its number block was originally allocated to.
phonenumbers (libphonenumber's data, Apache License 2.0) names that carrier for each prefix
(``phonenumbers.carrierdata``, English names); this script turns the names into MCCMNC codes
through the network directory ``npl_agi/data/mccmnc.tsv``:

    python tools/build_ranges.py            # rewrites the bundled table
    python tools/build_ranges.py --check    # exit 1 when the bundled table is not what it builds

The date in the header is ``SOURCE_DATE_EPOCH`` when it is set (the reproducible-builds
convention), else today; ``--check`` rebuilds with the date recorded in the file. A report of the
prefixes each alias mapped and of the carrier names left unmapped goes to stderr.

The region of a prefix is the ISO region of its country calling code. Where several regions share
a calling code (+1, +44 with GG, IM and JE, +7 with KZ, ...), it is the only one of them that can
hold a number starting with the prefix according to phonenumbers' own patterns (a region's
leading digits, else its number patterns); when that leaves more than one, all are looked at.

First the aliases, ``tools/range_aliases.tsv``: each declares that a carrier's exact name in a
region is one MCCMNC of the directory, where the names differ (``Vodafone`` and ``Vodafone UK``)
or the network has several codes (EE). A prefix maps by its aliases when those of its region(s)
give it one MCCMNC; two that disagree leave it unmapped. The file is checked whole before
anything is built: a region phonenumbers does not know, an MCCMNC the directory does not list
for that region (or for one sharing its calling code), or a name phonenumbers does not give in
that region fails the build with the line named, so an alias gone stale with a phonenumbers
upgrade is noticed.

Then the rule, and nothing looser (no fuzzy matching): a prefix without an alias maps to an
MCCMNC when its region has exactly one directory entry whose network name equals the carrier's
name, both compared after ``name_key`` (case folded, everything but letters and digits dropped);
of several regions, the name must match in exactly one of them, once.

Longest prefix wins: a prefix that cannot be mapped inside one that was keeps a row with an
empty MCCMNC, so its numbers do not inherit the wrong holder. A row that gives its numbers the
same answer as its nearest shorter prefix is dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import sys
import textwrap
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import NamedTuple

import phonenumbers
from phonenumbers.carrierdata import CARRIER_DATA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "npl_agi", "data", "ranges.tsv")
DIRECTORY = os.path.join(ROOT, "npl_agi", "data", "mccmnc.tsv")
ALIASES = os.path.join(ROOT, "tools", "range_aliases.tsv")
LANGUAGE = "en"
HEADER = """\
# Range holders: the MCCMNC of the network each number block was originally allocated to.
# Source: the carrier data of phonenumbers {version} (libphonenumber, Apache License 2.0),
# English names, matched to the network directory npl_agi/data/mccmnc.tsv, whose own source is:
{directory_source}
# Aliases: {aliases} of {aliases_file}, each a carrier's exact name in its region declared one
# MCCMNC of the directory, applied first.
# Rule: otherwise a prefix maps when its region has exactly one directory entry of the carrier's
# name (compared case-folded, ignoring whitespace and punctuation). A region shared by a calling
# code is told apart by phonenumbers' patterns. Longest prefix wins; an empty MCCMNC marks a block
# that could not be mapped inside one that was. Built {date} by tools/build_ranges.py.
# Columns: prefix<TAB>mccmnc
"""
BUILT = re.compile(r"^# .*\bBuilt (\d{4}-\d{2}-\d{2}) by ", re.MULTILINE)
VERSION = re.compile(r"^# Source: the carrier data of phonenumbers (\S+) ", re.MULTILINE)
# The number types phonenumbers validates a number against.
NUMBER_TYPES = (
    "fixed_line",
    "mobile",
    "toll_free",
    "premium_rate",
    "shared_cost",
    "personal_number",
    "voip",
    "pager",
    "uan",
    "voicemail",
)


def name_key(name: str) -> str:
    """A network name as compared: NFC, case folded, only its letters and digits.

    ``Talk Talk`` and ``TalkTalk``, ``T-Mobile`` and ``T Mobile`` are equal; ``Vodafone`` and
    ``Vodafone UK`` are not, nor are accented and unaccented letters.
    """
    return "".join(c for c in unicodedata.normalize("NFC", name).casefold() if c.isalnum())


# -- the network directory --


@dataclass
class Directory:
    """The directory's codes by (country, name key), its (country, name) by code (to check an
    alias), and the sentence that says where it is from."""

    source: str
    codes: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    networks: dict[str, tuple[str, str]] = field(default_factory=dict)


def read_directory(text: str) -> Directory:
    """The directory as the build needs it; its header must say where it is from."""
    header = " ".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    found = re.search(r"Source: .*?Extracted \d{4}-\d{2}-\d{2}\.", header)
    if not found:
        raise SystemExit("mccmnc.tsv: no 'Source: ... Extracted YYYY-MM-DD.' in its header")
    directory = Directory(found.group(0))
    for line in text.splitlines():
        if line and not line.startswith("#"):
            code, country, name = line.split("\t")
            if name_key(name):
                directory.codes.setdefault((country, name_key(name)), []).append(code)
                directory.networks[code] = (country, name)
    return directory


# -- the aliases --

ALIAS_COLUMNS = "region<TAB>carrier<TAB>mccmnc<TAB>note"


@dataclass(frozen=True)
class Alias:
    """One line of the aliases: the carrier's exact name in a region is this MCCMNC, and why;
    ``network`` is the directory's name for the MCCMNC, for the report."""

    region: str
    name: str
    mccmnc: str
    note: str
    line: int
    network: str = ""


@dataclass
class Aliases:
    """The aliases by (region, exact carrier name), and the file they came from (for the header)."""

    file: str
    by_name: dict[tuple[str, str], Alias] = field(default_factory=dict)


def read_aliases(text: str, file: str, directory: Directory, carriers: dict[str, dict[str, str]]) -> Aliases:
    """The aliases, checked whole: every bad line is named, then the build stops.

    Lines are ``region<TAB>carrier<TAB>mccmnc<TAB>note``; blank lines and ``#`` lines are skipped.
    """
    aliases, bad = Aliases(file), []
    names = carrier_names(carriers)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            bad.append(f"line {number}: {len(fields)} field(s); expected 4: {ALIAS_COLUMNS}")
            continue
        alias = Alias(*fields, line=number)
        problem = _alias_problem(alias, directory, names) or _duplicate(alias, aliases)
        if problem:
            bad.append(f"line {number}: {problem}")
        else:
            network = directory.networks[alias.mccmnc][1]
            aliases.by_name[alias.region, alias.name] = dataclasses.replace(alias, network=network)
    if bad:
        raise SystemExit(f"{file}: {len(bad)} bad line(s):\n  " + "\n  ".join(bad))
    return aliases


def _alias_problem(alias: Alias, directory: Directory, names: dict[str, set[str]]) -> str:
    """What is wrong with an alias by itself, or ""."""
    if alias.region not in phonenumbers.SUPPORTED_REGIONS:
        return f"region {alias.region!r} is not a region of phonenumbers"
    if alias.mccmnc not in directory.networks:
        return f"MCCMNC {alias.mccmnc!r} is not a network of the directory"
    country, network = directory.networks[alias.mccmnc]
    if country not in phonenumbers.region_codes_for_country_code(phonenumbers.country_code_for_region(alias.region)):
        return f"MCCMNC {alias.mccmnc} is {network} of {country} in the directory, not a network of {alias.region}"
    if alias.name not in names.get(alias.region, ()):
        return f"phonenumbers {phonenumbers.__version__} names no carrier {alias.name!r} in {alias.region}"
    if not alias.note.strip():
        return "no note: say why this is the network's code"
    return ""


def _duplicate(alias: Alias, aliases: Aliases) -> str:
    first = aliases.by_name.get((alias.region, alias.name))
    return f"{alias.region} {alias.name!r} is on line {first.line} already" if first else ""


def carrier_names(carriers: dict[str, dict[str, str]]) -> dict[str, set[str]]:
    """The carriers' English names by region, a prefix shared by regions counting in each."""
    names: dict[str, set[str]] = {}
    for prefix, languages in carriers.items():
        if languages.get(LANGUAGE):
            for region in regions(prefix):
                names.setdefault(region, set()).add(languages[LANGUAGE])
    return names


# -- which region a prefix is in --


def calling_code(prefix: str) -> tuple[int, str]:
    """The country calling code of a prefix and the national digits after it."""
    for n in (1, 2, 3):
        if phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(int(prefix[:n])):
            return int(prefix[:n]), prefix[n:]
    raise ValueError(f"{prefix}: no country calling code")


@cache
def regions(prefix: str) -> tuple[str, ...]:
    """The regions that can hold a number starting with the prefix (several: undecided).

    Cached: the aliases are checked against every prefix's regions before the build asks again.
    """
    code, national = calling_code(prefix)
    shared = phonenumbers.region_codes_for_country_code(code)
    if len(shared) == 1:
        return shared
    possible = tuple(region for region in shared if _can_hold(region, national))
    return possible or shared


def _can_hold(region: str, national: str) -> bool:
    """Whether some number of the region starts with these national digits.

    Leading digits, where the region has them, decide as they do in phonenumbers; else the
    region's number patterns (any type) must accept some continuation of the digits.
    """
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if metadata.leading_digits:
        return bool(_partial(metadata.leading_digits, national, whole=False))
    patterns = [getattr(metadata, kind) for kind in NUMBER_TYPES]
    return any(
        d is not None and d.national_number_pattern and _partial(d.national_number_pattern, national) for d in patterns
    )


def _partial(pattern: str, digits: str, *, whole: bool = True) -> bool:
    """Whether some continuation of ``digits`` matches ``pattern`` (``whole``: all of it, as
    ``re.fullmatch``; else at its start, as ``re.match``)."""
    ends = _ends(_parse(pattern), frozenset({0}), digits)
    return len(digits) in ends if whole else bool(ends)


# A small regular-expression engine for phonenumbers' patterns (digits, [classes], \d, (?:...), |,
# ?, {n}, {n,m}), because ``re`` cannot tell whether a string could still match once extended.
# A node is ("set", chars), ("seq", nodes), ("alt", nodes) or ("rep", node, low, high).

DIGITS = frozenset("0123456789")


@cache
def _parse(pattern: str) -> tuple:
    node, end = _alternation(pattern, 0)
    if end != len(pattern):
        raise ValueError(f"unsupported pattern {pattern!r} at {end}")
    return node


def _alternation(p: str, i: int) -> tuple[tuple, int]:
    branch, i = _sequence(p, i)
    branches = [branch]
    while i < len(p) and p[i] == "|":
        branch, i = _sequence(p, i + 1)
        branches.append(branch)
    return ("alt", tuple(branches)), i


def _sequence(p: str, i: int) -> tuple[tuple, int]:
    items = []
    while i < len(p) and p[i] not in "|)":
        atom, i = _atom(p, i)
        items.append(atom)
    return ("seq", tuple(items)), i


def _atom(p: str, i: int) -> tuple[tuple, int]:
    if p.startswith("(?:", i):
        atom, i = _alternation(p, i + 3)
        if p[i : i + 1] != ")":
            raise ValueError(f"unsupported pattern {p!r} at {i}")
        i += 1
    elif p[i] == "[":
        end = p.index("]", i)
        body, chars = p[i + 1 : end], set()
        for m in re.finditer(r"\\d|(\d)-(\d)|(\d)|(.)", body):
            if m.group(4):
                raise ValueError(f"unsupported class in {p!r}")
            chars |= DIGITS if m.group(0) == r"\d" else set(m.group(3) or "") | _range(m.group(1), m.group(2))
        atom, i = ("set", frozenset(chars)), end + 1
    elif p.startswith(r"\d", i):
        atom, i = ("set", DIGITS), i + 2
    elif p[i] in DIGITS:
        atom, i = ("set", frozenset(p[i])), i + 1
    else:
        raise ValueError(f"unsupported pattern {p!r} at {i}")
    return _quantified(p, i, atom)


def _range(low: str | None, high: str | None) -> set[str]:
    return {str(d) for d in range(int(low), int(high) + 1)} if low and high else set()


def _quantified(p: str, i: int, atom: tuple) -> tuple[tuple, int]:
    if p[i : i + 1] == "?":
        return ("rep", atom, 0, 1), i + 1
    m = re.compile(r"\{(\d+)(,(\d*))?\}").match(p, i)
    if not m:
        return atom, i
    low = int(m.group(1))
    high = low if m.group(2) is None else int(m.group(3)) if m.group(3) else None
    return ("rep", atom, low, high), m.end()


def _ends(node: tuple, starts: frozenset[int], digits: str) -> frozenset[int]:
    """Where in ``digits`` a match of ``node`` begun at ``starts`` can end; a match that runs past
    the end of ``digits`` ends at ``len(digits)`` (a continuation can complete it)."""
    kind, n = node[0], len(digits)
    if kind == "set":
        return frozenset(i + 1 for i in starts if i < n and digits[i] in node[1]) | (starts & {n})
    if kind == "seq":
        for item in node[1]:
            starts = _ends(item, starts, digits)
        return starts
    if kind == "alt":
        return frozenset().union(*(_ends(branch, starts, digits) for branch in node[1]))
    _, item, low, high = node
    ends, count = frozenset(), 0
    while starts and (high is None or count <= high):
        if count >= low:
            if starts <= ends:
                break
            ends |= starts
        starts, count = _ends(item, starts, digits), count + 1
    return ends


# -- the table --


@dataclass
class Build:
    rows: list[tuple[str, str]]
    # (region or regions, carrier name, why not) -> number of prefixes, for the report.
    unmapped: Counter = field(default_factory=Counter)
    mapped: Counter = field(default_factory=Counter)
    # Alias -> number of prefixes it mapped.
    by_alias: Counter = field(default_factory=Counter)


class Mapping(NamedTuple):
    """A prefix's holder ("" when not mapped), its region(s), why not, and the alias that decided."""

    mccmnc: str
    label: str
    why: str
    alias: Alias | None = None


def map_prefix(prefix: str, name: str | None, directory: Directory, aliases: Aliases | None = None) -> Mapping:
    """The prefix's holder: by its alias, else by the directory's one network of that name."""
    where = regions(prefix)
    label = "/".join(where)
    if where == ("001",):
        return Mapping("", label, "non-geographic calling code")
    if not name:
        return Mapping("", label, "no English name")
    declared = (
        [aliases.by_name[region, name] for region in where if (region, name) in aliases.by_name] if aliases else []
    )
    if len({alias.mccmnc for alias in declared}) == 1:
        return Mapping(declared[0].mccmnc, label, "", declared[0])
    if declared:
        return Mapping("", label, "aliases of that name: " + " ".join(f"{a.region} {a.mccmnc}" for a in declared))
    key = name_key(name)
    found = [code for region in where for code in directory.codes.get((region, key), [])]
    in_regions = {region for region in where if (region, key) in directory.codes}
    if len(found) == 1:
        return Mapping(found[0], label, "")
    if not found:
        return Mapping("", label, "no network of that name")
    if len(in_regions) > 1:
        return Mapping("", label, f"that name in {len(in_regions)} regions")
    return Mapping("", label, f"{len(found)} networks of that name: " + " ".join(sorted(found)))


def build(carriers: dict[str, dict[str, str]], directory: Directory, aliases: Aliases | None = None) -> Build:
    """Every prefix's holder, without the rows that do not change any number's answer."""
    result = Build(rows=[])
    holders: dict[str, str] = {}
    for prefix in sorted(carriers):
        name = carriers[prefix].get(LANGUAGE)
        code, label, why, alias = map_prefix(prefix, name, directory, aliases)
        holders[prefix] = code
        counts = result.unmapped if why else result.mapped
        counts[label, name or "", why] += 1
        if alias:
            result.by_alias[alias] += 1
    for prefix in sorted(holders):
        parent = next((holders[prefix[:n]] for n in range(len(prefix) - 1, 0, -1) if prefix[:n] in holders), "")
        if holders[prefix] != parent:
            result.rows.append((prefix, holders[prefix]))
    return result


def render(result: Build, directory: Directory, aliases: Aliases, date: str) -> str:
    """The table's text: its header (sources, aliases, rule, date), then its rows."""
    source = "\n".join(textwrap.wrap(directory.source, width=96, initial_indent="#   ", subsequent_indent="#   "))
    header = HEADER.format(
        version=phonenumbers.__version__,
        directory_source=source,
        aliases=len(aliases.by_name),
        aliases_file=aliases.file,
        date=date,
    )
    return header + "".join(f"{prefix}\t{code}\n" for prefix, code in result.rows)


def report(result: Build, aliases: Aliases | None = None) -> Iterable[str]:
    """The prefixes each alias mapped, the carrier names left unmapped by region, and the totals."""
    if aliases:
        yield f"{aliases.file}:"
        for a in aliases.by_name.values():
            yield f"  {a.region} {a.name} -> {a.mccmnc} ({a.network}): {_prefixes(result.by_alias[a])}"
        yield f"aliases: {len(aliases.by_name)}; prefixes mapped by them: {sum(result.by_alias.values())}"
    by_region: dict[str, list[tuple[str, str, int]]] = {}
    for (label, name, why), count in result.unmapped.items():
        by_region.setdefault(label, []).append((name, why, count))
    for label in sorted(by_region):
        yield f"{label}:"
        for name, why, count in sorted(by_region[label], key=lambda e: (-e[2], e[0])):
            yield f"  {name or '-'} ({_prefixes(count)}): {why}"
    yield (
        f"carrier names mapped: {_names(result.mapped)}, unmapped: {_names(result.unmapped)}; "
        f"prefixes mapped: {sum(result.mapped.values())}, unmapped: {sum(result.unmapped.values())}; "
        f"rows written: {len(result.rows)}"
    )


def _prefixes(count: int) -> str:
    return f"{count} prefix{'' if count == 1 else 'es'}"


def _names(counts: Counter) -> int:
    """Distinct carrier names, a name in another region counting apart."""
    return len({(label, name) for label, name, _ in counts})


def build_date(existing: str | None = None) -> str:
    """The date for the header: the existing file's (for --check), SOURCE_DATE_EPOCH, or today."""
    if existing is not None:
        found = BUILT.search(existing)
        if not found:
            raise SystemExit("no 'Built YYYY-MM-DD' in the existing table's header")
        return found.group(1)
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.datetime.fromtimestamp(int(epoch), tz=datetime.UTC).date().isoformat()
    return datetime.date.today().isoformat()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild npl_agi/data/ranges.tsv from phonenumbers' carrier data.")
    parser.add_argument("--output", default=OUTPUT, help="where to write the table (default: the bundled one)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the table at --output is not what is built")
    parser.add_argument("--aliases", default=ALIASES, help="the curated aliases (default: tools/range_aliases.tsv)")
    args = parser.parse_args(argv)
    with open(DIRECTORY, encoding="utf-8") as f:
        directory = read_directory(f.read())
    try:
        with open(args.aliases, encoding="utf-8") as f:
            aliases = read_aliases(f.read(), _shown(args.aliases), directory, CARRIER_DATA)
    except OSError as e:
        raise SystemExit(f"{args.aliases}: {e.strerror}") from None
    existing = None
    if args.check:
        try:
            with open(args.output, encoding="utf-8") as f:
                existing = f.read()
        except OSError as e:
            raise SystemExit(f"{args.output}: {e.strerror}") from None
    result = build(CARRIER_DATA, directory, aliases)
    text = render(result, directory, aliases, build_date(existing))
    if existing is None:
        for line in report(result, aliases):
            print(line, file=sys.stderr)
        with open(args.output, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        return 0
    if text == existing:
        return 0
    recorded = VERSION.search(existing)
    built_from = recorded.group(1) if recorded else "an unknown version"
    why = (
        ""
        if built_from == phonenumbers.__version__
        else f" (built from phonenumbers {built_from}, this is {phonenumbers.__version__})"
    )
    old, new = existing.splitlines(), text.splitlines()
    first = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
    print(
        f"{args.output} is not what tools/build_ranges.py builds{why}: first difference at line {first + 1} "
        f"({_line(old, first)!r} in the file, {_line(new, first)!r} built)",
        file=sys.stderr,
    )
    return 1


def _line(lines: list[str], i: int) -> str:
    return lines[i] if i < len(lines) else "<end>"


def _shown(path: str) -> str:
    """A file as the header and the errors name it: from the project's root when it is inside,
    so that the table does not depend on where the tree is checked out."""
    relative = os.path.relpath(os.path.abspath(path), ROOT)
    return os.path.basename(path) if relative.startswith("..") else relative.replace(os.sep, "/")


if __name__ == "__main__":
    sys.exit(main())
