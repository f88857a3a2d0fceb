"""npl-agi serve over real TCP on 127.0.0.1: emulated Asterisk connections against the simulator."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import AGI_SCRIPT, write_config
from doors import but_time, calls, door_configs, run, serving, through_both_doors

from npl_agi.askers.direct import lookup_here
from npl_agi.backends import SqliteCache
from npl_agi.config import load_config
from npl_agi.core.protocol import Answer
from npl_agi.doors.process import VARIABLES
from npl_agi.doubles.emulator import AgiEmulator, fastagi_call
from npl_agi.doubles.simulator import Simulator

pytest_plugins = ("redis_fixture",)


class Clock:
    """An injectable monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def uk(i: int) -> str:
    return f"07400{100000 + i:06d}"


def msisdn(dialled: str) -> str:
    return "44" + dialled[1:]


def config_for(tmp_path, sim, name="npl-agi.conf", **sections):
    sections.setdefault("fastagi", {}).setdefault("metrics_listen", "127.0.0.1:0")
    return load_config(str(write_config(tmp_path / name, sim.url, **sections)))


def test_a_call_sets_what_the_agi_script_sets(tmp_path, sim, subprocess_env):
    """One implementation of which number, which variables, how quoted: two transports."""
    config = config_for(tmp_path, sim)
    dialled = ["07788450450", '0740"0\\123410', "07973100100", "hello", "07400999905", ""]

    async def main():
        server = await serving(config)
        try:  # one after another: the simulator's fault numbers spoil the whole request
            return [(await calls(server, [d]))[0] for d in dialled]
        finally:
            await server.drain()

    served = run(main())
    # A deadline with room: the script's interpreter and imports count in it, on a busy machine too.
    other = write_config(
        tmp_path / "process.conf", sim.url, api={"timeout": 10}, cache={"path": str(tmp_path / "process.sqlite")}
    )
    script = AgiEmulator(str(AGI_SCRIPT), env={**subprocess_env, "NPL_AGI_CONFIG": str(other)})
    for number, fast in zip(dialled, served, strict=True):
        process = script.run([number])
        assert list(fast.variables) == list(VARIABLES)
        assert fast.unbalanced == []
        assert {**fast.variables, "NPL_LOOKUP_MS": ""} == {**process.variables, "NPL_LOOKUP_MS": ""}, number
        assert [c[:2] for c in fast.commands[: len(VARIABLES)]] == [["SET", "VARIABLE"]] * len(VARIABLES)
    assert served[0].variables["NPL_MCCMNC"] == "23415" and served[0].variables["NPL_SOURCE"] == "api"
    assert served[2].variables["NPL_ERR"] == "ERR1" and served[3].variables["NPL_ERR"] == "BADNUMBER"
    assert served[4].variables["NPL_ERR"] == "PROTOCOL"
    assert any("NPL_ERR=PROTOCOL" in v for v in served[4].verbose)


# One call each, in this order, through both doors: an answer, the service's per-number error,
# numbers refused locally, every fault of the simulator but the hang, a cache hit, then the hang
# (its request holds the account until the simulator lets go): the sixth service failure in a
# row opens the breaker, so a new number is answered at once.
BOTH_DOORS = ["07788450450", '0740"0\\123410', "07973100100", "hello", ""]
BOTH_DOORS += [f"0740099990{n}" for n in (1, 3, 4, 5, 6, 7)] + ["07788450450", "07400999902", "07788450451"]


def test_both_doors_set_the_same_variables_for_every_kind_of_answer(tmp_path, subprocess_env):
    """Both doors, one truth: the same calls through the FastAGI server and the process script
    give the same variables, all but NPL_LOOKUP_MS. 4 s for each call: the slow fault answers
    in 3 s, the hang does not; the script's interpreter counts in it, on a busy machine too."""
    with Simulator("127.0.0.1", 0, hang_seconds=5) as sim:
        config = config_for(tmp_path, sim, api={"timeout": 4}, breaker={"failures": 6})

        async def main():
            server = await serving(config)
            try:  # one after another: a fault number spoils the whole request it is in
                return [(await calls(server, [d]))[0] for d in BOTH_DOORS]
            finally:
                await server.drain()

        served = run(main())
        other = write_config(
            tmp_path / "process.conf",
            sim.url,
            api={"timeout": 4},
            breaker={"failures": 6},
            cache={"path": str(tmp_path / "process.sqlite")},
        )
        script = AgiEmulator(str(AGI_SCRIPT), env={**subprocess_env, "NPL_AGI_CONFIG": str(other)})
        deadline = time.monotonic() + 30
        while any(sim.active.values()) and time.monotonic() < deadline:  # the server's hung request
            time.sleep(0.05)
        processed = [script.run([d]) for d in BOTH_DOORS]
    differ = {
        number: (fast.variables, process.variables)
        for number, fast, process in zip(BOTH_DOORS, served, processed, strict=True)
        if {**fast.variables, "NPL_LOOKUP_MS": ""} != {**process.variables, "NPL_LOOKUP_MS": ""}
    }
    assert differ == {}, "\n".join(f"{n}: {a} {b}" for n, (a, b) in differ.items())
    errors = [fast.variables["NPL_ERR"] for fast in served]
    assert errors == [
        "",
        "BADNUMBER",
        "ERR1",
        "BADNUMBER",
        "BADNUMBER",
        "",
        *["PROTOCOL"] * 5,
        "",
        "TIMEOUT",
        "UNAVAILABLE",
    ], errors
    assert [fast.variables["NPL_SOURCE"] for fast in served][-3] == "cache"


