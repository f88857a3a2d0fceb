"""The lookup cache: SQLite on one PBX (the default), Redis for a cluster, or none.

What is kept: network answers for ``ttl`` (portability changes take days), permanent
per-number errors (``ERR1``, ``ERR11``, ``ERR13``, ``ERR21``) for ``error_ttl``, and nothing
transient. A cache is an optimisation, never a dependency: any failure (locked, corrupt,
read-only or missing file, Redis down or slow) is logged once and the lookup goes on uncached.

The backend also provides the account lock, because it knows the lock's scope: a file lock for
one machine, a Redis lock when several machines share the account through one Redis.
"""

from __future__ import annotations

from ..config import Config
from .base import Cache
from .redis import REDIS_TIMEOUT, RedisCache
from .sqlite import SqliteCache

__all__ = ["BACKENDS", "REDIS_TIMEOUT", "Cache", "RedisCache", "SqliteCache", "open_cache"]

BACKENDS = {"none": Cache, "sqlite": SqliteCache, "redis": RedisCache}


def open_cache(config: Config) -> Cache:
    """The backend the configuration names; opening is lazy, so this never fails a call."""
    return BACKENDS[config.cache.backend](config.cache)
