"""The lookup chain's stages, seen through a fake asker: what reaches the service, and what a
failing service leaves each number with.

One table, run through both drivers of the chain (``Lookup.many`` for the CLI and the process
script, ``Lookup.many_async`` for the FastAGI server): cached numbers never reach the asker; when
the service fails, a number whose entry expired lately is answered from it (``stale``) and the
rest get the failure; a refusal of the account is never answered stale, even when an entry exists.
The cache is a real SQLite file on an injected clock.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import AGI_SCRIPT, write_config

from npl_agi.askers.direct import lookup_here
from npl_agi.backends import SqliteCache
from npl_agi.backends.sqlite import SQLITE_BUSY_TIMEOUT
from npl_agi.chain.asking import Asked, asked_from
from npl_agi.chain.lookup import Lookup
from npl_agi.config import load_config
from npl_agi.core import protocol
from npl_agi.core.codes import TIMEOUT, TRUNCATED, UNAVAILABLE
from npl_agi.core.errors import AuthError, CreditError, LockedError, LookupTimeout, NplError, ProtocolError, Unreachable
from npl_agi.core.errors import npl_err as npl_err_of
from npl_agi.core.protocol import Answer
from npl_agi.doubles.emulator import AgiEmulator

DAY = 86400.0
KNOWN, FRESH, UNKNOWN = "07788450450", "07400100001", "07400100002"  # cached earlier / cached now / never


def msisdn(dialled: str) -> str:
    return "44" + dialled[1:]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeAsker:
    """Records what it is asked; answers each number with ``answer(msisdn)``, or raises ``error``."""

    def __init__(self, answer=None, error: NplError | None = None) -> None:
        self.answer = answer or (lambda m: Answer(m, mccmnc="23410", source="api"))
        self.error = error
        self.asked: list[list[str]] = []

    def _answers(self, misses: list[str]) -> dict[str, Answer]:
        self.asked.append(list(misses))
        if self.error is not None:
            raise self.error
        return {m: self.answer(m) for m in misses}

    takes_readings = False

    def ask(self, misses, deadline, *, timeout=None, fresh=False, on_batch=None) -> Asked:  # the sync driver's
        def batches():
            yield self._answers(misses)

        return asked_from(batches(), misses, on_batch)


class FakeAsyncAsker(FakeAsker):
    async def ask(self, misses, deadline, *, timeout=None, fresh=False, on_batch=None) -> Asked:  # the server's
        return FakeAsker.ask(self, misses, deadline, on_batch=on_batch)


def sync_many(chain, dialled: list[str], asker: FakeAsker, **kwargs) -> list[Answer]:
    return chain(asker).many(dialled, strict=False, **kwargs)


def async_many(chain, dialled: list[str], asker: FakeAsker, **kwargs) -> list[Answer]:
    """As the server runs it; its cache steps run inline (the server's go to its cache thread).
    ``kwargs`` go to ``many_async`` (``cached``, ``fresh``)."""
    async_asker = FakeAsyncAsker(asker.answer, asker.error)

    async def run(work, *args):
        return work(*args)

    try:
        return asyncio.run(chain(async_asker).many_async(dialled, 1e12, run=run, **kwargs))
    finally:
        asker.asked = async_asker.asked


DRIVERS = {"sync": sync_many, "async": async_many}


@pytest.fixture
def chain(tmp_path):
    """A lookup on a real SQLite cache: KNOWN was answered two days ago (expired, stale for a
    week), FRESH an hour ago (live)."""
    config = load_config(str(write_config(tmp_path / "npl-agi.conf", "http://127.0.0.1:9/")))
    config = config._replace(cache=config.cache._replace(ttl=DAY, stale_ttl=7 * DAY))
    clock = Clock()
    cache = SqliteCache(config.cache, clock)
    cache.put_many([Answer(msisdn(KNOWN), mccmnc="23415", msc="447", imsi="234150", source="api")])
    clock.now += DAY + 3600
    cache.put_many([Answer(msisdn(FRESH), mccmnc="23420", source="api")])
    clock.now += 3600
    return lambda asker: Lookup(config, cache=cache, asker=asker)


def refused(error: NplError):
    return FakeAsker(error=error)


def answering(code: str):
    return FakeAsker(lambda m: protocol.failed(m, code, source="api"))


@pytest.mark.parametrize("driver", DRIVERS)
def test_cached_numbers_never_reach_the_asker(chain, driver):
    asker = FakeAsker()
    answers = DRIVERS[driver](chain, [FRESH, UNKNOWN, "12", FRESH, KNOWN], asker)
    assert asker.asked == [[msisdn(UNKNOWN), msisdn(KNOWN)]]  # once each; not FRESH, not the bad number
    assert [(a.source, a.mccmnc, a.error) for a in answers] == [
        ("cache", "23420", ""),
        ("api", "23410", ""),
        ("", "", "BADNUMBER"),
        ("cache", "23420", ""),
        ("api", "23410", ""),
    ]
    assert answers[1].network  # the directory's names are filled in


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_fresh_lookup_asks_for_a_cached_number_and_still_refuses_a_bad_one(chain, driver):
    """``fresh``: the cache's live answer is not read, under the plain reading nor the canonical
    form that validation finds (``+44 (0)7…``); numbers refused by their form cost nothing."""
    canonical = "+44 (0)7400 100001"  # FRESH, read again only once validated
    assert [a.source for a in DRIVERS[driver](chain, [FRESH, canonical], FakeAsker())] == ["cache", "cache"]
    asker = FakeAsker()
    answers = DRIVERS[driver](chain, [FRESH, "12", canonical], asker, fresh=True)
    assert asker.asked == [[msisdn(FRESH)]]
    assert [(a.source, a.mccmnc, a.error) for a in answers] == [
        ("api", "23410", ""),
        ("", "", "BADNUMBER"),
        ("api", "23410", ""),
    ]


def test_a_fresh_lookup_on_the_loop_skips_the_servers_cache_hit(chain):
    """The server resolves a hit on its loop (``cached``); a fresh call never asks it."""
    resolutions = []

    def cached(dialled):
        resolutions.append(dialled)
        return chain(None).cached(dialled)

    asker = FakeAsker()
    (hit,) = async_many(chain, [FRESH], asker, cached=cached)
    (fresh,) = async_many(chain, [FRESH], asker, cached=cached, fresh=True)
    assert (hit.source, fresh.source, fresh.mccmnc) == ("cache", "api", "23410")
    assert resolutions == [[FRESH]]
    assert asker.asked == [[msisdn(FRESH)]]


def test_cached_resolves_only_numbers_refused_by_form_when_fresh(chain):
    lookup = chain(None)
    assert lookup.cached([FRESH]) is not None
    assert lookup.cached([FRESH], fresh=True) is None
    (bad,) = lookup.finish(lookup.cached(["12"], fresh=True), {})
    assert bad.error == "BADNUMBER"


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_fresh_lookup_of_a_failing_service_still_gets_stale_entries(chain, driver):
    asker = refused(Unreachable("connection refused"))
    known, live = DRIVERS[driver](chain, [KNOWN, FRESH], asker, fresh=True)
    assert asker.asked == [[msisdn(KNOWN), msisdn(FRESH)]]
    assert (known.source, known.mccmnc, known.error) == ("stale", "23415", "")
    assert (live.mccmnc, live.error) == ("", "UNREACHABLE")  # its live entry is not read, and is not stale


def test_a_fresh_lookup_stores_the_services_answer_over_the_cached_one(tmp_path, sim):
    """The chain's own asker against the simulator: the answer of a fresh lookup is paid for
    once and replaces the cached one, which the next lookup then reads."""
    config = load_config(str(write_config(tmp_path / "npl-agi.conf", sim.url)))
    cache = SqliteCache(config.cache)
    cache.put_many([Answer("447788450450", mccmnc="23410", source="api")])  # the simulator says 23415
    lookup = lookup_here(config, cache=cache)
    before = lookup.one(KNOWN)
    fresh = lookup.one(KNOWN, fresh=True)
    after = lookup.one(KNOWN)
    assert [(a.source, a.mccmnc) for a in (before, fresh, after)] == [
        ("cache", "23410"),
        ("api", "23415"),
        ("cache", "23415"),
    ]
    assert sim.stats()["charged"] == ["447788450450"]


SERVICE_FAILED = {
    "unreachable": (refused(Unreachable("connection refused")), "UNREACHABLE"),
    "timed out": (refused(LookupTimeout("no answer")), "TIMEOUT"),
    "garbage": (refused(ProtocolError("not an answer")), "PROTOCOL"),
    "per-number timeout": (answering(TIMEOUT), "TIMEOUT"),
    "cut short": (answering(TRUNCATED), "PROTOCOL"),
    "breaker open": (answering(UNAVAILABLE), "UNAVAILABLE"),
}


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("case", SERVICE_FAILED)
def test_a_failing_service_leaves_known_numbers_their_stale_entry(chain, driver, case):
    asker, npl_err = SERVICE_FAILED[case]
    known, unknown = DRIVERS[driver](chain, [KNOWN, UNKNOWN], asker)
    assert asker.asked == [[msisdn(KNOWN), msisdn(UNKNOWN)]]
    assert (known.source, known.mccmnc, known.msc, known.error, known.number) == ("stale", "23415", "447", "", KNOWN)
    assert known.network  # the directory's names are filled in
    assert (unknown.mccmnc, npl_err_of(unknown.error)) == ("", npl_err)


REFUSALS = {
    "AUTH": AuthError("wrong password"),
    "CREDIT": CreditError("no credit left"),
    "LOCKED": LockedError("account locked"),
}


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("code", REFUSALS)
def test_a_refused_account_is_never_answered_stale(chain, driver, code):
    asker = refused(REFUSALS[code])
    known, unknown = DRIVERS[driver](chain, [KNOWN, UNKNOWN], asker)
    assert asker.asked == [[msisdn(KNOWN), msisdn(UNKNOWN)]]
    assert (known.source, known.mccmnc, known.error) == ("", "", code)
    assert (unknown.mccmnc, unknown.error) == ("", code)


def test_strict_raises_the_failure_with_the_stale_answers(chain):
    with pytest.raises(Unreachable) as raised:
        chain(refused(Unreachable("connection refused"))).many([KNOWN, UNKNOWN])
    assert [(a.source, a.error) for a in raised.value.answers] == [("stale", ""), ("", "UNREACHABLE")]


@pytest.mark.parametrize(
    ("account", "fault", "npl_err", "source", "unknown_err"),
    [
        ({}, "http500", "", "stale", "PROTOCOL"),  # the service fails: the known number keeps its route
        ({}, "garbage", "", "stale", "PROTOCOL"),
        ({"password": "wrong"}, None, "AUTH", "", "AUTH"),  # the account is refused: the admin must see it
    ],
)
def test_the_process_script_answers_stale_only_for_a_failing_service(
    tmp_path, sim, subprocess_env, account, fault, npl_err, source, unknown_err
):
    """The real script against the simulator, an entry stored two days ago (expired, stale for a week)."""
    path = write_config(tmp_path / "npl-agi.conf", sim.url, **account, cache={"ttl": DAY, "stale_ttl": 7 * DAY})
    config = load_config(str(path))
    clock = Clock()
    clock.now = time.time() - 2 * DAY
    SqliteCache(config.cache, clock).put_many([Answer(msisdn(KNOWN), mccmnc="23415", source="api")])
    sim.fault = fault
    agi = AgiEmulator(str(AGI_SCRIPT), env={**subprocess_env, "NPL_AGI_CONFIG": str(path)})
    v = agi.run([KNOWN]).variables
    assert (v["NPL_ERR"], v["NPL_SOURCE"]) == (npl_err, source)
    assert v["NPL_MCCMNC"] == ("23415" if source == "stale" else "")
    assert agi.run([UNKNOWN]).variables["NPL_ERR"] == unknown_err


def test_a_call_s_deadline_stays_with_that_call(tmp_path):
    """A lookup shared by calls (the FastAGI server's) carries no call's deadline into the next:
    a store made after a call whose deadline has passed may still wait for a busy file."""
    config = load_config(str(write_config(tmp_path / "npl-agi.conf", "http://127.0.0.1:9/")))
    cache = SqliteCache(config.cache)
    cache.put_many([Answer(msisdn(FRESH), mccmnc="23420", source="api")])
    lookup = Lookup(config, cache=cache)
    assert lookup.one(FRESH, deadline=time.monotonic() - 1).source == "cache"  # past its deadline: no waiting
    lookup.cache.put_many([Answer(msisdn(KNOWN), mccmnc="23415", source="api")])  # no call waits for this one
    assert cache._conn().execute("PRAGMA busy_timeout").fetchone()[0] == SQLITE_BUSY_TIMEOUT * 1000
