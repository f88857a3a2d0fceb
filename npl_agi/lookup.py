"""The one lookup path: normalise, then the cache, then the service for what the cache misses.

The AGI script, the CLI and the FastAGI server all call ``Lookup``; none of them talks to the
client or the cache on its own.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator

from . import protocol
from .config import Config, require_credentials
from .errors import NplError
from .protocol import Answer

Progress = Callable[[int, int], None]


class Lookup:
    """Looks numbers up for one configuration. Build it once; it opens what it needs lazily."""

    def __init__(
        self, config: Config, *, cache=None, client=None, directory=None, detached: bool = False, memory=None
    ) -> None:
        """``detached``: requests run in a detached child process that outlives a call's deadline
        to cache what it paid for (the AGI script); otherwise in this process (the CLI).
        ``memory``: a ``RunMemory`` that keeps every answer of a run (the CLI), so no number is
        asked twice in it, cached or not."""
        self.config = config
        self.detached = detached
        self.memory = memory
        self._cache = cache
        self._client = client
        self._directory = directory
        self._breaker = None

    @property
    def cache(self):
        if self._cache is None:
            from .cache import open_cache

            self._cache = open_cache(self.config)
        return self._cache

    @property
    def client(self):
        if self._client is None:
            from .client import Client

            require_credentials(self.config)
            self._client = Client(self.config.api, lock=self.cache.account_lock(self.config.api))
        return self._client

    @property
    def breaker(self):
        """The account's breaker that every process shares (the detached script's); else None:
        the FastAGI server keeps its own, the CLI asks whatever the state."""
        if self._breaker is None and self.detached:
            from .breaker import shared_breaker

            self._breaker = shared_breaker(self.config, self.cache)
        return self._breaker

    @property
    def directory(self):
        if self._directory is None:
            from .networks import Directory

            self._directory = Directory.load(self.config.networks)
        return self._directory

    def one(self, dialled: str, timeout: float | None = None, *, deadline: float | None = None) -> Answer:
        """The answer for one dialled number (call time: the short deadline by default).

        Never raises ``NplError``: a service or network failure is the answer's ``error``
        (its ``NPL_ERR`` value, e.g. ``TIMEOUT``), with the reason in ``error_name``.
        """
        return self.many([dialled], timeout, deadline=deadline, strict=False)[0]

    def many(
        self,
        dialled: list[str],
        timeout: float | None = None,
        progress: Progress | None = None,
        *,
        deadline: float | None = None,
        strict: bool = True,
    ) -> list[Answer]:
        """One answer per dialled number, in input order.

        Numbers that cannot be normalised or are skipped by type get a per-number error and cost
        nothing; cached answers (and those in the run's ``memory``) cost nothing; the rest are
        asked once each, each request within ``timeout`` and all of them before ``deadline``
        (``time.monotonic()`` seconds). When a request fails as a whole (refused, unreachable,
        timed out), its numbers get that failure as their error and no later request is sent;
        with ``strict`` the failure is then raised, carrying every answer in its ``answers``
        attribute (what was already paid for is not lost).
        """
        if deadline is not None:
            self.cache.deadline = deadline
        resolved = self.resolve(dialled)
        remembered = self.memory.get_many(resolved.misses) if self.memory is not None else {}
        misses = [m for m in resolved.misses if m not in remembered]
        done = len(resolved.wanted) - len(misses)
        if progress:
            progress(done, len(resolved.wanted))
        fresh: dict[str, Answer] = {}
        failure = None
        breaker = self.breaker if misses else None  # a cache hit imports nothing of it
        if breaker is not None:  # the gate: an open breaker answers at once
            from .breaker import STALE_RESERVE, gate

            # Read now, and the names of their networks: past the deadline there is no time left.
            stale = self.cache.get_stale_many(misses)
            if stale:
                self.directory  # noqa: B018 - loaded for finish()
            if stale and deadline is not None:  # leave the stale answer time to be given
                deadline -= STALE_RESERVE
            fresh, misses = gate(breaker, misses)
        try:
            for batch in self._ask(misses, timeout, deadline) if misses else ():
                if self.memory is not None:
                    self.memory.put_many(batch.values())
                fresh.update(batch)
                if progress:
                    progress(done + len(fresh), len(resolved.wanted))
        except NplError as e:
            failure = e
            for m in misses:
                fresh.setdefault(m, protocol.failed(m, e.npl_err, reason=str(e)))
        if breaker is not None:  # the stale stage: a known number keeps its route
            from .breaker import stale_answers

            fresh.update(stale_answers(stale, fresh))
        out = self.finish(resolved, {**remembered, **fresh})
        if failure is not None and strict:
            failure.answers = out
            raise failure
        return out

    def _ask(self, misses: list[str], timeout: float | None, deadline: float | None) -> Iterator[dict[str, Answer]]:
        """Each request's answers (``source = "api"``), in the cache before they are yielded."""
        if self.detached:
            from .handoff import ask_detached

            yield from ask_detached(self, misses, deadline if deadline is not None else self._deadline(timeout))
            return
        for batch in self.client.batches(misses, timeout, deadline=deadline):
            self.store(batch.values())
            yield batch

    def _deadline(self, timeout: float | None) -> float:
        import time

        return time.monotonic() + (self.config.api.timeout if timeout is None else timeout)

    def store(self, answers: Iterable[Answer]) -> None:
        """Cache what the service answered and deserves keeping (see ``cache.ttl_for``)."""
        self.cache.put_many(list(answers))

    def finish(self, resolved: Resolved, fresh: dict[str, Answer]) -> list[Answer]:
        """The answers in the order dialled, with the network directory's names filled in.

        ``fresh`` holds an answer (or a per-number failure) for every number in
        ``resolved.misses``.
        """
        found = {**resolved.found, **fresh}
        out = []
        for d in resolved.dialled:
            answer = resolved.local.get(d) or found[resolved.msisdn_of[d]]._replace(number=d)
            if answer.mccmnc:
                country, network = self.directory.describe(answer.mccmnc)
                answer = answer._replace(country=country, network=network)
            out.append(answer)
        return out

    def resolve(self, dialled: list[str]) -> Resolved:
        """Dialled numbers -> msisdns, their cached answers, and the numbers refused locally.

        The cache is read with the plain string readings of each number first; only numbers it
        misses pay for full validation (phonenumbers), whose canonical form is read once more.
        Counts the cache's hits and misses, once per distinct number.
        """
        from .number import validate

        readings_of, local, found = self._read(dialled)
        cfg = self.config.number
        msisdn_of: dict[str, str] = {}
        for d, rs in readings_of.items():
            hit = next((r for r in rs if r in found), None)
            if hit is None:
                try:
                    hit = validate(rs, cfg)
                except NplError as e:
                    local[d] = protocol.failed("", e.npl_err, number=d, reason=str(e))
                    continue
            msisdn_of[d] = hit
        readings = set().union(*readings_of.values())
        unread = {m for m in msisdn_of.values() if m not in found and m not in readings}
        if unread:  # a canonical form ("+44 (0)7…" -> 447…) may be cached already
            found.update(self.cache.get_many(sorted(unread)))
        resolved = Resolved(list(dialled), msisdn_of, found, local)
        self.cache.record(hits=len(resolved.wanted) - len(resolved.misses), misses=len(resolved.misses))
        return resolved

    def cached(self, dialled: list[str]) -> Resolved | None:
        """What ``resolve`` gives when the cache holds every number under a plain reading (or the
        number is refused by its form alone); None when any would need validation or a request.

        Reads the cache once and does nothing else: no phonenumbers, no counting (the caller
        counts the hits). The FastAGI server serves such calls without leaving its event loop.
        """
        readings_of, local, found = self._read(dialled)
        msisdn_of: dict[str, str] = {}
        for d, rs in readings_of.items():
            hit = next((r for r in rs if r in found), None)
            if hit is None:
                return None
            msisdn_of[d] = hit
        return Resolved(list(dialled), msisdn_of, found, local)

    def _read(self, dialled: list[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, Answer], dict[str, Answer]]:
        """Each distinct dialled number's plain readings, the numbers refused by their form, and
        the cached answers of all the readings."""
        from .number import normalise

        cfg = self.config.number
        readings_of: dict[str, tuple[str, ...]] = {}
        local: dict[str, Answer] = {}
        for d in dict.fromkeys(dialled):
            try:
                readings_of[d] = normalise(d, cfg)
            except NplError as e:
                local[d] = protocol.failed("", e.npl_err, number=d, reason=str(e))
        readings = set().union(*readings_of.values())
        found = self.cache.get_many(sorted(readings)) if readings else {}
        return readings_of, local, found


class Resolved(namedtuple("Resolved", "dialled msisdn_of found local")):
    """What the cache and the numbering plan made of the dialled numbers, before any request.

    ``msisdn_of`` maps each dialled number that may be looked up to its msisdn, ``found`` the
    cached answers by msisdn, ``local`` the dialled numbers refused without asking (BADNUMBER,
    NOTMOBILE) to their answers.
    """

    __slots__ = ()

    @property
    def wanted(self) -> list[str]:
        """The distinct msisdns, in the order first dialled."""
        return list(dict.fromkeys(self.msisdn_of.values()))

    @property
    def misses(self) -> list[str]:
        """The distinct msisdns the cache does not hold: what the service must be asked."""
        return [m for m in self.wanted if m not in self.found]
