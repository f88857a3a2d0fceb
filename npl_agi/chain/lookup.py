"""The one lookup chain, the same for every door: normalise, then the numbers the admin knows,
then the cache, then the service for what both miss (behind the breaker's gate), then stale
entries for the numbers the service failed to answer, then the range holder
(``NPL_RANGE_MCCMNC``; the answer itself where ``[number] range_fallback`` says so).

The stages are written once (``plan`` before asking, ``conclude`` after) and driven two ways:
``many`` in the caller's thread (the process script, the CLI) and ``many_async`` on an event
loop (the FastAGI server), each with its asker (``chain.asking``: one contract for both). The
chain imports no door and no transport.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterable
from functools import cached_property

from npl_agi.backends.base import KNOWN_NUMBERS, RANGES
from npl_agi.chain.asking import Asked
from npl_agi.chain.resolved import Resolved, stale_standins
from npl_agi.config import Config
from npl_agi.core import protocol
from npl_agi.core.codes import LOCAL_REFUSALS, RANGE_FALLBACK
from npl_agi.core.errors import LookupTimeout, NotMobile, NplError
from npl_agi.core.protocol import Answer

Progress = Callable[[int, int], None]
# Seconds before its deadline that a call holding a stale answer stops waiting for the service:
# what comes after the wait must not meet the deadline's alarm.
STALE_RESERVE = 0.1
NOTHING_ASKED = Asked({}, None)


class Plan(namedtuple("Plan", "resolved remembered misses stale gated deadline on_batch")):
    """What the chain knows before asking: the numbers resolved, the run's memory of them, the
    misses still to ask, the stale entries that may stand in, the answers the breaker's gate
    gave, the deadline the asker has, and what each request's answers go to."""

    __slots__ = ()


