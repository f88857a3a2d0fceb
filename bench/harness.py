"""What the sections share: the simulator in a process of its own, configurations, numbers, and
the contenders, i.e. the ways a call can get its lookup.

A contender is made by a factory ``factory(world)`` that returns a context manager giving an
object with ``name`` and ``call(number) -> AgiRun`` (the variables the call ended with and its
wall time). A process AGI needs nothing around it, so its factory returns a ``nullcontext``; a
contender that needs a server, such as FastAGI, starts it in its context manager. Adding one is
adding its factory to a section's list of contenders.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from npl_agi.emulator import AgiEmulator, AgiRun

ROOT = Path(__file__).resolve().parent.parent
AGI_SCRIPT = ROOT / "agi-bin" / "npl-lookup.agi"
BASELINE_SCRIPT = ROOT / "bench" / "baseline_agi.py"
PEAK_RSS = ROOT / "bench" / "peak_rss.py"
ACCOUNT = "demo"  # the simulator's account with unlimited credit (user and password)
CALL_TIMEOUT = 30.0  # seconds the emulator waits for a script before it kills it
PORTED = "447788450450"  # the simulator's Vodafone UK number, used for cache hits


class BenchError(Exception):
    """A run did not do what was measured (wrong answer, failed command): no figure from it."""


def log(message: str) -> None:
    """Progress on stderr; the table goes to stdout."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def mobiles(start: int = 0) -> Iterator[str]:
    """Distinct UK mobile numbers, international form (4474…), from ``start`` on.

    Numbers whose last six digits would trigger one of the simulator's test errors or faults
    (``0000nn``, ``9999nn``) are skipped: every number yielded gets a network.
    """
    for i in count(start):
        tail = i % 1_000_000
        if tail < 10_000 or tail >= 999_900:
            continue
        yield f"4474{i:08d}"


class SimulatorProcess:
    """``npl-agi simulate`` on a free loopback port, in its own process (its work does not
    compete with the benchmark's threads for one interpreter lock)."""

    def __init__(self, *, request_delay: float = 0.0, line_delay: float = 0.0) -> None:
        self.command = [sys.executable, "-m", "npl_agi.cli", "simulate", "--port", "0"]
        self.command += ["--request-delay", str(request_delay), "--line-delay", str(line_delay)]
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> SimulatorProcess:
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True, env=child_env())
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], 20)
            found = re.search(r"(http://127\.0\.0\.1:\d+/npl)", self.proc.stdout.readline() if ready else "")
            if not found:
                raise BenchError("the simulator did not start")
        except BaseException:
            self.__exit__()
            raise
        self.url = found.group(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def _base(self) -> str:
        return self.url.rsplit("/", 1)[0]

    def stats(self) -> dict:
        """Queries since the last reset: ``requests``, ``charged`` numbers, ``max_concurrent``."""
        with urllib.request.urlopen(self._base() + "/_sim/stats", timeout=60) as r:  # noqa: S310 - loopback
            return json.load(r)

    def reset(self) -> None:
        request = urllib.request.Request(self._base() + "/_sim/reset", data=b"", method="POST")  # noqa: S310
        urllib.request.urlopen(request, timeout=10).close()  # noqa: S310 - loopback


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every process the benchmark starts: this checkout's npl_agi first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


@dataclass
class World:
    """A simulator and a directory for one section's configurations and caches."""

    sim: SimulatorProcess
    directory: Path
    ttl: float = 86400.0

    def config(self, name: str, *, enabled: bool = True) -> Path:
        """A configuration for the simulator's account, with a cache file of its own (``name``)."""
        path = self.directory / f"{name}.conf"
        path.write_text(
            f"[api]\nurl = {self.sim.url}\nuser = {ACCOUNT}\npassword = {ACCOUNT}\n"
            f"enabled = {'yes' if enabled else 'no'}\nlock_dir = {self.directory}\n"
            f"[number]\ncountry_code = 44\n"
            f"[cache]\npath = {self.directory / name}.sqlite\nttl = {self.ttl}\n"
        )
        return path

    def env(self, config: Path) -> dict[str, str]:
        """For a script: the npl-agi configuration, and the service for the baseline script."""
        return child_env(NPL_AGI_CONFIG=str(config), NPL_URL=self.sim.url, NPL_USER=ACCOUNT, NPL_PASSWORD=ACCOUNT)


@contextlib.contextmanager
def world(**simulator) -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="npl-bench-") as tmp, SimulatorProcess(**simulator) as sim:
        yield World(sim, Path(tmp))


class ProcessAgi:
    """A script Asterisk starts for every call: environment block on stdin, commands over pipes."""

    def __init__(self, name: str, script: str, env: dict[str, str], python: list[str] | None = None) -> None:
        self.name = name
        self.script = script
        self.env = env
        self.python = [sys.executable] if python is None else python

    def call(self, number: str) -> AgiRun:
        return AgiEmulator(self.script, python=self.python, env=self.env).run([number], timeout=CALL_TIMEOUT)

    def peak_mib(self, number: str) -> float:
        """Peak resident memory of one call's process, in MiB."""
        with tempfile.NamedTemporaryFile("r", suffix=".rss") as out:
            wrapped = [sys.executable, "-S", "-I", str(PEAK_RSS), out.name, *self.python]
            run = AgiEmulator(self.script, python=wrapped, env=self.env).run([number], timeout=CALL_TIMEOUT)
            if run.returncode != 0:
                raise BenchError(f"{self.name}: exit status {run.returncode}: {run.stderr[-300:]}")
            return int(out.read()) / 1024


Factory = Callable[[World], AbstractContextManager]


def npl_agi(config: str = "npl-agi", *, enabled: bool = True) -> Factory:
    """npl-agi's process AGI (``agi-bin/npl-lookup.agi``) with the SQLite cache ``config``."""

    def make(w: World) -> AbstractContextManager[ProcessAgi]:
        env = w.env(w.config(config, enabled=enabled))
        return contextlib.nullcontext(ProcessAgi("npl-agi, process AGI", str(AGI_SCRIPT), env))

    return make


def baseline(w: World) -> AbstractContextManager[ProcessAgi]:
    """The naive script (``bench/baseline_agi.py``), run by the same Python."""
    return contextlib.nullcontext(ProcessAgi("baseline script", str(BASELINE_SCRIPT), w.env(w.config("baseline"))))


def python_c(code: str) -> Factory:
    """``python3 -c CODE`` spawned the same way: ``pass`` is the cost of starting the interpreter."""

    def make(w: World) -> AbstractContextManager[ProcessAgi]:
        return contextlib.nullcontext(
            ProcessAgi(f"python3 -c {code!r}", code, w.env(w.config("bare")), [sys.executable, "-c"])
        )

    return make


def network_of(run: AgiRun) -> str:
    """The network the call got, or '' (``NPL_ERR`` set, or no answer at all)."""
    return "" if run.variables.get("NPL_ERR") else run.variables.get("NPL_MCCMNC", "")


def check(run: AgiRun, name: str, **expected: str) -> AgiRun:
    """Refuse a run that failed or did not set what the case is about."""
    wrong = {k: run.variables.get(k) for k, v in expected.items() if run.variables.get(k) != v}
    if run.returncode != 0 or wrong:
        raise BenchError(f"{name}: exit {run.returncode}, expected {expected}, got {wrong}: {run.stderr[-300:]}")
    return run
