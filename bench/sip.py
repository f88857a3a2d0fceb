"""SIP calls at fixed rates, as a carrier measures a routing package: SIPp places calls through
chan_pjsip and the shipped dialplan (npl-outbound.conf, npl-lookup.conf, npl-routes.conf) to a
SIPp trunk that answers at once (tests/sip_fixture.py: the same caller, trunk and pjsip.conf as
the SIP tests).

Per rate, each variant of the lookup lines of npl-lookup.conf gets the same calls: no lookup (a
NoOp: the reference for what a lookup costs), the bare Python process AGI (bench/bare_agi.py,
the floor of the process script), npl-agi's process script, the minimal FastAGI server
(bench/minimal_fastagi.py, the floor of the FastAGI door) and ``npl-agi serve``; cache hits,
then the two doors again with every tenth call a number nobody looked up, the simulator taking
0.3 s per request. Post-dial delay is SIPp's time from the INVITE to the first 180 or 200 at
the caller; a failed call is one SIPp did not see answered and ended. CPU per call: Asterisk's
own, and the lookup's (the AGI processes Asterisk reaped, or the FastAGI server). The process
script runs under the shipped NPL_PROCESS_MAX limit (calls beyond it are not looked up: BUSY in
their CDR, counted as shed); the bare AGI, the floor, runs without a limit, as a naive script would.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from npl_agi.doors.process import VARIABLES

from .harness import AGI_SCRIPT, PORTED, ROOT, BenchError, ServerProcess, fastagi, log, minimal_fastagi, mobiles, world
from .pbx import AGI_LINE, FASTAGI_GLOBAL, install_script
from .report import Figure, Report

sys.path.insert(0, str(ROOT / "tests"))
from asterisk_fixture import DIALPLAN, Asterisk, extensions_conf, find_asterisk, wait_for
from sip_fixture import (
    CALL_SCENARIO,
    PJSIP_SAMPLE,
    Trunk,
    find_sip,
    free_udp_port,
    pjsip_conf,
    scenario_file,
    sipp,
    trunk_names,
    write_numbers,
)

SECTION = "sip"
TITLE = "8. SIP calls at fixed rates: SIPp -> chan_pjsip -> the shipped dialplan -> a SIPp trunk"
BARE_SCRIPT = ROOT / "bench" / "bare_agi.py"
TIMEOUT = 2.0  # [api] timeout of the run's configuration: the call's deadline for the lookup
CAPACITY_P99 = 500.0  # ms: a rate is within a door's capacity while its p99 stays under this
COLLAPSED_P99 = 5000.0  # ms: past this (or with failed calls) a variant is not run at higher rates
MISS_EVERY = 10  # the miss mix: every tenth call a new number
MINIMAL_GLOBAL = "NPL_BENCH_MINIMAL"
REFERENCE = "no lookup"
BARE, PROCESS = "bare Python AGI (floor)", "npl-agi, process script"
MINIMAL, FASTAGI = "minimal FastAGI server (floor)", "npl-agi serve, FastAGI"
FLOOR = {PROCESS: BARE, FASTAGI: MINIMAL}
PROCESS_LIMIT = '"${NPL_PROCESS_MAX}" = ""]?20:'  # the shipped limit on running scripts when unset
VARIANTS = {  # name -> npl-lookup.conf as run
    REFERENCE: lambda text: text.replace(AGI_LINE, "NoOp(no lookup)"),
    BARE: lambda text: text.replace(AGI_LINE, AGI_LINE.replace("npl-lookup.agi", "bare.agi")).replace(
        PROCESS_LIMIT, PROCESS_LIMIT.replace("?20:", "?0:")
    ),
    PROCESS: lambda text: text,
    MINIMAL: lambda text: text.replace("${NPL_FASTAGI}", f"${{{MINIMAL_GLOBAL}}}"),
    FASTAGI: lambda text: text.replace("${NPL_FASTAGI}", f"${{{FASTAGI_GLOBAL}}}"),
}
CONTEXTS = """\
[from-sipp]
include => npl-outbound