class Lookup:
    """Looks numbers up for one configuration. Build it once; it opens what it needs lazily.

    Per-call values (a deadline) are arguments of each call, never attributes: the FastAGI
    server shares one ``Lookup`` between concurrent calls.
    """

    def __init__(self, config: Config, *, asker=None, breaker=None, cache=None, directory=None, memory=None) -> None:
        """``asker``: how the misses are asked (``chain.asking``); a chain without one only
        reads (``cached``, ``finish``, ``failed``). ``breaker``: gives the gate before the asker
        (``chain.breaker.Breaker``) when the first miss needs it; none by default (the CLI asks
        whatever the state). ``cache``: the backend's cache (by default the configured one,
        opened lazily). ``memory``: a ``RunMemory`` that keeps every answer of a run (the CLI),
        so no number is asked twice in it, cached or not."""
        self.config = config
        self.asker = asker
        self.memory = memory
        self._make_breaker = breaker
        if cache is not None:
            self.cache = cache
        if directory is not None:
            self.directory = directory

    @cached_property
    def cache(self):
        from npl_agi.backends import open_cache

        return open_cache(self.config)

    @cached_property
    def breaker(self):
        """The gate before the asker, if this chain has one (see ``__init__``)."""
        return None if self._make_breaker is None else self._make_breaker()

    @cached_property
    def directory(self):
        from npl_agi.core.networks import Directory

        return Directory.load(self.config.networks)

    @cached_property
    def ranges(self):
        """The bundled range table (``ranges.RangeTable``), read when a number first needs it."""
        from npl_agi.core.ranges import RangeTable

        return RangeTable.load()

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
        """One answer per dialled number, in input order, in this thread.

        Numbers that cannot be normalised or are skipped by type get a per-number error and cost
        nothing; cached answers (and those in the run's ``memory``) cost nothing; the rest are
        asked once each, each request within ``timeout`` and all of them before ``deadline``
        (``time.monotonic()`` seconds). When a request fails as a whole (refused, unreachable,
        timed out), its numbers get that failure as their error and no later request is sent;
        a number the service failed (``SERVICE_FAILURES``) whose entry expired lately gets that
        entry instead (``source = "stale"``). With ``strict`` a failure is then raised, carrying
        every answer (``NplError.answers``: what was already paid for is not lost). With
        ``fresh`` no cached answer is used (see ``resolve``); stale entries still stand in.
        """
        resolved = self.resolve(dialled, deadline=deadline, fresh=fresh, validate=not self._takes_readings)
        plan = self.plan(resolved, deadline, progress)
        asked = NOTHING_ASKED
        if plan.misses:
            asked = self.asker.ask(plan.misses, plan.deadline, timeout=timeout, fresh=fresh, on_batch=plan.on_batch)
        return self.conclude(plan, asked, strict)

    async def many_async(
        self,
        dialled: list[str],
        deadline: float,
        *,
        run,
        cached: Callable[[list[str]], Resolved | None] | None = None,
        seen: Callable[[Resolved], None] | None = None,
        fresh: bool = False,
        strict: bool = False,
    ) -> list[Answer]:
        """``many``'s stages on an event loop, for the FastAGI server; the asker's ``ask`` is
        awaited. Every stage that may block (cache reads and writes, validating a number the
        cache misses) goes through ``run`` (``await run(work, *args)``: the server's cache
        thread), while ``cached`` may resolve the numbers first without leaving the loop (a
        ``Lookup.cached``). ``seen`` is told what the cache made of them (the server's metrics).
        Raises ``LookupTimeout`` when the deadline passes while the cache is read.
        """
        import asyncio

        resolved = cached(dialled) if cached is not None and not fresh else None
        try:
            async with asyncio.timeout_at(deadline):
                if resolved is None:
                    validate = not self._takes_readings
                    resolved = await run(
                        lambda: self.resolve(dialled, deadline=deadline, fresh=fresh, validate=validate)
                    )
                if seen is not None:
                    seen(resolved)
                plan = await run(self.plan, resolved, deadline) if resolved.misses else self.plan(resolved, deadline)
        except TimeoutError:
            raise LookupTimeout("deadline passed while reading the cache") from None
        asked = NOTHING_ASKED
        if plan.misses:
            asked = await self.asker.ask(plan.misses, plan.deadline, fresh=fresh, on_batch=plan.on_batch)
        if self._takes_readings and asked.answers:
            return await run(self.conclude, plan, asked, strict)
        return self.conclude(plan, asked, strict)

    @property
    def _takes_readings(self) -> bool:
        """Does the asker take the numbers as read, and validate them itself (the queue's asker:
        a waiting call loads no phonenumbers)?"""
        return self.asker is not None and self.asker.takes_readings

    def plan(self, resolved: Resolved, deadline: float | None, progress: Progress | None = None) -> Plan:
        """The stages before asking: the run's memory, the stale entries that may stand in
        (read before asking: a failure's stand-ins must not wait for a cache read past the
        deadline), and the breaker's gate (while it is open the misses are ``UNAVAILABLE`` at
        once, none asked)."""
        remembered = self.memory.get_many(resolved.misses) if self.memory is not None else {}
        misses = [m for m in resolved.misses if m not in remembered]
        read = [r for m in misses for r in m.split(",")]
        stale = self.cache.get_stale_many(read, deadline=deadline) if misses else {}
        if stale:  # a stand-in is given at the deadline: its network's name is loaded now
            self.directory  # noqa: B018
            if deadline is not None:
                deadline -= STALE_RESERVE
        gated: dict[str, Answer] = {}
        if misses and self.breaker is not None:
            from npl_agi.chain.breaker import gate  # a cache hit imports nothing of it

            gated, misses = gate(self.breaker, misses)
        total, done = len(resolved.wanted), len(resolved.wanted) - len(misses)
        if progress:
            progress(done - len(gated), total)
        asked = [0]

        def on_batch(batch: dict[str, Answer]) -> None:
            if self.memory is not None:
                self.memory.put_many(batch.values())
            asked[0] += len(batch)
            if progress:
                progress(done + asked[0], total)

        return Plan(resolved, remembered, misses, stale, gated, deadline, on_batch)

    def conclude(self, plan: Plan, asked: Asked, strict: bool) -> list[Answer]:
        """The stages after asking: what the asker validated, stale entries for the numbers the
        service failed, then the answers in the order dialled. With ``strict`` the request's
        failure is raised, carrying every answer."""
        resolved, answered = plan.resolved, {**asked.answers, **plan.gated}
        if self._takes_readings:
            resolved, answered = self.validated_by_asker(resolved, answered, plan.deadline)
        answered.update(stale_standins(answered, plan.stale))
        out = self.finish(resolved, {**plan.remembered, **answered})
        if asked.failure is not None and strict:
            raise asked.failure.carrying(out)
        return out

    def validated_by_asker(
        self, resolved: Resolved, answered: dict[str, Answer], deadline: float | None
    ) -> tuple[Resolved, dict[str, Answer]]:
        """What the asker made of the numbers as read: each miss's canonical number (or the
        refusal that cost no credit, BADNUMBER or NOTMOBILE), as ``resolve`` gives them when
        it validates itself; the answers by canonical number."""
        msisdn_of, settled, refused = dict(resolved.msisdn_of), dict(resolved.settled), dict(resolved.refused)
        by_msisdn: dict[str, Answer] = {}
        for d, key in resolved.msisdn_of.items():
            answer = answered.get(key)
            if answer is None:  # a cached answer, or the run's memory's
                continue
            if answer.error in LOCAL_REFUSALS:
                del msisdn_of[d]
                settled[d] = protocol.failed("", answer.error, number=d, reason=answer.error_name)
                if answer.msisdn:
                    refused[d] = answer.msisdn
                continue
            msisdn = answer.msisdn or key.partition(",")[0]
            msisdn_of[d] = msisdn
            by_msisdn[msisdn] = answer._replace(msisdn=msisdn)
        newly = {d: m for d, m in refused.items() if d not in resolved.refused}  # by the asker
        asker_refused = set(newly)
        self._known_after_all(newly, msisdn_of, settled, by_msisdn, deadline)
        for d in asker_refused - set(newly):
            del refused[d]
        new = [m for m in (*by_msisdn, *refused.values()) if m not in resolved.holders]
        holders = {**resolved.holders, **self._holders(new, deadline)}
        return resolved._replace(msisdn_of=msisdn_of, settled=settled, refused=refused, holders=holders), by_msisdn

    def finish(self, resolved: Resolved, fresh: dict[str, Answer]) -> list[Answer]:
        """The answers in the order dialled, with the network directory's names filled in.

        ``fresh`` holds an answer (or a per-number failure) for every number in
        ``resolved.misses``.
        """
        found = {**resolved.found, **fresh}
        out = []
        for d in resolved.dialled:
            answer = resolved.settled.get(d) or found[resolved.msisdn_of[d]]._replace(number=d)
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
        from npl_agi.core.number import normalise

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
        ``Cache.wait_for``): which timer ended a call must not change where it is routed."""
        from npl_agi.core.ranges import holder, prefixes

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
        (``backends.queue.key_of``), for an asker that validates (see ``validated_by_asker``).
        """
        from npl_agi.backends.queue import key_of
        from npl_agi.core.number import validate as valid_number

        readings_of, settled, found = self._read(dialled, deadline, fresh)
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
                    settled[d] = protocol.failed("", e.npl_err, number=d, reason=str(e))
                    if isinstance(e, NotMobile):
                        refused[d] = e.msisdn
                    continue
            msisdn_of[d] = hit
        self._known_after_all(refused, msisdn_of, settled, found, deadline)
        readings = set().union(*readings_of.values())
        unread = {m for m in msisdn_of.values() if m not in found and m not in readings}
        if unread and validate:  # a canonical form ("+44 (0)7…" -> 447…) may be known or cached already
            found.update(self._known_and_cached(sorted(unread), deadline, fresh))
        numbers = [m for m in (*msisdn_of.values(), *refused.values()) if "," not in m]
        holders = self._holders(numbers, deadline)
        resolved = Resolved(list(dialled), msisdn_of, found, settled, refused, holders)
        self.cache.record(resolved.cache_hits, len(resolved.misses), deadline=deadline)
        return resolved

    def _known_after_all(self, refused: dict, msisdn_of: dict, settled: dict, found: dict, deadline) -> None:
        """Numbers refused by type (NOTMOBILE) whose canonical form the admin knows: answered
        ``local`` after all (known numbers are of any type; "+44 (0)20…" is read as 4402… and
        known as 442…). Changes the maps in place."""
        if not refused:
            return
        known = self.cache.get_local_many(KNOWN_NUMBERS, sorted(set(refused.values())), deadline=deadline)
        for d, msisdn in list(refused.items()):
            if msisdn in known:
                del refused[d], settled[d]
                msisdn_of[d] = msisdn
                found[msisdn] = Answer(msisdn, mccmnc=known[msisdn], source="local")

    def cached(self, dialled: list[str], *, deadline: float | None = None, fresh: bool = False) -> Resolved | None:
        """What ``resolve`` gives when the cache holds every number under a plain reading (or the
        number is refused by its form alone); None when any would need validation or a request.

        Reads the cache once and does nothing else: no phonenumbers, no counting (the caller
        counts the hits). The FastAGI server serves such calls without leaving its event loop.
        ``fresh``: as in ``resolve``, so only numbers refused by their form are resolved.
        """
        readings_of, settled, found = self._read(dialled, deadline, fresh)
        msisdn_of: dict[str, str] = {}
        for d, rs in readings_of.items():
            hit = next((r for r in rs if r in found), None)
            if hit is None:
                return None
            msisdn_of[d] = hit
        return Resolved(list(dialled), msisdn_of, found, settled, {}, self._holders(msisdn_of.values(), deadline))

    def _read(
        self, dialled: list[str], deadline: float | None, fresh: bool = False
    ) -> tuple[dict[str, tuple[str, ...]], dict[str, Answer], dict[str, Answer]]:
        """Each distinct dialled number's plain readings, the numbers refused by their form, and
        the cached answers of all the readings (none when ``fresh``)."""
        from npl_agi.core.number import normalise

        cfg = self.config.number
        readings_of: dict[str, tuple[str, ...]] = {}
        settled: dict[str, Answer] = {}
        for d in dict.fromkeys(dialled):
            try:
                readings_of[d] = normalise(d, cfg)
            except NplError as e:
                settled[d] = protocol.failed("", e.npl_err, number=d, reason=str(e))
        readings = set().union(*readings_of.values())
        found = self._known_and_cached(sorted(readings), deadline, fresh) if readings else {}
        return readings_of, settled, found
