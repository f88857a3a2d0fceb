"""``python -m bench``: every benchmark, one table. Run from the repository root."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass

from . import bulk, burst, credit, doors, fastagi, local, pbx, process, sip
from .harness import log
from .report import Report

SECTIONS = {m.SECTION: m for m in (process, burst, fastagi, pbx, bulk, credit, sip, doors, local)}


@dataclass(frozen=True)
class Settings:
    """How much of everything: the full suite (under 5 minutes on 2 cores) or a smoke run."""

    runs: int = 30  # timed runs per process-AGI case
    memory_runs: int = 3
    bursts: tuple[int, ...] = (20, 50)
    burst_runs: int = 3
    bulk_sizes: tuple[int, ...] = (100_000, 1_000_000)
    raw_numbers: int = 100_000  # numbers a do-nothing client reads to find the simulator's rate
    calls: int = 20_000  # the credits replay: calls over distinct numbers
    numbers: int = 4_000
    pbx_calls: int = 30  # one at a time, for call-setup latency
    pbx_burst: int = 40  # at once, for calls/s
    fastagi_calls: tuple[int, ...] = (1000, 2000, 2000)  # cache hits a round at 1, 10, 100 connections
    fastagi_rounds: int = 3
    fastagi_miss_calls: tuple[int, ...] = (100, 300, 300)  # distinct misses at 1, 10, 100 connections
    fastagi_at_once: int = 500  # distinct misses all at once
    agis_at_once: int = 50  # process AGIs running at once for the same numbers
    load_clients: int = 1  # FastAGI client processes
    sip_rates: tuple[int, ...] = (10, 15, 20, 25, 50)  # SIP calls per second
    sip_seconds: float = 20  # at each rate
    door_bursts: tuple[int, ...] = (20, 100)  # calls at once through each door, cold then hot
    door_runs: int = 3
    local_numbers: int = 3_000_000  # numbers you know, imported into SQLite
    local_redis_numbers: int = 1_000_000  # the same, into Redis
    local_runs: int = 2  # imports of each, each beside its floor
    local_delta: int = 10_000  # lines of a day's delta


QUICK = Settings(
    runs=3,
    memory_runs=1,
    bursts=(10,),
    burst_runs=1,
    bulk_sizes=(2_000, 20_000),
    raw_numbers=20_000,
    calls=1_000,
    numbers=200,
    pbx_calls=3,
    pbx_burst=5,
    fastagi_calls=(200, 200, 200),
    fastagi_rounds=1,
    fastagi_miss_calls=(30, 30, 30),
    fastagi_at_once=40,
    agis_at_once=10,
    sip_rates=(5,),
    sip_seconds=2,
    door_bursts=(10,),
    door_runs=1,
    local_numbers=20_000,
    local_redis_numbers=10_000,
    local_runs=1,
    local_delta=1_000,
)


def machine() -> dict[str, str]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"nproc": str(os.cpu_count()), "cpu": cpu or platform.processor(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="npl-agi's benchmarks against the bundled simulator on 127.0.0.1, side by side with "
        "the naive script an admin would write (bench/baseline_agi.py). Prints one table: each figure's "
        "median (and p99 for latencies) and its ratio to the reference measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few repetitions, small files")
    parser.add_argument("--json", metavar="F", help="also write every figure's raw samples to F")
    parser.add_argument("--only", choices=list(SECTIONS), action="append", metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")  # fmt: skip
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    report = Report(machine=machine())
    started = time.monotonic()
    for name, section in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        log(f"{name} ...")
        began = time.monotonic()
        section.run(settings, report)
        report.seconds[name] = round(time.monotonic() - began, 1)
    titles = {name: s.TITLE for name, s in SECTIONS.items() if not args.only or name in args.only}
    m = report.machine
    quick = " (--quick)" if args.quick else ""
    print(f"npl-agi benchmarks{quick}: {m['nproc']} CPUs, {m['cpu']}, Python {m['python']}")
    print(report.table(titles))
    each = ", ".join(f"{name} {s:.0f} s" for name, s in report.seconds.items())
    print(f"whole run: {time.monotonic() - started:.0f} s ({each})")
    if args.json:
        report.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
