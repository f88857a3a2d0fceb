"""Numbers you know at national scale: ``npl-agi local import`` of millions of numbers, a
``--replace`` while calls run, a day's delta, and what a call costs with millions held.

Every import runs as an admin runs it, a whole process timed from spawn to exit under
``peak_rss.py``, and beside it, in the same run, its floor (``local_floor.py``): a bare script
storing the same rows into a table or a hash of the same shape, run the same way, checking
nothing. Calls are process-script calls spawned as in the process section, on the interpreter
install.sh leaves; a call with millions held is compared with the same call with ten held,
pair by pair. Redis runs in a ``redis-server`` of the section's own on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from npl_agi.admin.localdata import BadLines, known_key, lines_of, row_of
from npl_agi.backends.base import KNOWN_NUMBERS
from npl_agi.backends.redis import RedisCache
from npl_agi.config import NumberConfig
from npl_agi.doubles.emulator import AgiRun

from .harness import PORTED, ROOT, BenchError, ProcessAgi, World, check, log, measured, mobiles, stop, world
from .process import ratios
from .report import Report

SECTION = "local"
TITLE = "10. Numbers you know at national scale (npl-agi local import, process-script calls)"
FLOOR = ROOT / "bench" / "local_floor.py"
NETWORKS = ("23410", "23415", "23420", "23430")
CHECKED = 200_000  # lines read and checked in-process to find what checking costs
ROUNDS = 3  # times the process section's rounds of held / ten held: a small ratio, in noise of 15 ms a call
SAMPLES = 1000  # numbers of a set kept to be called
# Seconds between two calls during --replace: on SQLite a call every 50 ms (some 25 ms of CPU each);
# on Redis one every 200 ms, since each process-script call there spends some 130 ms of CPU importing
# redis-py, and 20 a second would need more cores than the machine the figures are for has.
INTERVAL = {"SQLite": 0.05, "Redis": 0.2}
LEAD = 1.0  # seconds of calls before the --replace starts and after it ends
SQLITE_S, PEAK_MB, REDIS_S, DELTA_S, HELD_RATIO = 90, 200, 60, 5, 1.1  # the targets
MB = 1024 * 1024 / 1e6  # MiB -> MB
KNOWN_KEY = RedisCache.local_key(KNOWN_NUMBERS)  # the hash npl-agi keeps numbers you know in


def network(position: int, shift: int = 0) -> str:
    """The network of the set's number at ``position``; ``shift`` 1 is the replacing set's."""
    return NETWORKS[(position + shift) % len(NETWORKS)]


def write_set(path: Path, total: int, shift: int = 0) -> list[tuple[str, int]]:
    """The first ``total`` numbers of ``mobiles()`` as ``number,mccmnc`` lines; returns
    ``SAMPLES`` of them spread over the file, with their positions."""
    every, kept = max(1, total // SAMPLES), []
    with path.open("w") as f:
        for i, number in enumerate(itertools.islice(mobiles(), total)):
            f.write(f"{number},{network(i, shift)}\n")
            if i % every == 0:
                kept.append((number, i))
    return kept


def write_delta(path: Path, total: int, lines: int) -> None:
    """A day's changes to the set of ``total``: half the lines move a held number to another
    network, a quarter remove one, a quarter add a number the set does not hold."""
    step = max(2, total // (lines // 2))
    with path.open("w") as f:
        changed = removed = 0
        for i, number in enumerate(itertools.islice(mobiles(), total)):
            if i % step == 0 and changed < lines // 2:
                f.write(f"{number},{network(i, 2)}\n")
                changed += 1
            elif i % step == step // 2 and removed < lines // 4:
                f.write(f"{number},-\n")
                removed += 1
        for number in itertools.islice(mobiles(start=50_000_000), lines - changed - removed):
            f.write(f"{number},{network(0)}\n")


def checking_s(path: Path, total: int) -> float:
    """Seconds npl-agi takes to read and check the file's lines alone (CSV, each number against the
    numbering plan, each network), in this process over ``CHECKED`` lines, scaled to ``total``: the
    part of an import the floor does not do at all."""
    row = row_of(known_key(NumberConfig(country_code="44")))
    with path.open() as f:
        lines = list(itertools.islice(f, CHECKED))
    bad = BadLines()
    started = time.perf_counter()
    for _, cells in lines_of(lines, bad):
        row(cells)
    seconds = time.perf_counter() - started
    if bad.count:
        raise BenchError(f"{bad.count} bad lines in {path}")
    return seconds * total / len(lines)


def npl_agi(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "npl_agi.admin.cli", "--config", str(config), *args]


def held_bytes(config: Path) -> float:
    """Bytes a number held, as ``npl-agi cache stats`` reports them."""
    return json.loads(measured(npl_agi(config, "cache", "stats", "--json"))[2])["bytes_per_number"]


def calls_during(agi: ProcessAgi, numbers: list[str], command: list[str], interval: float) -> tuple:
    """``command`` run while ``agi`` is called every ``interval`` s for ``numbers`` in turn, from
    ``LEAD`` before it starts to ``LEAD`` after it ends: its seconds, its peak MiB, and each
    call's (number, ``AgiRun``)."""
    done, calls = threading.Event(), []

    def caller() -> None:
        with ThreadPoolExecutor(max_workers=32) as pool:
            at = time.monotonic()
            for number in itertools.cycle(numbers):
                if done.is_set():
                    break
                calls.append((number, pool.submit(agi.spawn, number)))
                at += interval
                time.sleep(max(0.0, at - time.monotonic()))

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        time.sleep(LEAD)
        seconds, peak, _ = measured(command)
        time.sleep(LEAD)
    finally:
        done.set()
        thread.join()
    return seconds, peak, [(number, future.result()) for number, future in calls]


