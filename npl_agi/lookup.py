"""The one lookup chain, the same for every door: normalise, then the numbers the admin knows,
then the cache, then the service for what both miss, then stale entries for the numbers the
service failed to answer, then the range holder (``NPL_RANGE_MCCMNC``; the answer itself where
``[number] range_fallback`` says so).

The AGI script, the CLI and the FastAGI server all call ``Lookup``; none of them talks to the
client or the cache on its own. How the misses are asked is the door's: it hands the chain an
asker (see ``askers``), so this module imports no door and no mechanism of one.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterable

from . import protocol
from .askers import failed_all
from .cache.base import KNOWN_NUMBERS, RANGES
from .config import Config
from .errors import BADNUMBER, NOTMOBILE, RANGE_FALLBACK, SERVICE_FAILURES, LookupTimeout, NotMobile, NplError
from .protocol import Answer

Progress = Callable[[int, int], None]
LOCAL_REFUSALS = (BADNUMBER, NOTMOBILE)  # what validation refuses, without a credit
STALE_READ_GRACE = 0.05  # seconds the async chain waits for the stale entries it read meanwhile
# Seconds before its deadline that a call holding a stale answer stops waiting for the service:
# what comes after the wait must not meet the deadline's alarm.
STALE_RESERVE = 0.1


class Lookup:
    """Looks numbers up for one configuration. Build it once; it opens what it needs lazily.

    Per-call values (a deadline) are arguments of each call, never attributes: the FastAGI
    server shares one ``Lookup`` between concurrent calls.
    """

    def __init__(
        self, config: Config, *, asker=None, breaker=None, cache=None, client=None, directory=None, memory=None
    ) -> None:
        """``asker``: how the misses are asked (see ``askers``); by default in this process, with
        ``client``. ``breaker``: a gate before the asker, made from the configuration and the
        cache when the first miss needs it (``breaker.shared_breaker``: the process script's,
        which every process of the account shares); none by default (the CLI asks whatever the
        state, the FastAGI server keeps its own in its broker). ``memory``: a ``RunMemory``
        that keeps every answer of a run (the CLI), so no number is asked twice in it, cached
        or not."""
        self.config = config
        self.memory = memory
        self._asker = asker
        self._make_breaker = breaker
        self._breaker = None
        self._cache = cache
        self._client = client
        self._directory = directory
        self._ranges = None

    @property
    def asker(self):
        if self._asker is None:
            from .askers import InProcess

            self._asker = InProcess(lambda: self.client, self.store)
        return self._asker

    @property
    def cache(self):
        if self._cache is None:
            from .cache import open_cache

            self._cache = open_cache(self.config)
        return self._cache

    @property
    def client(self):
        """The service's client in this process (the CLI's ``check``, the default asker)."""
        if self._client is None:
            from .askers import own_client

            self._client = own_client(self.config, self.cache)
        return self._client

    @property
    def breaker(self):
        """The gate before the asker, if this chain has one (see ``__init__``)."""
        if self._breaker is None and self._make_breaker is not None:
            self._breaker = self._make_breaker(self.config, self.cache)
        return self._breaker

    @property
    def directory(self):
        if self._directory is None:
            from .networks import Directory

            self._directory = Directory.load(self.config.networks)
        return self._directory

    @property
    def ranges(self):
        """The bundled range table (``ranges.RangeTable``), read when a number first needs it."""
        if self._ranges is None:
            from .ranges import RangeTable

            self._ranges = RangeTable.load()
        return self._ranges

    def one(
        self, dialled: str, timeout: float | None = None, *, deadline: float | None = None, fresh: bool = False
    ) -> Answer:
        """The answer for one dialled number (call time: the short deadline by default).

        Never raises ``NplError``: a service or network failure is the answer's ``error``
        (its ``NPL_ERR`` value, e.g. ``TIMEOUT``), with the reason in ``error_name``.
        """
        return self.many([dialled], timeout, deadline=deadline, strict=False, fresh=fresh)[0]

    def many(
        self,
        dialled: list[str],
        timeout: float | None = None,
        progress: Progress | None = None,
        *,
        deadline: float | None = None,
        strict: bool = True,
        fresh: bool = False,
    ) -> list[Answer]:
        """One answer per dialled number, in input order.

        Numbers that cannot be normalised or are skipped by type get a per-number error and cost
        nothing; cached answers (and those in the run's ``memory``) cost nothing; the rest are
        asked once each, each request within ``timeout`` and all of them before ``deadline``
        (``time.monotonic()`` seconds). When a request fails as a whole (refused, unreachable,
        timed out), its numbers get that failure as their error and no later request is sent;
        a number the service failed (``SERVICE_FAILURES``) whose entry expired lately gets that
        entry instead (``source = "stale"``). With ``strict`` a failure is then raised, carrying
        every answer in its ``answers`` attribute (what was already paid for is not lost). With
        ``fresh`` no cached answer is used (see ``resolve``); stale entries still stand in.
        """
        # 1. normalise, then the cache (and the run's memory); validation is the asker's when it
        # takes the numbers as read (the queue's asker: a waiting call loads no phonenumbers)
        readings = getattr(self.asker, "takes_readings", False)
        resolved = self.resolve(dialled, deadline=deadline, fresh=fresh, validate=not readings)
        remembered = self.memory.get_many(resolved.misses) if self.memory is not None else {}
        misses = [m for m in resolved.misses if m not in remembered]
        # Read before asking: a failure's stand-ins must not wait for a cache read past the deadline.
        read = [r for m in misses for r in m.split(",")]
        stale = self.cache.get_stale_many(read, deadline=deadline) if misses else {}
        total, done = len(resolved.wanted), len(resolved.wanted) - len(misses)
        if progress:
            progress(done, total)
        if stale:  # a stand-in is given at the deadline: its network's name is loaded now
            self.directory  # noqa: B018
            if deadline is not None:
                deadline -= STALE_RESERVE
        # 2. the breaker's gate: while it is open the misses are UNAVAILABLE at once, none asked
        gated: dict[str, Answer] = {}
        if misses and self.breaker is not None:
            from .breaker import gate  # a cache hit imports nothing of it

            gated, misses = gate(self.breaker, misses)
        # 3. the service, for the misses
        asked = (lambda n: progress(done + len(gated) + n, total)) if progress else None
        answered, failure = self._ask(misses, timeout, deadline, asked, fresh if readings else None)
        answered.update(gated)
        if readings:
            resolved, answered = self._validated_by_asker(resolved, answered, deadline)
        # 4. stale entries, for the numbers the service failed
        answered.update(stale_standins(answered, stale))
        out = self.finish(resolved, {**remembered, **answered})
        if failure is not None and strict:
            failure.answers = out
            raise failure
        return out

    def _ask(
        self,
        misses: list[str],
        timeout: float | None,
        deadline: float | None,
        progress: Callable[[int], None] | None,
        readings_fresh: bool | None = None,
    ) -> tuple[dict[str, Answer], NplError | None]:
        """An answer for each miss from the asker (each request's answers stored by it), and the
        failure of the request that failed as a whole, if one did: its numbers and those never
        sent then have that failure as their answer. ``readings_fresh``: for an asker that takes
        the numbers as read, whether the lookup is fresh (it queues them so)."""
        fresh: dict[str, Answer] = {}
        if not misses:
            return fresh, None
        if readings_fresh is None:
            asking = self.asker.ask(misses, timeout, deadline)
        else:
            asking = self.asker.ask(misses, timeout, deadline, readings_fresh)
        try:
            for batch in asking:
                if self.memory is not None:
                    self.memory.put_many(batch.values())
                fresh.update(batch)
                if progress:
                    progress(len(fresh))
        except NplError as e:
            return {**failed_all(misses, e), **fresh}, e
        return fresh, None

    async def many_async(
        self,
        dialled: list[str],
        deadline: float,
        *,
        asker,
        run,
        cached: Callable[[list[str]], Resolved | None] | None = None,
        seen: Callable[[Resolved], None] | None = None,
        fresh: bool = False,
    ) -> list[Answer]:
        """``many``'s stages on an event loop, for the FastAGI server; raises ``NplError``.

        ``asker.ask(misses, deadline)`` is awaited (see ``askers.Brokered``). Every step that may
        block (cache reads and writes, validating a number the cache misses) goes through
        ``run`` (``await run(work, *args)``: the server's cache thread), while ``cached`` may
        resolve the numbers first without leaving the loop (a ``Lookup.cached``). ``seen`` is
        told what the cache made of them (the server's metrics). With ``fresh`` the cache is not
        read, ``cached`` not asked.
        """
        import asyncio

        resolved = cached(dialled) if cached is not None and not fresh else None
        if resolved is None:
            try:
                async with asyncio.timeout_at(deadline):
                    resolved = await run(lambda: self.resolve(dialled, deadline=deadline, fresh=fresh))
            except TimeoutError:
                raise LookupTimeout("deadline passed while reading the cache") from None
        if seen is not None:
            seen(resolved)
        answered: dict[str, Answer] = {}
        misses = resolved.misses
        if misses:
            # Read while the service is asked, so a failure's stand-ins are at hand by the deadline.
            stale = asyncio.ensure_future(run(lambda: self.cache.get_stale_many(misses, deadline=deadline)))
            answered = await (asker.ask(misses, deadline, fresh=True) if fresh else asker.ask(misses, deadline))
            if any(a.error in SERVICE_FAILURES for a in answered.values()):
                try:
                    async with asyncio.timeout(STALE_READ_GRACE):
                        answered.update(stale_standins(answered, await stale))
                except TimeoutError:
                    pass
            else:
                stale.cancel()
        return self.finish(resolved, answered)

    def _validated_by_asker(
        self, resolved: Resolved, answered: dict[str, Answer], deadline: float | None
    ) -> tuple[Resolved, dict[str, Answer]]:
        """What the asker made of the numbers as read: each miss's canonical number (or the
        refusal that cost no credit, BADNUMBER or NOTMOBILE), as ``resolve`` gives them when
        it validates itself; the answers by canonical number."""
        msisdn_of, local, refused = dict(resolved.msisdn_of), dict(resolved.local), dict(resolved.refused)
        by_msisdn: dict[str, Answer] = {}
        for d, key in resolved.msisdn_of.items():
            answer = answered.get(key)
            if answer is None:  # a cached answer, or the run's memory's
                continue
            if answer.error in LOCAL_REFUSALS:
                del msisdn_of[d]
                local[d] = protocol.failed("", answer.error, number=d, reason=answer.error_name)
                if answer.msisdn:
                    refused[d] = answer.msisdn
                continue
            msisdn = answer.msisdn or key.partition(",")[0]
            msisdn_of[d] = msisdn
            by_msisdn[msisdn] = answer._replace(msisdn=msisdn)
        new = [m for m in (*by_msisdn, *refused.values()) if m not in resolved.holders]
        holders = {**resolved.holders, **self._holders(new, deadline)}
        return resolved._replace(msisdn_of=msisdn_of, local=local, refused=refused, holders=holders), by_msisdn

    def store(self, answers: Iterable[Answer], *, deadline: float | None = None) -> None:
        """Cache what the service answered and deserves keeping (see ``cache.ttl_for``), waiting
        for a busy cache at most until ``deadline``."""
        self.cache.put_many(list(answers), deadline=deadline)

    def finish(self, resolved: Resolved, fresh: dict[str, Answer]) -> list[Answer]:
        """The answers in the order dialled, with the network directory's names filled in.

        ``fresh`` holds an answer (or a per-number failure) for every number in
        ``resolved.misses``.
        """
        found = {**resolved.found, **fresh}
        out = []
        for d in resolved.dialled:
            answer = resolved.local.get(d) or found[resolved.msisdn_of[d]]._replace(number=d)
            held = resolved.holders.get(answer.msisdn or resolved.refused.get(d, ""), "")
            answer = self._range_fallback(answer._replace(range_mccmnc=held))
            if answer.mccmnc:
                country, network = self.directory.describe(answer.mccmnc)
                answer = answer._replace(country=country, network=network)
            out.append(answer)
        return out

    def _range_fallback(self, answer: Answer) -> Answer:
        """The range holder's answer (``source = "range"``, never cached) for a number whose
        lookup failed in a way ``[number] range_fallback`` allows; else ``answer`` itself."""
        if answer.range_mccmnc and answer.error in RANGE_FALLBACK[self.config.number.range_fallback]:
            held = answer.range_mccmnc
            return Answer(answer.msisdn, mccmnc=held, source="range", number=answer.number, range_mccmnc=held)
        return answer

    def failed(self, dialled: str, failure: NplError, *, deadline: float | None = None) -> Answer:
        """The answer of a call whose lookup failed as a whole (its deadline passed, lookups are
        switched off): the failure, with the number's range holder as the plain reading of the
        number gives it; or the range holder's answer where ``range_fallback`` says so."""
        from .number import normalise

        answer = protocol.failed("", failure.npl_err, number=dialled, reason=str(failure))
        try:
            readings = normalise(dialled, self.config.number)
        except NplError:
            return answer
        holders = self._holders(readings, deadline)
        reading = next((r for r in readings if holders.get(r)), "")
        if not reading:
            return answer
        answer = self._range_fallback(answer._replace(msisdn=reading, range_mccmnc=holders[reading]))
        return answer if answer.ok else answer._replace(msisdn="")

    def _holders(self, msisdns: Iterable[str], deadline: float | None) -> dict[str, str]:
        """The range holder of each msisdn ("" when unknown): the admin's ranges (``npl-agi
        ranges``) and the bundled table, the longest prefix winning (see ``ranges.holder``).
        Past the deadline the admin's are still read, without waiting for a busy backend (see
        ``Cache._wait``): which timer ended a call must not change where it is routed."""
        from .ranges import holder, prefixes

        msisdns = list(dict.fromkeys(m for m in msisdns if m))
        if not msisdns:
            return {}
        wanted = sorted({p for m in msisdns for p in prefixes(m)})
        admin = self.cache.get_local_many(RANGES, wanted, deadline=deadline)
        return {m: holder(m, self.ranges, admin) for m in msisdns}

    def _known_and_cached(self, msisdns: list[str], deadline: float | None, fresh: bool = False) -> dict[str, Answer]:
        """The numbers the admin knows (``npl-agi local``: ``source = "local"``, no credit, never
        expiring), then the cache's answers for the rest (none when ``fresh``: the admin's own
        numbers still answer)."""
        known = self.cache.get_local_many(KNOWN_NUMBERS, msisdns, deadline=deadline)
        found = {m: Answer(m, mccmnc=mccmnc, source="local") for m, mccmnc in known.items()}
        if not fresh:
            found.update(self.cache.get_many([m for m in msisdns if m not in found], deadline=deadline))
        return found

    def resolve(
        self, dialled: list[str], *, deadline: float | None = None, fresh: bool = False, validate: bool = True
    ) -> Resolved:
        """Dialled numbers -> msisdns, their cached answers, and the numbers refused locally.

        The cache is read with the plain string readings of each number first; only numbers it
        misses pay for full validation (phonenumbers), whose canonical form is read once more.
        Counts the cache's hits and misses, once per distinct number. ``fresh`` reads no cache:
        every number that may be looked up is a miss (a trunk refused its cached network).
        Without ``validate`` a miss stays as read: its msisdn is its readings, comma separated
        (``cache.queue.key_of``), for an asker that validates (see ``_validated_by_asker``).
        """
        from .cache.queue import key_of
        from .number import validate as valid_number

        readings_of, local, found = self._read(dialled, deadline, fresh)
        cfg = self.config.number
        msisdn_of: dict[str, str] = {}
        refused: dict[str, str] = {}
        for d, rs in readings_of.items():
            hit = next((r for r in rs if r in found), None)
            if hit is None and not validate:
                hit = key_of(rs)
            elif hit is None:
                try:
                    hit = valid_number(rs, cfg)
                except NplError as e:
                    local[d] = protocol.failed("", e.npl_err, number=d, reason=str(e))
                    if isinstance(e, NotMobile):
                        refused[d] = e.msisdn
                    continue
            msisdn_of[d] = hit
        readings = set().union(*readings_of.values())
        unread = {m for m in msisdn_of.values() if m not in found and m not in readings}
        if unread and validate:  # a canonical form ("+44 (0)7…" -> 447…) may be known or cached already
            found.update(self._known_and_cached(sorted(unread), deadline, fresh))
        numbers = [m for m in (*msisdn_of.values(), *refused.values()) if "," not in m]
        holders = self._holders(numbers, deadline)
        resolved = Resolved(list(dialled), msisdn_of, found, local, refused, holders)
        self.cache.record(resolved.cache_hits, len(resolved.misses), deadline=deadline)
        return resolved

    def cached(self, dialled: list[str], *, deadline: float | None = None, fresh: bool = False) -> Resolved | None:
        """What ``resolve`` gives when the cache holds every number under a plain reading (or the
        number is refused by its form alone); None when any would need validation or a request.

        Reads the cache once and does nothing else: no phonenumbers, no counting (the caller
        counts the hits). The FastAGI server serves such calls without leaving its event loop.
        ``fresh``: as in ``resolve``, so only numbers refused by their form are resolved.
        """
        readings_of, local, found = self._read(dialled, deadline, fresh)
        msisdn_of: dict[str, str] = {}
        for d, rs in readings_of.items():
            hit = next((r for r in rs if r in found), None)
            if hit is None:
                return None
            msisdn_of[d] = hit
        return Resolved(list(dialled), msisdn_of, found, local, {}, self._holders(msisdn_of.values(), deadline))

    def _read(
        self, dialled: list[str], deadline: float | None, fresh: bool = False
    ) -> tuple[dict[str, tuple[str, ...]], dict[str, Answer], dict[str, Answer]]:
        """Each distinct dialled number's plain readings, the numbers refused by their form, and
        the cached answers of all the readings (none when ``fresh``)."""
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
        found = self._known_and_cached(sorted(readings), deadline, fresh) if readings else {}
        return readings_of, local, found


def stale_standins(fresh: dict[str, Answer], stale: dict[str, Answer]) -> dict[str, Answer]:
    """The stale entries that stand in for the numbers the service failed to answer.

    Only for a service that failed (``SERVICE_FAILURES``): a refusal of the account (``AUTH``,
    ``CREDIT``, ``LOCKED``) or a local failure keeps its own ``NPL_ERR``, so the admin sees it.
    """
    return {m: stale[m] for m, a in fresh.items() if a.error in SERVICE_FAILURES and m in stale}


class Resolved(namedtuple("Resolved", "dialled msisdn_of found local refused holders")):
    """What the local data, the cache and the numbering plan made of the dialled numbers, before
    any request.

    ``msisdn_of`` maps each dialled number that may be looked up to its msisdn, ``found`` the
    known and cached answers by msisdn, ``local`` the dialled numbers refused without asking
    (BADNUMBER, NOTMOBILE) to their answers, ``refused`` those refused by type (NOTMOBILE) to
    their msisdn, ``holders`` every msisdn to its range holder ("" when unknown): read with the
    cache, given to the answers last.
    """

    __slots__ = ()

    @property
    def wanted(self) -> list[str]:
        """The distinct msisdns, in the order first dialled."""
        return list(dict.fromkeys(self.msisdn_of.values()))

    @property
    def cache_hits(self) -> int:
        """The distinct msisdns the cache answered (the numbers the admin knows are not its)."""
        return sum(1 for m in self.wanted if m in self.found and self.found[m].source != "local")

    @property
    def misses(self) -> list[str]:
        """The distinct msisdns the cache does not hold: what the service must be asked."""
        return [m for m in self.wanted if m not in self.found]
