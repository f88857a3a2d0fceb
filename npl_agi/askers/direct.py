"""The askers that ask from a process of their own, without the queue (``chain.asking`` is
their contract):

- ``InProcess``: the request runs in this process (the CLI, the demo, tests), behind the
  account lock of the backend's scope, a batch a request;
- ``Detached``: it runs in a detached child that outlives the call to keep what it paid for
  (the process script when the queue cannot be written; see ``handoff``).

The queue's asker is ``askers.queued``, the FastAGI server's ``askers.brokered``. The
mechanisms are imported where they are used: a cache hit imports none of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from npl_agi.chain.asking import BatchAsker
from npl_agi.chain.lookup import Lookup
from npl_agi.core.protocol import Answer

# typing.TYPE_CHECKING would import typing, which a cache hit does not use.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from npl_agi.backends import Cache
    from npl_agi.chain.breaker import Breaker
    from npl_agi.config import Config
    from npl_agi.transports.sync import Client


class InProcess(BatchAsker):
    """The service asked from this process: each request's answers stored, then handed on."""

    def __init__(self, config: Config, cache: Cache) -> None:
        self.config = config
        self.cache = cache
        self._client = None

    @property
    def client(self) -> Client:
        """The client, made when the first miss needs it (a hit makes none)."""
        if self._client is None:
            self._client = own_client(self.config, self.cache)
        return self._client

    def batches(self, misses: list[str], timeout: float | None, deadline: float | None) -> Iterator[dict]:
        for batch in self.client.batches(misses, timeout, deadline=deadline):
            self.cache.put_many(list(batch.values()), deadline=deadline)
            yield batch


class Detached(BatchAsker):
    """The service asked from a detached child process that caches everything it paid for, even
    after the call's deadline (see ``handoff``). The child opens a cache and a client of its own:
    nothing opened before the fork is used."""

    def __init__(self, config: Config, cache: Cache) -> None:
        """``cache``: the caller's, closed before the fork (an SQLite connection must not cross it)."""
        self.config = config
        self.cache = cache

    def batches(self, misses: list[str], timeout: float | None, deadline: float | None) -> Iterator[dict]:
        from npl_agi.askers.handoff import ask_detached

        if deadline is None:
            deadline = time.monotonic() + (self.config.api.timeout if timeout is None else timeout)
        self.cache.close()
        yield from ask_detached(self.config, misses, deadline, child_parts)


def lookup_here(config: Config, *, cache: Cache | None = None, memory=None) -> Lookup:
    """A chain that asks from this process (the CLI, tests): no breaker, a batch a request."""
    if cache is None:
        from npl_agi.backends import open_cache

        cache = open_cache(config)
    return Lookup(config, cache=cache, asker=InProcess(config, cache), memory=memory)


def own_client(config: Config, cache: Cache) -> Client:
    """A client asking from this process, behind the account lock of ``cache``'s scope."""
    from npl_agi.config import require_credentials
    from npl_agi.transports.sync import Client

    require_credentials(config)
    return Client(config.api, cache.account_lock(config.api))


def child_parts(config: Config) -> tuple[Client, Callable[[Iterable[Answer]], None], Breaker]:
    """What the detached child asks with: a client holding the account lock, a store that may
    wait for a busy cache (no call waits for it), and the account's shared breaker, which it
    tells how the service did."""
    from npl_agi.backends import open_cache
    from npl_agi.chain.breaker import shared_breaker

    cache = open_cache(config)
    client = own_client(config, cache)
    return client, lambda answers: cache.put_many(list(answers), background=True), shared_breaker(config, cache)
