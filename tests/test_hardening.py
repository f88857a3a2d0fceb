"""What every answer paid for, every deadline and every password must survive: broken servers,
the spec's own example account, abandoned requests and bursts of simultaneous calls."""

from __future__ import annotations

import concurrent.futures
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import AGI_SCRIPT, parse_response, write_config
from test_client import client_for

from npl_agi.askers.direct import lookup_here
from npl_agi.config import load_config
from npl_agi.core import protocol
from npl_agi.core.codes import TRUNCATED
from npl_agi.core.errors import ProtocolError, RequestRejected
from npl_agi.doors.process import VARIABLES
from npl_agi.doubles.emulator import AgiEmulator
from npl_agi.doubles.simulator import Account, Simulator, simulated_answer
from tests import hostile_server as hostile

ASKED = ["447788450450", "447810701702", "447912345678"]


def expected(msisdn: str) -> protocol.Answer:
    line = simulated_answer(msisdn, "2.4")
    return parse_response(f"QUERYOK\n{line}\nENDBATCH\n", [msisdn])[msisdn]._replace(source="api")


@pytest.mark.parametrize("behaviour", [hostile.reset_mid_body, hostile.short_body, hostile.bad_chunk])
def test_an_answer_cut_off_mid_body_keeps_its_complete_lines(tmp_path, behaviour):
    with hostile.HostileServer(behaviour) as server:
        got = client_for(server.url, tmp_path).lookup(ASKED, timeout=5)
    assert got[ASKED[0]] == expected(ASKED[0])
    assert [got[n].error for n in ASKED[1:]] == [TRUNCATED, TRUNCATED]


def test_one_malformed_line_costs_only_its_own_number(tmp_path):
    with hostile.HostileServer(hostile.one_bad_line) as server:
        got = client_for(server.url, tmp_path).lookup(ASKED, timeout=5)
    assert got[ASKED[0]] == expected(ASKED[0]) and got[ASKED[2]] == expected(ASKED[2])
    assert got[ASKED[1]].error == "PROTOCOL" and "malformed" in got[ASKED[1]].error_name


def test_a_malformed_line_in_a_bulk_request_does_not_lose_the_rest_of_the_batch(tmp_path):
    numbers = [f"4477884{i:05d}" for i in range(1000)]
    with hostile.HostileServer(hostile.one_bad_line) as server:
        conf = write_config(tmp_path / "npl-agi.conf", server.url)
        answers = lookup_here(load_config(str(conf))).many(numbers, timeout=30, strict=False)
        assert sum(a.ok for a in answers) == 999 and not answers[1].ok
        again = lookup_here(load_config(str(conf))).many(numbers, timeout=30, strict=False)
        assert len(server.forms) == 2 and server.forms[1]["msisdn"] == numbers[1]  # only the bad one again
    assert sum(a.source == "cache" for a in again) == 999


@pytest.mark.parametrize(
    "behaviour", [hostile.reset_mid_body, hostile.short_body, hostile.bad_chunk, hostile.echo_in_reason]
)
def test_the_command_never_shows_a_traceback(tmp_path, subprocess_env, behaviour):
    with hostile.HostileServer(behaviour) as server:
        conf = write_config(tmp_path / "npl-agi.conf", server.url)
        result = subprocess.run(
            [sys.executable, "-m", "npl_agi.admin.cli", "--config", str(conf), "lookup", *ASKED],
            capture_output=True, text=True, env=subprocess_env, timeout=60,
        )  # fmt: skip
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 1
    assert result.returncode in (0, 1)


