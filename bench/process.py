"""Process AGI, whole process: what one call costs when Asterisk starts a script for it.

Every case is spawned as Asterisk spawns it (environment block on stdin, over pipes, through the
emulator) and timed from the spawn to the process's exit. The cases run round-robin, so the
machine's noise falls on all of them alike. Peak memory is measured in separate runs, because
the small process that measures it would add its own start-up to the wall time.
"""

from __future__ import annotations

import http.client
import time
from urllib.parse import urlencode, urlsplit

from .harness import ACCOUNT, PORTED, baseline, check, log, mobiles, npl_agi, python_c, world
from .report import Report

SECTION = "process"
TITLE = "2. Process AGI, whole process (spawn to exit, one call at a time)"
BARE, OFF, HIT = "bare python3 -c pass", "kill switch (enabled = no)", "cache hit"
MISS, BASE = "cache miss (lookup at the simulator)", "baseline script (always asks)"
IMPORTS = "python3 -c 'import requests, phonenumbers'"  # what a miss loads that a hit does not


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


def run(settings, report: Report) -> None:
    with world() as w:
        fresh = mobiles(start=100_000)
        with (
            python_c("pass")(w) as bare,
            python_c("import requests, phonenumbers")(w) as imports,
            npl_agi("off", enabled=False)(w) as off,
            npl_agi()(w) as agi,
            baseline(w) as base,
        ):
            check(agi.call(PORTED), "warm-up", NPL_SOURCE="api")  # the cache now holds PORTED
            # (label, contender, number to call, what the call must end with)
            cases = [
                (BARE, bare, lambda: PORTED, None),
                (IMPORTS, imports, lambda: PORTED, None),
                (OFF, off, lambda: PORTED, {"NPL_ERR": "DISABLED"}),
                (HIT, agi, lambda: PORTED, {"NPL_SOURCE": "cache", "NPL_MCCMNC": "23415"}),
                (MISS, agi, lambda: next(fresh), {"NPL_SOURCE": "api"}),
                (BASE, base, lambda: PORTED, {"NPL_MCCMNC": "23415"}),
            ]
            wall: dict[str, list[float]] = {label: [] for label, *_ in cases}
            log(f"process: {settings.runs} timed runs of {len(cases)} cases")
            for _ in range(settings.runs):
                for label, contender, number, expected in cases:
                    result = contender.call(number())
                    if expected is not None:
                        check(result, label, **expected)
                    wall[label].append(result.seconds * 1000)
            memory = {
                label: [contender.peak_mib(number()) for _ in range(settings.memory_runs)]
                for label, contender, number, _ in cases
            }
        rtt = [round_trip_ms(w.sim.url, next(fresh)) for _ in range(settings.runs)]

    times = {label: report.add(SECTION, f"{label}: wall time", "ms", s, latency=True) for label, s in wall.items()}
    for f in times.values():
        f.reference = times[BASE]
    mems = {label: report.add(SECTION, f"{label}: peak memory", "MiB", s) for label, s in memory.items()}
    for f in mems.values():
        f.reference = mems[BASE]
    trip = report.add(SECTION, "simulator round trip (1 number, new connection)", "ms", rtt, latency=True)

    bare_ms, hit, miss = times[BARE].median, times[HIT].median, times[MISS].median
    report.target(
        SECTION,
        "cache hit <= 3 x bare python3 -c pass",
        hit <= 3 * bare_ms,
        f"{hit:.1f} ms = {hit / bare_ms:.2f} x {bare_ms:.1f} ms",
    )
    report.target(
        SECTION,
        "cache miss <= hit + simulator round trip + 15 ms",
        miss <= hit + trip.median + 15,
        f"{miss:.1f} ms vs {hit:.1f} + {trip.median:.1f} + 15 = {hit + trip.median + 15:.1f} ms",
    )
