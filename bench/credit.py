"""Credits: a day-and-a-bit of calls replayed through the real lookup path.

A generated call log (Zipf-like popularity: the k-th most called number is called about 1/k as
often as the first; dialled in the forms phones send: 07…, +44…, 0044…, 44…) spread over two
cache TTL windows is replayed through ``npl_agi.chain.lookup.Lookup`` with a real SQLite cache whose
clock is the log's, and a real client asking the simulator. Credits are what the simulator
charged. The naive script spends one per call; the floor is the distinct numbers of each window.
"""

from __future__ import annotations

import random
import time

from npl_agi.askers.direct import lookup_here
from npl_agi.backends import SqliteCache
from npl_agi.config import load_config

from .harness import BenchError, log, mobiles, world
from .report import Report

SECTION = "credits"
TITLE = "7. Credits: replayed call log (Zipf-like popularity, two TTL windows)"
TTL = 86400.0
WINDOWS = 2
FORMS = ("0{}", "+44{}", "0044{}", "44{}")  # how the national part is dialled


def call_log(calls: int, numbers: int, seed: int = 11) -> list[tuple[float, str, str]]:
    """(time, dialled, msisdn) for each call, in time order, reproducible from ``seed``."""
    rng = random.Random(seed)
    pool = [m for _, m in zip(range(numbers), mobiles(start=300_000), strict=False)]
    picks = rng.choices(pool, weights=[1 / (k + 1) for k in range(numbers)], k=calls)
    times = sorted(rng.uniform(0, WINDOWS * TTL) for _ in range(calls))
    return [(t, rng.choice(FORMS).format(m[2:]), m) for t, m in zip(times, picks, strict=True)]


def floor_of(log_: list[tuple[float, str, str]]) -> int:
    """Credits no cache can beat: each number once in each TTL window it is called in."""
    return len({(int(t // TTL), m) for t, _, m in log_})


def run(settings, report: Report) -> None:
    calls = call_log(settings.calls, settings.numbers)
    with world() as w:
        w.ttl = TTL
        config = load_config(str(w.config("credits")))
        now = [0.0]
        lookup = lookup_here(config, cache=SqliteCache(config.cache, clock=lambda: now[0]))
        log(f"credits: replaying {len(calls):,} calls over {settings.numbers:,} numbers")
        started = time.perf_counter()
        for t, dialled, msisdn in calls:
            now[0] = t
            answer = lookup.one(dialled)
            if answer.error or answer.msisdn != msisdn:
                raise BenchError(f"credits: {dialled} ended {answer.error} {answer.error_name} ({answer.msisdn})")
        seconds = time.perf_counter() - started
        spent = len(w.sim.stats()["charged"])

    naive = report.add(SECTION, "baseline script: credits (one per call)", "credits", [len(calls)])
    naive.reference = naive
    ours = report.add(SECTION, "npl-agi: credits", "credits", [spent], reference=naive)
    floor = report.add(SECTION, "floor: distinct numbers per TTL window", "credits", [floor_of(calls)], reference=naive)
    report.add(SECTION, "npl-agi: calls replayed per second (lookup path)", "calls/s", [len(calls) / seconds])
    report.target(
        SECTION,
        "credits <= 1.05 x the floor",
        ours.median <= 1.05 * floor.median,
        f"{ours.median:,.0f} credits = {ours.median / floor.median:.3f} x the floor of {floor.median:,.0f}",
    )
