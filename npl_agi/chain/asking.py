"""The one contract between the chain and an asker: how a lookup's misses reach the service.

The chain decides the stages; an asker only asks, as an HTTP client hands its bytes to a
transport. Each door hands the chain its own (``npl_agi.askers``). One contract for both
drivers, as httpx has one for ``Client`` and ``AsyncClient``:

    ask(misses, deadline, *, timeout=None, fresh=False, on_batch=None) -> Asked

returned by ``Lookup.many``'s askers, awaited by ``Lookup.many_async``'s. ``misses`` are
msisdns, or with ``takes_readings`` the numbers as ``normalise`` read them (the asker then
validates them; see ``Lookup.validated_by_asker``). ``deadline`` is ``time.monotonic()``
seconds (None: each request within ``timeout``). ``on_batch`` sees each request's answers once
they are stored, so a run's memory and a progress bar follow a long run. An asker never raises
for the service: the request that failed as a whole is ``Asked.failure``, and every miss still
has an answer (that failure's ``NPL_ERR`` for those not answered).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator

from npl_agi.core import protocol
from npl_agi.core.errors import NplError
from npl_agi.core.protocol import Answer

OnBatch = Callable[[dict[str, Answer]], None]


class Asked(namedtuple("Asked", "answers failure")):
    """An asker's result: an answer (or a per-number failure) for each miss, by the key it was
    asked by, and the failure of the request that failed as a whole (None when none did)."""

    __slots__ = ()


def failed_all(keys: Iterable[str], error: NplError) -> dict[str, Answer]:
    """Each number's answer when its request failed as a whole: the failure's ``NPL_ERR``."""
    return {k: protocol.failed(k, error.npl_err, reason=str(error)) for k in keys}


def asked_from(batches: Iterator[dict[str, Answer]], misses: list[str], on_batch: OnBatch | None) -> Asked:
    """The ``Asked`` of a sync asker whose requests yield their answers batch by batch and raise
    ``NplError`` when one fails as a whole: what came before the failure is kept."""
    answers: dict[str, Answer] = {}
    try:
        for batch in batches:
            answers.update(batch)
            if on_batch is not None:
                on_batch(batch)
    except NplError as e:
        return Asked({**failed_all([m for m in misses if m not in answers], e), **answers}, e)
    return Asked(answers, None)


class BatchAsker(ABC):
    """A sync asker whose requests yield their answers batch by batch and raise ``NplError``
    when one fails as a whole: ``batches`` is all a subclass writes."""

    takes_readings = False

    def ask(
        self,
        misses: list[str],
        deadline: float | None,
        *,
        timeout: float | None = None,
        fresh: bool = False,
        on_batch: OnBatch | None = None,
    ) -> Asked:
        return asked_from(self.batches(misses, timeout, deadline), misses, on_batch)

    @abstractmethod
    def batches(self, misses: list[str], timeout: float | None, deadline: float | None) -> Iterator[dict[str, Answer]]:
        """Each request's answers, once stored; raises ``NplError`` for a request that failed."""
