"""``npl-agi demo``: the whole call-time path on the bundled simulator, no account or Asterisk.

It starts the simulator on a free loopback port, runs the real ``npl-lookup.agi`` behind the
AGI channel emulator for a handful of dialled numbers, and shows what the dialplan would see
and which route the bundled ``npl-routes.conf`` would take.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

from npl_agi.doubles.emulator import AgiEmulator
from npl_agi.doubles.simulator import Simulator

CASES = (
    ("07788450450", "national (UK trunk prefix 0)"),
    ("00447810701702", "international with 00"),
    ("+44 7400 123410", "international with + and spaces"),
    ("0049 151 12345678", "a German mobile: no route for its network"),
    ("07973100100", "unknown subscriber"),
    ("07400000029", "absent subscriber (transient, not cached)"),
    ("020 7946 0018", "London landline: no credit spent"),
    ('0779"; EXEC Dial', "garbage from a SIP URI"),
    ("07400999902", "the service hangs: call-time deadline"),
    ("07788450450", "the same number again: from the cache"),
)
_ROUTE_RE = re.compile(r"^\s*exten\s*=>?\s*(\d{5,6}|s)\s*,\s*1\s*,\s*([^;]+?)\s*(?:;.*)?$")


def find_file(*parts: str) -> Path | None:
    """A bundled file: from the source checkout, else from the installed ``share/npl-agi``."""
    here = Path(__file__).resolve().parents[2]
    for base in (here, Path(sys.prefix) / "share" / "npl-agi"):
        candidate = base.joinpath(*parts)
        if candidate.exists():
            return candidate
    return None


def find_agi_script() -> Path | None:
    """The source tree's ``agi-bin/npl-lookup.agi``, else the one pip put in the environment's bin/."""
    installed = Path(sys.prefix) / "bin" / "npl-lookup.agi"
    return find_file("agi-bin", "npl-lookup.agi") or (installed if installed.exists() else None)


def read_routes(path: Path | None) -> dict[str, str]:
    """First step of each route in ``npl-routes.conf``: MCCMNC -> step, and ``s`` -> fallback."""
    routes: dict[str, str] = {}
    context = ""
    for line in path.read_text(encoding="utf-8").splitlines() if path else []:
        if line.strip().startswith("["):
            context = line.strip()
        m = _ROUTE_RE.match(line)
        if m and context in ("[npl-routes]", "[npl-fallback]"):
            routes[m.group(1)] = f"{context[1:-1]}: {m.group(2)}"
    return routes


def run_demo(out=None) -> int:
    out = out or sys.stdout
    script = find_agi_script()
    if script is None:
        print(
            "npl-agi demo: npl-lookup.agi not found (run from the source tree or install the package)", file=sys.stderr
        )
        return 1
    routes = read_routes(find_file("dialplan", "npl-routes.conf"))
    tmp = tempfile.mkdtemp(prefix="npl-agi-demo-")
    try:
        return _show(out, script, routes, tmp)
    finally:
        _remove(tmp)


def _show(out, script: Path, routes: dict[str, str], tmp: str) -> int:
    with Simulator("127.0.0.1", 0) as sim:
        config = Path(tmp) / "npl-agi.conf"
        config.write_text(
            f"[api]\nurl = {sim.url}\nuser = demo\npassword = demo\ntimeout = 2\nlock_dir = {tmp}\n"
            f"[number]\ncountry_code = 44\n[cache]\npath = {tmp}/cache.sqlite\n"
        )
        print(f"npl-agi demo: simulator at {sim.url}, AGI script {script}", file=out)
        print(_row("dialled", "NPL_NUMBER", "MCCMNC", "NPL_NETWORK", "NPL_ERR", "source", "ms", "route"), file=out)
        emulator = AgiEmulator(str(script), env={"NPL_AGI_CONFIG": str(config), **_pythonpath()})
        for dialled, what in CASES:
            run = emulator.run([dialled], {"agi_extension": dialled})
            v = run.variables
            if run.returncode != 0 or "NPL_ERR" not in v:
                print(
                    f"{dialled!r}: the AGI script failed (exit {run.returncode}): {run.stderr.strip()[-300:]}", file=out
                )
                return 1
            route = (not v["NPL_ERR"] and routes.get(v["NPL_MCCMNC"])) or routes.get("s", "npl-fallback")
            route = route.replace("npl-routes:", f"npl-routes,{v['NPL_MCCMNC']}:")
            fields = ("NPL_NUMBER", "NPL_MCCMNC", "NPL_NETWORK", "NPL_ERR", "NPL_SOURCE")
            print(_row(dialled, *(v[f] or "-" for f in fields), v["NPL_LOOKUP_MS"], route), file=out)
            print(f"{'':<22} ({what})", file=out)
        charged = sim.stats()["charged"]
        print(f"credits spent: {len(charged)} for {len(CASES)} calls", file=out)
    return 0


def _remove(path: str, tries: int = 50) -> None:
    """The demo's directory, once the detached request it left behind (the hung one, ended when
    the simulator stops) has written its last: it may still be storing into it a moment later."""
    import shutil

    for _ in range(tries):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    shutil.rmtree(path, ignore_errors=True)


def _row(dialled, number, mccmnc, network, err, source, ms, route) -> str:
    return f"{dialled:<22} {number:<13} {mccmnc:<7} {network:<13.13} {err:<10} {source:<6} {ms:>5}  {route}"


def _pythonpath() -> dict[str, str]:
    """Let the script import this very package, also when it runs from a source checkout."""
    root = str(Path(__file__).resolve().parents[2])
    return {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
