"""FastAGI: ``npl-agi serve`` under many calls at a time, as its own process on 127.0.0.1.

- Cache hits: calls/s and the time per call (connect to close) at 1, 10 and 100 connections at a
  time, next to a minimal asyncio FastAGI server that sets the same variables to constants
  (``bench/minimal_fastagi.py``, the reference: what any Python FastAGI server costs), measured
  with the same client in the same run, the two alternating round by round.
- Misses: the same, each call for a number nobody has looked up, the simulator taking 5 ms a
  number: the broker puts the misses of concurrent calls into one request.
- Many misses at once: distinct numbers all at the same moment (``timeout = 10``): the requests
  sent, the most connections the account had open at once (the service allows one), the time
  to the last answer; the same numbers as process AGIs (``agi-bin/npl-lookup.agi``), a bounded
  number of them running at once, are the reference.

The calls come from ``bench/fastagi_load.py`` in processes of their own, so the client's work
does not share the server's interpreter.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from .harness import (
    ACCOUNT,
    PORTED,
    ROOT,
    BenchError,
    check,
    child_env,
    fastagi,
    log,
    minimal_fastagi,
    mobiles,
    network_of,
    npl_agi,
    world,
)
from .report import Report

SECTION = "fastagi"
TITLE = "4. FastAGI: npl-agi serve, calls at a time (cache hits; misses at 5 ms a number)"
CONNECTIONS = (1, 10, 100)
OURS, MINIMAL = "npl-agi serve", "minimal server (constants)"
LINE_DELAY = 0.005
MANY_TIMEOUT = 10.0


def clients(port: int, connections: int, numbers: list[str], processes: int) -> dict:
    """Call each number once, ``connections`` at a time, from ``processes`` client processes."""
    processes = max(1, min(processes, connections))
    command = [sys.executable, "-m", "bench.fastagi_load", "127.0.0.1", str(port)]
    procs = [
        subprocess.Popen(
            [*command, str(len(range(i, connections, processes)))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=ROOT,
        )
        for i in range(processes)
    ]
    try:
        for i, p in enumerate(procs):
            p.stdin.write(json.dumps(numbers[i::processes]) + "\n")
            p.stdin.flush()
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise BenchError("a FastAGI load client did not start")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline() or "null") for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(60)
            p.stdout.close()
    if None in results:
        raise BenchError("a FastAGI load client failed")
    merged = {"seconds": [], "elapsed": max(r["elapsed"] for r in results), "npl_err": {}, "mccmnc": {}}
    for r in results:
        merged["seconds"] += r["seconds"]
        for key in ("npl_err", "mccmnc"):
            for value, n in r[key].items():
                merged[key][value] = merged[key].get(value, 0) + n
    return merged


def _expect(result: dict, name: str, **counts: dict) -> None:
    for key, expected in counts.items():
        if result[key] != expected:
            raise BenchError(f"{name}: {key} {result[key]}, expected {expected}")


def hits(settings, report: Report) -> dict[int, tuple]:
    """Cache hits against ``npl-agi serve`` and the minimal server, round by round."""
    rate = {(c, s): [] for c in CONNECTIONS for s in (OURS, MINIMAL)}
    per_call = {key: [] for key in rate}
    with world() as w, fastagi("hits")(w) as ours, minimal_fastagi(w) as minimal:
        check(ours.call(PORTED), "warm-up", NPL_SOURCE="api")  # the cache now holds PORTED
        for c, n in zip(CONNECTIONS, settings.fastagi_calls, strict=True):
            expected = {OURS: {"npl_err": {"": n}, "mccmnc": {"23415": n}}, MINIMAL: {"npl_err": {"1": n}}}
            log(f"fastagi: cache hits, {c} connections at a time, {settings.fastagi_rounds} x {n:,} calls each")
            for server in (ours, minimal):
                clients(server.port, c, [PORTED] * min(n, 10 * c), settings.load_clients)  # warm-up
            for _ in range(settings.fastagi_rounds):
                for name, server in ((OURS, ours), (MINIMAL, minimal)):
                    result = clients(server.port, c, [PORTED] * n, settings.load_clients)
                    _expect(result, f"{name}, {c} connections", **expected[name])
                    rate[(c, name)].append(n / result["elapsed"])
                    per_call[(c, name)] += [s * 1000 for s in result["seconds"]]
    figures = {}
    for c in CONNECTIONS:
        label = f"cache hits, {c} connection{'s' if c > 1 else ''}"
        ref_rate = report.add(SECTION, f"{label}, {MINIMAL}: calls/s", "calls/s", rate[(c, MINIMAL)])
        ref_rate.reference = ref_rate
        ours_rate = report.add(SECTION, f"{label}, {OURS}: calls/s", "calls/s", rate[(c, OURS)], reference=ref_rate)
        ref_call = report.add(SECTION, f"{label}, {MINIMAL}: per call", "ms", per_call[(c, MINIMAL)], latency=True)
        ref_call.reference = ref_call
        ours_call = report.add(SECTION, f"{label}, {OURS}: per call", "ms", per_call[(c, OURS)], latency=True,
                               reference=ref_call)  # fmt: skip
        figures[c] = (ours_rate, ours_call)
    return figures


def misses(settings, report: Report, hit_figures: dict[int, tuple]) -> None:
    """Misses at 1, 10, 100 connections; then many distinct misses at once, against process AGIs."""
    fresh = mobiles(start=400_000)
    with world(line_delay=LINE_DELAY) as w:
        with fastagi("misses")(w) as server:
            for c, n in zip(CONNECTIONS, settings.fastagi_miss_calls, strict=True):
                log(f"fastagi: misses, {c} connections at a time, {n:,} calls")
                numbers = list(itertools.islice(fresh, n))
                result = clients(server.port, c, numbers, settings.load_clients)
                label = f"misses, {c} connection{'s' if c > 1 else ''}"
                rate, per_call = hit_figures[c]
                report.add(SECTION, f"{label}: calls/s", "calls/s", [len(numbers) / result["elapsed"]], reference=rate)
                report.add(SECTION, f"{label}: per call", "ms", [s * 1000 for s in result["seconds"]], latency=True,
                           reference=per_call)  # fmt: skip
                report.add(SECTION, f"{label}: answered", "calls", [result["npl_err"].get("", 0)])

        many = settings.fastagi_at_once
        numbers = list(itertools.islice(fresh, many))
        w.sim.reset()
        log(f"fastagi: {many} distinct misses at once")
        with fastagi("many", timeout=MANY_TIMEOUT)(w) as server:
            result = clients(server.port, many, numbers, 1)
        ours = {
            "answered": result["npl_err"].get("", 0),
            **_account(w.sim.quiet()),
            "time to the last answer": result["elapsed"] * 1000,
        }
        numbers = list(itertools.islice(fresh, many))
        w.sim.reset()
        at_once = settings.agis_at_once
        log(f"fastagi: the same as {many} process AGIs, {at_once} at a time")
        with npl_agi("agis", timeout=MANY_TIMEOUT)(w) as agi, ThreadPoolExecutor(at_once) as pool:
            started = time.perf_counter()
            runs = list(pool.map(agi.call, numbers))
            elapsed = time.perf_counter() - started
        theirs = {
            "answered": sum(bool(network_of(r)) for r in runs),
            **_account(w.sim.quiet()),
            "time to the last answer": elapsed * 1000,
        }
    units = {"answered": "calls", "requests sent": "requests", "max connections per account": "conns",
             "time to the last answer": "ms"}  # fmt: skip
    head = f"{many} misses at once"
    for row, unit in units.items():
        ref = report.add(SECTION, f"{head}, process AGIs ({at_once} at a time): {row}", unit, [theirs[row]])
        ref.reference = ref
        report.add(SECTION, f"{head}, {OURS}: {row}", unit, [ours[row]], reference=ref)
    report.target(
        SECTION,
        f"{many} misses at once through npl-agi serve: one connection, every call answered",
        ours["max connections per account"] == 1 and ours["answered"] == many,
        f"{ours['max connections per account']:.0f} connection(s), {ours['answered']:.0f} of {many} answered, "
        f"{ours['requests sent']:.0f} requests, last answer after {ours['time to the last answer'] / 1000:.1f} s",
    )


def _account(stats: dict) -> dict[str, float]:
    """What the simulator saw of the account since its last reset."""
    most = stats["max_concurrent"].get(ACCOUNT, 0)
    return {"requests sent": len(stats["requests"]), "max connections per account": most}


def run(settings, report: Report) -> None:
    hit_figures = hits(settings, report)
    rate100, _ = hit_figures[100]
    _, call10 = hit_figures[10]
    report.target(
        SECTION,
        "FastAGI cache hits >= 1,000 calls/s at 100 connections",
        rate100.median >= 1000,
        f"{rate100.median:,.0f} calls/s",
    )
    report.target(
        SECTION, "FastAGI cache hits p99 < 20 ms at 10 connections", call10.p99 < 20, f"p99 {call10.p99:.1f} ms"
    )
    worst = min((hit_figures[c][0] for c in CONNECTIONS), key=lambda f: f.ratio)
    report.target(
        SECTION,
        "FastAGI cache hits >= 0.5 x the minimal server's calls/s",
        worst.ratio >= 0.5,
        f"lowest {worst.ratio:.2f} x ({worst.label})",
    )
    misses(settings, report, hit_figures)
