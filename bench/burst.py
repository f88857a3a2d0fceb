"""Burst: N calls at the same moment, each for a distinct number nobody has looked up yet.

The simulator takes 0.3 s per request (connection, TLS, SS7 set-up) plus 10 ms per number, as
the real service does on a bad day. For each contender: how many calls got their network, how
many ended in ``TIMEOUT`` or another failure, the slowest call, the credits spent and the most
connections the account had open at once (the service allows one). The contenders: the process
AGI (a process per call; its misses wait in the cache file's queue, asked by one asker per
connection slot), the FastAGI server (``npl-agi serve``: the broker puts the calls' misses into
the same queue) and the naive script.
Each npl-agi run starts with an empty cache; the server is started before the burst.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from .harness import ACCOUNT, baseline, fastagi, log, mobiles, network_of, npl_agi, world
from .report import Report

SECTION = "burst"
TITLE = "3. Burst: simultaneous calls, distinct uncached numbers (0.3 s a request + 10 ms a number)"
REQUEST_DELAY, LINE_DELAY = 0.3, 0.01
# Name -> factory for one run, given the run's name for its own (empty) cache file.
CONTENDERS = {"npl-agi": npl_agi, "npl-agi serve": fastagi, "baseline": lambda run: baseline}
TIMEOUT = 2.0  # [api] timeout, the default
ROWS = {
    "answered": "calls",
    "TIMEOUT": "calls",
    "other failure": "calls",
    "slowest call (spawn to exit, connect to close)": "ms",
    "worst NPL_LOOKUP_MS": "ms",  # npl-agi's own measure of its lookup; the baseline has none
    "credits spent": "credits",
    "max connections per account": "conns",
}


def burst(contender, numbers: list[str]) -> list:
    """Every call started at once (a barrier), as a burst of calls reaches Asterisk."""
    gate = threading.Barrier(len(numbers))

    def one(number: str):
        gate.wait()
        return contender.call(number)

    with ThreadPoolExecutor(max_workers=len(numbers)) as pool:
        return list(pool.map(one, numbers))


def outcome(runs: list, stats: dict) -> dict[str, float]:
    """The ROWS of one burst, from its calls and the simulator's records."""
    errors = [r.variables.get("NPL_ERR", "") for r in runs]
    answered = [bool(network_of(r)) for r in runs]
    return {
        "answered": sum(answered),
        "TIMEOUT": errors.count("TIMEOUT"),
        "other failure": sum(not ok and e != "TIMEOUT" for ok, e in zip(answered, errors, strict=True)),
        "slowest call (spawn to exit, connect to close)": max(r.seconds for r in runs) * 1000,
        "worst NPL_LOOKUP_MS": max(int(r.variables.get("NPL_LOOKUP_MS") or 0) for r in runs),
        "credits spent": len(stats["charged"]),
        "max connections per account": stats["max_concurrent"].get(ACCOUNT, 0),
    }


def run(settings, report: Report) -> None:
    samples = {(n, name, row): [] for n in settings.bursts for name in CONTENDERS for row in ROWS}
    numbers = mobiles(start=200_000)
    with world(request_delay=REQUEST_DELAY, line_delay=LINE_DELAY) as w:
        for n in settings.bursts:
            for i in range(settings.burst_runs):
                for name, factory in CONTENDERS.items():
                    log(f"burst: {n} calls, {name}, run {i + 1}")
                    w.sim.reset()
                    with factory(f"burst-{n}-{i}")(w) as contender:
                        runs = burst(contender, [next(numbers) for _ in range(n)])
                    measured = outcome(runs, w.sim.quiet())
                    for row, value in measured.items():
                        samples[(n, name, row)].append(value)

    for n in settings.bursts:
        for row, unit in ROWS.items():
            names = [name for name in CONTENDERS if row != "worst NPL_LOOKUP_MS" or name != "baseline"]
            figures = {name: report.add(SECTION, f"{n} calls, {name}: {row}", unit, samples[(n, name, row)])
                       for name in names}  # fmt: skip
            for f in figures.values():
                f.reference = figures.get("baseline")
    n = min(settings.bursts)
    served = [(samples[(n, "npl-agi serve", "answered")][i], samples[(n, "npl-agi serve", "worst NPL_LOOKUP_MS")][i])
              for i in range(settings.burst_runs)]  # fmt: skip
    report.target(
        SECTION,
        f"burst of {n}: every npl-agi serve call answered within timeout = {TIMEOUT:g}",
        all(answered == n and worst <= TIMEOUT * 1000 for answered, worst in served),
        "; ".join(f"{answered:.0f} of {n} answered, worst NPL_LOOKUP_MS {worst:,.0f}" for answered, worst in served),
    )
