"""Bursts through both doors: the process script against ``npl-agi serve``, N calls at once.

The same burst, N calls started at the same moment, each for a distinct number, goes through
each door as a user runs it: the process script (``agi-bin/npl-lookup.agi``) as whole processes
on an interpreter as install.sh leaves one, timed from the spawn to the exit (``ProcessAgi.spawn``:
stdin from a file holding the conversation), and ``npl-agi serve`` as a process of its own,
started before the burst, the calls coming over FastAGI from a client process of their own
(``bench/fastagi_load.py``), timed from the connect to the close. ``[api] timeout`` is the
shipped 2 s.

Each door's burst runs twice. Cold: numbers nobody has looked up, into an empty cache (the
process script's misses wait in the cache file's queue for the one asker holding the account's
connection; the server's broker puts them into shared requests). Hot: the same numbers again,
every one a cache hit (what the cold burst left unasked, a call shed for starting too late, is
looked up with ``npl-agi lookup`` in between, outside the figures). Against an instant service
and one taking 0.5 s a request. For each burst: the calls answered (a network and no
``NPL_ERR``), the worst and the median call, the requests the simulator received (the asker's
that outlive their calls too) and the credits it charged. Each process-script figure's ratio is
to the server's of the same burst in the same run: the server is the floor.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import subprocess
import sys
from types import SimpleNamespace

from .burst import burst
from .fastagi import clients
from .harness import BenchError, check, child_env, fastagi, log, mobiles, network_of, npl_agi, world
from .report import Report

SECTION = "doors"
TITLE = "9. Bursts through both doors: process script vs npl-agi serve, distinct numbers at once (timeout = 2)"
SERVICES = {"instant service": 0.0, "0.5 s a request": 0.5}
SERVER, PROCESS = "npl-agi serve", "process script"
ROWS = {
    "answered": "calls",
    "worst call": "ms",
    "p50 call": "ms",
    "requests sent": "requests",
    "credits spent": "credits",
}


def process_burst(w, name: str, numbers: list[str]) -> tuple[int, list[float]]:
    """The process script's calls, all at once: how many got their network, each call's seconds."""
    with npl_agi(name)(w) as agi:
        runs = burst(SimpleNamespace(call=agi.spawn), numbers)
    for run in runs:
        check(run, f"{PROCESS}, {len(numbers)} calls")
    return sum(bool(network_of(r)) for r in runs), [r.seconds for r in runs]


def server_burst(server, numbers: list[str]) -> tuple[int, list[float]]:
    """The same over FastAGI, every call on a connection of its own, all at once."""
    result = clients(server.port, len(numbers), numbers, 1)
    got = sum(n for network, n in result["mccmnc"].items() if network not in ("", "(not set)"))
    return min(got, result["npl_err"].get("", 0)), result["seconds"]


def warm(w, name: str, numbers: list[str]) -> None:
    """Cache whatever the cold burst left unasked, so that the hot burst is all cache hits."""
    command = [sys.executable, "-m", "npl_agi.admin.cli", "--config", str(w.config(name)), "lookup", "--timeout", "30"]
    done = subprocess.run([*command, *numbers], capture_output=True, text=True, env=child_env(), timeout=120)
    if done.returncode != 0:
        raise BenchError(f"the warm-up lookup of {name} failed: {done.stderr[-300:]}")


def figures(answered: int, seconds: list[float], stats: dict) -> dict[str, float]:
    """The ROWS of one burst, from its calls and the simulator's records since its start."""
    return {
        "answered": answered,
        "worst call": max(seconds) * 1000,
        "p50 call": statistics.median(seconds) * 1000,
        "requests sent": len(stats["requests"]),
        "credits spent": len(stats["charged"]),
    }


def one_door(w, door: str, name: str, numbers: list[str], samples: dict, key: tuple) -> None:
    """A door's cold burst, then its hot one, on a cache of its own (``name``)."""
    with fastagi(name)(w) if door == SERVER else contextlib.nullcontext() as server:
        for temperature in ("cold", "hot"):
            log(f"doors: {key[0]}, {len(numbers)} calls, {temperature}, {door}")
            if temperature == "hot":
                warm(w, name, numbers)
            w.sim.reset()
            if door == SERVER:
                answered, seconds = server_burst(server, numbers)
            else:
                answered, seconds = process_burst(w, name, numbers)
            for row, value in figures(answered, seconds, w.sim.quiet()).items():
                samples[(*key, temperature, door, row)].append(value)


def run(settings, report: Report) -> None:
    cases = itertools.product(SERVICES, settings.door_bursts, ("cold", "hot"), (SERVER, PROCESS), ROWS)
    samples: dict[tuple, list[float]] = {case: [] for case in cases}
    numbers = mobiles(start=600_000)
    for service, delay in SERVICES.items():
        with world(request_delay=delay) as w:
            w.as_installed()
            for n in settings.door_bursts:
                for i in range(settings.door_runs):
                    for door in (SERVER, PROCESS):
                        name = f"doors-{delay:g}-{n}-{i}-{'serve' if door == SERVER else 'process'}"
                        one_door(w, door, name, list(itertools.islice(numbers, n)), samples, (service, n))

    for service in SERVICES:
        for n in settings.door_bursts:
            for temperature in ("cold", "hot"):
                head = f"{n} calls {temperature}, {service}"
                for row, unit in ROWS.items():
                    floor = report.add(SECTION, f"{head}, {SERVER}: {row}", unit,
                                       samples[(service, n, temperature, SERVER, row)])  # fmt: skip
                    floor.reference = floor
                    report.add(SECTION, f"{head}, {PROCESS}: {row}", unit,
                               samples[(service, n, temperature, PROCESS, row)], reference=floor)  # fmt: skip