#include {lookup}
#include {dialplan}/npl-outbound.conf
#include {dialplan}/npl-routes.conf
"""
SHED = "BUSY"  # a call's npl_err when the dialplan did not start the process script for it


@dataclass
class Run:
    variant: str
    misses: bool
    rate: int
    delays: list[float]  # ms, one per answered call
    failed: int
    shed: int  # calls not looked up: more than NPL_PROCESS_MAX scripts were running
    asterisk_cpu: float  # ms per call
    lookup_cpu: float  # ms per call

    @property
    def p99(self) -> float:
        ordered = sorted(self.delays) or [float("inf")]
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def cpu_ms(pid: int, children: bool = False) -> float:
    """CPU time a process used so far (with ``children``: only that of its reaped children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[13]) + int(fields[14]) if children else int(fields[11]) + int(fields[12])
    return ticks * 1000 / os.sysconf("SC_CLK_TCK")


class SipPbx:
    """Asterisk with chan_pjsip, its trunk, and the servers the FastAGI variants use."""

    def __init__(self, asterisk: Asterisk, port: int, lookup_conf: Path, servers: dict[str, ServerProcess]) -> None:
        self.asterisk = asterisk
        self.port = port
        self.lookup_conf = lookup_conf
        self.servers = servers
        self.directory = asterisk.root.parent
        self.scenario = scenario_file(self.directory, CALL_SCENARIO)
        self.runs = 0

    def use(self, variant: str) -> None:
        shipped = (DIALPLAN / "npl-lookup.conf").read_text()
        if AGI_LINE not in shipped or "${NPL_FASTAGI}" not in shipped or PROCESS_LIMIT not in shipped:
            raise BenchError(f"npl-lookup.conf has no {AGI_LINE!r}, {PROCESS_LIMIT!r} or ${{NPL_FASTAGI}} to vary")
        self.lookup_conf.write_text(VARIANTS[variant](shipped))
        out = self.asterisk.cli("dialplan reload")
        if "Dialplan reloaded" not in out:
            raise BenchError(f"dialplan reload: {out}")

    def idle(self) -> bool:
        return bool(re.search(r"^0 active calls?", self.asterisk.cli("core show channels"), flags=re.MULTILINE))

    def place(self, variant: str, rate: int, seconds: float, numbers: list[str], misses: bool = False) -> Run:
        """``numbers`` called at ``rate`` per second, once every call has ended."""
        self.use(variant)
        self.runs += 1
        out = self.directory / f"run{self.runs}"
        out.mkdir()
        calls = write_numbers(out / "numbers.csv", numbers)
        server = self.servers.get(variant)
        lookup_pid = server.proc.pid if server else self.asterisk.proc.pid
        before = cpu_ms(self.asterisk.proc.pid), cpu_ms(lookup_pid, children=server is None)
        cdrs = len(self.cdr_errors())
        command = sipp("-sf", self.scenario, "-inf", calls, "-p", str(free_udp_port()), f"127.0.0.1:{self.port}")
        command += ["-r", str(rate), "-m", str(len(numbers)), "-l", str(len(numbers))]
        command += ["-trace_rtt", "-rtt_freq", "1", "-trace_stat", "-fd", "1"]
        command += ["-timeout", str(int(seconds + 120))]
        subprocess.run(command, cwd=out, capture_output=True, timeout=seconds + 180)
        wait_for(self.idle, 120, f"the calls of {variant} at {rate}/s to end")
        after = cpu_ms(self.asterisk.proc.pid), cpu_ms(lookup_pid, children=server is None)
        delays = [float(line.split(";")[1]) for f in out.glob("*_rtt.csv") for line in f.read_text().splitlines()[1:]]
        stats = next(out.glob("*_.csv"), None)
        rows = [line.split(";") for line in stats.read_text().splitlines()] if stats else []
        answered = int(rows[-1][rows[0].index("SuccessfulCall(C)")]) if len(rows) > 1 else 0
        n = len(numbers)
        shed = self.cdr_errors()[cdrs:].count(SHED)
        cpu = (after[0] - before[0]) / n, (after[1] - before[1]) / n
        return Run(variant, misses, rate, delays, n - answered, shed, *cpu)

    def cdr_errors(self) -> list[str]:
        """The npl_err field of every CDR written so far, in order."""
        if not self.asterisk.cdr_file.exists():
            return []
        column = self.asterisk.cdr_fields.index("npl_err")
        with self.asterisk.cdr_file.open(newline="") as f:
            return [row[column] for row in csv.reader(f) if len(row) > column]