def replace_under_calls(w: World, report: Report, name: str, config: Path, samples: list, new: Path) -> tuple:
    """``npl-agi local import --replace NEW`` while a process-script call for one of ``samples``
    starts every ``INTERVAL`` of the backend (the name's first word): the calls' wall times by
    what answered them (``answered``), and the import's seconds."""
    interval = INTERVAL[name.split(",")[0]]
    log(f"local: {name}: --replace while a process-script call starts every {interval * 1000:.0f} ms")
    agi = ProcessAgi("process script", str(ROOT / "agi-bin" / "npl-lookup.agi"), w.env(config), [w.python])
    positions = dict(samples)
    called = random.Random(26).sample(list(positions), len(positions))
    seconds, _, calls = calls_during(agi, called, npl_agi(config, "local", "import", "--replace", str(new)), interval)
    report.add(SECTION, f"{name}: --replace under calls", "s", [seconds])
    by = answered(calls, positions)
    for which, label in (("old", "by the old set"), ("new", "by the new set"), ("other", "otherwise")):
        report.add(SECTION, f"{name}: calls during --replace answered {label}", "calls", [len(by[which])])
    answers = by["old"] + by["new"] or [0]
    report.add(SECTION, f"{name}: calls during --replace: wall time", "ms", answers, latency=True)
    return by, seconds


def answered(calls: list[tuple[str, AgiRun]], positions: dict[str, int]) -> dict[str, list[float]]:
    """Each call's wall time (ms), by what answered it: ``old`` or ``new`` set, or ``other``."""
    out: dict[str, list[float]] = {"old": [], "new": [], "other": []}
    for number, run in calls:
        got = run.variables.get("NPL_MCCMNC") if run.variables.get("NPL_SOURCE") == "local" else None
        which = {network(positions[number]): "old", network(positions[number], 1): "new"}.get(got, "other")
        if run.returncode != 0:
            which = "other"
        out[which].append(run.seconds * 1000)
    return out


def pairs(runs: int, cases: list[tuple[str, ProcessAgi, str, dict]]) -> dict[str, list[float]]:
    """``runs`` rounds of every case, round-robin: each call's wall time (ms) by case."""
    wall: dict[str, list[float]] = {label: [] for label, *_ in cases}
    for _ in range(runs):
        for label, agi, number, expected in cases:
            wall[label].append(check(agi.spawn(number), label, **expected).seconds * 1000)
    return wall


def held_ratios(w: World, settings, report: Report, name: str, configs: tuple[Path, Path], number: tuple) -> float:
    """A local answer and a cache hit through the process script, with the set held (``configs[0]``)
    and with ten numbers held (``configs[1]``), pair by pair; returns the local answer's ratio."""
    many, ten = (
        ProcessAgi(f"{name}, {c.stem}", str(ROOT / "agi-bin" / "npl-lookup.agi"), w.env(c), [w.python]) for c in configs
    )
    local = {"NPL_SOURCE": "local", "NPL_MCCMNC": network(number[1], 1)}
    hit = {"NPL_SOURCE": "cache", "NPL_MCCMNC": "23415"}
    for agi in (many, ten):
        check(agi.spawn(PORTED), "warm-up", NPL_SOURCE="api")
    cases = [
        ("local answer, set held", many, number[0], local),
        ("local answer, ten held", ten, number[0], local),
        ("cache hit, set held", many, PORTED, hit),
        ("cache hit, ten held", ten, PORTED, hit),
    ]
    wall = pairs(ROUNDS * settings.runs, cases)
    times = {
        label: report.add(SECTION, f"{name}: {label}: wall time", "ms", s, latency=True) for label, s in wall.items()
    }
    for what in ("local answer", "cache hit"):
        times[f"{what}, set held"].reference = times[f"{what}, ten held"]
    ratio = report.add(
        SECTION,
        f"{name}: local answer, set held / ten held, pair by pair",
        "x",
        ratios(wall["local answer, set held"], wall["local answer, ten held"]),
    )
    report.add(
        SECTION,
        f"{name}: cache hit, set held / ten held, pair by pair",
        "x",
        ratios(wall["cache hit, set held"], wall["cache hit, ten held"]),
    )
    return ratio.median


