"""``npl-agi cache``, ``local`` and ``ranges``: the cache's statistics, export and purge, and
the admin's own numbers and range holders kept beside it."""

from __future__ import annotations

import csv
import json
import sys
import time

from npl_agi.admin.lookup_cmd import CSV_FIELDS, csv_cell, csv_row, open_numbers
from npl_agi.admin.usage import EXIT_OK, UsageError
from npl_agi.config import load_config
from npl_agi.core.errors import CacheError, NplError


def cmd_cache(args) -> int:
    from npl_agi.backends import open_cache

    config = load_config(args.config)
    cache = open_cache(config)
    try:
        if args.action == "purge":
            print(f"purged {cache.purge(purge_msisdns(args.numbers, config))} entries")
        elif args.action == "stats":
            from npl_agi.backends.locks import lock_dir_fallbacks

            stats = cache.stats()
            fell_back = cache.lock_fallbacks(config.api)
            if fell_back is not None:
                stats.update(lock_fallbacks=fell_back[0], last_lock_fallback=fell_back[1])
            count, last = lock_dir_fallbacks().read()
            stats.update(lock_dir_fallbacks=count, last_lock_dir_fallback=last)
            if cache.keeps_data:
                from npl_agi.backends.base import KNOWN_NUMBERS, RANGES

                stats.update(
                    known_numbers=sum(1 for _ in cache.local_items(KNOWN_NUMBERS)),
                    own_ranges=sum(1 for _ in cache.local_items(RANGES)),
                )
            print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
        else:
            export(cache, config, as_json=args.json)
    except (NplError, UsageError, BrokenPipeError):
        raise
    except Exception as e:
        raise CacheError(f"cache {args.action} failed ({cache.name}): {e.__class__.__name__}: {e}") from None
    return EXIT_OK


def cmd_local_data(args) -> int:
    """``npl-agi local`` and ``npl-agi ranges``: the admin's own data beside the cache."""
    from npl_agi.admin.localdata import number_key, prefix_key, read_rows, row_of
    from npl_agi.backends import open_cache
    from npl_agi.backends.base import KNOWN_NUMBERS, RANGES

    config = load_config(args.config)
    cache = open_cache(config)
    kind, what = (KNOWN_NUMBERS, "numbers") if args.command == "local" else (RANGES, "ranges")
    key = number_key(config.number) if kind == KNOWN_NUMBERS else prefix_key
    if args.action == "import":
        with open_numbers(args.file) as f:
            rows = read_rows(f, row_of(key), args.file)
    elif args.action == "delete":
        keys = []
        for text in args.keys:
            try:
                keys.append(key(text))
            except ValueError as e:
                raise UsageError(f"{args.command} delete: {e}") from None
    try:
        if args.action == "import":
            print(f"imported {cache.put_local(kind, rows, replace=args.replace)} {what}")
        elif args.action == "delete":
            print(f"deleted {cache.delete_local(kind, keys)} {what}")
        elif args.action == "clear":
            print(f"deleted {cache.delete_local(kind)} {what}")
        else:
            w = csv.writer(sys.stdout, lineterminator="\n")
            w.writerow(("number" if kind == KNOWN_NUMBERS else "prefix", "mccmnc", "note"))
            w.writerows((key, mccmnc, csv_cell(note)) for key, mccmnc, note in cache.local_items(kind))
    except (NplError, UsageError, BrokenPipeError):
        raise
    except Exception as e:
        raise CacheError(f"{args.command} {args.action} failed ({cache.name}): {e.__class__.__name__}: {e}") from None
    return EXIT_OK


def purge_msisdns(numbers: list[str], config) -> list[str] | None:
    """The international numbers to purge (None: all); a number that is none is a usage error."""
    from npl_agi.core.number import normalise, validate

    if not numbers:
        return None
    anything = config.number._replace(lookup_types=("any",))
    msisdns = []
    for n in numbers:
        try:
            msisdns.append(validate(normalise(n, anything), anything))
        except NplError as e:
            raise UsageError(f"cache purge: {n!r} is not a number: {e}") from None
    return msisdns


def export(cache, config, *, as_json: bool) -> None:
    """The live entries with their network names, times in ISO 8601 UTC."""
    from npl_agi.core.networks import Directory

    rows = cache.export()  # fails here, before the header, if the cache is broken
    directory = Directory.load(config.networks)

    def described(row: dict) -> dict:
        if row["mccmnc"]:
            row["country"], row["network"] = directory.describe(row["mccmnc"])
        return {**row, "stored": iso_utc(row["stored"]), "expires": iso_utc(row["expires"])}

    if as_json:
        print(json.dumps([described(r) for r in rows], indent=1))
        return
    fields = [f for f in CSV_FIELDS[1:] if f not in ("range_mccmnc", "ported")]  # the cache keeps neither
    w = csv.DictWriter(sys.stdout, fieldnames=[*fields, "stored", "expires"], extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow(csv_row(described(row)))


def iso_utc(t: float) -> str:
    """``2026-11-25T10:04:05Z``"""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def format_stats(s: dict) -> str:
    def when(t):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"

    lock_dir = []
    if "lock_dir_fallbacks" in s:
        lock_dir.append(
            f"lock dir fallbacks: {s['lock_dir_fallbacks']} (lock directory unusable: the temp dir's lock "
            f"file was used; last {when(s['last_lock_dir_fallback'])})"
        )
    if s["backend"] == "none":
        return "\n".join(["cache: none (backend = none)", *lock_dir])
    lines = [
        f"cache:         {s['backend']} ({s['location']})",
        f"entries:       {s['entries']}",
        f"oldest entry:  {when(s['oldest'])}",
        f"counting since {when(s['since'])}",
        f"hits / misses: {s['hits']} / {s['misses']} (hit ratio {s['hit_ratio']:.1%})",
        f"credits saved: {s['credits_saved']}",
    ]
    if "known_numbers" in s:
        lines.append(
            f"yours:         {s['known_numbers']} numbers you know, {s['own_ranges']} ranges (npl-agi local, ranges)"
        )
    if "lock_fallbacks" in s:
        lines.append(
            f"lock fallbacks: {s['lock_fallbacks']} (Redis unreachable: the local file lock was used; "
            f"last {when(s['last_lock_fallback'])})"
        )
    lines += lock_dir
    if s.get("unwritable"):
        lines.append(f"NOT WRITABLE by {s['shared_with']}: {', '.join(s['unwritable'])}")
        lines.append("  (Asterisk's lookups then go uncached: fix the owner, group or mode)")
    elif "shared_with" in s:
        lines.append(f"writable by:   {s['shared_with']}")
    return "\n".join(lines)
