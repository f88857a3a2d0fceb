"""A real Asterisk as a test fixture, and the routes-file format the dialplan tests share.

Asterisk runs in the foreground of a child process with its own configuration tree in a temp
directory (nothing of the machine's own Asterisk is read or written). Calls are originated
with call files over Local channels; results are read from files the dialplan and cdr_custom
write, never scraped from the console.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
DIALPLAN = ROOT / "dialplan"
T = TypeVar("T")

# The npl-routes.conf format contract (the demo reads it): a route starts with
#   exten => <MCCMNC>,1,<Application>(<args>)
# and a comment on that line, or on the line just above, names the network.
ROUTE_LINE = re.compile(r"^exten\s*=>\s*(\d{5,6})\s*,\s*1\s*,\s*(\w+)\((.*)\)\s*(?:;\s*(.*?)\s*)?$")
CONTEXT_LINE = re.compile(r"^\[([^\]]+)\]")


@dataclass(frozen=True)
class Route:
    mccmnc: str
    network: str
    application: str
    args: str
    line: int


def parse_routes(text: str, context: str = "npl-routes") -> list[Route]:
    """The routes of ``[context]`` by the format contract; raises ValueError where it is broken."""
    routes: list[Route] = []
    current, previous = "", ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if m := CONTEXT_LINE.match(line):
            current = m.group(1)
        elif current == context and line.startswith("exten"):
            m = ROUTE_LINE.match(line)
            if not m:
                raise ValueError(f"line {number}: a route must start 'exten => <MCCMNC>,1,<App>(<args>)': {raw}")
            name = m.group(4) or (previous[1:].strip() if previous.startswith(";") else "")
            if not name:
                raise ValueError(f"line {number}: route {m.group(1)} has no comment naming its network")
            routes.append(Route(m.group(1), name, m.group(2), m.group(3), number))
        previous = line
    return routes


def local_routes(text: str, drop: str | None = None) -> str:
    """npl-routes.conf with Local channels for PJSIP (trunks become contexts), and without the
    route for ``drop`` when one is given."""
    lines = text.replace("Dial(PJSIP/", "Dial(Local/").splitlines()
    if drop is not None:
        route = {r.mccmnc: r for r in parse_routes(text)}[drop]
        start = route.line - 2  # the comment naming the network, just above
        end = route.line
        while end < len(lines) and lines[end].strip().startswith("same"):
            end += 1
        lines = lines[:start] + lines[end:]
    return "\n".join(lines) + "\n"


def extensions_conf(contexts: str, **variables: str) -> str:
    """An extensions.conf for a PBX under test: static, write-protected, these globals, ``contexts``."""
    globals_ = "".join(f"{name}={value}\n" for name, value in variables.items())
    return f"[general]\nstatic = yes\nwriteprotect = yes\n\n[globals]\n{globals_}\n{contexts}"


def wait_for(probe: Callable[[], T], timeout: float, what: str | Callable[[], str]) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout`` s
    (a callable ``what`` is asked only then, e.g. for the log lines at the time of failure)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {described}")
        time.sleep(0.05)


@dataclass(frozen=True)
class AsteriskBuild:
    """An installed Asterisk: its binary, loadable modules and data (XML documentation) dirs."""

    binary: Path
    moddir: Path
    datadir: Path


def _configured_dirs(prefix: Path) -> dict[str, Path]:
    """astmoddir/astdatadir from the build's own asterisk.conf, when it has one."""
    dirs: dict[str, Path] = {}
    for conf in (prefix / "etc/asterisk/asterisk.conf", Path("/etc/asterisk/asterisk.conf")):
        if conf.is_file():
            for line in conf.read_text(errors="replace").splitlines():
                key, sep, value = line.partition("=>")
                if sep and key.strip() in ("astmoddir", "astdatadir"):
                    dirs.setdefault(key.strip(), Path(value.split(";")[0].strip()))
            break
    return dirs


def _build_at(binary: Path) -> AsteriskBuild | None:
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return None
    prefix = binary.resolve().parent.parent
    conf = _configured_dirs(prefix)
    moddirs = [conf.get("astmoddir"), prefix / "lib/asterisk/modules", prefix / "lib64/asterisk/modules"]
    moddirs += sorted(prefix.glob("lib/*/asterisk/modules"))
    datadirs = [conf.get("astdatadir"), prefix / "var/lib/asterisk", prefix / "share/asterisk"]
    datadirs += [Path("/var/lib/asterisk"), Path("/usr/share/asterisk")]
    moddir = next((d for d in moddirs if d and (d / "res_agi.so").exists()), None)
    datadir = next((d for d in datadirs if d and (d / "documentation").is_dir()), None)
    if moddir is None or datadir is None:
        return None
    return AsteriskBuild(binary, moddir, datadir)


def find_asterisk() -> tuple[AsteriskBuild | None, str]:
    """$ASTERISK_PREFIX, else /opt/asterisk, else ``asterisk`` on PATH; and what was looked at.

    A set $ASTERISK_PREFIX that holds no usable Asterisk is an error, not a reason to skip.
    """
    prefix = os.environ.get("ASTERISK_PREFIX")
    if prefix:
        build = _build_at(Path(prefix) / "sbin" / "asterisk")
        if build is None:
            raise RuntimeError(f"ASTERISK_PREFIX={prefix}: no sbin/asterisk with res_agi.so and XML documentation")
        return build, prefix
    looked = ["/opt/asterisk/sbin/asterisk"]
    on_path = shutil.which("asterisk")
    if on_path:
        looked.append(on_path)
    for candidate in looked:
        build = _build_at(Path(candidate))
        if build is not None:
            return build, candidate
    return None, ", ".join(looked) + " (set ASTERISK_PREFIX, or build one: bash ../shared/asterisk/build-asterisk.sh)"


