"""Shared fixtures: the simulator as a real HTTP server on loopback, and config files for it."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from npl_agi.core import protocol
from npl_agi.core.codes import TRUNCATED
from npl_agi.core.protocol import Answer
from npl_agi.doubles.simulator import Simulator

ROOT = Path(__file__).resolve().parent.parent
# The end of a child's code that runs npl-agi's CLI on its arguments and reports its peak memory
# (KiB) on its last stderr line: the peak of its own memory map (VmHWM), since ru_maxrss may carry
# the test process's peak across fork and exec.
CLI_REPORTING_PEAK = """
from npl_agi.admin.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    print("maxrss", peak, file=sys.stderr)
sys.exit(code)
"""
AGI_SCRIPT = ROOT / "agi-bin" / "npl-lookup.agi"


def load_tool(name: str) -> ModuleType:
    """A script of tools/ as a module, to test its functions (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sim():
    """A fresh simulator on 127.0.0.1, a free port, default accounts (demo/demo, ...)."""
    with Simulator("127.0.0.1", 0) as s:
        yield s


def write_config(path: Path, url: str, *, user: str = "demo", password: str = "demo", **sections) -> Path:
    """Write an npl-agi.conf. ``sections`` maps section name to {key: value} overrides."""
    values = {
        "api": {"url": url, "user": user, "password": password, "lock_dir": str(path.parent)},
        "number": {"country_code": "44"},
        "cache": {"backend": "sqlite", "path": str(path.parent / "cache.sqlite")},
    }
    for section, overrides in sections.items():
        values.setdefault(section, {}).update(overrides)
    text = "".join(
        f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for section, keys in values.items()
    )
    path.write_text(text)
    path.chmod(0o640)  # as installed: it holds the password (a world-readable one draws a warning)
    return path


@pytest.fixture
def config_file(tmp_path, sim):
    """A config for the simulator's demo account, with its own lock dir and SQLite cache."""
    return write_config(tmp_path / "npl-agi.conf", sim.url)


@pytest.fixture
def subprocess_env():
    """Environment for child processes that import npl_agi from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["NPL_PYTHON"] = sys.executable
    return env


def parse_response(body: str, asked: list[str], *, cut_short: str = TRUNCATED, secret: str = "") -> dict[str, Answer]:
    """Answers for every number asked, keyed by msisdn, from a whole recorded body, read line by
    line as the transports read it (``protocol.AnswerReader``).

    A trailing line without its newline is dropped (it may have lost its end), unless it is
    ``ENDBATCH``. Raises a ``ServiceRefused`` subclass for a refused query and ``ProtocolError``
    for a body that is not the contract at all (empty, HTML, garbage first line).
    """
    reader = protocol.AnswerReader(asked, secret)
    lines = body.split("\n")
    tail = lines.pop()  # "" after a final newline, else a line that lost its end
    if not lines or tail.strip() == protocol.ENDBATCH:
        lines.append(tail)
    for line in lines:
        reader.feed(line)
    return reader.finish(cut_short)
