"""``npl-agi cache``, ``local`` and ``ranges``: the cache's statistics, export and purge, and
the admin's own numbers and range holders kept beside it."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
                stats.update(local_stats(cache))
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
    from npl_agi.admin.localdata import known_key, prefix_key
    from npl_agi.backends import open_cache
    from npl_agi.backends.base import KNOWN_NUMBERS, RANGES

    config = load_config(args.config)
    cache = open_cache(config)
    kind, what = (KNOWN_NUMBERS, "numbers") if args.command == "local" else (RANGES, "ranges")
    key = known_key(config.number) if kind == KNOWN_NUMBERS else prefix_key
    if args.action == "import":
        return import_rows(cache, config, args, kind, key, what)
    if args.action == "delete":
        keys = []
        for text in args.keys:
            try:
                keys.append(key(text))
            except ValueError as e:
                raise UsageError(f"{args.command} delete: {e}") from None
    with failing_as(cache, f"{args.command} {args.action}"):
        if args.action == "delete":
            print(f"deleted {cache.delete_local(kind, keys)} {what}")
        elif args.action == "clear":
            print(f"deleted {cache.delete_local(kind)} {what}")
        else:
            w = csv.writer(sys.stdout, lineterminator="\n")
            w.writerow(("number" if kind == KNOWN_NUMBERS else "prefix", "mccmnc", "note"))
            w.writerows((key, mccmnc, csv_cell(note)) for key, mccmnc, note in cache.local_items(kind))
    return EXIT_OK


def import_rows(cache, config, args, kind: str, key, what: str) -> int:
    """``npl-agi local|ranges import [--replace | --delta] FILE``: the file checked whole and
    staged (``localdata.staged``), then handed to the backend a chunk at a time (``load_local``)."""
    from npl_agi.admin.localdata import row_of, staged

    mode = "delta" if args.delta else "replace" if args.replace else "add"
    action = f"{args.command} import"
    if not cache.keeps_data:  # say so before reading a national database for nothing
        with failing_as(cache, action):
            cache.load_local(kind, iter(()), mode=mode)
    with (
        terminated_as_interrupted(),
        open_numbers(args.file) as f,
        staged(f, row_of(key, delta=args.delta), args.file, staging_dir(config.cache)) as rows,
        failing_as(cache, action),
    ):
        done = cache.load_local(kind, rows.chunks(), mode=mode)
    if args.delta:
        print(f"applied {done} changes to {what} ({rows.removed} removals in the file)")
    else:
        print(f"imported {done} {what}")
    return EXIT_OK


def staging_dir(cfg) -> str | None:
    """Where a file being imported is staged: beside an SQLite cache file (a disk the admin's
    data is kept on already), else the system's temp dir (``TMPDIR``)."""
    import os

    if cfg.backend == "sqlite":
        directory = os.path.dirname(os.path.abspath(cfg.path))
        if os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK):
            return directory
    return None


@contextmanager
def failing_as(cache, what: str) -> Iterator[None]:
    """A backend's failure as one ``CacheError`` naming the command and the backend."""
    try:
        yield
    except (NplError, UsageError, BrokenPipeError):
        raise
    except Exception as e:
        raise CacheError(f"{what} failed ({cache.name}): {e.__class__.__name__}: {e}") from None


@contextmanager
def terminated_as_interrupted() -> Iterator[None]:
    """SIGTERM ends the command as Ctrl-C does, through every ``finally`` (the staging file is
    removed, a backend's load rolled back)."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def local_stats(cache) -> dict:
    """What the admin's data holds and costs (``cache stats``): ``known_numbers`` (numbers held
    one by one), ``known_blocks``, ``known_bytes`` and ``bytes_per_number`` (per number or
    block held), ``own_ranges``."""
    from npl_agi.backends.base import KNOWN_NUMBERS, RANGES

    known = cache.local_size(KNOWN_NUMBERS)
    held = known["entries"] + known["blocks"]
    return {
        "known_numbers": known["entries"],
        "known_blocks": known["blocks"],
        "known_bytes": known["bytes"],
        "bytes_per_number": round(known["bytes"] / held, 1) if held else None,
        "own_ranges": cache.local_size(RANGES)["entries"],
    }


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
        per = f", {s['bytes_per_number']:.0f} bytes per number or block" if s["bytes_per_number"] is not None else ""
        lines.append(f"known blocks:  {s['known_blocks']}; numbers you know take {s['known_bytes']} bytes{per}")
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
