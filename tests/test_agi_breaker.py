"""The process script's breaker and stale answers: every call is a process, the state is shared.

The service hangs; calls come one after another. Once ``[breaker] failures`` calls have waited
out their deadline, the next calls are answered ``UNAVAILABLE`` without a request, a number
cached earlier whose entry has expired is answered ``stale`` with its network, and after the
cool-down (moved by editing the stored time, not by sleeping) one probe closes the breaker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import AGI_SCRIPT, write_config
from test_agi import assert_clean

from npl_agi.backends import RedisCache, SqliteCache
from npl_agi.backends.breaker_store import FileStore, RedisStore
from npl_agi.chain.breaker import OPEN, shared_breaker
from npl_agi.config import load_config
from npl_agi.core.protocol import Answer
from npl_agi.doubles.emulator import AgiEmulator
from npl_agi.doubles.simulator import Simulator

pytest_plugins = ("redis_fixture",)
KNOWN = "07788450450"  # cached two days ago: expired, within stale_ttl
DAY = 86400.0


def uk(i: int) -> str:
    return f"07400{200000 + i:06d}"


def msisdn(dialled: str) -> str:
    return "44" + dialled[1:]


def until(condition, seconds: float = 60.0) -> None:
    """Wait for what another process does (a condition, not a duration: the deadline is room)."""
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "condition not met"
        time.sleep(0.05)


def asked(sim: Simulator) -> set[str]:
    return {n for r in sim.stats()["requests"] for n in r["numbers"]}


def setup(tmp_path: Path, sim: Simulator, subprocess_env, **sections):
    # Room for a slow machine: a script that starts too late to ask answers TIMEOUT unasked.
    sections.setdefault("api", {}).update(timeout="4", finish_timeout="60")
    sections.setdefault("breaker", {}).update(failures="3", cooldown="30")
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, **sections)
    config = load_config(str(conf))
    agi = AgiEmulator(str(AGI_SCRIPT), env={**subprocess_env, "NPL_AGI_CONFIG": str(conf)})
    return config, agi


def seed_stale(config) -> None:
    SqliteCache(config.cache, clock=lambda: time.time() - 2 * DAY).put_many(
        [Answer(msisdn(KNOWN), mccmnc="23415", msc="447", imsi="23415")]
    )


def cool_down(store: FileStore) -> None:
    """Move the breaker's opening back past the cool-down, as the clock would."""
    state = store.load()
    state["opened_at"] -= 31
    Path(store.path).write_text(json.dumps(state))


def end_hanging_queries(sim: Simulator) -> None:
    """The hanging queries end without an answer (their clients see the connection close)."""
    sim._stop.set()
    try:
        until(lambda: not sim.stats()["active"])
    finally:
        sim._stop.clear()


def test_a_hanging_service_opens_the_shared_breaker_stale_answers_keep_known_numbers_then_one_probe_recovers(
    tmp_path, subprocess_env
):
    with Simulator("127.0.0.1", 0, hang_seconds=60) as sim:
        config, agi = setup(tmp_path, sim, subprocess_env)
        seed_stale(config)
        store = shared_breaker(config, SqliteCache(config.cache)).store
        sim.fault = "hang"
        hung = [agi.run([uk(i)]) for i in range(3)]
        for run in hung:
            assert_clean(run)
        assert [r.variables["NPL_ERR"] for r in hung] == ["TIMEOUT"] * 3
        assert store.load()["state"] == OPEN
        before = asked(sim)
        rejected = [agi.run([uk(i)]) for i in range(3, 6)]
        known = agi.run([KNOWN])
        for run in [*rejected, known]:
            assert_clean(run)
            assert int(run.variables["NPL_LOOKUP_MS"]) < 3000  # loose: none waited out its 4 s deadline
        assert [r.variables["NPL_ERR"] for r in rejected] == ["UNAVAILABLE"] * 3
        assert asked(sim) == before  # not one request for them
        assert msisdn(uk(3)) not in asked(sim)
        assert (known.variables["NPL_ERR"], known.variables["NPL_SOURCE"], known.variables["NPL_MCCMNC"]) == (
            "",
            "stale",
            "23415",
        )

        sim.fault = None
        end_hanging_queries(sim)  # the first call's request fails now: one more failure, still open
        until(lambda: store.load()["failed"] >= 4)
        cool_down(store)
        probe = agi.run([uk(50)])
        until(lambda: store.load()["state"] == "closed")  # told by the probe's request as it ends
        after = agi.run([uk(51)])
    assert (probe.variables["NPL_ERR"], probe.variables["NPL_SOURCE"]) == ("", "api")
    assert (after.variables["NPL_ERR"], after.variables["NPL_SOURCE"]) == ("", "api")
    assert store.load()["state"] == "closed" and store.load()["failed"] == 0


