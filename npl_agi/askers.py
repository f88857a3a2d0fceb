"""How a lookup's misses reach the service: the seam between the chain and a door's mechanism.

``Lookup`` decides the stages (normalise, cache, the service for the misses, stale entries when
the service failed); an asker only asks. Each door hands the chain its own, as an HTTP client is
handed a transport:

- ``InProcess``: the request runs in this process (the CLI, the demo, tests);
- ``Detached``: it runs in a detached child that outlives the call to keep what it paid for
  (the process AGI script; see ``handoff``);
- ``Brokered``: the FastAGI server's broker, which joins concurrent calls' misses (async).

A sync asker's ``ask(misses, timeout, deadline)`` yields each request's answers once they are
stored, and raises ``NplError`` when a request fails as a whole. An async asker's
``ask(misses, deadline)`` returns an answer or a per-number failure for each miss. Any object
with that method will do (a test hands the chain a fake one).

The mechanisms are imported where they are used: a cache hit imports none of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from . import protocol
from .protocol import Answer

# typing.TYPE_CHECKING would import typing, which a cache hit does not use.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .breaker import Breaker
    from .cache import Cache
    from .client import Client
    from .config import Config
    from .errors import NplError

Batches = Iterator[dict[str, Answer]]


class InProcess:
    """The service asked from this process: each request's answers stored, then yielded."""

    def __init__(self, client: Callable[[], Client], store: Callable[..., None]) -> None:
        """``client`` gives the client when the first miss needs it (a hit makes none);
        ``store(answers, deadline=...)`` keeps them (``Lookup.store``)."""
        self.client = client
        self.store = store

    def ask(self, misses: list[str], timeout: float | None, deadline: float | None) -> Batches:
        for batch in self.client().batches(misses, timeout, deadline=deadline):
            self.store(list(batch.values()), deadline=deadline)
            yield batch


class Detached:
    """The service asked from a detached child process that caches everything it paid for, even
    after the call's deadline (see ``handoff``). The child opens a cache and a client of its own:
    nothing opened before the fork is used."""

    def __init__(self, config: Config, cache: Cache) -> None:
        """``cache``: the caller's, closed before the fork (an SQLite connection must not cross it)."""
        self.config = config
        self.cache = cache

    def ask(self, misses: list[str], timeout: float | None, deadline: float | None) -> Batches:
        from .handoff import ask_detached

        if deadline is None:
            deadline = time.monotonic() + (self.config.api.timeout if timeout is None else timeout)
        self.cache.close()
        yield from ask_detached(self.config, misses, deadline, child_parts)


def own_client(config: Config, cache: Cache) -> Client:
    """A client asking from this process, behind the account lock of ``cache``'s scope."""
    from .client import Client
    from .config import require_credentials

    require_credentials(config)
    return Client(config.api, lock=cache.account_lock(config.api))


def child_parts(config: Config) -> tuple[Client, Callable[[Iterable[Answer]], None], Breaker]:
    """What the detached child asks with: a client holding the account lock, a store that may
    wait for a busy cache (no call waits for it), and the account's shared breaker, which it
    tells how the service did."""
    from .breaker import shared_breaker
    from .cache import open_cache

    cache = open_cache(config)
    client = own_client(config, cache)
    return client, lambda answers: cache.put_many(list(answers), background=True), shared_breaker(config, cache)


class Brokered:
    """The FastAGI server's asker: its broker, or every miss refused at once when the
    configuration cannot ask at all (no credentials; cache hits are still served)."""

    def __init__(self, broker, refused: NplError | None = None) -> None:
        self.broker = broker
        self.refused = refused

    async def ask(self, misses: list[str], deadline: float, fresh: bool = False) -> dict[str, Answer]:
        if self.refused is not None:
            return failed_all(misses, self.refused)
        return await self.broker.ask(misses, deadline, fresh)


def failed_all(msisdns: Iterable[str], error: NplError) -> dict[str, Answer]:
    """Each number's answer when its request failed as a whole: the failure's ``NPL_ERR``."""
    return {m: protocol.failed(m, error.npl_err, reason=str(error)) for m in msisdns}
