"""One request for all who wait: the process script's misses go into the backend's queue of
waiting numbers, and whoever holds one of the account's connections asks for every number
waiting. Shown with real AGI processes against the simulator, with the shipped 2 s deadline."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

from npl_agi.emulator import AgiEmulator
from npl_agi.simulator import Simulator
from tests.conftest import AGI_SCRIPT, write_config

COLD = [f"074009{i:05d}" for i in range(1, 21)]


def script(tmp_path, env, url, **sections) -> AgiEmulator:
    conf = write_config(tmp_path / "npl-agi.conf", url, **sections)
    return AgiEmulator(str(AGI_SCRIPT), env={**env, "NPL_AGI_CONFIG": str(conf)})


def at_once(agi: AgiEmulator, dialled: list[str]) -> list[dict[str, str]]:
    """Every call started together, as a burst of calls reaches Asterisk."""
    with concurrent.futures.ThreadPoolExecutor(len(dialled)) as pool:
        runs = list(pool.map(lambda n: agi.run([n]), dialled))
    for run in runs:
        assert run.returncode == 0 and run.stderr == "", run
    return [run.variables for run in runs]


def settle(sim: Simulator, seconds: float = 30.0) -> None:
    """Wait until no request is open (an asker may outlive the calls that queued for it)."""
    end = time.monotonic() + seconds
    while any(sim.stats()["active"].values()) and time.monotonic() < end:
        time.sleep(0.05)


def answered(runs: list[dict[str, str]]) -> int:
    return sum(1 for v in runs if v["NPL_ERR"] == "" and v["NPL_MCCMNC"])


def test_twenty_cold_calls_at_once_are_answered_by_a_few_shared_requests(tmp_path, subprocess_env):
    with Simulator() as sim:
        agi = script(tmp_path, subprocess_env, sim.url)
        runs = at_once(agi, COLD)
        settle(sim)
        after = agi.run(["07400988888"]).variables
        requests = sim.stats()["requests"]
    assert answered(runs) == 20, [v["NPL_ERR"] for v in runs]
    assert all(int(v["NPL_LOOKUP_MS"]) <= 2100 for v in runs), [v["NPL_LOOKUP_MS"] for v in runs]
    assert len(requests) - 1 <= 5, [r["numbers"] for r in requests]
    assert (after["NPL_ERR"], after["NPL_SOURCE"]) == ("", "api")
    assert sim.stats()["max_concurrent"] == {"demo": 1}


def test_twenty_cold_calls_behind_a_slow_service_share_at_most_three_requests(tmp_path, subprocess_env):
    with Simulator(request_delay=0.5) as sim:
        agi = script(tmp_path, subprocess_env, sim.url)
        runs = at_once(agi, COLD)
        settle(sim)
        requests = sim.stats()["requests"]
    assert answered(runs) >= 19, [v["NPL_ERR"] for v in runs]
    assert len(requests) <= 3, [r["numbers"] for r in requests]
    assert sim.stats()["max_concurrent"] == {"demo": 1}


def test_twenty_calls_for_five_numbers_pay_five_credits(tmp_path, subprocess_env):
    with Simulator() as sim:
        agi = script(tmp_path, subprocess_env, sim.url)
        runs = at_once(agi, COLD[:5] * 4)
        settle(sim)
        charged = sim.stats()["charged"]
    assert answered(runs) == 20, [v["NPL_ERR"] for v in runs]
    assert sorted(charged) == sorted("44" + n[1:] for n in COLD[:5])


def test_ten_calls_behind_a_service_slow_per_number_are_all_asked_and_cached(tmp_path, subprocess_env):
    """A request whose lines come after the calls' deadline still answers every number it was
    sent: the next call for any of them is a cache hit."""
    with Simulator(line_delay=0.2) as sim:
        agi = script(tmp_path, subprocess_env, sim.url)
        runs = at_once(agi, COLD[:10])
        settle(sim)
        again = at_once(agi, COLD[:10])
        charged = sim.stats()["charged"]
    assert answered(runs) >= 5, [v["NPL_ERR"] for v in runs]
    assert sorted(charged) == sorted("44" + n[1:] for n in COLD[:10])
    assert [v["NPL_SOURCE"] for v in again] == ["cache"] * 10


def test_a_second_wave_goes_out_on_the_second_connection_never_a_third(tmp_path, subprocess_env):
    with Simulator(request_delay=1.0) as sim:
        agi = script(tmp_path, subprocess_env, sim.url, api={"connections": "2"})
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(at_once, agi, COLD[:5])
            while not sim.stats()["active"]:
                time.sleep(0.01)
            second = pool.submit(at_once, agi, COLD[5:10])
            third = pool.submit(at_once, agi, COLD[10:15])
            runs = first.result() + second.result() + third.result()
        settle(sim)
        stats = sim.stats()
    assert stats["max_concurrent"] == {"demo": 2}
    assert sorted(stats["charged"]) == sorted("44" + n[1:] for n in COLD[:15])
    assert answered(runs) >= 10


def test_with_one_connection_a_second_wave_waits_for_the_first_request(tmp_path, subprocess_env):
    with Simulator(request_delay=0.5) as sim:
        agi = script(tmp_path, subprocess_env, sim.url)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(at_once, agi, COLD[:5])
            while not sim.stats()["active"]:
                time.sleep(0.01)
            second = pool.submit(at_once, agi, COLD[5:10])
            first.result(), second.result()
        settle(sim)
        stats = sim.stats()
    assert stats["max_concurrent"] == {"demo": 1}
    assert len(stats["requests"]) == 2


def _askers(before: set[int]) -> set[int]:
    """Processes started since ``before`` that still run npl-agi's code."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in before:
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"npl-lookup.agi" in f.read():
                        found.add(int(entry))
            except OSError:
                continue
    return found


def test_an_asker_killed_mid_request_strands_nothing(tmp_path, subprocess_env):
    """Its numbers go back to the queue: the next calls for them are answered in time."""
    with Simulator(hang_seconds=60) as sim:
        agi = script(tmp_path, subprocess_env, sim.url)
        sim.fault = "hang"
        before = {int(p) for p in os.listdir("/proc") if p.isdigit()}
        hung = at_once(agi, COLD[:3])
        assert [v["NPL_ERR"] for v in hung] == ["TIMEOUT"] * 3
        for pid in _askers(before):
            os.kill(pid, signal.SIGKILL)
        sim.fault = None
        runs = at_once(agi, COLD[:3])
    assert [(v["NPL_ERR"], v["NPL_SOURCE"]) for v in runs] == [("", "api")] * 3
    assert all(int(v["NPL_LOOKUP_MS"]) <= 2100 for v in runs)
