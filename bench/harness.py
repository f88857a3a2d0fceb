"""What the sections share: the simulator in a process of its own, configurations, numbers, and
the contenders, i.e. the ways a call can get its lookup.

A contender is made by a factory ``factory(world)`` that returns a context manager giving an
object with ``name`` and ``call(number) -> AgiRun`` (the variables the call ended with and its
wall time). A process AGI needs nothing around it, so its factory returns a ``nullcontext``; the
FastAGI server (``npl-agi serve``) is started as a process of its own in its context manager and
stopped at its end. Adding one is adding its factory to a section's list of contenders.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import json
import os
import re
import select
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
import venv
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from npl_agi.core.agiwire import header as agi_header
from npl_agi.doubles.emulator import OK, AgiEmulator, AgiRun, environment, fastagi_call, replay

ROOT = Path(__file__).resolve().parent.parent
AGI_SCRIPT = ROOT / "agi-bin" / "npl-lookup.agi"
BASELINE_SCRIPT = ROOT / "bench" / "baseline_agi.py"
BARE_AGI_SCRIPT = ROOT / "bench" / "bare_agi.py"
PEAK_RSS = ROOT / "bench" / "peak_rss.py"
ACCOUNT = "demo"  # the simulator's account with unlimited credit (user and password)
MINIMAL_FASTAGI = ROOT / "bench" / "minimal_fastagi.py"
CALL_TIMEOUT = 30.0  # seconds the emulator waits for a script before it kills it
PORTED = "447788450450"  # the simulator's Vodafone UK number, used for cache hits
REPLIES = 64  # replies a conversation file holds: a call sends a dozen commands


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
        self.command = [sys.executable, "-m", "npl_agi.admin.cli", "simulate", "--port", "0"]
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
        if self.proc is not None:
            stop(self.proc)
            self.proc.stdout.close()

    def _base(self) -> str:
        return self.url.rsplit("/", 1)[0]

    def stats(self) -> dict:
        """Queries since the last reset: ``requests``, ``charged`` numbers, ``max_concurrent``."""
        with urllib.request.urlopen(self._base() + "/_sim/stats", timeout=60) as r:  # noqa: S310 - loopback
            return json.load(r)

    def quiet(self, settle: float = 1.0, longest: float = 60.0) -> dict:
        """The stats once no query is open and none has started for ``settle`` seconds: requests
        a call left to finish in the background (the AGI's detached child) are counted too."""
        until = time.monotonic() + longest
        last = self.stats()
        while time.monotonic() < until:
            time.sleep(settle)
            now = self.stats()
            if not now["active"] and not last["active"] and len(now["requests"]) == len(last["requests"]):
                return now
            last = now
        raise BenchError(f"the simulator still had queries open after {longest:g} s")

    def reset(self) -> None:
        request = urllib.request.Request(self._base() + "/_sim/reset", data=b"", method="POST")  # noqa: S310
        urllib.request.urlopen(request, timeout=10).close()  # noqa: S310 - loopback


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def child_env(*path: str, **extra: str) -> dict[str, str]:
    """The environment of every process the benchmark starts: this checkout's npl_agi first,
    then the directories in ``path``, on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), *path, env.get("PYTHONPATH")]))
    return {**env, **extra}


def measured(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run a whole command as an admin would, under ``peak_rss.py``: its wall time (s), its peak
    resident memory (MiB) and its stdout; a command that fails is a ``BenchError``."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        wrapped = [sys.executable, "-S", "-I", str(PEAK_RSS), rss.name, *command]
        started = time.perf_counter()
        done = subprocess.run(wrapped, capture_output=True, text=True, env=env or child_env(), timeout=1800)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise BenchError(f"{' '.join(command[:6])}... exited {done.returncode}: {done.stderr[-300:]}")
        return seconds, int(rss.read()) / 1024, done.stdout


@dataclass
class World:
    """A simulator and a directory for one section's configurations and caches."""

    sim: SimulatorProcess
    directory: Path
    ttl: float = 86400.0
    python: str = sys.executable  # the interpreter the scripts run on (see ``as_installed``)
    path: tuple[str, ...] = ()  # on their PYTHONPATH after this checkout

    def as_installed(self) -> None:
        """Run the scripts as install.sh leaves them: on the interpreter of a virtual environment
        of their own, whose site-packages holds no ``.pth`` file (a development checkout's editable
        install imports pathlib, re and urllib.parse in every interpreter it starts, which adds the
        same milliseconds to both sides of a ratio), with this environment's packages on
        PYTHONPATH and their bytecode compiled, npl_agi's and its dependencies' (pyst2, six,
        requests, phonenumbers...): pip compiles what it installs, and without it a call compiles
        every module it imports."""
        venv.create(self.directory / "venv", symlinks=True)
        self.python = str(self.directory / "venv" / "bin" / "python")
        self.path = tuple(dict.fromkeys(sysconfig.get_path(p) for p in ("purelib", "platlib")))
        for directory in (str(ROOT / "npl_agi"), *self.path):
            compileall.compile_dir(directory, quiet=1)  # once up to date, a stat a file

    def config(self, name: str, *, enabled: bool = True, timeout: float | None = None, cache: str = "") -> Path:
        """A configuration for the simulator's account, with a cache file of its own (``name``);
        ``timeout``: the call's deadline, ``[api] timeout`` (the default when None); ``cache``:
        more ``[cache]`` lines (``backend = redis``...). The server it may run has no metrics
        port (sections run servers side by side)."""
        path = self.directory / f"{name}.conf"
        path.write_text(
            f"[api]\nurl = {self.sim.url}\nuser = {ACCOUNT}\npassword = {ACCOUNT}\n"
            f"enabled = {'yes' if enabled else 'no'}\nlock_dir = {self.directory}\n"
            + (f"timeout = {timeout}\n" if timeout is not None else "")
            + f"[number]\ncountry_code = 44\n"
            f"[cache]\npath = {self.directory / name}.sqlite\nttl = {self.ttl}\n{cache}"
            "[fastagi]\nmetrics_listen =\n"
        )
        path.chmod(0o640)  # as install.sh leaves it: else every call warns that the password is readable
        return path

    def env(self, config: Path) -> dict[str, str]:
        """For a script: the npl-agi configuration, and the service for the baseline script."""
        return child_env(
            *self.path, NPL_AGI_CONFIG=str(config), NPL_URL=self.sim.url, NPL_USER=ACCOUNT, NPL_PASSWORD=ACCOUNT
        )


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
        """One call through the AGI emulator: the replies come one at a time, as Asterisk sends them."""
        return AgiEmulator(self.script, python=self.python, env=self.env).run([number], timeout=CALL_TIMEOUT)

    def spawn(self, number: str) -> AgiRun:
        """One call as an admin times a script: a whole process with stdin from a file holding the
        conversation (the environment block, then a reply for every command), timed from the spawn
        to the exit, with no emulator's work in it; what it set is read from its output afterwards."""
        header = agi_header(environment(os.path.basename(self.script), [number]))
        with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            stdin.write(header + f"{OK}\n".encode() * REPLIES)
            stdin.seek(0)
            started = time.perf_counter()
            proc = subprocess.Popen(
                [*self.python, self.script, number], stdin=stdin, stdout=out, stderr=err, env=self.env
            )
            # A wait with a timeout polls, sleeping up to 50 ms at a time: the exit is waited for
            # without one, and a timer kills a script that hangs.
            killer = threading.Timer(CALL_TIMEOUT, proc.kill)
            killer.start()
            try:
                returncode = proc.wait()
            finally:
                killer.cancel()
            seconds = time.perf_counter() - started
            out.seek(0)
            err.seek(0)
            run = replay(out.read().decode("utf-8", "replace"))
            run.stderr = err.read().decode("utf-8", "replace")
        run.returncode, run.seconds = returncode, seconds
        return run

    def peak_mib(self, number: str) -> float:
        """Peak resident memory of one call's process, in MiB."""
        with tempfile.NamedTemporaryFile("r", suffix=".rss") as out:
            wrapped = [sys.executable, "-S", "-I", str(PEAK_RSS), out.name, *self.python]
            run = AgiEmulator(self.script, python=wrapped, env=self.env).run([number], timeout=CALL_TIMEOUT)
            if run.returncode != 0:
                raise BenchError(f"{self.name}: exit status {run.returncode}: {run.stderr[-300:]}")
            return int(out.read()) / 1024


class ServerProcess:
    """A FastAGI server as a process of its own, on a free loopback port: it writes
    ``... on 127.0.0.1:PORT`` to its log (a file: a pipe nobody reads would fill and stop it)."""

    def __init__(self, name: str, command: list[str], log_file: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.command = command
        self.log_file = log_file
        self.env = env or child_env()
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> ServerProcess:
        with self.log_file.open("w") as log_:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log_, stderr=log_, env=self.env)
        try:
            for _ in range(400):
                found = re.search(r" on 127\.0\.0\.1:(\d+)", self.log_file.read_text())
                if found:
                    self.port = int(found.group(1))
                    return self
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
            raise BenchError(f"{self.name} did not start: {self.log_file.read_text()[-300:]}")
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop(self.proc, 30)  # a server finishes the calls and the request in flight first

    @property
    def url(self) -> str:
        return f"agi://127.0.0.1:{self.port}"

    def call(self, number: str) -> AgiRun:
        """One call, as Asterisk's ``AGI(agi://…/npl-lookup,NUMBER)`` makes it."""
        return asyncio.run(fastagi_call("127.0.0.1", self.port, [number], timeout=CALL_TIMEOUT))


Factory = Callable[[World], AbstractContextManager]


def fastagi(config: str = "npl-agi", *, timeout: float | None = None) -> Factory:
    """``npl-agi serve`` with the SQLite cache ``config``, as long as the context lasts."""

    def make(w: World) -> AbstractContextManager[ServerProcess]:
        path = w.config(config, timeout=timeout)
        command = [sys.executable, "-m", "npl_agi.admin.cli", "--config", str(path), "serve", "--listen", "127.0.0.1:0"]
        return ServerProcess("npl-agi serve, FastAGI", command, w.directory / f"{config}.serve.log")

    return make


def minimal_fastagi(w: World) -> AbstractContextManager[ServerProcess]:
    """The least a FastAGI server can do (``bench/minimal_fastagi.py``): the reference for
    ``npl-agi serve``'s own cost."""
    command = [sys.executable, str(MINIMAL_FASTAGI)]
    return ServerProcess("minimal FastAGI server", command, w.directory / "minimal.serve.log")


def npl_agi(config: str = "npl-agi", *, enabled: bool = True, timeout: float | None = None) -> Factory:
    """npl-agi's process AGI (``agi-bin/npl-lookup.agi``) with the SQLite cache ``config``."""

    def make(w: World) -> AbstractContextManager[ProcessAgi]:
        env = w.env(w.config(config, enabled=enabled, timeout=timeout))
        return contextlib.nullcontext(ProcessAgi("npl-agi, process AGI", str(AGI_SCRIPT), env, [w.python]))

    return make


def baseline(w: World) -> AbstractContextManager[ProcessAgi]:
    """The naive script (``bench/baseline_agi.py``), run by the same Python."""
    env = w.env(w.config("baseline"))
    return contextlib.nullcontext(ProcessAgi("baseline script", str(BASELINE_SCRIPT), env, [w.python]))


def bare_agi(w: World) -> AbstractContextManager[ProcessAgi]:
    """The least a process AGI in Python does (``bench/bare_agi.py``): a hit's variables as constants."""
    env = w.env(w.config("bare"))
    return contextlib.nullcontext(ProcessAgi("bare AGI script", str(BARE_AGI_SCRIPT), env, [w.python]))


def python_c(code: str) -> Factory:
    """``python3 -c CODE`` spawned the same way: ``pass`` is the cost of starting the interpreter."""

    def make(w: World) -> AbstractContextManager[ProcessAgi]:
        return contextlib.nullcontext(
            ProcessAgi(f"python3 -c {code!r}", code, w.env(w.config("bare")), [w.python, "-c"])
        )

    return make


def network_of(run: AgiRun) -> str:
    """The network the call got, or '' (``NPL_ERR`` set, or no answer at all)."""
    return "" if run.variables.get("NPL_ERR") else run.variables.get("NPL_MCCMNC", "")


def check(run: AgiRun, name: str, **expected: str) -> AgiRun:
    """Refuse a run that failed or did not set what the case is about."""
    wrong = {k: run.variables.get(k) for k, v in expected.items() if run.variables.get(k) != v}
    if run.returncode not in (0, None) or wrong:  # None: a FastAGI call, no process of its own
        raise BenchError(f"{name}: exit {run.returncode}, expected {expected}, got {wrong}: {run.stderr[-300:]}")
    return run
