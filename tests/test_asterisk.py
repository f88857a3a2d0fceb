"""The bundled dialplan on a real Asterisk, with the real AGI script against the simulator.

One Asterisk (22.x in CI, built by ../shared/asterisk/build-asterisk.sh) serves the module. Its
extensions.conf includes the real dialplan/npl-lookup.conf and dialplan/npl-outbound.conf, and
a routes file made from dialplan/npl-routes.conf whose trunks are Local channels into contexts
that record which trunk got the call. Asterisk runs npl-lookup.agi from an install.sh stage
(--destdir), so the AGI directory and the Python behind the script are the ones install.sh makes.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asterisk_fixture import (
    DIALPLAN,
    ROOT,
    Asterisk,
    extensions_conf,
    find_asterisk,
    local_routes,
    wait_for,
)
from conftest import write_config

from npl_agi.admin import cli
from npl_agi.backends import SqliteCache
from npl_agi.config import NumberConfig, load_config
from npl_agi.core.number import normalise, validate
from npl_agi.core.protocol import Answer
from npl_agi.doors.process import asked_at
from npl_agi.doubles.simulator import Simulator, simulated_answer

CDR_SNIPPET = DIALPLAN / "npl-cdr-custom.conf"  # the shipped cdr_custom snippet, included as is
LOOKUP_ERRORS = {"BADNUMBER", "NOTMOBILE", "TIMEOUT", "UNREACHABLE", "PROTOCOL", "AUTH", "CREDIT", "LOCKED"}
LOOKUP_ERRORS |= {"CONFIG", "DISABLED", "AGIFAIL"} | {f"ERR{n}" for n in (1, 11, 13, 21, 29, 36, 77)}
UNROUTED = "23420"  # the test routes file leaves Three UK out: its calls must take the fallback
DOWN = "23430"  # trunk-ee answers with congestion: EE calls must move on to the fallback

EXTENSIONS = """\
; The originating half of every test call: it stays up until the other half ends the call.
[caller]
exten => s,1,Wait(30)
 same => n,Hangup()

; Trunks: record which one was asked for which number, then answer and end the call.
[trunk-vodafone]
exten => _[+0-9].,1,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)=${{NPL_TEST_TOKEN}}|trunk|trunk-vodafone|${{EXTEN}})
 same => n,Answer(,i)
 same => n,Hangup()

[trunk-o2]
exten => _[+0-9].,1,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)=${{NPL_TEST_TOKEN}}|trunk|trunk-o2|${{EXTEN}})
 same => n,Answer(,i)
 same => n,Hangup()

[trunk-three]
exten => _[+0-9].,1,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)=${{NPL_TEST_TOKEN}}|trunk|trunk-three|${{EXTEN}})
 same => n,Answer(,i)
 same => n,Hangup()

[trunk-ee]
exten => _[+0-9].,1,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)=${{NPL_TEST_TOKEN}}|trunk|trunk-ee|${{EXTEN}})
 same => n,Congestion(5)

[trunk-default]
exten => _[+0-9].,1,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)=${{NPL_TEST_TOKEN}}|trunk|trunk-default|${{EXTEN}})
 same => n,Answer(,i)
 same => n,Hangup()

; Where a dial string with an injected "&Local/<number>" (no @context) would land.
[default]
exten => _X.,1,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)=${{NPL_TEST_TOKEN}}|injected|default|${{EXTEN}})
 same => n,Hangup()

; The subroutine on its own, given the dialled extension as it is.
[test-gosub]
exten => _X.,1,Gosub(npl-lookup,s,1(${{EXTEN}}))
 same => n,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)={record})
 same => n,Hangup()

; The subroutine asked for a fresh lookup, its second argument.
[test-gosub-fresh]
exten => _X.,1,Gosub(npl-lookup,s,1(${{EXTEN}},fresh))
 same => n,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)={record})
 same => n,Hangup()

; Twice on one channel: a failure after a success must not leave the success's network behind.
[test-gosub-twice]
exten => _X.,1,Gosub(npl-lookup,s,1(07788450450))
 same => n,Gosub(npl-lookup,s,1(${{EXTEN}}))
 same => n,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)={record})
 same => n,Hangup()

