"""Real Asterisk: call setup through Asterisk 22 and the shipped dialplan, Local channels only.

Calls are originated into ``npl-outbound`` (dialplan/npl-outbound.conf, npl-lookup.conf and
npl-routes.conf as shipped, PJSIP trunks turned into Local ones). Each trunk writes the time the
call reached it, from Asterisk's own clock; call setup is that minus the moment the call file was
queued. The variants differ only in the lookup lines of npl-lookup.conf:

- no lookup: the line replaced by a NoOp (the call takes the fallback); the reference for what
  a lookup adds;
- npl-agi: the shipped line, the process AGI (cache hits: the cache is warmed first);
- npl-agi serve: the shipped lines with ``NPL_FASTAGI`` pointing at a running ``npl-agi serve``
  (``agi://``) on the same configuration and cache;
- baseline: the same line running bench/baseline_agi.py.

Calls per second: a burst of calls queued at once, to the last one reaching its trunk.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from pathlib import Path

from .harness import AGI_SCRIPT, BASELINE_SCRIPT, PORTED, ROOT, BenchError, fastagi, log, world
from .report import Report

sys.path.insert(0, str(ROOT / "tests"))
from asterisk_fixture import DIALPLAN, Asterisk, extensions_conf, find_asterisk, local_routes, wait_for

SECTION = "asterisk"
TITLE = "5. Real Asterisk 22: call setup through the shipped dialplan (Local channels, cache hits)"
# The process script, as the subroutine calls it.
AGI_LINE = "AGI(npl-lookup.agi,${ARG1},${ARG2},t=${STRFTIME(,,%s.%3q)})"
# The variants share one [globals]: only the FastAGI variant's lines read the server's address.
FASTAGI_GLOBAL = "NPL_BENCH_FASTAGI"
REFERENCE = "no lookup"
VARIANTS = {  # name -> (npl-lookup.conf as run, the trunk a call to PORTED must reach)
    REFERENCE: (lambda text: text.replace(AGI_LINE, "NoOp(no lookup)"), "trunk-default"),
    "npl-agi, process AGI": (lambda text: text, "trunk-vodafone"),
    "npl-agi serve, FastAGI": (lambda text: text.replace("${NPL_FASTAGI}", f"${{{FASTAGI_GLOBAL}}}"),
                               "trunk-vodafone"),
    "baseline script": (lambda text: text.replace(AGI_LINE, AGI_LINE.replace("npl-lookup.agi", "baseline.agi")),
                        "trunk-vodafone"),
}  # fmt: skip
CONTEXTS = """\
[caller]
exten => s,1,Wait(5)
 same => n,Hangup()

{trunks}
#include {lookup}
#include {dialplan}/npl-outbound.conf
#include {routes}
"""
TRUNK = """\
[{name}]
exten => _[+0-9].,1,Set(FILE({results},,,al,u)=${{NPL_TEST_TOKEN}}|${{STRFTIME(,,%s.%6q)}}|{name})
 same => n,Answer(,i)
 same => n,Hangup()