def run(settings, report: Report) -> None:
    build, looked = find_asterisk()
    missing = f"no Asterisk found (looked at {looked})" if build is None else find_sip(build)
    if missing:
        report.skipped[SECTION] = missing
        log(f"sip: skipped, {missing}")
        return
    if tuple(re.findall(r'^    "(NPL_\w+)":', BARE_SCRIPT.read_text(), flags=re.MULTILINE)) != VARIABLES:
        raise BenchError("bench/bare_agi.py does not set npl_agi.doors.process.VARIABLES")
    runs: list[Run] = []
    with world(request_delay=0.3) as w, contextlib.ExitStack() as stack:
        agi_dir = w.directory / "agi-bin"
        agi_dir.mkdir()
        install_script(AGI_SCRIPT, agi_dir / "npl-lookup.agi")
        install_script(BARE_SCRIPT, agi_dir / "bare.agi")
        config = w.config("sip", timeout=TIMEOUT)
        env = {k: v for k, v in w.env(config).items() if k != "VIRTUAL_ENV"}
        servers = {
            FASTAGI: stack.enter_context(fastagi("sip", timeout=TIMEOUT)(w)),  # the same configuration and cache
            MINIMAL: stack.enter_context(minimal_fastagi(w)),
        }
        trunk = Trunk("trunk", w.directory).start()
        stack.callback(trunk.stop)
        port = free_udp_port()
        asterisk = Asterisk(build, w.directory / "asterisk", agi_dir, env)
        asterisk.write_config("logger.conf", "[logfiles]\nmessages.log => notice,warning,error\n")  # as in production
        asterisk.cdr_custom(DIALPLAN / "npl-cdr-custom.conf")  # as the docs tell admins: each call's npl_err
        names = trunk_names(PJSIP_SAMPLE.read_text())
        asterisk.write_config("pjsip.conf", pjsip_conf(port, "from-sipp", dict.fromkeys(names, trunk.port)))
        lookup_conf = asterisk.etc / "npl-lookup-variant.conf"
        lookup_conf.write_text((DIALPLAN / "npl-lookup.conf").read_text())
        globals_ = {
            "NPL_ONNET_MCCMNC": "23415",
            FASTAGI_GLOBAL: servers[FASTAGI].url,
            MINIMAL_GLOBAL: servers[MINIMAL].url,
        }
        contexts = CONTEXTS.format(lookup=lookup_conf, dialplan=DIALPLAN)
        asterisk.write_config("extensions.conf", extensions_conf(contexts, **globals_))
        pbx = SipPbx(asterisk, port, lookup_conf, servers)
        fresh = (f"+{n}" for n in mobiles(7_000_000))
        stack.callback(asterisk.stop)
        asterisk.start()
        for variant in VARIANTS:  # warms the cache, the page cache and the servers
            pbx.place(variant, 1, 1, [f"+{PORTED}"])
        given_up: set[tuple[str, bool]] = set()
        plan = [(v, False) for v in VARIANTS] + [(PROCESS, True), (FASTAGI, True)]
        for rate in settings.sip_rates:
            count = int(rate * settings.sip_seconds)
            for variant, misses in plan:
                if (variant, misses) in given_up:
                    continue
                numbers = [next(fresh) if misses and i % MISS_EVERY == 0 else f"+{PORTED}" for i in range(count)]
                log(f"sip: {rate}/s, {variant}{', 10 % misses' if misses else ''}: {count} calls")
                result = pbx.place(variant, rate, settings.sip_seconds, numbers, misses)
                runs.append(result)
                if result.failed or result.p99 > COLLAPSED_P99:
                    given_up.add((variant, misses))
        hits = sum(len(r.delays) for r in runs if r.variant == FASTAGI and not r.misses)
        served = servers[FASTAGI].log_file.read_text().count(f"{PORTED[-4:]}' ")
        if served < hits:
            raise BenchError(f"only {served} of {hits} FastAGI calls reached npl-agi serve")
    add_figures(report, runs, settings)


def add_figures(report: Report, runs: list[Run], settings) -> None:
    """The table's rows, each against the reference of its rate, and the targets."""
    delay: dict[tuple[str, bool, int], Figure] = {}
    cpu: dict[int, Figure] = {}
    for r in runs:
        name = f"{r.rate}/s, {'10 % misses' if r.misses else 'hits'}, {r.variant}"
        delay[r.variant, r.misses, r.rate] = d = report.add(
            SECTION, f"{name}: post-dial delay", "ms", r.delays or [0], latency=True
        )
        d.reference = delay.get((FLOOR.get(r.variant, REFERENCE), False, r.rate))
        report.add(SECTION, f"{name}: failed calls", "calls", [r.failed])
        if r.variant == PROCESS:
            report.add(SECTION, f"{name}: calls shed (BUSY, not looked up)", "calls", [r.shed])
        a = report.add(SECTION, f"{name}: Asterisk CPU per call", "ms", [r.asterisk_cpu])
        cpu.setdefault(r.rate, a)
        a.reference = cpu[r.rate]
        if r.variant != REFERENCE:
            lookup = report.add(SECTION, f"{name}: lookup CPU per call", "ms", [r.lookup_cpu])
            lookup.reference = cpu[r.rate]  # what the lookup adds, against what the call costs Asterisk
    targets(report, runs, settings)