@pytest.mark.parametrize(
    ("password", "fault", "expected"), [("wrong", None, ("AUTH", "")), ("demo", "http500", ("", "stale"))]
)
def test_both_doors_answer_stale_for_a_failing_service_and_never_for_a_refused_account(
    tmp_path, subprocess_env, sim, password, fault, expected
):
    """A number whose entry expired a day ago: a service answering HTTP 500 gives its old network
    (``stale``) through both doors; a refused account keeps its NPL_ERR through both, stale or not."""
    sim.fault = fault
    confs = door_configs(tmp_path, sim, password=password)
    for conf in confs.values():
        cfg = load_config(str(conf)).cache
        SqliteCache(cfg, clock=lambda: time.time() - 2 * 86400).put_many(
            [Answer("447788450450", mccmnc="23415", msc="447", imsi="23415")]
        )
    doors = through_both_doors(confs, subprocess_env, "07788450450")
    fast = doors["server"]
    assert but_time(fast) == but_time(doors["process"])
    assert (fast["NPL_ERR"], fast["NPL_SOURCE"]) == expected
    assert fast["NPL_MCCMNC"] == ("23415" if expected[1] == "stale" else "")


def test_both_doors_send_extra_form_with_every_lookup(tmp_path, subprocess_env, sim):
    """The FastAGI server (httpx) and the process script's detached child (requests): the same
    extra fields, beside the account, the API version and the numbers of each request."""
    api = {"timeout": 10, "apiver": "2.5", "extra_form": "economy=1"}  # room for a busy machine
    confs = door_configs(tmp_path, sim, api=api)
    doors = through_both_doors(confs, subprocess_env, {"server": "07788450450", "process": "07810701702"})
    assert (doors["server"]["NPL_SOURCE"], doors["process"]["NPL_SOURCE"]) == ("api", "api")
    got = [(r["user"], r["apiver"], r["numbers"], r["extra"]) for r in sim.stats()["requests"]]
    assert got == [
        ("demo", "2.5", ["447788450450"], {"economy": "1"}),
        ("demo", "2.5", ["447810701702"], {"economy": "1"}),
    ]
    assert sim.stats()["charged"] == ["447788450450", "447810701702"]


def test_a_time_argument_after_the_number_changes_nothing_here(tmp_path, sim):
    """The process script's t= (its deadline's start) is no number here; this door's deadline
    starts when it accepts the connection."""
    config = config_for(tmp_path, sim)

    async def main():
        server = await serving(config)
        host, port = server.address
        try:
            return await fastagi_call(host, port, ["07788450450", f"t={time.time() - 30:.3f}"])
        finally:
            await server.drain()

    v = run(main()).variables
    assert (v["NPL_ERR"], v["NPL_NUMBER"], v["NPL_MCCMNC"], v["NPL_SOURCE"]) == ("", "447788450450", "23415", "api")
    assert int(v["NPL_LOOKUP_MS"]) < 30_000


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_fresh_call_skips_the_cache_on_the_loop_and_in_memory_and_stores_its_answer(tmp_path, sim, request, backend):
    """A number cached on the wrong network (the simulator says 23415): a call is served from
    the cache (SQLite: on the loop; both: then kept in the server's memory); a ``fresh`` call
    asks the service whatever either holds, and its answer is what the next call gets."""
    cache = {"backend": "redis", "redis_url": request.getfixturevalue("redis_server").url} if backend == "redis" else {}
    config = config_for(tmp_path, sim, cache=cache)
    lookup = lookup_here(config)
    lookup.cache.put_many([Answer("447788450450", mccmnc="23410", msc="447", imsi="23410")])

    async def main():
        server = await serving(config)
        host, port = server.address
        try:
            served = [await fastagi_call(host, port, ["07788450450"])]
            assert len(server.state.lookup.cache.recent) == 1  # the cached answer is in memory now
            served.append(await fastagi_call(host, port, ["07788450450", "fresh"]))
            await server.state.broker.settled()
            served.append(await fastagi_call(host, port, ["07788450450"]))
            return served
        finally:
            await server.drain()

    cached, fresh, after = (r.variables for r in run(main()))
    assert (cached["NPL_SOURCE"], cached["NPL_MCCMNC"]) == ("cache", "23410")
    assert (fresh["NPL_ERR"], fresh["NPL_SOURCE"], fresh["NPL_MCCMNC"]) == ("", "api", "23415")
    assert (after["NPL_SOURCE"], after["NPL_MCCMNC"]) == ("cache", "23415")
    assert sim.stats()["charged"] == ["447788450450"]
    assert lookup_here(config).cache.get_many(["447788450450"])["447788450450"].mccmnc == "23415"


