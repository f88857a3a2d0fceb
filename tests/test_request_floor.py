"""A request that could not finish before the deadline is never sent: no credit is spent on it.

``[api] min_request_time`` is the least time a request needs. With less left when the account
lock is had, nothing goes to the service, through every way a request is made: the client, the
lookup chain the CLI runs, the detached child the process script asks through, and the process
script as Asterisk runs it, its deadline counted from the dialplan's ``t=`` argument. Each case is
shown on both sides of the floor against the simulator, counting what it charged.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
from conftest import AGI_SCRIPT, write_config

from npl_agi.askers.direct import lookup_here
from npl_agi.backends.locks import FileLock
from npl_agi.config import ApiConfig, load_config
from npl_agi.core.codes import TIMEOUT
from npl_agi.core.errors import LookupTimeout
from npl_agi.doors.process import process_lookup
from npl_agi.doubles.emulator import AgiEmulator
from npl_agi.transports.sync import Client

NUMBER = "447788450450"
FLOOR = 0.3  # min_request_time; timeout 2 s, so the floor is min_request_time itself
UNDER = FLOOR - 0.05  # seconds left: the time only shrinks before the check, so always under
OVER = FLOOR + 1.5  # seconds left: room for a busy machine to reach the check and still be over


def config(tmp_path, sim):
    path = write_config(tmp_path / "npl-agi.conf", sim.url, api={"timeout": 2.0, "min_request_time": FLOOR})
    return load_config(str(path))


def test_the_client_sends_nothing_with_less_than_the_floor_left(sim, tmp_path):
    api = ApiConfig(url=sim.url, user="demo", password="demo", lock_dir=str(tmp_path))
    client = Client(api, FileLock.for_account(api.lock_dir, api.url, api.user))
    assert client.api.request_floor == FLOOR
    with pytest.raises(LookupTimeout, match="too little time"):
        client.request([NUMBER], time.monotonic() + UNDER)
    assert sim.stats()["charged"] == []
    assert client.request([NUMBER], time.monotonic() + OVER)[NUMBER].mccmnc == "23415"
    assert sim.stats()["charged"] == [NUMBER]


def test_the_client_sends_nothing_once_the_lock_deadline_passed(sim, tmp_path):
    """The detached child's request has a long deadline of its own, but must start while the call waits."""
    api = ApiConfig(url=sim.url, user="demo", password="demo", lock_dir=str(tmp_path))
    client = Client(api, FileLock.for_account(api.lock_dir, api.url, api.user))
    with pytest.raises(LookupTimeout, match="too little time"):
        next(client.batches([NUMBER], 30.0, lock_deadline=time.monotonic() - 0.01))
    assert sim.stats()["charged"] == []
    assert next(client.batches([NUMBER], 30.0, lock_deadline=time.monotonic() + OVER))[NUMBER].ok
    assert sim.stats()["charged"] == [NUMBER]


def test_the_lookup_chain_sends_nothing_with_less_than_the_floor_left(sim, tmp_path):
    cfg = config(tmp_path, sim)
    answer = lookup_here(cfg).one("07788450450", deadline=time.monotonic() + UNDER)
    assert answer.error == TIMEOUT
    assert sim.stats()["charged"] == []
    answer = lookup_here(cfg).one("07788450450", deadline=time.monotonic() + OVER)
    assert (answer.error, answer.mccmnc) == ("", "23415")
    assert sim.stats()["charged"] == [NUMBER]


def test_the_detached_request_sends_nothing_with_less_than_the_floor_left(sim, tmp_path):
    """The process script's way: its child must not send once the call could no longer get the answer."""
    cfg = config(tmp_path, sim)
    before = _children()
    answer = process_lookup(cfg).one("07788450450", deadline=time.monotonic() + UNDER)
    assert answer.error == TIMEOUT
    _wait_for(_children() - before)  # the child has decided, and ended
    assert sim.stats()["charged"] == []
    before = _children()
    answer = process_lookup(cfg).one("07788450450", deadline=time.monotonic() + OVER)
    _wait_for(_children() - before)
    assert (answer.error, answer.mccmnc) == ("", "23415")
    assert sim.stats()["charged"] == [NUMBER]


def test_the_process_script_sends_nothing_with_less_than_the_floor_left(sim, tmp_path, subprocess_env):
    """The dialplan's ``t=`` is the call's clock: it says how much of a 10 s deadline is left."""
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, api={"timeout": 10.0, "min_request_time": FLOOR})
    agi = AgiEmulator(str(AGI_SCRIPT), env={**subprocess_env, "NPL_AGI_CONFIG": str(conf)})

    def asked(left: float) -> str:
        return f"t={time.time() - (10.0 - left):.3f}"

    under = agi.run(["07788450450", asked(UNDER)]).variables
    assert (under["NPL_ERR"], under["NPL_MCCMNC"]) == (TIMEOUT, "")
    over = agi.run(["07788450450", asked(OVER + 3.0)]).variables  # more room: a whole process starts first
    assert (over["NPL_ERR"], over["NPL_SOURCE"], over["NPL_MCCMNC"]) == ("", "api", "23415")
    assert sim.stats()["charged"] == [NUMBER]  # the call under the floor charged nothing, then or later


def _children() -> set[int]:
    """This process's child processes (a detached child stays ours until it is reaped)."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == me:
                found.add(int(entry))
    return found


def _wait_for(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError):  # reaped already
            os.waitpid(pid, 0)