# The spec's example account is bob/123; "OK" is inside QUERYOK, "44" and "7" inside every number.
@pytest.mark.parametrize("password", ["123", "44", "7", "OK", "ENDBATCH", "23415"])
def test_a_password_that_collides_with_the_data_never_changes_an_answer(tmp_path, password):
    numbers = ["447712312345", "447123123123", "447788450450", "447973100100"]
    with Simulator(accounts={"bob": Account(password)}) as sim:
        conf = write_config(tmp_path / "npl-agi.conf", sim.url, user="bob", password=password)
        answers = lookup_here(load_config(str(conf))).many(numbers)
        cached = lookup_here(load_config(str(conf))).many(numbers)
        assert lookup_here(load_config(str(conf))).asker.client.check().startswith("FAIL No numbers")
    # The service's fields, as sent; the names and the range holder are ours, from bundled tables.
    derived = {"number": "", "network": "", "country": "", "range_mccmnc": ""}
    assert [a._replace(**derived) for a in answers[:3]] == [expected(n) for n in numbers[:3]]
    assert answers[3].error == "ERR1"
    assert [a.source for a in cached] == ["cache"] * 4
    assert sim.stats()["charged"] == numbers


@pytest.mark.parametrize("password", ["123", "p\\w\"x'y", "a b&c=d%2F", "long-" + "q" * 90, "\\\\" + "z" * 70 + "tail"])
@pytest.mark.parametrize("behaviour", [hostile.echo_in_reason, hostile.echo_in_body])
def test_an_echoed_password_never_reaches_a_message(tmp_path, caplog, password, behaviour):
    with hostile.HostileServer(behaviour) as server, pytest.raises((ProtocolError, RequestRejected)) as info:
        client_for(server.url, tmp_path, password=password).lookup(ASKED, timeout=5)
    text = f"{info.value} {getattr(info.value, 'line', '')} {info.value!r}"
    visible = text.replace("***", "")
    for form in {password, repr(password)[1:-1], password[:12]}:
        assert form not in visible, text
    assert password not in caplog.text


def test_verify_tls_off_warns_once_not_on_every_request(tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING)
    with Simulator() as sim:
        client = client_for(sim.url.replace("http:", "https:"), tmp_path, verify_tls=False)
        for _ in range(2):
            with pytest.raises(Exception):  # noqa: B017 - the simulator speaks plain HTTP here
                client.lookup(["447788450450"], timeout=2)
    assert [r.message for r in caplog.records].count(
        "TLS certificate checks are off (verify_tls = no): the service is not authenticated"
    ) <= 1


# -- the AGI: the deadline counts from the script's start, and a request outlives its call --


def agi_for(tmp_path: Path, env: dict, url: str, **api: str) -> AgiEmulator:
    conf = write_config(tmp_path / "npl-agi.conf", url, api=api)
    return AgiEmulator(str(AGI_SCRIPT), env={**env, "NPL_AGI_CONFIG": str(conf)})


def cached_numbers(tmp_path: Path) -> set[str]:
    path = tmp_path / "cache.sqlite"
    if not path.exists():
        return set()
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT msisdn FROM answers")}


def wait_until(probe, seconds: float = 20.0):
    """Poll for what a detached child does after the call has ended."""
    end = time.monotonic() + seconds
    while not (result := probe()) and time.monotonic() < end:
        time.sleep(0.05)
    return result


def idle(sim: Simulator) -> bool:
    with sim._mutex:
        return not any(sim.active.values())


def test_a_request_abandoned_at_the_deadline_finishes_caches_and_keeps_the_lock(tmp_path, subprocess_env):
    with Simulator(line_delay=3.0) as sim:
        agi = agi_for(tmp_path, subprocess_env, sim.url, timeout="2")
        first = agi.run(["07788450450"]).variables
        assert first["NPL_ERR"] == "TIMEOUT" and int(first["NPL_LOOKUP_MS"]) <= 2100
        # The first request is still being answered: the next call waits for the lock, not beside it.
        second = agi.run(["07810701702"]).variables
        assert wait_until(lambda: idle(sim) and "447788450450" in cached_numbers(tmp_path)), (
            sim.stats(),
            cached_numbers(tmp_path),
        )
        assert sim.stats()["max_concurrent"] == {"demo": 1}
        assert second["NPL_ERR"] == "TIMEOUT"
        third = agi.run(["07788450450"]).variables
    assert (third["NPL_SOURCE"], third["NPL_MCCMNC"]) == ("cache", "23415")
    assert sim.stats()["charged"].count("447788450450") == 1