def test_a_fresh_call_for_a_number_refused_by_its_form_asks_nothing(tmp_path, sim):
    config = config_for(tmp_path, sim)

    async def main():
        server = await serving(config)
        try:
            return [
                await fastagi_call(*server.address, args) for args in (["hello", "fresh"], ["0123", "t=1", "fresh"])
            ]
        finally:
            await server.drain()

    assert [r.variables["NPL_ERR"] for r in run(main())] == ["BADNUMBER", "BADNUMBER"]
    assert sim.stats()["requests"] == []


def test_200_distinct_calls_at_once_share_one_connection_and_a_few_requests(tmp_path, sim):
    config = config_for(tmp_path, sim)

    async def main():
        server = await serving(config)
        try:
            return await calls(server, [uk(i) for i in range(200)]), server.state.broker.requests
        finally:
            await server.drain()

    runs, requests = run(main())
    assert [r.variables["NPL_ERR"] for r in runs] == [""] * 200
    assert all(r.variables["NPL_SOURCE"] == "api" and r.variables["NPL_MCCMNC"] for r in runs)
    stats = sim.stats()
    assert stats["max_concurrent"] == {"demo": 1}
    assert len(stats["requests"]) == requests <= 10
    assert sorted(stats["charged"]) == sorted(f"44{uk(i)[1:]}" for i in range(200))


def test_50_calls_for_one_number_cost_one_credit(tmp_path, sim):
    config = config_for(tmp_path, sim)

    async def main():
        server = await serving(config)
        try:
            first = await calls(server, ["07788450450"] * 50)
            again = await calls(server, ["+44 7788 450450"] * 5)
            return first, again
        finally:
            await server.drain()

    first, again = run(main())
    assert {r.variables["NPL_MCCMNC"] for r in first} == {"23415"}
    assert {r.variables["NPL_SOURCE"] for r in again} == {"cache"}
    assert sim.stats()["charged"] == ["447788450450"]


def test_cache_hits_served_from_the_loop_are_counted_in_the_cache_statistics(tmp_path, sim):
    config = config_for(tmp_path, sim)

    async def main():
        server = await serving(config)
        try:
            first = await calls(server, ["07788450450"])
            await server.state.broker.settled()  # stored: what follows is a cache hit
            hits = await calls(server, ["07788450450", "+447788450450", "447788450450"])
            return first, hits
        finally:
            await server.drain()

    first, hits = run(main())
    assert first[0].variables["NPL_SOURCE"] == "api"
    assert [r.variables["NPL_SOURCE"] for r in hits] == ["cache"] * 3
    stats = SqliteCache(config.cache).stats()
    assert (stats["hits"], stats["misses"]) == (3, 1)


