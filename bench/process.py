"""Process AGI, whole process: what one call costs when Asterisk starts a script for it.

Every case runs as an admin times a script: the same plain spawner starts it as a whole process,
stdin from a file holding the conversation (the environment block, then the replies Asterisk
would send), on an interpreter as install.sh leaves one (``World.as_installed``), timed from the
spawn to the exit. The cases run round-robin, so the machine's noise falls on all of them alike,
and the hit's ratios to the floors are taken pair by pair within a round. The AGI emulator, which
answers each command as it comes (as Asterisk does), has its own cost: a cache hit through it is
a case of its own. Peak memory is measured in separate runs, because the small process that
measures it would add its own start-up to the wall time. Where a hit's time goes: its imports in
runs under ``python -X importtime``, its SQLite work timed in this process.
"""

from __future__ import annotations

import http.client
import re
import time
from urllib.parse import urlencode, urlsplit

from npl_agi.backends import open_cache
from npl_agi.config import load_config

from .harness import (
    ACCOUNT,
    AGI_SCRIPT,
    PORTED,
    ProcessAgi,
    bare_agi,
    baseline,
    check,
    log,
    mobiles,
    npl_agi,
    python_c,
    world,
)
from .report import Report

SECTION = "process"
TITLE = "2. Process AGI, whole process (spawn to exit, stdin from a file, one call at a time)"
BARE, OFF, HIT = "bare python3 -c pass", "kill switch (enabled = no)", "cache hit"
BARE_AGI, PYST2 = "bare AGI script (reads the environment, sets 13 constants)", "python3 -c 'import asterisk.agi'"
MISS_DEADLINE = 10.0  # seconds: a miss on a busy machine is timed, not refused as TIMEOUT
MISS, BASE = "cache miss (lookup at the simulator)", "baseline script (always asks)"
IMPORTS = "python3 -c 'import requests, phonenumbers'"  # what a miss loads that a hit does not
EMULATED = "cache hit through the AGI emulator (a reply per command)"
# Where a hit's imports go, by the top-level imports of `python -X importtime`, and two of the
# modules inside them (NESTED) wherever they are first imported.
IMPORT_GROUPS = {
    "asterisk.agi": "pyst2's asterisk.agi",
    "pprint": "  pprint, inside pyst2 (without dataclasses and inspect: see doors.process)",
    "sqlite3": "sqlite3",
    "npl_agi.config": "npl_agi.config (configparser)",
    "npl_agi": "npl_agi's other modules",
    "re": "  re, in the module that imports it first (pyst2 and configparser need it too)",
    "signal": "signal and enum, the script's own first import (pyst2 and re need them too)",
    "": "the interpreter's own (site, encodings)",
}
NESTED = ("pprint", "re")
_IMPORT_LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)")


def round_trip_ms(url: str, msisdn: str) -> float:
    """One single-number query to the simulator on a new connection, read to the end."""
    parts = urlsplit(url)
    body = urlencode({"user": ACCOUNT, "pass": ACCOUNT, "apiver": "2.4", "msisdn": msisdn})
    started = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", parts.path, body, {"Content-Type": "application/x-www-form-urlencoded"})
        conn.getresponse().read()
    finally:
        conn.close()
    return (time.perf_counter() - started) * 1000


def sqlite_ms(config: str, count: bool) -> float:
    """A hit's SQLite work in this process, as the script does it: open the cache, read the
    number, count the hit (``count``: a write transaction), close (the last connection to close
    checkpoints the WAL)."""
    cache = open_cache(load_config(config))
    started = time.perf_counter()
    cache.get_many([PORTED])
    if count:
        cache.record(hits=1, misses=0)
    cache.close()
    return (time.perf_counter() - started) * 1000


def import_ms(stderr: str) -> dict[str, float]:
    """A run's ``-X importtime`` report as milliseconds per group of ``IMPORT_GROUPS`` (each
    top-level import counts once, with everything it imported first), and ``total``."""
    out = dict.fromkeys([*IMPORT_GROUPS, "total"], 0.0)
    for cumulative, indent, name in _IMPORT_LINE.findall(stderr):
        ms = int(cumulative) / 1000
        if name in NESTED:
            out[name] += ms
        if indent:
            continue
        group = name if name in IMPORT_GROUPS else "npl_agi" if name.startswith("npl_agi.") else ""
        out[group] += ms
        out["total"] += ms
    return out


def ratios(samples: list[float], references: list[float]) -> list[float]:
    """Each round's sample over the same round's reference: the noise of a moment falls on both."""
    return [s / r for s, r in zip(samples, references, strict=True)]