def middle(samples: list[tuple[str, int]]) -> tuple[str, int]:
    """The number called with the set held and with ten held (both hold it)."""
    return samples[len(samples) // 2]


def ten_of(w: World, name: str, samples: list[tuple[str, int]], cache: str = "") -> Path:
    """A configuration holding ten of ``samples`` around ``middle(samples)``, with the replacing
    set's networks."""
    config, path, i = w.config(name, cache=cache), w.directory / f"{name}.csv", len(samples) // 2
    path.write_text("".join(f"{n},{network(p, 1)}\n" for n, p in samples[i - 5 : i + 5]))
    measured(npl_agi(config, "local", "import", str(path)))
    return config


def imports(report: Report, name: str, runs: int, floor: list[str], ours: list[str], before) -> tuple:
    """``runs`` pairs of the floor's import and npl-agi's, each after ``before(who)`` empties its
    target: npl-agi's time and peak memory (figures against the floor's)."""
    seconds: dict[str, list[float]] = {"floor": [], "npl-agi": []}
    peaks: dict[str, list[float]] = {"floor": [], "npl-agi": []}
    for _ in range(runs):
        for who, command in (("floor", floor), ("npl-agi", ours)):
            before(who)
            s, peak, _ = measured(command)
            seconds[who].append(s)
            peaks[who].append(peak * MB)
    took = {who: report.add(SECTION, f"{name}, {who}: import", "s", s) for who, s in seconds.items()}
    took["npl-agi"].reference = took["floor"]
    peak = {who: report.add(SECTION, f"{name}, {who}: peak memory", "MB", p) for who, p in peaks.items()}
    peak["npl-agi"].reference = peak["floor"]
    return took["npl-agi"], peak["npl-agi"]


def run(settings, report: Report) -> None:
    with world() as w:
        w.as_installed()
        total, lines = settings.local_numbers, settings.local_delta
        sqlite_name = f"SQLite, {total:,} numbers"
        old, new, delta = w.directory / "old.csv", w.directory / "new.csv", w.directory / "delta.csv"
        samples = write_set(old, total)
        write_set(new, total, shift=1)
        log(f"local: {settings.local_runs} imports of {total:,} numbers into SQLite, each beside its floor")
        held = w.config("held")
        floor_db = w.directory / "floor.sqlite"

        def empty(who: str) -> None:
            target = floor_db if who == "floor" else w.directory / "held.sqlite"
            for path in (target, Path(f"{target}-wal"), Path(f"{target}-shm")):
                path.unlink(missing_ok=True)

        took, peak = imports(
            report,
            sqlite_name,
            settings.local_runs,
            [sys.executable, str(FLOOR), "sqlite", str(old), str(floor_db)],
            npl_agi(held, "local", "import", str(old)),
            empty,
        )
        checked = [checking_s(old, total) for _ in range(settings.local_runs)]
        report.add(
            SECTION, f"{sqlite_name}, npl-agi: reading and checking the lines alone", "s", checked, reference=took
        )
        report.add(SECTION, f"{sqlite_name}, floor: bytes a number on disk", "bytes", [floor_db.stat().st_size / total])
        report.add(SECTION, f"{sqlite_name}, npl-agi: bytes a number (cache stats)", "bytes", [held_bytes(held)])

        replaced = {"SQLite": replace_under_calls(w, report, sqlite_name, held, samples, new)}

        log(f"local: process-script calls with {total:,} numbers held and with ten held")
        ten = ten_of(w, "ten", samples)
        held_ratio = held_ratios(w, settings, report, sqlite_name, (held, ten), middle(samples))

        log(f"local: a delta of {lines:,} lines")
        write_delta(delta, total, lines)
        delta_s = {"SQLite": measured(npl_agi(held, "local", "import", "--delta", str(delta)))[0]}
        floor_delta = measured([sys.executable, str(FLOOR), "sqlite", str(delta), str(floor_db)])[0]
        floor_fig = report.add(SECTION, f"{sqlite_name}, floor: a delta of {lines:,} lines", "s", [floor_delta])
        report.add(
            SECTION,
            f"{sqlite_name}, npl-agi: a delta of {lines:,} lines",
            "s",
            [delta_s["SQLite"]],
            reference=floor_fig,
        )
        for path in (w.directory / "held.sqlite", floor_db, new):
            path.unlink(missing_ok=True)
        redis_took = redis_section(w, settings, report, delta_s, replaced)

    report.target(
        SECTION,
        f"{total:,} numbers imported with SQLite in <= {SQLITE_S} s",
        took.median <= SQLITE_S,
        f"{took.median:.1f} s, {took.ratio:.2f} x its floor (a bare executemany)",
    )
    report.target(
        SECTION,
        f"SQLite import of {total:,} numbers: peak memory <= {PEAK_MB} MB",
        peak.median <= PEAK_MB,
        f"{peak.median:.0f} MB, {peak.ratio:.2f} x its floor's",
    )
    redis_n = settings.local_redis_numbers
    report.target(
        SECTION,
        f"{redis_n:,} numbers imported with Redis in <= {REDIS_S} s",
        redis_took is not None and redis_took.median <= REDIS_S,
        "not measured: no redis-server found"
        if redis_took is None
        else f"{redis_took.median:.1f} s, {redis_took.ratio:.2f} x its floor (a bare redis-py pipeline)",
    )
    report.target(
        SECTION,
        f"--replace of {total:,} numbers (SQLite; {redis_n:,} on Redis), a process-script call every 50 ms "
        "(200 ms on Redis): every call answered locally, by the old set or the new one",
        all(by["old"] and by["new"] and not by["other"] for by, _ in replaced.values()),
        "; ".join(
            f"{backend}: {len(by['old'])} calls by the old set, {len(by['new'])} by the new, {len(by['other'])} "
            f"otherwise, in {seconds:.1f} s" + ("" if by["old"] and by["new"] else " (the swap fell outside the calls)")
            for backend, (by, seconds) in replaced.items()
        ),
    )
    report.target(
        SECTION,
        f"a delta of {lines:,} lines applied in <= {DELTA_S} s",
        max(delta_s.values()) <= DELTA_S,
        ", ".join(f"{k} {v:.2f} s" for k, v in delta_s.items()),
    )
    report.target(
        SECTION,
        f"a local answer with {total:,} numbers held <= {HELD_RATIO} x with ten held, pair by pair",
        held_ratio <= HELD_RATIO,
        f"{held_ratio:.3f} x, the median of {ROUNDS * settings.runs} pairs (SQLite)",
    )


def redis_section(w: World, settings, report: Report, delta_s: dict[str, float], replaced: dict[str, tuple]):
    """The import into Redis beside a bare pipeline, a --replace under calls, a call with the set
    held, a delta (into ``delta_s`` and ``replaced``): the import's figure, or None without a
    ``redis-server``."""
    total, lines = settings.local_redis_numbers, settings.local_delta
    with redis_server(w.directory) as url:
        if url is None:
            log("local: no redis-server found, Redis not measured")
            return None
        import redis

        client = redis.Redis.from_url(url)
        name, subset, new = f"Redis, {total:,} numbers", w.directory / "redis.csv", w.directory / "redis-new.csv"
        samples = write_set(subset, total)
        write_set(new, total, shift=1)
        cache = f"backend = redis\nredis_url = {url}\n"
        held = w.config("redis-held", cache=cache)
        log(f"local: {settings.local_runs} imports of {total:,} numbers into Redis, each beside its floor")
        took, _ = imports(
            report,
            name,
            settings.local_runs,
            [sys.executable, str(FLOOR), "redis", str(subset), url, KNOWN_KEY],
            npl_agi(held, "local", "import", str(subset)),
            lambda who: client.flushall(),
        )
        report.add(SECTION, f"{name}, npl-agi: bytes a number (cache stats)", "bytes", [held_bytes(held)])
        replaced["Redis"] = replace_under_calls(w, report, name, held, samples, new)
        ten = ten_of(w, "redis-ten", samples, cache=f"backend = redis\nredis_url = {url.removesuffix('/0')}/1\n")
        held_ratios(w, settings, report, name, (held, ten), middle(samples))
        delta = w.directory / "redis-delta.csv"
        write_delta(delta, total, lines)
        delta_s["Redis"] = measured(npl_agi(held, "local", "import", "--delta", str(delta)))[0]
        report.add(SECTION, f"{name}, npl-agi: a delta of {lines:,} lines", "s", [delta_s["Redis"]])
        client.close()
        return took


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str | None]:
    """A ``redis-server`` without persistence on a free loopback port: its URL, or None when
    there is none to run."""
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)), None
    )
    if found is None:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)]
    proc = subprocess.Popen([found, *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    break
            time.sleep(0.05)
        else:
            raise BenchError("redis-server did not start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)
