"""The process script's deadline counts from the dialplan's ``AGI()`` call (``t=EPOCH``), and a
script that starts too late to ask the service answers at once: an overloaded PBX sheds calls."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import AGI_SCRIPT, write_config
from test_agi import assert_clean

from npl_agi.doors.process import VARIABLES, asked_at
from npl_agi.doubles.emulator import AgiEmulator

HANGS = "07400999902"  # the simulator never answers it in time
HEAVY = ("requests", "urllib3", "phonenumbers", "npl_agi.transports.sync", "npl_agi.askers.handoff")


def agi_for(tmp_path, subprocess_env, url, **api) -> AgiEmulator:
    conf = write_config(tmp_path / "npl-agi.conf", url, api=api)
    return AgiEmulator(str(AGI_SCRIPT), env={**subprocess_env, "NPL_AGI_CONFIG": str(conf)})


def ago(seconds: float) -> str:
    return f"t={time.time() - seconds:.3f}"


# -- the argument: only a sane wall-clock time near now is used --


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["07788450450", "t=995.250"], 95.0 - 4.75),  # 4.75 s before now
        (["07788450450", "t=1000"], 95.0),
        (["07788450450", "t=1000.6"], 95.0),  # a little ahead (another clock's rounding): now
        (["", "x=1", "t=998"], 93.0),  # any position after the number
        (["07788450450", "t=1", "t=999"], 94.0),  # the last one wins (the shipped Gosub's is last)
        (["07788450450"], None),
        (["t=999"], None),  # the first argument is always the number
        ([], None),
    ],
)
def test_the_time_argument_becomes_the_deadlines_start(args, expected):
    assert asked_at(args, wall=1000.0, mono=95.0) == expected


@pytest.mark.parametrize(
    "given",
    ["t=", "t=soon", "t=nan", "t=inf", "t=-inf", "t=1e400", "t=939.9", "t=1001.5", "t=0", "t=-5", "t=1" + "0" * 40],
)
def test_a_time_that_is_not_near_now_is_refused(given):
    with pytest.raises(ValueError):
        asked_at(["07788450450", given], wall=1000.0, mono=95.0)


# -- the script as Asterisk runs it --


def test_a_script_that_starts_past_its_deadline_answers_timeout_at_once_and_asks_nothing(tmp_path, subprocess_env, sim):
    run = agi_for(tmp_path, subprocess_env, sim.url, timeout="5").run([HANGS, ago(30)])
    assert_clean(run)
    assert list(run.variables) == list(VARIABLES)
    assert run.variables["NPL_ERR"] == "TIMEOUT"
    assert all(run.variables[v] == "" for v in VARIABLES if v not in ("NPL_ERR", "NPL_LOOKUP_MS"))
    assert int(run.variables["NPL_LOOKUP_MS"]) >= 30_000  # counted from the dialplan's time
    assert run.seconds < 5 / 2  # it did not wait out a deadline that had passed already
    assert sim.stats()["requests"] == []


def test_a_time_a_little_in_the_past_shortens_the_deadline(tmp_path, subprocess_env, sim):
    run = agi_for(tmp_path, subprocess_env, sim.url, timeout="3").run([HANGS, ago(1.5)])
    assert_clean(run)
    assert run.variables["NPL_ERR"] == "TIMEOUT"
    ms = int(run.variables["NPL_LOOKUP_MS"])
    assert 2800 <= ms <= 3100
    # The script itself ran about 1.5 s less than the call waited: that much was gone before it.
    assert run.seconds < ms / 1000 - 1.0, (run.seconds, ms)


def test_a_script_too_late_to_send_a_request_answers_from_the_cache(tmp_path, subprocess_env, sim):
    agi = agi_for(tmp_path, subprocess_env, sim.url, timeout="5", min_request_time="2")
    assert agi.run(["07788450450"]).variables["NPL_SOURCE"] == "api"
    late = agi.run(["07788450450", ago(3.5)]).variables  # 1.4 s left: too little to ask
    assert (late["NPL_ERR"], late["NPL_SOURCE"], late["NPL_MCCMNC"]) == ("", "cache", "23415")
    assert late["NPL_NETWORK"] == "Vodafone UK"
    missed = agi.run(["07810701702", ago(3.5)]).variables
    assert missed["NPL_ERR"] == "TIMEOUT"
    assert sim.stats()["charged"] == ["447788450450"]


def test_a_fresh_call_too_late_to_send_a_request_is_not_answered_from_the_cache(tmp_path, subprocess_env, sim):
    agi = agi_for(tmp_path, subprocess_env, sim.url, timeout="5", min_request_time="2")
    assert agi.run(["07788450450"]).variables["NPL_SOURCE"] == "api"
    late = agi.run(["07788450450", "fresh", ago(3.5)])  # 1.4 s left: too little to ask
    assert (late.variables["NPL_ERR"], late.variables["NPL_MCCMNC"]) == ("TIMEOUT", "")
    assert any("fresh lookup" in line for line in late.verbose), late.verbose
    bad = agi.run(["0123", "fresh", ago(3.5)]).variables  # refused by its form, as ever
    assert bad["NPL_ERR"] == "BADNUMBER"
    assert sim.stats()["charged"] == ["447788450450"]


@pytest.mark.parametrize("given", ["t=soon", "t=1", f"t={2 * 10**9}"])
def test_a_bad_time_falls_back_to_the_scripts_start_and_says_so(tmp_path, subprocess_env, sim, given):
    run = agi_for(tmp_path, subprocess_env, sim.url).run(["07788450450", given])
    assert_clean(run)
    assert (run.variables["NPL_ERR"], run.variables["NPL_MCCMNC"]) == ("", "23415")
    assert int(run.variables["NPL_LOOKUP_MS"]) < 60_000
    assert any("t=" in line and "script's start" in line for line in run.verbose), run.verbose


# -- what a shed call loads --

IN_PROCESS = """\
import io, json, sys, time
from npl_agi.doors import process as agi
replies = io.StringIO("agi_request: npl-lookup.agi\\nagi_extension: s\\n\\n" + "200 result=1\\n" * 20)
sent = io.StringIO()
args = [sys.argv[2], f"t={time.time() - float(sys.argv[3]):.3f}"]
values = agi.run(agi.Channel(stdin=replies, stdout=sent), args, config_path=sys.argv[1])
print(json.dumps({"values": values, "modules": sorted(sys.modules)}))
"""


def shed_in_a_fresh_process(subprocess_env, conf, dialled: str, late: float) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(IN_PROCESS), str(conf), dialled, str(late)],
        capture_output=True, text=True, env=subprocess_env, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_a_shed_call_imports_no_request_path(tmp_path, subprocess_env, sim):
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, api={"timeout": "4", "min_request_time": "2"})
    past = shed_in_a_fresh_process(subprocess_env, conf, "07788450450", late=10)
    assert past["values"]["NPL_ERR"] == "TIMEOUT"
    assert not set(past["modules"]) & {*HEAVY, "sqlite3", "npl_agi.backends", "npl_agi.chain.lookup"}
    # Too late to ask but in time to read the cache: SQLite, never the request path.
    soon = shed_in_a_fresh_process(subprocess_env, conf, "07810701702", late=2.5)  # 1.4 s left
    assert soon["values"]["NPL_ERR"] == "TIMEOUT"
    assert "npl_agi.backends" in soon["modules"]
    assert not set(soon["modules"]) & set(HEAVY)
    assert sim.stats()["requests"] == []


def test_a_lookup_in_time_still_uses_the_request_path(tmp_path, subprocess_env, sim):
    """The other side of the test above: the observable does see the request path when used."""
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, api={"timeout": "5"})
    ok = shed_in_a_fresh_process(subprocess_env, conf, "07810701702", late=0)
    assert (ok["values"]["NPL_ERR"], ok["values"]["NPL_SOURCE"]) == ("", "api")
    assert {"npl_agi.askers.queued", "npl_agi.askers.handoff"} <= set(ok["modules"])
    # It waited for its number in the queue: the asker it forked loaded the HTTP stack and
    # phonenumbers, the call did not (see tests/test_coalescing.py).
    assert not set(ok["modules"]) & {"requests", "urllib3", "phonenumbers", "npl_agi.transports.sync"}
