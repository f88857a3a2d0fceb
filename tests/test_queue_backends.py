"""The queue of waiting numbers, as each backend keeps it: the contract of ``cache.queue``, run
against a real SQLite file and a real Redis, then real AGI processes sharing the Redis queue.

Times are the ``now`` arguments the callers give: nothing here sleeps for the queue to change.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading

import pytest
from conftest import write_config
from test_coalescing import COLD, answered, at_once, script, settle

from npl_agi.backends import RedisCache, SqliteCache
from npl_agi.backends.queue import KEEP_DONE, SqliteQueue, encode
from npl_agi.backends.redis import REDIS_PREFIX
from npl_agi.backends.redis_queue import RedisQueue
from npl_agi.config import ApiConfig, CacheConfig
from npl_agi.core import protocol
from npl_agi.core.codes import UNAVAILABLE
from npl_agi.core.protocol import Answer
from npl_agi.doubles.simulator import Simulator

pytest_plugins = ("redis_fixture",)

API = ApiConfig(url="https://npl.example/npl", user="demo")
NOW = 1_700_000_000.0
WAIT = 5.0
ALIVE, GONE = (lambda _: True), (lambda _: False)


def key(i: int) -> str:
    """A queued number as a call reads it: its one national reading."""
    return f"07400{i:06d}"


def msisdn(i: int) -> str:
    return f"447400{i:06d}"


def answer(i: int) -> Answer:
    return Answer(msisdn(i), mccmnc="23415", source="api")


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    """Makes one queue of the backend per call, all on the same file or Redis: each is one
    process (or machine) of the PBX."""
    if request.param == "sqlite":
        cfg = CacheConfig(path=str(tmp_path / "cache.sqlite"))
        return lambda api=API: SqliteCache(cfg).queue(api)
    cfg = CacheConfig(backend="redis", redis_url=request.getfixturevalue("redis_server").url)
    return lambda api=API: RedisCache(cfg).queue(api)


@pytest.fixture
def queue(backend):
    return backend()


def enqueue(queue, *keys: str, deadline: float = NOW + 2, fresh: bool = False, most: int = 100, now: float = NOW):
    return queue.enqueue(dict.fromkeys(keys, (deadline, fresh)), most, now, WAIT)


def claim(queue, token: str, most: int = 100, now: float = NOW, floor: float = 0.3, alive=ALIVE) -> list[tuple]:
    return queue.claim(token, most, now, floor, alive, WAIT)


def plant(queue, bad: str, queued: float) -> None:
    """A row another writer left, waiting, its key one that no call could have queued."""
    if isinstance(queue, SqliteQueue):
        with queue.cache._writing() as db:
            db.execute("INSERT INTO waiting VALUES (?, ?, ?, 0, '', '', '')", (bad, queued, NOW + 2))
        return
    r = queue.client()
    r.zadd(queue.key("deadline"), {bad: NOW + 2})
    r.zadd(queue.key("waiting"), {bad: queued})


# -- enqueue and peek --


def test_a_queued_number_is_seen_waiting_and_no_other(queue):
    assert enqueue(queue, key(1)) == set()
    assert queue.peek([key(1), key(2)], WAIT) == {key(1): ("", "", "")}
    assert queue.peek([], WAIT) == {}
    assert not queue.in_flight(WAIT)


def test_a_number_queued_twice_is_one_row_with_the_later_deadline(queue):
    enqueue(queue, key(1), deadline=NOW + 2)
    enqueue(queue, key(1), deadline=NOW + 5, now=NOW + 0.1)
    enqueue(queue, key(1), deadline=NOW + 3, now=NOW + 0.2)
    assert claim(queue, "a") == [(key(1), NOW + 5, False)]


def test_a_fresh_call_makes_its_number_fresh(queue):
    enqueue(queue, key(1))
    enqueue(queue, key(1), fresh=True)
    assert claim(queue, "a") == [(key(1), NOW + 2, True)]


def test_most_refuses_the_newest_numbers_but_not_one_queued_already(queue):
    assert enqueue(queue, key(1), key(2), most=2) == set()
    assert enqueue(queue, key(3), key(1), most=2) == {key(3)}
    assert queue.peek([key(3)], WAIT) == {}
    claim(queue, "a", most=1)  # claimed: no longer waiting, it leaves room for one
    assert enqueue(queue, key(3), key(4), most=2) == {key(4)}


# -- claim --


def test_a_calls_numbers_are_claimed_in_the_order_it_gave_them(queue):
    enqueue(queue, key(3), key(1), key(2))
    assert [k for k, *_ in claim(queue, "a")] == [key(3), key(1), key(2)]


def test_claim_takes_the_oldest_first_up_to_most(queue):
    for i in (3, 1, 2):
        enqueue(queue, key(i), now=NOW + i / 10)
    assert [k for k, *_ in claim(queue, "a", most=2)] == [key(1), key(2)]
    assert [k for k, *_ in claim(queue, "b", most=2)] == [key(3)]
    assert claim(queue, "c") == []
    assert queue.in_flight(WAIT)
    assert queue.peek([key(1), key(3)], WAIT) == {key(1): ("a", "", ""), key(3): ("b", "", "")}


def test_two_claimers_at_once_never_claim_one_row(backend):
    queue = backend()
    enqueue(queue, *(key(i) for i in range(60)))
    claimed: dict[str, list[str]] = {}

    def asker(token: str) -> None:
        mine = backend()  # its own connection, as another process's
        while rows := claim(mine, token, most=3):
            claimed[token] += [k for k, *_ in rows]

    threads = [threading.Thread(target=asker, args=(t,)) for t in ("a", "b", "c", "d")]
    claimed.update((t, []) for t in ("a", "b", "c", "d"))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = [k for rows in claimed.values() for k in rows]
    assert sorted(everything) == sorted(key(i) for i in range(60))


def test_claim_drops_the_numbers_nobody_can_wait_for_any_more(queue):
    enqueue(queue, key(1), deadline=NOW + 0.2)
    enqueue(queue, key(2), deadline=NOW + 2)
    assert [k for k, *_ in claim(queue, "a", floor=0.3)] == [key(2)]
    assert queue.peek([key(1)], WAIT) == {}


def test_the_numbers_of_an_asker_gone_wait_again_and_a_live_askers_do_not(queue):
    enqueue(queue, key(1), key(2))
    claim(queue, "a")
    assert claim(queue, "b", alive=ALIVE) == []
    assert sorted(k for k, *_ in claim(queue, "b", alive=lambda t: t != "a")) == [key(1), key(2)]
    assert queue.peek([key(1)], WAIT)[key(1)][0] == "b"


def test_an_asker_giving_up_leaves_its_numbers_to_the_next(queue):
    enqueue(queue, key(1))
    claim(queue, "a")
    queue.unclaim("a", WAIT)
    assert queue.peek([key(1)], WAIT) == {key(1): ("", "", "")}
    assert not queue.in_flight(WAIT)
    assert [k for k, *_ in claim(queue, "b")] == [key(1)]


def test_a_malformed_row_is_dropped_reported_and_never_asked(queue, caplog):
    plant(queue, "not a number", NOW - 1)
    enqueue(queue, key(1))
    with caplog.at_level(logging.WARNING, logger="npl_agi"):
        assert [k for k, *_ in claim(queue, "a")] == [key(1)]
    assert "1 malformed rows ignored" in caplog.text
    queue.unclaim("a", WAIT)
    assert [k for k, *_ in claim(queue, "b")] == [key(1)]


# -- assign and publish --


def test_a_number_in_flight_is_not_asked_twice_its_second_reading_follows_its_asker(queue):
    enqueue(queue, key(1))
    claim(queue, "a")
    assert queue.assign("a", {key(1): msisdn(1)}, {key(1): False}, WAIT) == [msisdn(1)]
    other = msisdn(1)  # the same number dialled another way: another row
    enqueue(queue, other, now=NOW + 0.1)
    claim(queue, "b")
    assert queue.assign("b", {other: msisdn(1)}, {other: False}, WAIT) == []
    assert queue.peek([other], WAIT)[other] == ("a", msisdn(1), "")
    assert [k for k, *_ in claim(queue, "c", alive=lambda t: t != "a")] == [key(1), other]  # a died: both wait


def test_one_asker_asks_a_number_once_for_its_two_readings(queue):
    other = msisdn(1)
    enqueue(queue, key(1), other)
    claim(queue, "a")
    assert queue.assign("a", {key(1): msisdn(1), other: msisdn(1)}, {}, WAIT) == [msisdn(1)]


def test_an_answer_reaches_every_row_of_its_number_followers_included(queue):
    other = msisdn(1)
    enqueue(queue, key(1), key(2))
    claim(queue, "a")
    queue.assign("a", {key(1): msisdn(1), key(2): msisdn(2)}, {}, WAIT)
    enqueue(queue, other)
    claim(queue, "b")
    queue.assign("b", {other: msisdn(1)}, {}, WAIT)
    queue.publish([answer(1)], {}, WAIT)
    rows = queue.peek([key(1), other, key(2)], WAIT)
    assert rows[key(1)][1:] == rows[other][1:] == (msisdn(1), encode(answer(1)))
    assert rows[key(2)][2] == ""
    assert queue.in_flight(WAIT)
    queue.publish([answer(2)], {}, WAIT)
    assert not queue.in_flight(WAIT)


def test_an_answer_by_key_finishes_that_row(queue):
    enqueue(queue, key(1))
    claim(queue, "a")
    refused = protocol.failed("", "ERR1", reason="not a number")
    queue.publish([], {key(1): refused, key(2): refused}, WAIT)
    assert queue.peek([key(1), key(2)], WAIT) == {key(1): ("a", "", encode(refused))}
    assert not queue.in_flight(WAIT)


def test_a_number_answered_lately_takes_that_answer_unless_its_call_is_fresh(queue):
    enqueue(queue, key(1))
    claim(queue, "a")
    queue.assign("a", {key(1): msisdn(1)}, {}, WAIT)
    queue.publish([answer(1)], {}, WAIT)
    other, fresh = msisdn(1), "00" + msisdn(1)
    enqueue(queue, other)
    enqueue(queue, fresh, fresh=True)
    claim(queue, "b")
    assert queue.assign("b", {other: msisdn(1), fresh: msisdn(1)}, {fresh: True}, WAIT) == [msisdn(1)]
    assert queue.peek([other], WAIT)[other][2] == encode(answer(1))
    assert queue.peek([fresh], WAIT)[fresh][2] == ""


def test_a_finished_row_answers_a_new_call_for_its_key_but_a_service_failure_does_not(queue):
    enqueue(queue, key(1), key(2))
    claim(queue, "a")
    queue.assign("a", {key(1): msisdn(1), key(2): msisdn(2)}, {}, WAIT)
    queue.publish([answer(1), protocol.failed(msisdn(2), UNAVAILABLE)], {}, WAIT)
    enqueue(queue, key(1), key(2), now=NOW + 1)
    assert queue.peek([key(1)], WAIT)[key(1)][2] == encode(answer(1))
    assert queue.peek([key(2)], WAIT)[key(2)] == ("", "", "")  # queued again, to be asked
    enqueue(queue, key(1), fresh=True, now=NOW + 1)
    assert queue.peek([key(1)], WAIT)[key(1)] == ("", "", "")


# -- what is kept --


def test_finished_rows_go_keep_done_seconds_after_their_deadline(queue):
    enqueue(queue, key(1))
    enqueue(queue, key(2), now=NOW + 0.1)
    claim(queue, "a", most=1)
    queue.publish([], {key(1): answer(1)}, WAIT)
    enqueue(queue, key(3), now=NOW + 2 + KEEP_DONE - 0.1)
    assert set(queue.peek([key(1), key(2)], WAIT)) == {key(1), key(2)}
    enqueue(queue, key(3), now=NOW + 2 + KEEP_DONE + 0.1)
    assert queue.peek([key(1), key(2)], WAIT) == {}


def test_a_row_in_flight_outlives_its_deadline_while_its_asker_asks(queue):
    enqueue(queue, key(1), deadline=NOW + 2)
    claim(queue, "a")
    enqueue(queue, key(3), now=NOW + 60)
    assert queue.peek([key(1)], WAIT) == {key(1): ("a", "", "")}


# -- Redis only: one queue per account, nothing left behind --


@pytest.fixture
def redis_cache(redis_server) -> RedisCache:
    return RedisCache(CacheConfig(backend="redis", redis_url=redis_server.url))


def test_two_accounts_on_one_redis_have_a_queue_each(redis_cache):
    ours, theirs = redis_cache.queue(API), redis_cache.queue(API._replace(user="other"))
    enqueue(ours, key(1))
    assert claim(theirs, "b") == []
    assert theirs.peek([key(1)], WAIT) == {}
    assert [k for k, *_ in claim(ours, "a")] == [key(1)]


def test_every_key_of_the_queue_expires(redis_cache, redis_server):
    queue = redis_cache.queue(API)
    enqueue(queue, key(1))
    enqueue(queue, key(2), now=NOW + 0.1)
    enqueue(queue, key(3), fresh=True, now=NOW + 0.2)
    claim(queue, "a", most=2)
    queue.assign("a", {key(1): msisdn(1), key(2): msisdn(2)}, {}, WAIT)
    queue.publish([answer(1)], {}, WAIT)
    r = redis_server.client()
    keys = list(r.scan_iter(match=f"{REDIS_PREFIX}queue:*"))
    assert len(keys) == 9
    assert all(0 < r.ttl(k) <= 3600 for k in keys)


def test_a_row_with_no_deadline_is_malformed(redis_cache, caplog):
    queue = redis_cache.queue(API)
    queue.client().zadd(queue.key("waiting"), {key(9): NOW - 1})
    enqueue(queue, key(1))
    with caplog.at_level(logging.WARNING, logger="npl_agi"):
        assert [k for k, *_ in claim(queue, "a")] == [key(1)]
    assert "1 malformed rows ignored" in caplog.text
    assert queue.peek([key(9)], WAIT) == {}


def test_the_slots_are_the_account_locks_keys(redis_cache):
    slots = redis_cache.slots(API._replace(connections=2))
    lock = redis_cache.account_lock(API)
    assert slots.keys[0] == lock.name
    assert slots.keys[1] == lock.name + ".1"
    held = slots.take()
    assert held is not None and slots.alive(held.token)
    held.release()
    assert not slots.alive(held.token)
    assert isinstance(redis_cache.queue(API), RedisQueue)


# -- real AGI processes sharing the Redis queue --


def redis_script(tmp_path, env, url: str, redis_url: str):
    """The process script with ``backend = redis`` and the shipped defaults."""
    return script(tmp_path, env, url, cache={"backend": "redis", "redis_url": redis_url})


def test_cold_calls_at_once_share_one_request_through_redis(tmp_path, subprocess_env, redis_server):
    """Five at once: each process script on Redis imports redis-py (about 0.2 s of CPU, see
    docs/clusters.md), so a two-core PBX on Redis runs fewer scripts at once than on SQLite."""
    with Simulator() as sim:
        agi = redis_script(tmp_path, subprocess_env, sim.url, redis_server.url)
        runs = at_once(agi, COLD[:5])
        settle(sim)
        requests = sim.stats()["requests"]
        max_concurrent = sim.stats()["max_concurrent"]
    assert answered(runs) == 5, [v["NPL_ERR"] for v in runs]
    assert len(requests) <= 2, [r["numbers"] for r in requests]
    assert max_concurrent == {"demo": 1}


def test_calls_for_the_same_numbers_pay_once_through_redis(tmp_path, subprocess_env, redis_server):
    with Simulator() as sim:
        agi = redis_script(tmp_path, subprocess_env, sim.url, redis_server.url)
        runs = at_once(agi, COLD[:3] * 2)
        settle(sim)
        charged = sim.stats()["charged"]
    assert answered(runs) == 6, [v["NPL_ERR"] for v in runs]
    assert sorted(charged) == sorted("44" + n[1:] for n in COLD[:3])


def test_two_servers_on_one_redis_pay_once_for_the_numbers_both_are_asked(tmp_path, redis_server):
    """Two PBXs' FastAGI servers, the same thirty cold numbers at once: thirty credits, and
    every one of the sixty calls answered."""
    import asyncio

    from doors import calls, serving

    from npl_agi.config import load_config

    numbers = [f"074007{i:05d}" for i in range(30)]
    with Simulator(request_delay=0.3) as sim:
        configs = [
            load_config(
                str(
                    write_config(
                        tmp_path / f"pbx{n}.conf",
                        sim.url,
                        cache={"backend": "redis", "redis_url": redis_server.url},
                        fastagi={"metrics_listen": ""},
                    )
                )
            )
            for n in (1, 2)
        ]

        async def main():
            servers = [await serving(config) for config in configs]
            try:
                both = await asyncio.gather(*(calls(server, numbers) for server in servers))
                return [c.variables for served in both for c in served]
            finally:
                for server in servers:
                    await server.drain()

        runs = asyncio.run(asyncio.wait_for(main(), 60))
        settle(sim)
        stats = sim.stats()
    assert answered(runs) == 60, [v["NPL_ERR"] for v in runs]
    assert sorted(stats["charged"]) == sorted("44" + n[1:] for n in numbers)
    assert stats["max_concurrent"] == {"demo": 1}


def test_two_pbxs_process_scripts_on_one_redis_pay_once_for_the_numbers_both_are_asked(
    tmp_path, subprocess_env, redis_server
):
    """Two PBXs, each with its own lock directory and cache file, whose process scripts share one
    Redis: the same two cold numbers on both at once, behind a service taking 0.3 s a request.
    Two credits, one connection, every call answered."""
    numbers = ["07400800001", "07400800002"]
    with Simulator(request_delay=0.3) as sim:
        pbxs = []
        for n in (1, 2):
            (tmp_path / f"pbx{n}").mkdir()
            pbxs.append(redis_script(tmp_path / f"pbx{n}", subprocess_env, sim.url, redis_server.url))
        calls = [(pbx, number) for pbx in pbxs for number in numbers]
        with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
            runs = list(pool.map(lambda call: call[0].run([call[1]]), calls))
        settle(sim)
        stats = sim.stats()
    assert all(run.returncode == 0 and run.stderr == "" for run in runs), runs
    assert answered([run.variables for run in runs]) == 4, [run.variables["NPL_ERR"] for run in runs]
    assert sorted(stats["charged"]) == sorted("44" + n[1:] for n in numbers)
    assert stats["max_concurrent"] == {"demo": 1}


def test_redis_down_the_process_script_asks_alone_and_the_call_is_answered(tmp_path, subprocess_env):
    with Simulator() as sim:
        agi = redis_script(tmp_path, subprocess_env, sim.url, "redis://127.0.0.1:9/0")  # nothing listens there
        run = agi.run([COLD[0]])
    assert (run.variables["NPL_ERR"], run.variables["NPL_SOURCE"]) == ("", "api")
    assert any("redis" in line.lower() for line in run.verbose), run.verbose
    assert len(sim.stats()["requests"]) == 1