class Asterisk:
    """One Asterisk process with its own configuration tree under ``root``."""

    def __init__(self, build: AsteriskBuild, root: Path, agi_dir: Path, env: dict[str, str]) -> None:
        self.build = build
        self.root = root
        self.agi_dir = agi_dir
        self.env = env
        self.etc = root / "etc"
        self.log = root / "log"
        self.spool = root / "spool"
        self.conf = self.etc / "asterisk.conf"
        self.cdr_file = self.log / "cdr-custom" / "npl-cdr.csv"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cdr_fields: list[str] = []
        for d in (self.etc, self.log / "cdr-custom", self.spool / "outgoing", root / "run", root / "lib", root / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        self.write_config(
            "asterisk.conf",
            f"""[directories]
astetcdir => {self.etc}
astmoddir => {build.moddir}
astvarlibdir => {root / "lib"}
astdbdir => {root / "lib"}
astkeydir => {root / "lib"}
astdatadir => {build.datadir}
astagidir => {agi_dir}
astspooldir => {self.spool}
astrundir => {root / "run"}
astlogdir => {self.log}
astcachedir => {root / "tmp"}
astsbindir => {build.binary.parent}

[options]
verbose = 3
""",
        )
        self.write_config("modules.conf", "[modules]\nautoload = yes\n")
        self.write_config("logger.conf", "[logfiles]\nmessages.log => notice,warning,error,verbose\n")
        # Unanswered calls too: a caller who hangs up during the lookup still leaves a record.
        self.write_config("cdr.conf", "[general]\nenable = yes\nunanswered = yes\ncongestion = yes\n")

    def write_config(self, name: str, text: str) -> Path:
        path = self.etc / name
        path.write_text(text)
        return path

    def cdr_custom(self, snippet: Path) -> None:
        """cdr_custom.conf as the README tells admins to write it: ``#include`` the shipped snippet.

        The CSV columns are the snippet's ``fields``, without their ``(qualifiers)``.
        """
        text = snippet.read_text()
        (section,) = re.findall(r"^\[([^\]]+)\]", text, flags=re.MULTILINE)
        (fields,) = re.findall(r"^fields\s*=\s*(.*)$", text, flags=re.MULTILINE)
        self.cdr_file = self.log / "cdr-custom" / section
        self.cdr_fields = [re.sub(r"\(.*\)", "", f).strip() for f in fields.split(",")]
        self.write_config("cdr_custom.conf", f"#include {snippet}\n")

    def start(self, timeout: float = 30.0) -> None:
        console = (self.log / "console.log").open("wb")
        self.proc = subprocess.Popen(
            [str(self.build.binary), "-C", str(self.conf), "-f", "-n"],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        console.close()

        def booted() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"Asterisk exited with {self.proc.returncode}:\n{self.console_tail()}")
            return "fully booted" in self.cli("core waitfullybooted")

        wait_for(booted, timeout, lambda: f"Asterisk to boot\n{self.console_tail()}")

    def cli(self, command: str) -> str:
        """A CLI command's output (``-rx`` exits 0 even for unknown commands: read the output)."""
        result = subprocess.run(
            [str(self.build.binary), "-C", str(self.conf), "-rx", command],
            capture_output=True,
            text=True,
            timeout=20,
            env=self.env,
        )
        return result.stdout + result.stderr

    def originate(self, channel: str, token: str, *, context: str = "caller", wait: int = 10) -> None:
        """Place a call with a call file. ``token`` becomes the CDR account code and the
        inherited channel variable NPL_TEST_TOKEN, so every record of the call carries it."""
        escaped = channel.replace(";", "\\;")
        if "\n" in escaped or " #" in escaped:
            raise ValueError(f"cannot originate {channel!r} from a call file")
        text = (
            f"Channel: {escaped}\nContext: {context}\nExtension: s\nPriority: 1\n"
            f"WaitTime: {wait}\nMaxRetries: 0\nAccount: {token}\nSetvar: __NPL_TEST_TOKEN={token}\n"
        )
        staging = self.root / "tmp" / f"{token}.call"
        staging.write_text(text)
        os.replace(staging, self.spool / "outgoing" / staging.name)

    def cdr_rows(self, token: str, field: str = "accountcode") -> list[dict[str, str]]:
        """The CDR records cdr_custom wrote so far whose ``field`` is ``token`` (a call's)."""
        if not self.cdr_file.exists():
            return []
        with self.cdr_file.open(newline="") as f:
            rows = [dict(zip(self.cdr_fields, r, strict=False)) for r in csv.reader(f)]
        return [r for r in rows if r.get(field) == token]

    def descendants(self) -> dict[int, str]:
        """Processes below Asterisk (pid -> command line), e.g. AGI scripts it started."""
        if self.proc is None:
            return {}
        parent_of, cmdline = {}, {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            parent_of[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmdline[int(entry.name)] = cmd
        found: dict[int, str] = {}
        frontier = {self.proc.pid}
        while frontier:
            children = {pid for pid, ppid in parent_of.items() if ppid in frontier and pid not in found}
            found.update({pid: cmdline[pid] for pid in children})
            frontier = children
        return found

    def console_tail(self, lines: int = 40) -> str:
        text = ""
        for name in ("console.log", "messages.log"):
            path = self.log / name
            if path.exists():
                text += f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        leftovers = self.descendants()
        self.cli("core stop now")
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
