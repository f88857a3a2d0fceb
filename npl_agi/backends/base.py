"""What every cache backend shares: what is kept and for how long, and the rule that a cache
never fails a call. ``Cache`` itself is ``backend = none``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator

from npl_agi import log
from npl_agi.config import ApiConfig, CacheConfig
from npl_agi.core import protocol
from npl_agi.core.codes import PERMANENT_ERRORS
from npl_agi.core.protocol import Answer

# The locks are imported where they are taken: a cache hit takes none. typing.TYPE_CHECKING would
# import typing, which a hit does not use either.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from npl_agi.backends.breaker_store import FileStore
    from npl_agi.backends.locks import AccountLock
    from npl_agi.backends.recent import Recent
    from npl_agi.backends.slots import FileSlots


# The admin's own data beside the cache, by kind: numbers they know (``npl-agi local``) and the
# range holders of number blocks (``npl-agi ranges``). Never expiring, never purged with the cache.
KNOWN_NUMBERS, RANGES = "number", "range"
LOCAL_KINDS = (KNOWN_NUMBERS, RANGES)


def ttl_for(answer: Answer, cfg: CacheConfig) -> float:
    """How long an answer may be served from the cache; 0 means not at all."""
    if answer.ok and answer.mccmnc:
        return cfg.ttl
    if answer.error in PERMANENT_ERRORS:
        return cfg.error_ttl
    return 0.0


def _is_mccmnc(value: str) -> bool:
    """What an MCCMNC read back must be: another writer (or a hand-edited Redis) is not trusted."""
    return value.isascii() and value.isdigit() and len(value) in (5, 6)


def _record(answer: Answer) -> tuple[str, str, str, str]:
    return answer.mccmnc, answer.msc, answer.imsi, answer.error


def _answer(msisdn: str, mccmnc: str, msc: str, imsi: str, error: str) -> Answer:
    if error:
        return protocol.failed(msisdn, error, source="cache")
    return Answer(msisdn, mccmnc=mccmnc, msc=msc, imsi=imsi, source="cache")


class Cache:
    """No cache at all (``backend = none``); the base of the real backends.

    Public methods never raise: a backend error disables the backend for ``retry[0]`` seconds
    after one log line (for the rest of the process by default: an AGI script lives for one
    call). The FastAGI server gives a short first cool-down that doubles with each failed probe
    up to ``retry[1]``, timed by ``timer``; a success starts it again.
    """

    name = "none"
    keeps_data = False  # a store of answers and of the admin's data (not ``backend = none``)
    reads_cheaply = False  # read with nothing heavier than the standard library (a shed call's)

    def __init__(
        self,
        cfg: CacheConfig,
        clock: Callable[[], float] = time.time,
        *,
        timer: Callable[[], float] | None = None,
        retry: tuple[float, float] = (math.inf, math.inf),
        recent: Recent | None = None,
        fail_fast: bool = False,
    ) -> None:
        """``clock``: the entries' time (wall clock: shared across processes). ``timer``: times
        cool-downs and file checks (the server's monotonic clock; ``clock`` by default).
        ``recent``: the server's first-level cache, read before the backend. ``fail_fast``:
        reads never wait for a busy backend and raise what fails, for a reader on an event loop
        (the FastAGI server's cache hits) that has a slower path to fall back on."""
        self.cfg = cfg
        self.fail_fast = fail_fast
        self.clock = clock
        self.timer = timer or clock
        self.retry_after, self.retry_longest = retry
        self.recent = recent
        self._failures = 0  # failures since the last success
        self._broken_until = -math.inf

    # Seconds one operation may wait for a busy backend, and when no call waits for it.
    longest_wait = 0.0
    background_wait = 0.0

    def wait_for(self, deadline: float | None, background: bool = False) -> float:
        """How long one operation may wait: ``longest_wait``, less as the call's ``deadline``
        (``time.monotonic()``) nears; ``background_wait`` when no call waits (a detached request
        storing what it paid for). Arguments of each operation, never attributes: one cache may
        serve concurrent calls."""
        if background:
            return self.background_wait
        if deadline is None:
            return self.longest_wait
        return max(0.0, min(self.longest_wait, deadline - time.monotonic()))

    @property
    def broken(self) -> bool:
        """True while a failed backend is skipped."""
        return self.timer() < self._broken_until

    def mark_failed(self) -> None:
        """The backend failed (here, or in a lock of its scope): skip it for a cool-down, and let
        go of its connection, so the probe opens a new one (the old may be stuck: a read-only
        file, a dead socket)."""
        self._failures += 1
        cooldown = min(self.retry_after * 2 ** min(self._failures - 1, 32), self.retry_longest)
        self._broken_until = self.timer() + cooldown
        self.close()

    def get_many(self, msisdns: list[str], *, deadline: float | None = None) -> dict[str, Answer]:
        """The live cached answers among ``msisdns`` (``source = "cache"``); misses are absent."""
        if self.fail_fast:
            return self._with_recent(msisdns, lambda rest: self._get_many(rest, 0.0))
        wait = self.wait_for(deadline)
        return self._with_recent(msisdns, lambda rest: self._safely("read", self._get_many, {}, rest, wait))

    def _with_recent(self, msisdns: list[str], read: Callable[[list[str]], dict]) -> dict[str, Answer]:
        """The answers in ``recent``, then what ``read`` finds of the rest, kept in ``recent``."""
        if self.recent is None:
            return {m: answer for m, (answer, _) in read(msisdns).items()}
        found = self.recent.get_many(msisdns)
        rest = [m for m in msisdns if m not in found]
        if rest or not msisdns:  # an empty read still opens the backend (the server's start makes the file)
            hits = read(rest)
            self.recent.put_many(hits.values())
            found.update((m, answer) for m, (answer, _) in hits.items())
        return found

    def record(self, hits: int, misses: int, *, deadline: float | None = None) -> None:
        """Count hits and misses (for ``npl-agi cache stats``).

        Best effort and quiet: during a burst the file is busy with other calls' writes, and a
        counter is not worth a call's time or a warning (answers are; see ``put_many``).
        """
        if (hits or misses) and not self.broken:
            try:
                self._record(hits, misses, self.wait_for(deadline))
            except Exception:
                self._record_failed()

    def _record_failed(self) -> None:
        """A counter that could not be written (a busy file): nothing to say or do."""

    def get_stale_many(self, msisdns: list[str], *, deadline: float | None = None) -> dict[str, Answer]:
        """Network answers among ``msisdns`` whose entry expired less than ``stale_ttl`` ago.

        For a service that is failing: a known number keeps its route (``source = "stale"``).
        """
        return self._safely("read", self._get_stale_many, {}, msisdns, self.wait_for(deadline))

    def put_many(self, answers: list[Answer], *, deadline: float | None = None, background: bool = False) -> None:
        """Keep what deserves keeping (see ``ttl_for``); the rest is dropped silently."""
        now = self.clock()
        rows = [(a, now, now + ttl) for a in answers if (ttl := ttl_for(a, self.cfg)) > 0]
        if rows and self.recent is not None:
            self.recent.put_many((_answer(a.msisdn, *_record(a)), expires) for a, _, expires in rows)
        if rows:
            self._safely("write", self._put_many, None, rows, self.wait_for(deadline, background))

    def get_local_many(self, kind: str, keys: list[str], *, deadline: float | None = None) -> dict[str, str]:
        """The admin's entries of ``kind`` (``KNOWN_NUMBERS``, ``RANGES``) among ``keys``: key to
        MCCMNC. Like every read of a call, it never raises: a failing backend has none."""
        if not keys:
            return {}
        return {key: mccmnc for key, mccmnc in self._read_local(kind, keys, deadline).items() if _is_mccmnc(mccmnc)}

    def _read_local(self, kind: str, keys: list[str], deadline: float | None) -> dict[str, str]:
        if self.fail_fast:
            return self._get_local_many(kind, keys, 0.0)
        return self._safely("read", self._get_local_many, {}, kind, keys, self.wait_for(deadline))

    # -- the admin's commands on local data (``npl-agi local``, ``npl-agi ranges``); they may raise --
    def load_local(self, kind: str, chunks: Iterable[list[tuple[str, str, str]]], *, mode: str = "add") -> int:
        """Store checked (key, mccmnc, note) rows of ``kind``, a chunk at a time, so memory does
        not grow with a national database; the number of rows applied.

        A key of ``KNOWN_NUMBERS`` is an international number, or a block ``FROM-TO`` (two
        numbers of the same length, ``FROM`` <= ``TO``), answered like each number in it; a
        number held on its own wins over a block holding it. ``mode``:

        - ``add``: the rows are added (a key held already takes the new network);
        - ``replace``: the rows become the whole set of ``kind``. The new set is built beside
          the old one and swapped in at once: a call meanwhile sees the whole old set or the
          whole new one, never a part of either, never an empty one;
        - ``delta``: as ``add``, and a row whose mccmnc is ``-`` removes its key.

        All or nothing: the rows are staged first and applied in one step, so a failure
        part-way (a full disk, Redis gone) leaves the set as it was. Other writers (calls
        storing answers) wait for at most one chunk's write at a time, never for the whole load.
        May raise."""
        raise self._no_local()

    def local_size(self, kind: str) -> dict[str, int]:
        """What ``kind`` holds and costs (``npl-agi cache stats``): ``entries`` (numbers or
        prefixes), ``blocks`` (``FROM-TO`` keys) and ``bytes`` (what the backend spends on them,
        on disk or in memory, measured or closely estimated). May raise."""
        raise self._no_local()

    def local_items(self, kind: str) -> Iterator[tuple[str, str, str]]:
        """Every (key, mccmnc, note) of ``kind``, sorted by key."""
        raise self._no_local()

    def delete_local(self, kind: str, keys: list[str] | None = None) -> int:
        """Delete these keys of ``kind``, or all of them; the number deleted."""
        raise self._no_local()

    def _no_local(self) -> Exception:
        from npl_agi.core.errors import CacheError

        return CacheError("numbers and ranges of your own are kept by the cache backend; backend = none keeps none")

    def queue(self, api: ApiConfig):
        """The account's queue of waiting numbers this backend keeps (``backends.queue``); none
        without a backend."""
        return None

    def slots(self, api: ApiConfig) -> FileSlots:
        """The account's ``[api] connections`` slots across this cache's scope (see ``slots``)."""
        from npl_agi.backends.locks import lock_directory
        from npl_agi.backends.slots import FileSlots

        fallback = self.cfg.lock_fallback != "none"
        return FileSlots(lock_directory(api, self.cfg), api.url, api.user, api.connections, may_fall_back=fallback)

    def lock_fallbacks(self, api: ApiConfig) -> tuple[int, float | None] | None:
        """How often the account lock fell back to a file, and when last (``cache stats``);
        None where the lock is a file already."""
        return None

    def breaker_store(self, api: ApiConfig) -> FileStore:
        """Where the account's breaker keeps its state for every process of this scope: a file
        beside the account lock (in the temp dir when the lock directory is unusable)."""
        import os
        import tempfile

        from npl_agi.backends.breaker_store import FileStore
        from npl_agi.backends.locks import lock_directory, lock_name

        directory = lock_directory(api, self.cfg)
        if not (os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)):
            directory = tempfile.gettempdir()
        name = lock_name(api.url, api.user).removesuffix(".lock")
        return FileStore(os.path.join(directory, f"{name}.breaker"))

    def account_lock(self, api: ApiConfig) -> AccountLock:
        """The lock that keeps the account to one connection across this cache's scope."""
        from npl_agi.backends.locks import AccountLock, lock_directory

        fallback = self.cfg.lock_fallback != "none"
        return AccountLock(lock_directory(api, self.cfg), api.url, api.user, may_fall_back=fallback)

    def _safely(self, what: str, work, fallback, *args):
        if self.broken:
            return fallback
        try:
            done = work(*args)
        except Exception as e:  # whatever a cache does wrong, the call goes on
            self.mark_failed()
            log.warning("cache %s failed, continuing without the %s cache: %s", what, self.name, log.short(e))
            return fallback
        self._failures = 0
        return done

    def close(self) -> None:
        """Let go of the backend's connection. Before a fork: an SQLite connection must never be
        carried into a child process, where its locks and WAL index would be shared unknowingly."""

    # -- overridden by the backends; ``wait`` is the operation's (see ``wait_for``) --
    def _get_many(self, msisdns: list[str], wait: float) -> dict[str, tuple[Answer, float]]:
        """The live answers with when each expires (``clock`` seconds)."""
        return {}

    def _get_stale_many(self, msisdns: list[str], wait: float) -> dict[str, Answer]:
        return {}

    def _get_local_many(self, kind: str, keys: list[str], wait: float) -> dict[str, str]:
        return {}

    def _put_many(self, rows: list[tuple[Answer, float, float]], wait: float) -> None:
        pass

    def _record(self, hits: int, misses: int, wait: float) -> None:
        pass

    def stats(self) -> dict:
        """Entries, hits, misses and credits saved (``npl-agi cache stats``); may raise."""
        return {"backend": self.name}

    def purge(self, msisdns: list[str] | None = None) -> int:
        """Delete these numbers' entries, or all; the number of live entries deleted. May raise."""
        return 0

    def export(self) -> Iterator[dict]:
        """Every live entry as a dict (``npl-agi cache export``); may raise."""
        return iter(())


def _stats(backend: str, where: str, entries: int, oldest: float | None, counters: dict) -> dict:
    hits, misses = int(counters.get("hits", 0)), int(counters.get("misses", 0))
    return {
        "backend": backend,
        "location": where,
        "entries": entries,
        "oldest": oldest,
        "since": float(counters["created"]) if counters.get("created") else None,
        "hits": hits,
        "misses": misses,
        "hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
        "credits_saved": hits,
    }
