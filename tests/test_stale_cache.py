"""Stale entries (expired less than stale_ttl ago) for a failing service, and the cache's cool-down."""

from __future__ import annotations

import pytest

from npl_agi.backends import RedisCache, SqliteCache
from npl_agi.config import CacheConfig
from npl_agi.core.protocol import Answer, failed

pytest_plugins = ("redis_fixture",)
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


ANSWERS = [
    Answer("447788450450", mccmnc="23415", msc="447", imsi="234150"),
    failed("447973100100", "ERR1"),  # an error is never served stale
]


def caches(tmp_path, redis_url: str | None):
    cfg = CacheConfig(path=str(tmp_path / "cache.sqlite"), redis_url=redis_url or "", ttl=DAY, stale_ttl=7 * DAY)
    clock = Clock()
    return (RedisCache(cfg, clock) if redis_url else SqliteCache(cfg, clock)), clock


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_expired_entries_are_stale_for_stale_ttl(tmp_path, backend, request) -> None:
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    cache, clock = caches(tmp_path, url)
    cache.put_many(ANSWERS)
    numbers = [a.msisdn for a in ANSWERS]
    assert cache.get_stale_many(numbers) == {}  # live: not stale
    clock.now += 2 * DAY
    if backend == "redis":  # native expiry (real time): the live key would be gone by now
        cache.client().delete(*(cache.key(n) for n in numbers))
    assert cache.get_many(numbers) == {}
    stale = cache.get_stale_many(numbers)
    assert list(stale) == ["447788450450"]
    assert (stale["447788450450"].source, stale["447788450450"].mccmnc) == ("stale", "23415")
    if backend == "sqlite":
        clock.now += 6.5 * DAY  # expired more than stale_ttl ago
        cache.put_many([Answer("447400100001", mccmnc="23430")])  # a write drops what is too old
        assert cache.get_stale_many(numbers) == {}
    assert cache.purge() >= 0
    assert cache.get_stale_many(numbers) == {}


def test_a_failed_backend_is_tried_again_after_its_cooldown(tmp_path) -> None:
    cache, clock = caches(tmp_path, None)
    cache.retry_after = 30
    cache.cfg = cache.cfg._replace(path=str(tmp_path / "missing" / "dir" / "\0bad"))
    assert cache.get_many(["447788450450"]) == {}
    assert cache.broken
    cache.cfg = cache.cfg._replace(path=str(tmp_path / "cache.sqlite"))
    clock.now += 29
    cache.put_many(ANSWERS)
    assert cache.broken  # still cooling down: skipped
    clock.now += 2
    assert not cache.broken
    cache.put_many(ANSWERS)
    assert list(cache.get_many(["447788450450"])) == ["447788450450"]


def cooldown(cache, ticks: Clock) -> float:
    """How long ``cache`` stays broken, in half seconds of ``ticks`` (at most a minute)."""
    start = ticks.now
    while cache.broken and ticks.now - start < 60:
        ticks.now += 0.5
    return ticks.now - start


def test_a_failed_backend_is_probed_again_after_a_short_delay_doubling_up_to_the_longest(tmp_path) -> None:
    """The server's cool-down: 1 s after the first failure, then 2, 4, ... up to 30 s while the
    backend keeps failing; one success starts it again from 1 s. Timed by its own clock."""
    cache, _ = caches(tmp_path, None)
    ticks = Clock()
    cache.retry_after, cache.retry_longest, cache.timer = 1.0, 30.0, ticks
    good, bad = cache.cfg.path, str(tmp_path / "missing" / "dir" / "\0bad")
    cache.cfg = cache.cfg._replace(path=bad)
    waits = []
    for _ in range(7):
        assert cache.get_many(["447788450450"]) == {}
        assert cache.broken
        waits.append(cooldown(cache, ticks))
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    cache.cfg = cache.cfg._replace(path=good)
    cache.put_many(ANSWERS)
    assert list(cache.get_many(["447788450450"])) == ["447788450450"]
    cache.close()
    cache.cfg = cache.cfg._replace(path=bad)
    assert cache.get_many(["447788450450"]) == {}
    assert cooldown(cache, ticks) == 1.0  # the success started it again