"""


def install_script(source: Path, target: Path) -> None:
    """A copy whose first line runs this Python, as install.sh points the AGI at its environment."""
    lines = source.read_text().splitlines(keepends=True)
    target.write_text(f"#!{sys.executable}\n" + "".join(lines[1:]))
    target.chmod(0o755)


class Pbx:
    """The running Asterisk, the file its trunks write arrivals to, and the variant in use."""

    def __init__(self, asterisk: Asterisk, results: Path, lookup_conf: Path) -> None:
        self.asterisk = asterisk
        self.results = results
        self.lookup_conf = lookup_conf
        self.calls = 0

    def use(self, variant: str) -> None:
        shipped = (DIALPLAN / "npl-lookup.conf").read_text()
        if AGI_LINE not in shipped or "${NPL_FASTAGI}" not in shipped:
            raise BenchError(f"npl-lookup.conf has no {AGI_LINE!r} or no ${{NPL_FASTAGI}} to vary")
        self.lookup_conf.write_text(VARIANTS[variant][0](shipped))
        out = self.asterisk.cli("dialplan reload")
        if "Dialplan reloaded" not in out:
            raise BenchError(f"dialplan reload: {out}")

    def arrivals(self) -> dict[str, tuple[float, str]]:
        """Token -> (time, trunk) of every call that reached a trunk; a line still being written
        (no newline yet) is left for the next look."""
        found = {}
        for line in self.results.read_text().split("\n")[:-1]:
            token, when, trunk = line.split("|")
            found[token] = (float(when), trunk)
        return found

    def calls_at_once(self, count: int, trunk: str, *, strict: bool = True) -> tuple[list[float], float, int]:
        """Queue ``count`` calls to PORTED: the seconds from queueing to reaching a trunk, each,
        from the first queued to the last arrived, and how many reached ``trunk`` (``strict``:
        all of them, or ``BenchError``; a burst may push some lookups past their deadline, and
        their calls onto the fallback route)."""
        queued = {}
        for _ in range(count):
            self.calls += 1
            token = f"bench{self.calls}"
            queued[token] = time.time()
            self.asterisk.originate(f"Local/{PORTED}@npl-outbound", token, wait=20)

        def all_arrived() -> dict[str, tuple[float, str]] | None:
            found = self.arrivals()
            return found if all(t in found for t in queued) else None

        arrived = wait_for(
            all_arrived,
            60,
            lambda: f"{count} calls to reach a trunk\n{self.asterisk.console_tail()}",
        )
        wrong = {arrived[t][1] for t in queued} - {trunk}
        if wrong and strict:
            raise BenchError(f"calls reached {wrong}, not {trunk}")
        right = sum(arrived[t][1] == trunk for t in queued)
        span = max(arrived[t][0] for t in queued) - min(queued.values())
        return [arrived[t][0] - queued[t] for t in queued], span, right


def run(settings, report: Report) -> None:
    build, looked = find_asterisk()
    if build is None:
        report.skipped[SECTION] = f"no Asterisk found (looked at {looked})"
        log(f"asterisk: skipped, {report.skipped[SECTION]}")
        return
    latency: dict[str, list[float]] = {}
    throughput: dict[str, float] = {}
    routed: dict[str, int] = {}
    with world() as w, contextlib.ExitStack() as stack:
        agi_dir = w.directory / "agi-bin"
        agi_dir.mkdir()
        install_script(AGI_SCRIPT, agi_dir / "npl-lookup.agi")
        install_script(BASELINE_SCRIPT, agi_dir / "baseline.agi")
        env = {k: v for k, v in w.env(w.config("asterisk")).items() if k != "VIRTUAL_ENV"}
        server = stack.enter_context(fastagi("asterisk")(w))  # the same configuration and cache
        asterisk = Asterisk(build, w.directory / "asterisk", agi_dir, env)
        results = w.directory / "arrivals.txt"
        results.touch()
        routes_text = local_routes((DIALPLAN / "npl-routes.conf").read_text())
        trunks = sorted(set(re.findall(r"Dial\(Local/\$\{NPL_DIAL\}@([\w-]+)", routes_text)))
        routes = asterisk.write_config("npl-routes-local.conf", routes_text)
        lookup_conf = asterisk.etc / "npl-lookup-variant.conf"
        pbx = Pbx(asterisk, results, lookup_conf)
        lookup_conf.write_text((DIALPLAN / "npl-lookup.conf").read_text())  # until a variant is chosen
        contexts = CONTEXTS.format(
            trunks="\n".join(TRUNK.format(name=t, results=results) for t in trunks),
            lookup=lookup_conf,
            dialplan=DIALPLAN,
            routes=routes,
        )
        globals_ = {"NPL_ONNET_MCCMNC": "23415", FASTAGI_GLOBAL: server.url}
        asterisk.write_config("extensions.conf", extensions_conf(contexts, **globals_))
        try:
            asterisk.start()
            for variant, (_, trunk) in VARIANTS.items():
                pbx.use(variant)
                log(f"asterisk: {variant}: {settings.pbx_calls} calls one at a time, then {settings.pbx_burst} at once")
                pbx.calls_at_once(1, trunk)  # warms the cache and the page cache
                latency[variant] = [pbx.calls_at_once(1, trunk)[0][0] * 1000 for _ in range(settings.pbx_calls)]
                _, span, routed[variant] = pbx.calls_at_once(settings.pbx_burst, trunk, strict=False)
                throughput[variant] = settings.pbx_burst / span
            # agi:// falls back to the process script when the server cannot be reached: make sure it was reached.
            served = server.log_file.read_text().count(f"{PORTED[-4:]}' ")  # one line a lookup
            if served < settings.pbx_calls + settings.pbx_burst + 1:
                raise BenchError(f"only {served} FastAGI variant calls reached npl-agi serve")
        finally:
            asterisk.stop()
    reference = sorted(latency[REFERENCE])[len(latency[REFERENCE]) // 2]
    base = "baseline script"
    setup = {v: report.add(SECTION, f"{v}: call setup", "ms", s, latency=True) for v, s in latency.items()}
    added = {v: report.add(SECTION, f"{v}: added by the lookup", "ms", [x - reference for x in s], latency=True)
             for v, s in latency.items() if v != REFERENCE}  # fmt: skip
    rate = {v: report.add(SECTION, f"{v}: calls/s ({settings.pbx_burst} at once)", "calls/s", [x])
            for v, x in throughput.items()}  # fmt: skip
    right = {v: report.add(SECTION, f"{v}: calls on their route ({settings.pbx_burst} at once)", "calls", [x])
             for v, x in routed.items()}  # fmt: skip
    for group in (setup, added, rate, right):
        for f in group.values():
            f.reference = group[base]