def test_a_cache_the_loop_cannot_read_at_once_leaves_the_call_to_the_worker_thread(tmp_path, sim):
    """A connection that holds the file in exclusive locking mode makes every other reader
    busy: the loop gives up at once (busy timeout 0) and leaves the call to the worker thread's
    path, which goes on without the cache: the call still gets its network."""
    config = config_for(tmp_path, sim)
    stored = SqliteCache(config.cache)
    stored.put_many([Answer("447788450450", mccmnc="23415", msc="447", imsi="23415")])
    stored.close()
    holder = sqlite3.connect(config.cache.path, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")

    async def main():
        server = await serving(config)
        try:
            return (await calls(server, ["07788450450"]))[0]
        finally:
            await server.drain()

    try:
        held = run(main())
    finally:
        holder.execute("COMMIT")
        holder.close()
    got = held.variables
    assert (got["NPL_ERR"], got["NPL_MCCMNC"], got["NPL_SOURCE"]) == ("", "23415", "api")


def test_slow_service_each_call_ends_by_its_deadline_and_the_answers_are_cached_afterwards(tmp_path):
    timeout = 1.0
    with Simulator(request_delay=0.2, line_delay=0.05) as sim:
        config = config_for(tmp_path, sim, api={"timeout": str(timeout), "finish_timeout": "10"})
        numbers = [uk(i) for i in range(40)]  # 0.2 s + 40 x 0.05 s: the last lines come after 2 s

        async def main():
            server = await serving(config)
            try:
                return await calls(server, numbers)
            finally:
                await server.drain()  # the request ends and is stored before this returns

        runs = run(main())
        errors = [r.variables["NPL_ERR"] for r in runs]
        assert "" in errors and "TIMEOUT" in errors and set(errors) == {"", "TIMEOUT"}
        for r in runs:
            assert int(r.variables["NPL_LOOKUP_MS"]) <= timeout * 1000 + 50
        # Every number paid for is in the cache, also those whose call gave up; numbers whose
        # calls could no longer wait for a request were never sent (nor paid for).
        charged = sim.stats()["charged"]
        cached = SqliteCache(config.cache).get_many([f"44{n[1:]}" for n in numbers])
        assert len(charged) == len(set(charged)) and set(cached) == set(charged)
        answered = {r.variables["NPL_NUMBER"] for r in runs if r.variables["NPL_ERR"] == ""}
        assert answered < set(charged)  # some were paid for after their call had moved on
        assert sim.stats()["max_concurrent"] == {"demo": 1}


def test_a_hanging_service_opens_the_breaker_stale_answers_keep_known_numbers_routed_then_it_recovers(tmp_path):
    clock = Clock()
    with Simulator(hang_seconds=3) as sim:
        config = config_for(
            tmp_path,
            sim,
            api={"timeout": "0.5", "finish_timeout": "1"},
            fastagi={"breaker_failures": "3", "breaker_cooldown": "30"},
        )
        # An answer stored two days ago: expired a day ago, within stale_ttl.
        SqliteCache(config.cache, clock=lambda: time.time() - 2 * 86400).put_many(
            [Answer("447788450450", mccmnc="23415", msc="447", imsi="23415")]
        )
        sim.fault = "hang"

        async def main():
            server = await serving(config, clock)
            try:
                hung = await calls(server, [uk(i) for i in range(3)])
                assert server.state.breaker.state == "open"
                asked = len(sim.stats()["requests"])
                known, unknown = await calls(server, ["07788450450", uk(99)])
                assert len(sim.stats()["requests"]) == asked  # open: not even queued
                await server.state.broker.settled()  # the hung request gave up (finish_timeout)
                sim.fault = None
                clock.now += 31  # the cool-down is over: the next miss is the probe
                probe = await calls(server, [uk(50)])
                after = await calls(server, [uk(51)])
                return hung, known, unknown, probe, after, server.state.breaker.state
            finally:
                await server.drain()

        hung, known, unknown, probe, after, state = run(main())
        assert {r.variables["NPL_ERR"] for r in hung} == {"TIMEOUT"}
        assert (known.variables["NPL_SOURCE"], known.variables["NPL_MCCMNC"], known.variables["NPL_ERR"]) == (
            "stale",
            "23415",
            "",
        )
        assert unknown.variables["NPL_ERR"] == "UNAVAILABLE"
        assert int(unknown.variables["NPL_LOOKUP_MS"]) < 400  # answered at once, not at the deadline
        assert probe[0].variables["NPL_ERR"] == "" and after[0].variables["NPL_SOURCE"] == "api"
        assert state == "closed"


def hanging(tmp_path, sim, failures: int, timeout: float = 1.0):
    """A config whose breaker opens after ``failures``; a hung request is held for 8 s, past
    every call of the test (so it is still in flight while they are made)."""
    return config_for(
        tmp_path,
        sim,
        api={"timeout": str(timeout), "finish_timeout": "8"},
        fastagi={"breaker_failures": str(failures), "breaker_cooldown": "30"},
    )


def test_calls_queued_behind_a_hanging_request_count_and_the_next_is_answered_at_once(tmp_path):
    """One call after another: the first's number hangs in flight, the second's waits queued
    behind that request, which never sends a line. Both are failures of the service: the third
    call is not even queued but answered at once, and a known number is routed from its stale
    entry."""
    timeout = 1.0
    with Simulator(hang_seconds=30) as sim:
        config = hanging(tmp_path, sim, 2, timeout)
        SqliteCache(config.cache, clock=lambda: time.time() - 2 * 86400).put_many(
            [Answer("447788450450", mccmnc="23415", msc="447", imsi="23415")]
        )
        sim.fault = "hang"

        async def main():
            server = await serving(config, Clock())  # the clock stands still: no cool-down ends
            try:
                first = await calls(server, [uk(1)])
                second = await calls(server, [uk(2)])
                state = server.state.breaker.state
                third = await calls(server, [uk(3)])
                known = await calls(server, ["07788450450"])
                return first + second + third + known, state, server.state.broker.requests
            finally:
                await server.drain()

        (first, second, third, known), state, requests = run(main())
    assert (first.variables["NPL_ERR"], second.variables["NPL_ERR"]) == ("TIMEOUT", "TIMEOUT")
    assert state == "open"
    assert third.variables["NPL_ERR"] == "UNAVAILABLE"
    assert int(third.variables["NPL_LOOKUP_MS"]) < timeout * 1000 / 2  # not at the deadline
    v = known.variables
    assert (v["NPL_ERR"], v["NPL_SOURCE"], v["NPL_MCCMNC"]) == ("", "stale", "23415")
    assert requests == 1  # the second call's number was never sent: the breaker had opened


def test_a_call_counts_once_however_many_of_its_numbers_the_service_leaves_unanswered(tmp_path):
    with Simulator(hang_seconds=30) as sim:
        config = hanging(tmp_path, sim, 2)
        sim.fault = "hang"

        async def main():
            server = await serving(config, Clock())
            try:
                broker = server.state.broker
                # The broker takes numbers as the chain gives them: international, validated.
                in_flight = await broker.ask([msisdn(uk(1)), msisdn(uk(2))], time.monotonic() + 1.0)
                after_one = server.state.breaker.state
                queued = await broker.ask([msisdn(uk(3)), msisdn(uk(4))], time.monotonic() + 1.0)
                return in_flight, queued, after_one, server.state.breaker.state
            finally:
                await server.drain()

        in_flight, queued, after_one, after_two = run(main())
    assert (after_one, after_two) == ("closed", "open")
    assert {a.error for a in [*in_flight.values(), *queued.values()]} == {"TIMEOUT"}


def test_calls_queued_when_the_breaker_opens_are_answered_at_once(tmp_path):
    """Their numbers will not be sent (the breaker is open): they need not wait their deadline."""
    with Simulator(hang_seconds=30) as sim:
        config = hanging(tmp_path, sim, 2)
        sim.fault = "hang"

        async def main():
            server = await serving(config, Clock())
            host, port = server.address
            broker = server.state.broker

            async def queued(number: str) -> asyncio.Future:
                call = asyncio.ensure_future(fastagi_call(host, port, [number]))
                while f"44{number[1:]}" not in broker._pending:
                    await asyncio.sleep(0.01)
                return call

            try:
                first = await queued(uk(1))
                while not broker.requests:  # sent: in flight, hanging
                    await asyncio.sleep(0.01)
                second = await queued(uk(2))  # queued: its deadline comes first
                third = await queued(uk(3))  # queued still when the second call opens the breaker
                return await asyncio.gather(first, second, third), broker.requests
            finally:
                await server.drain()

        (first, second, third), requests = run(main())
    assert [r.variables["NPL_ERR"] for r in (first, second, third)] == ["TIMEOUT", "TIMEOUT", "UNAVAILABLE"]
    assert requests == 1


def test_a_refused_account_keeps_its_npl_err_and_does_not_open_the_breaker(tmp_path, sim):
    config = config_for(tmp_path, sim, api={"password": "wrong"}, fastagi={"breaker_failures": "1"})

    async def main():
        server = await serving(config)
        try:
            first = await calls(server, [uk(1)])
            second = await calls(server, [uk(2)])
            return first + second, server.state.breaker.state
        finally:
            await server.drain()

    runs, state = run(main())
    assert [r.variables["NPL_ERR"] for r in runs] == ["AUTH", "AUTH"]
    assert state == "closed"


def test_a_refused_account_is_never_answered_from_a_stale_entry(tmp_path, sim):
    """AUTH, CREDIT and LOCKED say the account is refused, not that the service failed."""
    config = config_for(tmp_path, sim, api={"password": "wrong"}, breaker={"failures": "1"})
    SqliteCache(config.cache, clock=lambda: time.time() - 2 * 86400).put_many(
        [Answer("447788450450", mccmnc="23415", msc="447", imsi="23415")]
    )

    async def main():
        server = await serving(config)
        try:
            return await calls(server, ["07788450450"]) + await calls(server, ["07788450450"])
        finally:
            await server.drain()

    for r in run(main()):
        assert (r.variables["NPL_ERR"], r.variables["NPL_SOURCE"], r.variables["NPL_MCCMNC"]) == ("AUTH", "", "")


async def misbehave(host: str, port: int, kind: str) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    if kind == "garbage":
        writer.write(b"\x00\x1b[31m GET / HTTP/1.1\r\n\r\n")
    elif kind == "megabyte":
        writer.write(b"agi_network: " + b"y" * (1 << 20))
    elif kind == "disconnect":
        writer.write(b"agi_network: yes\nagi_network_script: npl-lookup\nagi_arg_1: 07400100099\n\n")
        await writer.drain()
        writer.close()
        return
    elif kind == "refuses":  # answers the first command with an error
        writer.write(b"agi_network: yes\nagi_network_script: npl-lookup\nagi_arg_1: 07788450450\n\n")
        await reader.readline()
        writer.write(b"510 Invalid or unknown command\n")
    # "silent": sends nothing at all
    await writer.drain()
    try:
        async with asyncio.timeout(5):
            await reader.read()
    finally:
        writer.close()


def test_misbehaving_clients_end_only_their_own_session_and_leave_no_task(tmp_path, sim):
    config = config_for(tmp_path, sim, api={"timeout": "2"})

    async def main():
        server = await serving(config)
        host, port = server.address
        try:
            kinds = ["garbage", "megabyte", "disconnect", "refuses", "silent"]
            bad = [asyncio.ensure_future(misbehave(host, port, k)) for k in kinds]
            hung_up = asyncio.ensure_future(fastagi_call(host, port, [uk(7)], hangup_after=0.0))
            good = await calls(server, [uk(i) for i in range(20)])
            await asyncio.gather(*bad, return_exceptions=True)
            late = await hung_up
            async with asyncio.timeout(3):  # every session ends by its deadline + grace
                while server._calls:
                    await asyncio.sleep(0.05)
            return good, late, set(server._calls)
        finally:
            await server.drain()

    good, late, left = run(main())
    assert [r.variables["NPL_ERR"] for r in good] == [""] * 20
    assert late.variables["NPL_ERR"] == ""  # a hung-up channel still takes SET VARIABLE
    assert left == set()


def test_unknown_script_sets_nothing(tmp_path, sim):
    config = config_for(tmp_path, sim)

    async def main():
        server = await serving(config)
        try:
            return await calls(server, ["07788450450"], script="something-else")
        finally:
            await server.drain()

    (r,) = run(main())
    assert r.variables == {}
    assert any("unknown FastAGI script" in v for v in r.verbose)
    assert sim.stats()["requests"] == []


def test_metrics(tmp_path, sim):
    config = config_for(tmp_path, sim)

    async def main():
        server = await serving(config)
        try:
            await calls(server, ["07788450450", "07788450450", "hello"])
            await server.state.broker.settled()  # stored: what follows is a cache hit
            await calls(server, ["07788450450"])
            host, port = server.metrics_address
            url = f"http://{host}:{port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        finally:
            await server.drain()

    text = run(main())
    assert 'npl_lookups_total{npl_err="",source="api"} 2.0' in text
    assert 'npl_lookups_total{npl_err="",source="cache"} 1.0' in text
    assert 'npl_lookups_total{npl_err="BADNUMBER",source=""} 1.0' in text
    assert "npl_cache_hits_total 1.0" in text
    assert 'npl_breaker{npl_breaker="closed"} 1.0' in text
    assert "npl_batch_numbers_count 1.0" in text
    assert "npl_calls_in_flight 0.0" in text


# -- the process: signals --


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(config_path, subprocess_env, **popen) -> tuple[subprocess.Popen, int]:
    """``npl-agi serve`` in a process of its own, once it listens (``popen``: more ``Popen`` options)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "npl_agi.admin.cli",
            "serve",
            "--config",
            str(config_path),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        env=subprocess_env,
        text=True,
        **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen},
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("npl-agi serve did not listen")


def test_sigterm_finishes_the_calls_in_flight_then_exits_0_and_sighup_reloads(tmp_path, subprocess_env):
    with Simulator(request_delay=0.5) as sim:
        path = write_config(tmp_path / "npl-agi.conf", sim.url, fastagi={"metrics_listen": ""})
        proc, port = start_process(path, subprocess_env)
        try:
            before = asyncio.run(fastagi_call("127.0.0.1", port, ["07973100100"]))
            path.write_text(path.read_text().replace("[api]\n", "[api]\nenabled = no\n"))
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while (off := asyncio.run(fastagi_call("127.0.0.1", port, ["07788450450"]))).variables.get(
                "NPL_ERR"
            ) != "DISABLED" and time.monotonic() < deadline:
                time.sleep(0.1)
            path.write_text(path.read_text().replace("enabled = no\n", ""))
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)

            async def in_flight():
                call = asyncio.ensure_future(fastagi_call("127.0.0.1", port, ["07788450450"]))
                await asyncio.sleep(0.2)  # the call waits for the service's answer
                proc.send_signal(signal.SIGTERM)
                return await call

            during = asyncio.run(in_flight())
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate()
        assert before.variables["NPL_ERR"] == "ERR1"
        assert off.variables["NPL_ERR"] == "DISABLED"
        assert (during.variables["NPL_ERR"], during.variables["NPL_MCCMNC"]) == ("", "23415")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1)
        assert "configuration reloaded" in err
        assert "Traceback" not in err
        # One line per lookup, the number masked to its last 4 digits.
        lines = [line for line in err.splitlines() if "NPL_ERR=" in line or "->" in line]
        assert any("*******0100" in line for line in lines)
        assert not any("07973100100" in line for line in lines)
        assert os.path.exists(tmp_path / "cache.sqlite")


def test_a_request_longer_than_the_redis_lease_keeps_the_cluster_lock(tmp_path, redis_server):
    """The Redis lock is renewed until the request ends, not only until the call's deadline:
    a call gives up at 1.5 s while its request goes on to 3 s, holding the lock all along."""
    from npl_agi.backends.redis_lock import RedisLock
    from npl_agi.core.errors import LookupTimeout

    with Simulator(line_delay=3.0) as slow:
        cache = {"backend": "redis", "redis_url": redis_server.url}
        config = config_for(tmp_path, slow, cache=cache, api={"timeout": "1.5"})

        async def main():
            server = await serving(config)
            try:
                call = asyncio.ensure_future(calls(server, ["07788450450"]))
                while not any(slow.active.values()):
                    await asyncio.sleep(0.02)
                await asyncio.sleep(1.5 + RedisLock.LEASE)  # past the call's deadline and a whole lease
                assert any(slow.active.values())
                other = server.state.lookup.cache.account_lock(config.api)
                with pytest.raises(LookupTimeout):
                    await asyncio.to_thread(other.acquire, time.monotonic() + 0.1)
                return (await call)[0]
            finally:
                await server.drain()

        done = run(main())
    assert done.variables["NPL_ERR"] == "TIMEOUT"
    assert slow.stats()["max_concurrent"] == {"demo": 1}


def test_the_spec_example_account_never_changes_an_answer_through_the_server(tmp_path):
    """bob/123: the password occurs in the numbers, MSCs and IMSIs; only messages are masked."""
    from npl_agi.doubles.simulator import Account, simulated_answer

    dialled = ["07712312345", "07123123123", "07788450450"]
    with Simulator(accounts={"bob": Account("123")}) as bob:
        config = config_for(tmp_path, bob, api={"user": "bob", "password": "123"})

        async def main():
            server = await serving(config)
            try:
                return await calls(server, dialled)
            finally:
                await server.drain()

        served = run(main())
    for number, call in zip(dialled, served, strict=True):
        msisdn = "44" + number[1:]
        mccmnc, msc, imsi = simulated_answer(msisdn, "2.4").split(" ")[1].split(",")
        v = call.variables
        assert (v["NPL_ERR"], v["NPL_NUMBER"], v["NPL_MCCMNC"], v["NPL_MSC"], v["NPL_IMSI"]) == (
            "",
            msisdn,
            mccmnc,
            msc,
            imsi,
        )


def test_an_answer_reset_mid_body_keeps_its_complete_lines_through_the_server(tmp_path):
    from tests import hostile_server as hostile

    with hostile.HostileServer(hostile.reset_mid_body) as server_url_holder:
        config = load_config(
            str(
                write_config(
                    tmp_path / "npl-agi.conf",
                    server_url_holder.url,
                    fastagi={"metrics_listen": "127.0.0.1:0", "batch_window": "0.2"},
                )
            )
        )

        async def main():
            server = await serving(config)
            try:
                return await calls(server, ["07788450450", "07810701702"])
            finally:
                await server.drain()

        served = run(main())
    assert len(server_url_holder.forms) == 1  # one request for both calls
    errors = sorted(c.variables["NPL_ERR"] for c in served)
    assert errors == ["", "PROTOCOL"]  # the line that arrived is kept, the other is cut off
    assert [c.variables["NPL_MCCMNC"] for c in served if not c.variables["NPL_ERR"]] == ["23415"]


# -- the cache file goes wrong under a running server --


def immutable(path, on: bool) -> None:
    """``chattr +i``/``-i``: a file that nobody, root included, may open for writing."""
    done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True, text=True)
    if done.returncode and on:
        pytest.skip(f"cannot make a file immutable here: {done.stderr.strip()}")


def test_a_cache_file_that_was_read_only_is_reopened_once_writable_again(tmp_path, sim):
    """Opened while it cannot be written, SQLite's connection is read-only for good: a failed
    backend is retried with a new connection, so answers are cached again once the file is
    writable, without a restart."""
    config = config_for(tmp_path, sim)
    SqliteCache(config.cache).put_many([Answer("447788450450", mccmnc="23415", msc="447", imsi="23415")])
    clock = Clock()
    immutable(config.cache.path, True)

    async def main():
        server = await serving(config, clock)
        try:
            failed = await calls(server, [uk(1)])  # paid for; its write fails
            await server.state.broker.settled()  # stored after the call got its answer
            immutable(config.cache.path, False)
            clock.now += 2  # past the first cool-down
            return failed, await calls(server, [uk(2)])
        finally:
            await server.drain()

    try:
        failed, then = run(main())
    finally:
        immutable(config.cache.path, False)
    assert [r.variables["NPL_SOURCE"] for r in failed + then] == ["api", "api"]
    assert list(SqliteCache(config.cache).get_many([f"44{uk(2)[1:]}"])) == [f"44{uk(2)[1:]}"]


def test_a_deleted_cache_file_is_noticed_within_a_second_and_made_again_with_one_warning(tmp_path, sim, caplog):
    """Deleted under a running server, the cache file (with its -wal and -shm) is made again
    at the server's next cache step a second later: what the server pays for from then on is in
    the file that other processes (AGI scripts, the CLI, the next server) read."""
    config = config_for(tmp_path, sim)
    clock = Clock()
    path = config.cache.path

    async def main():
        server = await serving(config, clock)
        try:
            before = await calls(server, [uk(1)])
            await server.state.broker.settled()
            for suffix in ("", "-wal", "-shm"):
                os.unlink(path + suffix)
            clock.now += 1.5
            after = await calls(server, [uk(2)])
            clock.now += 1.5
            again = await calls(server, [uk(2), uk(3)])
            return before + after + again
        finally:
            await server.drain()

    served = run(main())
    assert [r.variables["NPL_ERR"] for r in served] == [""] * 4
    wanted = [f"44{uk(i)[1:]}" for i in (2, 3)]
    assert sorted(SqliteCache(config.cache).get_many(wanted)) == wanted
    replaced = [r for r in caplog.records if "deleted or replaced" in r.getMessage()]
    assert len(replaced) == 1, [r.getMessage() for r in caplog.records]


def test_a_frozen_redis_costs_each_number_at_most_one_credit(tmp_path, sim, redis_own):
    """Redis frozen (SIGSTOP) while the same few numbers are called again and again: answers
    already paid for come from the server's first-level cache, and a number first asked during
    the outage is paid for once; Redis is probed again after its short cool-down."""
    config = config_for(tmp_path, sim, cache={"backend": "redis", "redis_url": redis_own.url})
    clock = Clock()
    popular = [uk(i) for i in range(5)]
    newcomers = [uk(10), uk(11)]

    async def rounds(server, numbers, count):
        served = []
        for _ in range(count):
            served += await calls(server, numbers)
            await server.state.broker.settled()
            clock.now += 2  # the cool-down ends: the next miss probes Redis
        return served

    async def main():
        server = await serving(config, clock)
        try:
            served = await rounds(server, popular, 1)
            os.kill(redis_own.proc.pid, signal.SIGSTOP)
            try:
                served += await rounds(server, popular + newcomers, 4)
            finally:
                os.kill(redis_own.proc.pid, signal.SIGCONT)
            return served + await rounds(server, popular + newcomers, 2)
        finally:
            await server.drain()

    served = run(main())
    assert {r.variables["NPL_ERR"] for r in served} == {""}
    charged = sim.stats()["charged"]
    assert sorted(charged) == sorted(f"44{n[1:]}" for n in popular + newcomers)
