"""The server's first-level cache in front of real backends: what it keeps, for how long, how many."""

from __future__ import annotations

import pytest

from npl_agi.backends import RedisCache, SqliteCache
from npl_agi.backends.recent import Recent
from npl_agi.config import CacheConfig
from npl_agi.core.protocol import Answer, failed

pytest_plugins = ("redis_fixture",)
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def backend(tmp_path, name: str, request, clock: Clock, recent: Recent):
    url = request.getfixturevalue("redis_server").url if name == "redis" else ""
    cfg = CacheConfig(path=str(tmp_path / "cache.sqlite"), redis_url=url, ttl=DAY, error_ttl=7 * DAY)
    cache = (RedisCache if url else SqliteCache)(cfg, clock)
    cache.recent = recent
    return cache


@pytest.mark.parametrize("name", ["sqlite", "redis"])
def test_it_keeps_what_the_backend_keeps_and_never_longer(tmp_path, name, request) -> None:
    clock = Clock()
    recent = Recent(100, clock)
    cache = backend(tmp_path, name, request, clock, recent)
    network = Answer("447788450450", mccmnc="23415", msc="447", imsi="234150")
    cache.put_many([network, failed("447973100100", "ERR1"), failed("447400100036", "ERR36")])
    numbers = ["447788450450", "447973100100", "447400100036"]
    assert sorted(recent.get_many(numbers)) == numbers[:2]  # a transient error is kept nowhere
    assert cache.get_many(numbers[:1])["447788450450"] == recent.get_many(numbers[:1])["447788450450"]

    clock.now += DAY / 2  # a second server reads what the first stored half a day ago
    other = Recent(100, clock)
    assert sorted(backend(tmp_path, name, request, clock, other).get_many(numbers)) == numbers[:2]
    clock.now += DAY / 2 + 1  # its entry expires with the backend's, not a day after it was read
    assert other.get_many(numbers) == {"447973100100": recent.get_many(numbers)["447973100100"]}
    clock.now += 6 * DAY
    assert other.get_many(numbers) == {} and recent.get_many(numbers) == {}


def test_it_keeps_at_most_its_size_the_least_recently_used_going_first() -> None:
    clock = Clock()
    recent = Recent(3, clock)
    recent.put_many((Answer(f"4474001000{i:02d}", mccmnc="23415"), clock.now + DAY) for i in range(3))
    assert list(recent.get_many(["447400100000"])) == ["447400100000"]  # used: the last to go
    recent.put_many([(Answer("447400100099", mccmnc="23415"), clock.now + DAY)])
    assert len(recent) == 3
    assert sorted(recent.get_many([f"4474001000{i:02d}" for i in (0, 1, 2, 99)])) == [
        "447400100000",
        "447400100002",
        "447400100099",
    ]
