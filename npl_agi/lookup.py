"""The one lookup path: normalise, then the cache, then the service for what the cache misses.

The AGI script, the CLI and the FastAGI server all call ``Lookup``; none of them talks to the
client or the cache on its own.
"""

from __future__ import annotations

from collections.abc import Callable

from . import protocol
from .config import Config, require_credentials
from .errors import NplError
from .protocol import Answer

Progress = Callable[[int, int], None]


class Lookup:
    """Looks numbers up for one configuration. Build it once; it opens what it needs lazily."""

    def __init__(self, config: Config, *, cache=None, client=None, directory=None) -> None:
        self.config = config
        self._cache = cache
        self._client = client
        self._directory = directory

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
    def directory(self):
        if self._directory is None:
            from .networks import Directory

            self._directory = Directory.load(self.config.networks)
        return self._directory

    def one(self, dialled: str, timeout: float | None = None) -> Answer:
        """The answer for one dialled number (call time: the short deadline by default).

        Never raises ``NplError``: a service or network failure is the answer's ``error``
        (its ``NPL_ERR`` value, e.g. ``TIMEOUT``), with the reason in ``error_name``.
        """
        return self.many([dialled], timeout, strict=False)[0]

    def many(
        self,
        dialled: list[str],
        timeout: float | None = None,
        progress: Progress | None = None,
        *,
        strict: bool = True,
    ) -> list[Answer]:
        """One answer per dialled number, in input order.

        Numbers that cannot be normalised or are skipped by type get a per-number error and cost
        nothing; cached answers cost nothing; the rest are asked once each. When a request fails
        as a whole (refused, unreachable, timed out), its numbers get that failure as their
        error and no later request is sent; with ``strict`` the failure is then raised, carrying
        every answer in its ``answers`` attribute (what was already paid for is not lost).
        """
        msisdn_of, found, local = self._resolve(dialled)
        wanted = list(dict.fromkeys(msisdn_of.values()))
        misses = [m for m in wanted if m not in found]
        self.cache.record(hits=len(wanted) - len(misses), misses=len(misses))
        if progress:
            progress(len(wanted) - len(misses), len(wanted))
        failure = None
        try:
            for batch in self.client.batches(misses, timeout) if misses else ():
                fresh = {m: a._replace(source="api") for m, a in batch.items()}
                self.cache.put_many(list(fresh.values()))
                found.update(fresh)
                if progress:
                    progress(sum(m in found for m in wanted), len(wanted))
        except NplError as e:
            failure = e
            for m in misses:
                found.setdefault(m, protocol.failed(m, e.npl_err, reason=str(e)))
        out = []
        for d in dialled:
            answer = local.get(d) or found[msisdn_of[d]]._replace(number=d)
            if answer.mccmnc:
                country, network = self.directory.describe(answer.mccmnc)
                answer = answer._replace(country=country, network=network)
            out.append(answer)
        if failure is not None and strict:
            failure.answers = out
            raise failure
        return out

    def _resolve(self, dialled: list[str]) -> tuple[dict[str, str], dict[str, Answer], dict[str, Answer]]:
        """Dialled number -> msisdn, the cached answers, and the numbers refused locally.

        The cache is read with the plain string readings of each number first; only numbers it
        misses pay for full validation (phonenumbers), whose canonical form is read once more.
        """
        from .number import normalise, validate

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
        unread = {m for m in msisdn_of.values() if m not in found and m not in readings}
        if unread:  # a canonical form ("+44 (0)7…" -> 447…) may be cached already
            found.update(self.cache.get_many(sorted(unread)))
        return msisdn_of, found, local
