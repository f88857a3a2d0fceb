"""The lookup cache: SQLite on one PBX (the default), Redis for a cluster, or none.

What is kept: network answers for ``ttl`` (portability changes take days), permanent
per-number errors (``ERR1``, ``ERR11``, ``ERR13``, ``ERR21``) for ``error_ttl``, and nothing
transient. A cache is an optimisation, never a dependency: any failure (locked, corrupt,
read-only or missing file, Redis down or slow) is logged once and the lookup goes on uncached.

The backend also provides the account lock, because it knows the lock's scope: a file lock for
one machine, a Redis lock when several machines share the account through one Redis.

A backend's module is imported when the backend is asked for (``backend_class``, and this
package's ``__getattr__`` for the names in ``_LAZY``): a call opens one backend, and a cache hit
on SQLite has no use for the Redis backend's module, nor one on Redis for SQLite's.
"""

from __future__ import annotations

from npl_agi.backends.base import Cache
from npl_agi.config import Config

__all__ = ["REDIS_TIMEOUT", "Cache", "RedisCache", "SqliteCache", "backend_class", "open_cache", "reads_cheaply"]

# The names imported from a backend's module when first asked for, by the module that has them.
_LAZY = {"SqliteCache": "sqlite", "RedisCache": "redis", "REDIS_TIMEOUT": "redis"}


def backend_class(name: str) -> type[Cache]:
    """The class of the backend ``[cache] backend`` names: ``sqlite``, ``redis`` or ``none``."""
    if name == "sqlite":
        from npl_agi.backends.sqlite import SqliteCache

        return SqliteCache
    if name == "redis":
        from npl_agi.backends.redis import RedisCache

        return RedisCache
    return Cache  # none


def reads_cheaply(config: Config) -> bool:
    """Can the configured backend be read with nothing heavier than the standard library?"""
    return backend_class(config.cache.backend).reads_cheaply


def open_cache(config: Config, **tuning) -> Cache:
    """The backend the configuration names; opening is lazy, so this never fails a call.
    ``tuning``: as ``Cache``'s (the FastAGI server's timer, cool-downs and first-level cache)."""
    return backend_class(config.cache.backend)(config.cache, **tuning)


def __getattr__(name: str) -> object:
    """A name of ``_LAZY``, from its backend's module (a module ``__getattr__``, PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