; The subroutine, then what AGISIGHUP is once it has returned (LOCAL: nothing is left set).
[test-agisighup]
exten => _X.,1,Gosub(npl-lookup,s,1(${{EXTEN}}))
 same => n,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)=${{NPL_TEST_TOKEN}}|after|${{AGISIGHUP}}|${{NPL_MCCMNC}})
 same => n,Hangup()

; The outbound context's own guard: a failed lookup that still left a network behind.
[test-outbound-guard]
exten => _X.,1,Set(NPL_DIAL=${{EXTEN}})
 same => n,Set(NPL_ERR=TIMEOUT)
 same => n,Set(NPL_MCCMNC=23415)
 same => n,Gosub(npl-outbound-call,s,price)
 same => n,Hangup()

; The AGI with no argument: the number comes from agi_extension.
[test-agi-extension]
exten => _X.,1,AGI(npl-lookup.agi)
 same => n,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)={record})
 same => n,Hangup()

#include {dialplan}/npl-lookup.conf
#include {dialplan}/npl-outbound.conf
#include {routes}
"""
RECORD = "|".join(
    ["${NPL_TEST_TOKEN}", "lookup", "${AGISTATUS}"]
    + [f"${{{v}}}" for v in ("NPL_ERR", "NPL_MCCMNC", "NPL_NETWORK", "NPL_NUMBER", "NPL_MCC", "NPL_MNC")]
    + ["${NPL_COUNTRY}", "${NPL_SOURCE}"]
)
LOOKUP_KEYS = ("AGISTATUS", "NPL_ERR", "NPL_MCCMNC", "NPL_NETWORK", "NPL_NUMBER", "NPL_MCC", "NPL_MNC")
LOOKUP_KEYS += ("NPL_COUNTRY", "NPL_SOURCE")


def numbers_on(mccmnc: str, count: int, start: int = 0) -> list[str]:
    """Dialled UK mobile numbers (0778845NNNN, NNNN from ``start``) the simulator puts on ``mccmnc``."""
    cfg = NumberConfig(country_code="44")
    found = []
    for i in range(start, 10000):
        dialled = f"0778845{i:04d}"
        msisdn = validate(normalise(dialled, cfg), cfg)
        if simulated_answer(msisdn, "2.4").split()[1].split(",")[0] == mccmnc:
            found.append(dialled)
            if len(found) == count:
                return found
    raise LookupError(mccmnc)


def number_on(mccmnc: str) -> str:
    """A dialled UK mobile number the simulator places on ``mccmnc``."""
    return numbers_on(mccmnc, 1)[0]


@dataclass
class Pbx:
    asterisk: Asterisk
    sim: Simulator
    results: Path
    stage: Path
    tokens: Iterator[int]
    config: Path

    @property
    def agi(self) -> Path:
        return self.stage / "var/lib/asterisk/agi-bin/npl-lookup.agi"

    def token(self) -> str:
        """A new call's token, once the account is idle: a request an earlier call abandoned at
        its deadline (a hanging test number) finishes in the background, holding the lock."""
        wait_for(lambda: not any(self.sim.active.values()), 40, "the requests of earlier calls to finish")
        return f"call{next(self.tokens)}"

    def records(self, token: str) -> list[list[str]]:
        lines = self.results.read_text().splitlines()
        return [line.split("|")[1:] for line in lines if line.split("|")[0] == token]

    def trunks(self, token: str) -> list[tuple[str, str]]:
        return [(r[1], r[2]) for r in self.records(token) if r[0] in ("trunk", "injected")]

    def lookup(self, exten: str, context: str = "test-gosub") -> dict[str, str]:
        """Run a lookup in ``context`` and return the variables the dialplan saw afterwards."""
        token = self.token()
        self.asterisk.originate(f"Local/{exten}@{context}", token, wait=5)
        found = wait_for(
            lambda: [r for r in self.records(token) if r[0] == "lookup"],
            20,
            lambda: f"the lookup record of {exten!r} ({context})\n{self.asterisk.console_tail()}",
        )
        return dict(zip(LOOKUP_KEYS, found[0][1:], strict=True))

    def call(self, exten: str, wait: int = 10) -> tuple[str, list[dict[str, str]]]:
        """An outbound call through npl-outbound; returns its token and its outbound CDRs."""
        token = self.token()
        self.asterisk.originate(f"Local/{exten}@npl-outbound", token, wait=wait)

        def finished() -> list[dict[str, str]]:
            rows = self.asterisk.cdr_rows(token)
            ends = {r["channel"][-2:] for r in rows if "@npl-outbound-" in r["channel"]}
            return rows if {";1", ";2"} <= ends else []

        rows = wait_for(finished, wait + 10, lambda: f"the CDRs of {exten!r}\n{self.asterisk.console_tail()}")
        outbound = [r for r in rows if r["channel"].endswith(";2") and r["dcontext"] == "npl-outbound"]
        assert outbound, rows
        return token, outbound


@pytest.fixture(scope="module")
def pbx(tmp_path_factory) -> Iterator[Pbx]:
    build, looked = find_asterisk()
    if build is None:
        reason = f"no Asterisk found (looked at {looked})"
        print(reason)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("pbx")
    stage = root / "stage"
    command = ["bash", str(ROOT / "install.sh"), "--destdir", str(stage), "--prefix", str(stage / "opt/npl-agi")]
    install = subprocess.run(
        [*command, "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )
    assert install.returncode == 0, install.stdout + install.stderr
    # Calls get 3.5 s: the interpreters of simultaneous calls start on a machine that may be busy.
    # A hanging number still times out (the simulator hangs 4 s).
    with Simulator("127.0.0.1", 0, hang_seconds=4) as sim:
        config = write_config(root / "npl-agi.conf", sim.url, api={"timeout": 3.5})
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["NPL_AGI_CONFIG"] = str(config)
        asterisk = Asterisk(build, root / "asterisk", stage / "var/lib/asterisk/agi-bin", env)
        results = root / "results.txt"
        results.touch()
        routes = asterisk.write_config(
            "npl-routes-test.conf", local_routes((DIALPLAN / "npl-routes.conf").read_text(), UNROUTED)
        )
        contexts = EXTENSIONS.format(dialplan=DIALPLAN, routes=routes, record=RECORD)
        asterisk.write_config(
            "extensions.conf", extensions_conf(contexts, NPL_ONNET_MCCMNC="23415", NPL_TEST_RESULTS=str(results))
        )
        asterisk.cdr_custom(CDR_SNIPPET)
        try:
            asterisk.start()
            yield Pbx(asterisk, sim, results, stage, itertools.count(1), config)
        finally:
            asterisk.stop()


def test_the_bundled_dialplan_loads(pbx: Pbx) -> None:
    shown = pbx.asterisk.cli("dialplan show npl-outbound")
    assert "'_X.'" in shown and "'_+X.'" in shown, shown
    routes = pbx.asterisk.cli("dialplan show npl-routes")
    for mccmnc in ("23415", "23410", "23430"):
        assert f"'{mccmnc}'" in routes
    assert f"'{UNROUTED}'" not in routes
    messages = (pbx.asterisk.log / "messages.log").read_text()
    problems = [
        line for line in messages.splitlines() if "pbx_config" in line and ("ERROR" in line or "WARNING" in line)
    ]
    assert problems == []


def test_gosub_sets_the_variables(pbx: Pbx) -> None:
    seen = pbx.lookup("07788450450")
    assert seen == {
        "AGISTATUS": "SUCCESS",
        "NPL_ERR": "",
        "NPL_MCCMNC": "23415",
        "NPL_NETWORK": "Vodafone UK",
        "NPL_NUMBER": "447788450450",
        "NPL_MCC": "234",
        "NPL_MNC": "15",
        "NPL_COUNTRY": "GB",
        "NPL_SOURCE": seen["NPL_SOURCE"],
    }
    assert seen["NPL_SOURCE"] in ("api", "cache")
    assert "447788450450" in pbx.sim.stats()["charged"]  # asked of the simulator, by the staged AGI


def test_gosub_leaves_nothing_from_an_earlier_lookup(pbx: Pbx) -> None:
    seen = pbx.lookup("07400000001", context="test-gosub-twice")
    assert seen["NPL_ERR"] == "ERR1"
    assert seen["NPL_MCCMNC"] == seen["NPL_NETWORK"] == seen["NPL_MCC"] == ""


@pytest.mark.parametrize(
    ("mccmnc", "trunk", "rate"), [("23415", "trunk-vodafone", "onnet"), ("23410", "trunk-o2", "offnet")]
)
def test_outbound_call_goes_to_its_networks_trunk(pbx: Pbx, mccmnc: str, trunk: str, rate: str) -> None:
    dialled = number_on(mccmnc)
    token, cdrs = pbx.call(dialled)
    assert pbx.trunks(token) == [(trunk, dialled)]
    (cdr,) = cdrs
    assert cdr["dst"] == dialled  # routes run as subroutines: billing keeps the dialled number
    assert cdr["disposition"] == "ANSWERED"
    assert cdr["dstchannel"].startswith(f"Local/{dialled}@{trunk}-")
    assert (cdr["npl_mccmnc"], cdr["npl_rate"], cdr["npl_route"], cdr["npl_err"]) == (mccmnc, rate, mccmnc, "")
    assert cdr["npl_network"] == {"23415": "Vodafone UK", "23410": "O2 (UK)"}[mccmnc]


def test_outbound_call_dialled_with_plus(pbx: Pbx) -> None:
    token, cdrs = pbx.call("+447788450450")
    assert pbx.trunks(token) == [("trunk-vodafone", "+447788450450")]
    assert [(c["npl_mccmnc"], c["npl_route"]) for c in cdrs] == [("23415", "23415")]


@pytest.mark.parametrize(
    ("dialled", "error"),
    [("07400000001", "ERR1"), ("0123", "BADNUMBER"), ("02079460018", "NOTMOBILE"), ("07400999902", "TIMEOUT")],
)
def test_failed_lookup_takes_the_fallback(pbx: Pbx, dialled: str, error: str) -> None:
    token, cdrs = pbx.call(dialled)
    assert pbx.trunks(token) == [("trunk-default", dialled)]
    (cdr,) = cdrs
    assert (cdr["npl_err"], cdr["npl_mccmnc"], cdr["npl_rate"], cdr["npl_route"]) == (error, "", "unknown", "fallback")
    assert cdr["dst"] == dialled


def test_network_without_a_route_takes_the_fallback(pbx: Pbx) -> None:
    dialled = number_on(UNROUTED)
    token, cdrs = pbx.call(dialled)
    assert pbx.trunks(token) == [("trunk-default", dialled)]
    (cdr,) = cdrs
    assert (cdr["npl_mccmnc"], cdr["npl_network"], cdr["npl_rate"], cdr["npl_route"]) == (
        UNROUTED,
        "3",
        "offnet",
        "fallback",
    )


def test_unavailable_trunk_moves_on_to_the_fallback(pbx: Pbx) -> None:
    dialled = number_on(DOWN)
    token, cdrs = pbx.call(dialled)
    assert pbx.trunks(token) == [("trunk-ee", dialled), ("trunk-default", dialled)]
    assert [(c["npl_route"], c["disposition"]) for c in cdrs] == [(DOWN, "CONGESTION"), ("fallback", "ANSWERED")]
    assert {c["npl_mccmnc"] for c in cdrs} == {DOWN}
    assert {c["npl_retry"] for c in cdrs} == {""}  # the service's own answer: no retry


def test_a_cached_number_whose_trunk_is_unavailable_is_looked_up_fresh_once(pbx: Pbx) -> None:
    """The second call to a number is routed from the cache; its trunk congests, so the number is
    looked up once more, fresh (a credit), and the same network takes the fallback."""
    (dialled,) = numbers_on(DOWN, 1, start=6000)
    msisdn = "44" + dialled[1:]
    first, _ = pbx.call(dialled)
    charged = pbx.sim.stats()["charged"].count(msisdn)
    token, cdrs = pbx.call(dialled, wait=20)  # two lookups before the fallback answers
    assert pbx.trunks(first) == pbx.trunks(token) == [("trunk-ee", dialled), ("trunk-default", dialled)]
    assert pbx.sim.stats()["charged"].count(msisdn) == charged + 1 == 2
    assert [(c["npl_route"], c["disposition"], c["npl_retry"]) for c in cdrs] == [
        (DOWN, "CONGESTION", ""),
        ("fallback", "ANSWERED", "same"),
    ]
    assert {c["npl_mccmnc"] for c in cdrs} == {DOWN}
    messages = (pbx.asterisk.log / "messages.log").read_text(errors="replace")
    assert f"npl-agi: '{dialled}' -> {DOWN} EE (cache" in messages  # the routed answer was the cache's


def test_a_cached_number_found_on_a_network_without_a_route_takes_the_fallback(pbx: Pbx) -> None:
    """Cached on EE, whose trunk congests; the fresh lookup finds it on Three UK, which has no
    route: the call takes the fallback, priced and recorded as Three's."""
    (dialled,) = numbers_on(UNROUTED, 1, start=6200)
    msisdn = "44" + dialled[1:]
    SqliteCache(load_config(str(pbx.config)).cache).put_many([Answer(msisdn, mccmnc=DOWN, source="api")])
    token, cdrs = pbx.call(dialled, wait=20)  # two lookups before the fallback answers
    assert pbx.trunks(token) == [("trunk-ee", dialled), ("trunk-default", dialled)]
    assert pbx.sim.stats()["charged"].count(msisdn) == 1
    assert [(c["npl_mccmnc"], c["npl_route"], c["npl_retry"]) for c in cdrs] == [
        (DOWN, DOWN, ""),
        (UNROUTED, "fallback", "changed"),
    ]
    assert (cdrs[-1]["npl_network"], cdrs[-1]["npl_rate"]) == ("3", "offnet")


