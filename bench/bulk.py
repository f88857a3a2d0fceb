"""Bulk: ``npl-agi lookup --file`` on a file of distinct numbers, into an empty cache.

Measured: numbers per second from start to exit, the process's peak memory, and the requests it
sent. The reference is the simulator-limited rate: a client that does nothing but send batches
of 1000 numbers and read the answers to ``ENDBATCH``, against the same simulator.
"""

from __future__ import annotations

import http.client
import itertools
import sys
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from npl_agi.config import NumberConfig
from npl_agi.core.number import normalise, validate

from .harness import ACCOUNT, BenchError, log, measured, mobiles, world
from .report import Report

SECTION = "bulk"
TITLE = "6. Bulk: npl-agi lookup --file, distinct numbers, empty cache"
BATCH = 1000


def simulator_rate(url: str, total: int) -> float:
    """Numbers per second a do-nothing client gets from the simulator, in batches of 1000."""
    parts = urlsplit(url)
    numbers = mobiles(start=5_000_000)
    started = time.perf_counter()
    for _ in range(0, total, BATCH):
        form = {"user": ACCOUNT, "pass": ACCOUNT, "apiver": "2.4", "msisdn": ",".join(itertools.islice(numbers, BATCH))}
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            conn.request("POST", parts.path, urlencode(form), {"Content-Type": "application/x-www-form-urlencoded"})
            if not conn.getresponse().read().endswith(b"ENDBATCH\n"):
                raise BenchError("the simulator's answer did not end with ENDBATCH")
        finally:
            conn.close()
    return total / (time.perf_counter() - started)


def validation_rate(total: int) -> float:
    """Numbers per second through normalise + validate (phonenumbers) alone, in this process:
    the part of a bulk lookup that does not depend on the service."""
    cfg = NumberConfig(country_code="44")
    numbers = list(itertools.islice(mobiles(start=3_000_000), total))
    validate(normalise(numbers[0], cfg), cfg)  # phonenumbers' metadata loaded before the clock starts
    started = time.perf_counter()
    for n in numbers:
        validate(normalise(n, cfg), cfg)
    return total / (time.perf_counter() - started)


def run(settings, report: Report) -> None:
    with world() as w:
        log(f"bulk: simulator-limited rate over {settings.raw_numbers:,} numbers")
        limit = report.add(SECTION, "simulator-limited rate (do-nothing client)", "numbers/s",
                           [simulator_rate(w.sim.url, settings.raw_numbers)])  # fmt: skip
        limit.reference = limit
        checks = min(settings.bulk_sizes[0], 20_000)
        report.add(SECTION, "number validation alone (normalise + phonenumbers)", "numbers/s",
                   [validation_rate(checks)], reference=limit)  # fmt: skip
        peaks = []
        for size in settings.bulk_sizes:
            numbers = Path(w.directory, f"numbers-{size}.txt")
            with numbers.open("w") as f:
                f.writelines(n + "\n" for n in itertools.islice(mobiles(start=1_000_000), size))
            w.sim.reset()
            config = w.config(f"bulk-{size}")
            log(f"bulk: npl-agi lookup --file with {size:,} numbers")
            command = [sys.executable, "-m", "npl_agi.admin.cli", "--config", str(config), "lookup"]
            seconds, peak, _ = measured([*command, "--file", str(numbers), "--output", "/dev/null"])
            numbers.unlink()
            stats = w.sim.stats()
            label = f"{size:,} numbers"
            rate = report.add(SECTION, f"{label}: throughput", "numbers/s", [size / seconds], reference=limit)
            peaks.append(report.add(SECTION, f"{label}: peak memory", "MiB", [peak]))
            report.add(SECTION, f"{label}: requests sent", "requests", [len(stats["requests"])])
            report.add(SECTION, f"{label}: credits spent", "credits", [len(stats["charged"])])
        for f in peaks:
            f.reference = peaks[0]

    report.target(
        SECTION,
        ">= 95 % of the simulator-limited rate",
        rate.ratio >= 0.95,
        f"{rate.median:,.0f} numbers/s = {rate.ratio:.0%} of {limit.median:,.0f} ({rate.label})",
    )
    growth = peaks[-1].median / peaks[0].median
    report.target(
        SECTION,
        "flat memory (peak within 1.2 x from the smallest file to the largest)",
        growth <= 1.2,
        f"{peaks[0].median:.0f} MiB -> {peaks[-1].median:.0f} MiB ({growth:.1f} x for "
        f"{settings.bulk_sizes[-1] // settings.bulk_sizes[0]} x the numbers)",
    )