def capacity(runs: list[Run], variant: str) -> int:
    """The highest rate (cache hits) with a p99 under CAPACITY_P99, no failed call and at most 1 %
    of the calls shed (a shed call is quick because it was not looked up); 0 if none."""
    return max((r.rate for r in runs if r.variant == variant and not r.misses and r.failed == 0
                and r.p99 < CAPACITY_P99 and r.shed * 100 <= len(r.delays) + r.failed), default=0)  # fmt: skip


def targets(report: Report, runs: list[Run], settings) -> None:
    hits = {(r.variant, r.rate): r for r in runs if not r.misses}
    sustained = [rate for rate in settings.sip_rates if (REFERENCE, rate) in hits and hits[REFERENCE, rate].failed == 0]
    failures = [f"{r.variant}{' (misses)' if r.misses else ''} at {r.rate}/s: {r.failed}" for r in runs
                if r.rate in sustained and r.failed]  # fmt: skip
    not_run = [f"{v}{' (misses)' if m else ''} at {rate}/s" for rate in sustained for v, m in
               [(v, False) for v in VARIANTS] + [(PROCESS, True), (FASTAGI, True)]
               if not any(r.variant == v and r.misses == m and r.rate == rate for r in runs)]  # fmt: skip
    report.target(
        SECTION,
        "0 failed calls at every rate the no-lookup run sustains",
        not failures and not not_run,
        f"sustained {sustained}; failed: {', '.join(failures) or 'none'}"
        + (f"; not run after a collapse: {', '.join(not_run)}" if not_run else ""),
    )
    gaps = [(rate, hits[FASTAGI, rate].p99 - hits[MINIMAL, rate].p99) for rate in settings.sip_rates
            if (FASTAGI, rate) in hits and (MINIMAL, rate) in hits]  # fmt: skip
    report.target(
        SECTION,
        "FastAGI cache hits p99 within 5 ms of the minimal FastAGI server's",
        bool(gaps) and all(g <= 5 for _, g in gaps),
        ", ".join(f"{rate}/s {g:+.0f} ms" for rate, g in gaps),
    )
    cap, floor_cap = capacity(runs, PROCESS), capacity(runs, BARE)
    below = [(rate, hits[PROCESS, rate].p99 / max(hits[BARE, rate].p99, 1)) for rate in settings.sip_rates
             if rate <= cap and (BARE, rate) in hits]  # fmt: skip
    report.target(
        SECTION,
        "process script p99 <= 2 x the bare Python AGI's, below its capacity",
        bool(below) and all(x <= 2 for _, x in below),
        ", ".join(f"{rate}/s {x:.2f}x" for rate, x in below) or f"no rate under {CAPACITY_P99:.0f} ms",
    )
    report.target(
        SECTION,
        f"process script capacity (highest rate with p99 < {CAPACITY_P99:.0f} ms) >= 0.7 x the bare AGI's",
        cap > 0 and cap >= 0.7 * floor_cap,
        f"{cap}/s against {floor_cap}/s",
    )
    above = [hits[PROCESS, rate] for rate in settings.sip_rates if rate > cap and (PROCESS, rate) in hits]
    report.target(
        SECTION,
        f"process script above its capacity: p99 <= timeout + 1 s = {TIMEOUT + 1:g} s",
        all(r.failed == 0 and r.p99 <= (TIMEOUT + 1) * 1000 for r in above),
        ", ".join(f"{r.rate}/s p99 {r.p99 / 1000:.1f} s, {r.failed} failed, {r.shed} shed" for r in above)
        or "no rate above it",
    )
    mixes = [r for r in runs if r.misses]
    report.target(
        SECTION,
        f"10 % misses: p99 <= timeout + 0.1 s = {TIMEOUT + 0.1:g} s",
        bool(mixes) and all(r.failed == 0 and r.p99 <= (TIMEOUT + 0.1) * 1000 for r in mixes),
        ", ".join(f"{r.variant} {r.rate}/s {r.p99 / 1000:.2f} s" for r in mixes),
    )