def test_no_request_is_started_that_cannot_finish_before_the_deadline(tmp_path, subprocess_env):
    """A caller that gets the lock with less than min_request_time left answers TIMEOUT unasked."""
    with Simulator(line_delay=1.5) as sim:
        agi = agi_for(tmp_path, subprocess_env, sim.url, timeout="3", min_request_time="1.45")
        runs = list(concurrent.futures.ThreadPoolExecutor(2).map(agi.run, [["07788450450"], ["07810701702"]]))
        assert wait_until(lambda: idle(sim) and len(sim.stats()["requests"]) >= 1)
    errors = sorted(r.variables["NPL_ERR"] for r in runs)
    assert errors == ["", "TIMEOUT"]
    assert len(sim.stats()["requests"]) == 1  # the late one never connected, so paid nothing


def test_a_burst_of_twenty_calls_keeps_every_deadline_and_pays_once_per_number(tmp_path, subprocess_env):
    numbers = [f"074009{i:05d}" for i in range(1, 21)]
    with Simulator(line_delay=0.2) as sim:  # the shipped 2 s deadline
        agi = agi_for(tmp_path, subprocess_env, sim.url)
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            burst = list(pool.map(lambda n: agi.run([n]), numbers))
        for run in burst:
            assert run.returncode == 0 and run.stderr == ""
            assert list(run.variables) == list(VARIABLES)
            assert int(run.variables["NPL_LOOKUP_MS"]) <= 2100, run.variables
        assert wait_until(lambda: idle(sim))
        paid_in_burst = set(sim.stats()["charged"])
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            again = list(pool.map(lambda n: agi.run([n]), numbers))
        assert wait_until(lambda: idle(sim))
    charged = sim.stats()["charged"]
    assert len(charged) == len(set(charged)), "a number was paid for twice"
    assert max(sim.stats()["max_concurrent"].values(), default=0) <= 1
    # What the burst paid for, even for calls that had given up, the repeat finds in the cache.
    for run in again:
        if run.variables["NPL_NUMBER"] in paid_in_burst:
            assert run.variables["NPL_SOURCE"] == "cache", run.variables


@pytest.mark.parametrize(("api", "npl_err"), [({"enabled": "no"}, "DISABLED"), ({"timeout": "x"}, "CONFIG")])
def test_every_failure_sets_every_variable(tmp_path, subprocess_env, api, npl_err):
    """Nothing of an earlier lookup survives; the range holder is said whenever the configuration
    could be read (447788 is Vodafone's block), even with lookups switched off."""
    run = agi_for(tmp_path, subprocess_env, "http://127.0.0.1:9/npl", **api).run(["07788450450"])
    assert list(run.variables) == list(VARIABLES)
    assert run.variables["NPL_ERR"] == npl_err
    assert run.variables["NPL_RANGE_MCCMNC"] == ("23415" if npl_err == "DISABLED" else "")
    said = ("NPL_ERR", "NPL_LOOKUP_MS", "NPL_RANGE_MCCMNC")
    assert all(run.variables[v] == "" for v in VARIABLES if v not in said)


def test_two_spellings_of_one_number_are_one_miss_one_request_and_one_progress_step(tmp_path):
    steps = []
    with Simulator() as sim:
        conf = write_config(tmp_path / "npl-agi.conf", sim.url)
        look = lookup_here(load_config(str(conf)))
        answers = look.many(
            ["07788450450", "+44 7788 450450", "0044 7788450450"], progress=lambda d, t: steps.append((d, t))
        )
        stats = look.cache.stats()
    assert {a.msisdn for a in answers} == {"447788450450"}
    assert (stats["hits"], stats["misses"]) == (0, 1)
    assert steps == [(0, 1), (1, 1)]
    assert sim.stats()["requests"][0]["numbers"] == ["447788450450"]
