"""The lookup cache: SQLite on one PBX (the default), Redis for a cluster, or none.

What is kept: network answers for ``ttl`` (portability changes take days), permanent
per-number errors (``ERR1``, ``ERR11``, ``ERR13``, ``ERR21``) for ``error_ttl``, and nothing
transient. A cache is an optimisation, never a dependency: any failure (locked, corrupt,
read-only or missing file, Redis down or slow) is logged once and the lookup goes on uncached.

The backend also provides the account lock, because it knows the lock's scope: a file lock for
one machine, a Redis lock when several machines share the account through one Redis.
"""

from __future__ import annotations

from npl_agi.backends.base import Cache
from npl_agi.backends.redis import REDIS_TIMEOUT, RedisCache
from npl_agi.backends.sqlite import SqliteCache
from npl_agi.config import Config

__all__ = ["BACKENDS", "REDIS_TIMEOUT", "Cache", "RedisCache", "SqliteCache", "open_cache", "reads_cheaply"]

BACKENDS = {"none": Cache, "sqlite": SqliteCache, "redis": RedisCache}


def reads_cheaply(config: Config) -> bool:
    """Can the configured backend be read with nothing heavier than the standard library?"""
    return BACKENDS[config.cache.backend].reads_cheaply


def open_cache(config: Config, **tuning) -> Cache:
    """The backend the configuration names; opening is lazy, so this never fails a call.
    ``tuning``: as ``Cache``'s (the FastAGI server's timer, cool-downs and first-level cache)."""
    return BACKENDS[config.cache.backend](config.cache, **tuning)