def run(settings, report: Report) -> None:
    with world() as w:
        w.as_installed()
        fresh = mobiles(start=100_000)
        with (
            python_c("pass")(w) as bare,
            bare_agi(w) as floor,
            python_c("import asterisk.agi")(w) as pyst2,
            python_c("import requests, phonenumbers")(w) as imports,
            npl_agi("off", enabled=False)(w) as off,
            npl_agi(timeout=MISS_DEADLINE)(w) as agi,
            baseline(w) as base,
        ):
            check(agi.spawn(PORTED), "warm-up", NPL_SOURCE="api")  # the cache now holds PORTED
            hit = {"NPL_SOURCE": "cache", "NPL_MCCMNC": "23415"}
            # (label, contender, number to call, what the call must end with); EMULATED goes through the emulator
            cases = [
                (BARE, bare, lambda: PORTED, None),
                (HIT, agi, lambda: PORTED, hit),
                (BARE_AGI, floor, lambda: PORTED, {"NPL_MCCMNC": "23415"}),
                (PYST2, pyst2, lambda: PORTED, None),
                (IMPORTS, imports, lambda: PORTED, None),
                (OFF, off, lambda: PORTED, {"NPL_ERR": "DISABLED"}),
                (EMULATED, agi, lambda: PORTED, hit),
                (MISS, agi, lambda: next(fresh), {"NPL_SOURCE": "api"}),
                (BASE, base, lambda: PORTED, {"NPL_MCCMNC": "23415"}),
            ]
            wall: dict[str, list[float]] = {label: [] for label, *_ in cases}
            log(f"process: {settings.runs} timed rounds of {len(cases)} cases")
            for _ in range(settings.runs):
                for label, contender, number, expected in cases:
                    result = (contender.call if label == EMULATED else contender.spawn)(number())
                    if expected is not None:
                        check(result, label, **expected)
                    wall[label].append(result.seconds * 1000)
            memory = {
                label: [contender.peak_mib(number()) for _ in range(settings.memory_runs)]
                for label, contender, number, _ in cases
                if label != EMULATED
            }
            timed = ProcessAgi("importtime", str(AGI_SCRIPT), agi.env, [w.python, "-X", "importtime"])
            imported = [import_ms(check(timed.spawn(PORTED), "importtime", **hit).stderr) for _ in range(settings.runs)]
            sqlite = {count: [] for count in (False, True)}
            for _ in range(settings.runs):
                for count, samples in sqlite.items():
                    samples.append(sqlite_ms(agi.env["NPL_AGI_CONFIG"], count))
        rtt = [round_trip_ms(w.sim.url, next(fresh)) for _ in range(settings.runs)]

    times = {label: report.add(SECTION, f"{label}: wall time", "ms", s, latency=True) for label, s in wall.items()}
    for f in times.values():
        f.reference = times[BASE]
    per_pair = {
        floor: report.add(SECTION, f"cache hit / {floor}, pair by pair", "x", ratios(wall[HIT], wall[floor]))
        for floor in (BARE, BARE_AGI)
    }
    pyst2_ratio = report.add(SECTION, f"{PYST2} / {BARE}, pair by pair", "x", ratios(wall[PYST2], wall[BARE]))
    emulator = [e - h for e, h in zip(wall[EMULATED], wall[HIT], strict=True)]  # the same round's
    report.add(SECTION, "the AGI emulator's own cost (a hit through it - the same hit, pair by pair)", "ms", emulator)
    mems = {label: report.add(SECTION, f"{label}: peak memory", "MiB", s) for label, s in memory.items()}
    for f in mems.values():
        f.reference = mems[BASE]
    shares = {
        key: report.add(SECTION, f"imports on a hit (-X importtime): {label}", "ms", [r[key] for r in imported])
        for key, label in {"total": "all", **IMPORT_GROUPS}.items()
    }
    for f in shares.values():
        f.reference = shares["total"]
    read = report.add(SECTION, "a hit's SQLite work, in-process: open, read, close", "ms", sqlite[False])
    counted = report.add(
        SECTION, "a hit's SQLite work, in-process: open, read, count the hit, close", "ms", sqlite[True]
    )
    counted.reference = read
    trip = report.add(SECTION, "simulator round trip (1 number, new connection)", "ms", rtt, latency=True)

    ratio, bare_ms, hit_ms, miss = per_pair[BARE].median, times[BARE].median, times[HIT].median, times[MISS].median
    medians = {k: f.median for k, f in shares.items()} | {"read": read.median, "count": counted.median - read.median}
    cause = (
        "" if ratio <= 3 else f"; pyst2's import alone is {pyst2_ratio.median:.2f} x; " + where_the_time_goes(medians)
    )
    report.target(
        SECTION,
        "cache hit <= 3 x bare python3 -c pass",
        ratio <= 3,
        f"{ratio:.2f} x, the median of {len(wall[HIT])} pairs (hit {hit_ms:.1f} ms, bare {bare_ms:.1f} ms){cause}",
    )
    report.target(
        SECTION,
        "cache miss <= hit + simulator round trip + 15 ms",
        miss <= hit_ms + trip.median + 15,
        f"{miss:.1f} ms vs {hit_ms:.1f} + {trip.median:.1f} + 15 = {hit_ms + trip.median + 15:.1f} ms",
    )


def where_the_time_goes(ms: dict[str, float]) -> str:
    """The target's cause, from the medians of ``import_ms``."""
    return (
        f"a hit's imports take {ms['total']:.0f} ms under -X importtime: pyst2's asterisk.agi {ms['asterisk.agi']:.0f} "
        f"(its pprint {ms['pprint']:.0f}), signal {ms['signal']:.0f}, sqlite3 {ms['sqlite3']:.0f}, npl_agi.config "
        f"{ms['npl_agi.config']:.0f}, npl_agi's other modules {ms['npl_agi']:.0f} (re {ms['re']:.0f}), the "
        f"interpreter's own {ms['']:.0f}; SQLite in-process: {ms['read']:.1f} ms to read, {ms['count']:.1f} more "
        "to count the hit"
    )