def test_a_refused_account_keeps_its_npl_err_and_is_never_answered_stale(tmp_path, subprocess_env):
    with Simulator("127.0.0.1", 0) as sim:
        config, agi = setup(tmp_path, sim, subprocess_env, api={"password": "wrong"}, breaker={"failures": "1"})
        seed_stale(config)
        runs = [agi.run([KNOWN]), agi.run([KNOWN])]
    for run in runs:
        assert_clean(run)
        assert (run.variables["NPL_ERR"], run.variables["NPL_SOURCE"], run.variables["NPL_MCCMNC"]) == ("AUTH", "", "")
    assert shared_breaker(config, SqliteCache(config.cache)).state == "closed"


PROBE = """
import sys, time
from npl_agi.backends.breaker_store import FileStore
from npl_agi.chain.breaker import Breaker
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
print(Breaker(3, 30, time.time, FileStore(sys.argv[1])).allow())
"""


def test_only_one_process_becomes_the_probe(tmp_path, subprocess_env):
    path = str(tmp_path / "account.breaker")
    Path(path).write_text(json.dumps({"state": OPEN, "failed": 3, "opened_at": time.time() - 31, "line_at": 0}))
    start = time.time() + 3  # every process is up and polling by then, so they race
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", PROBE, path, str(start)], stdout=subprocess.PIPE, text=True, env=subprocess_env
        )
        for _ in range(6)
    ]
    said = [p.communicate(timeout=60)[0].strip() for p in racers]
    assert sorted(said) == ["False"] * 5 + ["True"]
    assert FileStore(path).load()["state"] == "half-open"


def test_an_unusable_store_is_a_closed_breaker(tmp_path):
    from npl_agi.chain.breaker import Breaker

    breaker = Breaker(1, 30, time.time, FileStore(str(tmp_path / "missing" / "account.breaker")))
    breaker.failure()
    assert breaker.allow() and not breaker.rejecting() and breaker.state == "closed"
    broken = tmp_path / "garbled.breaker"
    broken.write_text("{not json")
    assert Breaker(1, 30, time.time, FileStore(str(broken))).allow()


def test_the_redis_store_is_shared_and_takes_the_probe_once(tmp_path, redis_server):
    conf = write_config(
        tmp_path / "npl-agi.conf", "http://127.0.0.1:9/npl", cache={"backend": "redis", "redis_url": redis_server.url}
    )
    config = load_config(str(conf))
    one, two = (shared_breaker(config, RedisCache(config.cache)) for _ in range(2))
    assert isinstance(one.store, RedisStore)
    one.failure()
    two.failure()
    one.failure()  # failures = 5 by default
    two.failure()
    assert two.state == "closed"
    one.failure()
    assert two.state == OPEN and two.rejecting() and not two.allow()
    r = one.store.client()
    state = json.loads(r.get(one.store.key))
    state["opened_at"] -= 31
    r.set(one.store.key, json.dumps(state))
    assert [one.allow(), two.allow(), one.allow()] == [True, False, False]
    two.success()
    assert one.state == "closed" and one.allow()


def test_a_known_number_whose_request_hangs_is_answered_stale_at_the_deadline(tmp_path, subprocess_env):
    with Simulator("127.0.0.1", 0, hang_seconds=60) as sim:
        config, agi = setup(tmp_path, sim, subprocess_env, breaker={"failures": "5"})
        seed_stale(config)
        sim.fault = "hang"
        run = agi.run([KNOWN])
        end_hanging_queries(sim)
    assert_clean(run)
    assert msisdn(KNOWN) in asked(sim)  # asked, and the service kept it waiting
    assert (run.variables["NPL_ERR"], run.variables["NPL_SOURCE"], run.variables["NPL_MCCMNC"]) == (
        "",
        "stale",
        "23415",
    )