def test_agi_that_cannot_run_is_a_failure_and_takes_the_fallback(pbx: Pbx) -> None:
    mode = pbx.agi.stat().st_mode
    pbx.agi.chmod(mode & ~(stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
    try:
        seen = pbx.lookup("07788450450")
        token, cdrs = pbx.call("07788450450")
    finally:
        pbx.agi.chmod(mode)
    assert (seen["AGISTATUS"], seen["NPL_ERR"], seen["NPL_MCCMNC"]) == ("FAILURE", "AGIFAIL", "")
    assert pbx.trunks(token) == [("trunk-default", "07788450450")]
    assert [(c["npl_err"], c["npl_rate"], c["npl_route"]) for c in cdrs] == [("AGIFAIL", "unknown", "fallback")]


def test_simultaneous_calls_are_each_routed_over_one_connection(pbx: Pbx) -> None:
    """Calls at the same moment: each AGI waits its turn for the account (one connection at a
    time), within the call deadline, and every call still reaches its own network's trunk."""
    calls = dict.fromkeys(numbers_on("23415", 2, start=5000), "trunk-vodafone")
    calls |= dict.fromkeys(numbers_on("23410", 2, start=5000), "trunk-o2")
    tokens = {}
    for dialled in calls:
        tokens[dialled] = pbx.token()
        pbx.asterisk.originate(f"Local/{dialled}@npl-outbound", tokens[dialled])
    for dialled, trunk in calls.items():
        token = tokens[dialled]
        wait_for(lambda token=token: pbx.trunks(token), 20, f"the trunk of {dialled}")
        assert pbx.trunks(token) == [(trunk, dialled)]
    assert pbx.sim.stats()["max_concurrent"]["demo"] == 1


def test_broken_install_is_a_config_failure(pbx: Pbx) -> None:
    """The AGI script's own guard: without its package it still answers, with NPL_ERR=CONFIG."""
    (package,) = (pbx.stage / "opt/npl-agi/lib").glob("python*/site-packages/npl_agi")
    hidden = package.with_name("npl_agi.hidden")
    package.rename(hidden)
    try:
        seen = pbx.lookup("07788450450")
        token, cdrs = pbx.call("07788450450")
    finally:
        hidden.rename(package)
    assert (seen["AGISTATUS"], seen["NPL_ERR"], seen["NPL_MCCMNC"]) == ("SUCCESS", "CONFIG", "")
    assert pbx.trunks(token) == [("trunk-default", "07788450450")]
    assert [(c["npl_err"], c["npl_route"]) for c in cdrs] == [("CONFIG", "fallback")]


# A stand-in script's start: the environment block, keeping the call's token (its account code).
TOKEN_PRELUDE = (
    "#!/bin/sh\ntoken=\n"
    'while read -r line && [ -n "$line" ]; do\n'
    "  case $line in agi_accountcode:*) token=${line#agi_accountcode: } ;; esac\n"
    "done\n"
)
AGI_PRELUDE = '#!/bin/sh\nwhile read -r line && [ -n "$line" ]; do :; done\n'  # the environment block


@pytest.mark.parametrize(
    ("script", "status"),
    [
        # dies after it set a network (killed, out of memory...): the network must not be used
        (AGI_PRELUDE + "echo 'SET VARIABLE NPL_MCCMNC 23415'\nread -r reply\nexit 3\n", "FAILURE"),
        # runs and ends without a word (not the npl-agi script at all)
        (AGI_PRELUDE + "exit 0\n", "SUCCESS"),
    ],
    ids=["dies-after-setting-a-network", "sets-nothing"],
)
def test_agi_that_fails_midway_is_a_failure(pbx: Pbx, script: str, status: str) -> None:
    """Fault injection: a stand-in for the script that breaks the way a crashed one would."""
    real = pbx.agi.read_bytes()
    try:
        pbx.agi.write_text(script)
        seen = pbx.lookup("07788450450")
    finally:
        pbx.agi.write_bytes(real)
    assert (seen["AGISTATUS"], seen["NPL_ERR"], seen["NPL_MCCMNC"]) == (status, "AGIFAIL", "")


HOSTILE = [
    '07788450450"',
    "07788450450&Local",
    "07788450450,60,U(npl-lookup^s^1)",
    "0${EXTEN}$[1+1]",
    "0\\\\7788450450\\",
    "0)7788(450450",
    "07788450450\\;h",
]


@pytest.mark.parametrize("dialled", HOSTILE)
def test_hostile_dialled_number_reaches_no_dial_string(pbx: Pbx, dialled: str) -> None:
    token, cdrs = pbx.call(dialled)
    trunks = pbx.trunks(token)
    assert len(trunks) == 1, trunks  # one trunk, nothing injected into [default] or elsewhere
    trunk, number = trunks[0]
    assert number and set(number) <= set("0123456789+"), number
    route = cdrs[-1]["npl_route"]
    assert trunk == ("trunk-default" if route == "fallback" else "trunk-vodafone")
    assert cdrs[-1]["npl_err"] in LOOKUP_ERRORS | {""}


@pytest.mark.parametrize("dialled", HOSTILE)
def test_hostile_input_to_the_agi_leaves_a_working_dialplan(pbx: Pbx, dialled: str) -> None:
    by_argument = pbx.lookup(dialled)  # Gosub argument, as the dialplan passes it
    by_extension = pbx.lookup(dialled, context="test-agi-extension")  # agi_extension, untouched
    for seen in (by_argument, by_extension):
        assert seen["AGISTATUS"] == "SUCCESS"
        assert seen["NPL_ERR"] in LOOKUP_ERRORS | {""}
        assert seen["NPL_ERR"] or seen["NPL_MCCMNC"] == "23415"


@pytest.mark.parametrize("dialled", ["07400999902", "07400999901"])
def test_caller_hanging_up_during_a_slow_lookup_leaves_no_agi_process(pbx: Pbx, dialled: str) -> None:
    def agi_processes() -> dict[int, str]:
        return {pid: cmd for pid, cmd in pbx.asterisk.descendants().items() if "npl-lookup.agi" in cmd}

    assert agi_processes() == {}
    token = pbx.token()
    pbx.asterisk.originate(f"Local/{dialled}@npl-outbound", token, wait=1)  # the caller gives up after 1 s
    running = wait_for(agi_processes, 10, f"the AGI script for {dialled}")
    assert all(str(pbx.agi) in cmd and str(pbx.stage / "opt/npl-agi/bin/python") in cmd for cmd in running.values())
    wait_for(lambda: not agi_processes(), 8, "the AGI script to end after the hangup")
    outbound = wait_for(
        lambda: [r for r in pbx.asterisk.cdr_rows(token) if r["channel"].endswith(";2")],
        10,
        "the CDR of the abandoned call",
    )
    assert [(r["lastapp"], r["disposition"]) for r in outbound] == [("AGI", "NO ANSWER")]
    assert pbx.trunks(token) == []  # a call nobody waits for is not routed


def test_cdr_snippet_writes_every_npl_field(pbx: Pbx) -> None:
    """The shipped npl-cdr-custom.conf, #included in cdr_custom.conf, carries the npl_* fields."""
    assert {"npl_mccmnc", "npl_network", "npl_err", "npl_rate", "npl_ported", "npl_route", "npl_retry"} <= set(
        pbx.asterisk.cdr_fields
    )
    assert pbx.asterisk.cdr_file.name == "npl-cdr.csv"
    dialled = number_on("23410")
    ranges = pbx.config.parent / "ranges.csv"
    uk = NumberConfig(country_code="44")
    ranges.write_text(f"{validate(normalise(dialled, uk), uk)},23415\n")  # its block: ported from Vodafone
    assert cli.main(["--config", str(pbx.config), "ranges", "import", str(ranges)]) == 0
    _, (cdr,) = pbx.call(dialled)
    assert {k: cdr[k] for k in cdr if k.startswith("npl_")} == {
        "npl_mccmnc": "23410",
        "npl_network": "O2 (UK)",
        "npl_err": "",
        "npl_rate": "offnet",
        "npl_ported": "1",
        "npl_route": "23410",
        "npl_retry": "",
    }
    assert cdr["start"] and cdr["end"] and cdr["uniqueid"]


def test_lookup_that_sets_an_error_and_a_network_takes_the_fallback(pbx: Pbx) -> None:
    """A lookup (here a stand-in script) that sets NPL_ERR and NPL_MCCMNC: the call is not routed by it."""
    real = pbx.agi.read_bytes()
    script = AGI_PRELUDE + (
        "echo 'SET VARIABLE NPL_MCCMNC 23415'\nread -r reply\n"
        "echo 'SET VARIABLE NPL_ERR TIMEOUT'\nread -r reply\nexit 0\n"
    )
    try:
        pbx.agi.write_text(script)
        token, cdrs = pbx.call("07788450450")
    finally:
        pbx.agi.write_bytes(real)
    assert pbx.trunks(token) == [("trunk-default", "07788450450")]
    assert [(c["npl_err"], c["npl_rate"], c["npl_route"]) for c in cdrs] == [("TIMEOUT", "unknown", "fallback")]


def test_outbound_context_guards_on_npl_err_itself(pbx: Pbx) -> None:
    """npl-outbound's own check, after the lookup: NPL_ERR set means the fallback, whatever NPL_MCCMNC says."""
    token = pbx.token()
    pbx.asterisk.originate("Local/07788450450@test-outbound-guard", token)
    wait_for(lambda: pbx.trunks(token), 20, lambda: f"the trunk of the guarded call\n{pbx.asterisk.console_tail()}")
    assert pbx.trunks(token) == [("trunk-default", "07788450450")]


def test_agi_gets_no_sighup_when_the_caller_hangs_up(pbx: Pbx) -> None:
    """AGISIGHUP=no in the Gosub: a caller hanging up at once does not kill the script by signal."""
    real = pbx.agi.read_bytes()
    script = TOKEN_PRELUDE + (
        f"trap 'echo \"$token|signal|HUP\" >> {pbx.results}' HUP\n"
        "i=0; while [ $i -lt 20 ]; do sleep 0.1; i=$((i + 1)); done\n"
        f'echo "$token|signal|none" >> {pbx.results}\n'
    )
    token = pbx.token()
    try:
        pbx.agi.write_text(script)
        pbx.asterisk.originate("Local/07788450450@test-agisighup", token, wait=1)  # the caller gives up at once
        wait_for(lambda: [r for r in pbx.records(token) if r == ["signal", "none"]], 15, "the stand-in script to end")
    finally:
        pbx.agi.write_bytes(real)
    assert [r for r in pbx.records(token) if r[0] == "signal"] == [["signal", "none"]]


def test_agisighup_is_not_left_set_after_the_lookup(pbx: Pbx) -> None:
    token = pbx.token()
    pbx.asterisk.originate("Local/07788450450@test-agisighup", token)
    (after,) = wait_for(lambda: [r for r in pbx.records(token) if r[0] == "after"], 20, "the record after the Gosub")
    assert after == ["after", "", "23415"]


def test_the_gosub_passes_the_time_it_calls_the_agi(pbx: Pbx) -> None:
    """The call's deadline starts at the dialplan's AGI() call: the Gosub passes that time, to the
    millisecond (EPOCH alone is whole seconds), last, after the number and the Gosub's second
    argument (``fresh``, or empty)."""
    real = pbx.agi.read_bytes()
    script = TOKEN_PRELUDE + f'printf "%s|args|%s|%s|%s|%s\\n" "$token" "$#" "$1" "$2" "$3" >> {pbx.results}\n'
    seen = []
    try:
        pbx.agi.write_text(script)
        for context in ("test-gosub", "test-gosub-fresh"):
            token = pbx.token()
            before = time.time()
            pbx.asterisk.originate(f"Local/07788450450@{context}", token)
            (record,) = wait_for(
                lambda token=token: [r for r in pbx.records(token) if r[0] == "args"], 20, "the AGI's arguments"
            )
            seen.append((before, time.time(), record[1:]))
    finally:
        pbx.agi.write_bytes(real)
    assert [args[:3] for *_, args in seen] == [["3", "07788450450", ""], ["3", "07788450450", "fresh"]]
    for before, after, (_, number, second, given) in seen:
        assert re.fullmatch(r"t=\d{10}\.\d{3}", given), given
        assert before - 1 <= float(given[2:]) <= after
        assert asked_at([number, second, given], after, 0.0) is not None
    assert any(not args[3].endswith(".000") for *_, args in seen)


def test_a_fresh_gosub_asks_for_a_cached_number(pbx: Pbx) -> None:
    dialled = numbers_on("23410", 1, start=6100)[0]
    seen = [pbx.lookup(dialled, context) for context in ("test-gosub", "test-gosub", "test-gosub-fresh")]
    assert [(s["AGISTATUS"], s["NPL_ERR"], s["NPL_SOURCE"], s["NPL_MCCMNC"]) for s in seen] == [
        ("SUCCESS", "", "api", "23410"),
        ("SUCCESS", "", "cache", "23410"),
        ("SUCCESS", "", "api", "23410"),
    ]
    assert pbx.sim.stats()["charged"].count("44" + dialled[1:]) == 2


def test_the_script_takes_the_gosubs_time(pbx: Pbx) -> None:
    dialled = number_on("23410")
    seen = pbx.lookup(dialled)
    assert (seen["AGISTATUS"], seen["NPL_ERR"], seen["NPL_MCCMNC"]) == ("SUCCESS", "", "23410")
    messages = (pbx.asterisk.log / "messages.log").read_text(errors="replace")
    assert f"npl-agi: '{dialled}' -> 23410" in messages  # the script's own line, at verbose 3
    assert "the deadline counts from the script's start" not in messages


def test_scripts_beyond_npl_process_max_are_not_started(pbx: Pbx, tmp_path: Path) -> None:
    """An overloaded PBX sheds lookups in the dialplan, before a process is started: with
    NPL_PROCESS_MAX scripts running, the next call returns at once with NPL_ERR=BUSY; a slot
    is free again when a script ends."""
    release = tmp_path / "release"
    real = pbx.agi.read_bytes()
    script = TOKEN_PRELUDE + (
        f'printf "%s|held\\n" "$token" >> {pbx.results}\n'
        f"while [ ! -e {release} ]; do sleep 0.05; done\n"
        "echo 'SET VARIABLE NPL_MCCMNC 23415'\nread -r reply\n"
    )
    held = []
    try:
        pbx.asterisk.cli("dialplan set global NPL_PROCESS_MAX 2")
        pbx.agi.write_text(script)
        for _ in range(2):
            held.append(pbx.token())
            pbx.asterisk.originate("Local/07788450450@test-gosub", held[-1], wait=30)
        for token in held:
            wait_for(lambda token=token: [r for r in pbx.records(token) if r[0] == "held"], 20, "a held script")
        busy = pbx.lookup("07788450450")
        release.touch()
        for token in held:
            wait_for(lambda token=token: [r for r in pbx.records(token) if r[0] == "lookup"], 20, "a held lookup")
        after = pbx.lookup("07788450450")
    finally:
        release.touch()
        pbx.agi.write_bytes(real)
        pbx.asterisk.cli("dialplan set global NPL_PROCESS_MAX 8")
    assert (busy["AGISTATUS"], busy["NPL_ERR"], busy["NPL_MCCMNC"]) == ("", "BUSY", "")
    assert [pbx.records(t)[-1][1:4] for t in held] == [["SUCCESS", "", "23415"]] * 2
    assert (after["AGISTATUS"], after["NPL_ERR"], after["NPL_MCCMNC"]) == ("SUCCESS", "", "23415")
