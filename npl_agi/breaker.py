"""A circuit breaker: stop asking a service that keeps failing.

After ``failures`` consecutive failures it opens: calls are answered at once (from stale cache
entries, else ``UNAVAILABLE``) instead of each waiting out its deadline. After ``cooldown``
seconds one request goes through as a probe; its success closes the breaker, its failure opens
it again. A probe that never reports (its process died) is replaced after another cool-down.

The state lives in a store. The FastAGI server keeps it in memory on its injectable clock; the
process script, where every call is a process of its own, keeps it in a small file beside the
account lock (``FileStore``) or, with ``backend = redis``, in a Redis key (``RedisStore``), on
wall-clock time, so every process of the account (every PBX of a cluster) sees the same state.
Each change is one atomic read-modify-write, so only one process becomes the probe. A store that
cannot be read or written is a closed breaker: it never fails a call.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from .errors import SERVICE_FAILURES, UNAVAILABLE

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
STORE_WAIT = 0.05  # seconds a change waits for another process's change, then gives up: closed
LINE_EVERY = 1.0  # seconds between the notes that the service sent a line (see ``Breaker.line``)

State = dict  # {"state", "failed", "opened_at", "line_at"}
Change = Callable[[State], tuple[State, bool]]


def _closed() -> State:
    return {"state": CLOSED, "failed": 0, "opened_at": 0.0, "line_at": 0.0}


class MemoryStore:
    """The state of one process's breaker (the FastAGI server)."""

    def __init__(self) -> None:
        self.state = _closed()

    def load(self) -> State:
        return dict(self.state)

    def update(self, change: Change) -> bool:
        self.state, result = change(dict(self.state))
        return result


class FileStore:
    """The state as JSON in a file, changed under its ``flock``: shared by the machine's processes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> State:
        try:
            with open(self.path, encoding="utf-8") as f:
                return _parsed(f.read())
        except (OSError, ValueError):
            return _closed()

    def update(self, change: Change) -> bool:
        import fcntl

        from .locks import open_shared, wait_for

        try:
            fd = open_shared(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return change(_closed())[1]
        try:

            def take() -> bool:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    return False

            wait_for(take, time.monotonic() + STORE_WAIT, "breaker state")
            old = _parsed(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            new, result = change(dict(old))
            if new != old:
                data = json.dumps(new).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
            return result
        except Exception:  # busy, full, unwritable: a closed breaker, this time
            return change(_closed())[1]
        finally:
            os.close(fd)  # closing drops the flock


class RedisStore:
    """The state in one Redis key, changed in a WATCH/MULTI transaction: shared by a cluster."""

    def __init__(self, cache, key: str) -> None:
        self.cache, self.key = cache, key  # a RedisCache: its client and timeouts

    def load(self) -> State:
        try:
            return _parsed(self.cache.client().get(self.key) or "")
        except Exception:
            return _closed()

    def update(self, change: Change) -> bool:
        import redis

        for _ in range(5):  # another process changed it meanwhile: read it again
            try:
                with self.cache.client().pipeline() as pipe:
                    pipe.watch(self.key)
                    old = _parsed(pipe.get(self.key) or "")
                    new, result = change(dict(old))
                    pipe.multi()
                    if new != old:
                        pipe.set(self.key, json.dumps(new))
                    pipe.execute()
                    return result
            except redis.WatchError:
                continue
            except Exception:  # down, slow, garbled: a closed breaker, this time
                break
        return change(_closed())[1]


def _parsed(text: str) -> State:
    state = _closed()
    if text.strip():
        got = json.loads(text)
        if isinstance(got, dict) and got.get("state") in (CLOSED, OPEN, HALF_OPEN):
            state.update({k: got[k] for k in state if isinstance(got.get(k), (int, float, str))})
    return state


class Breaker:
    """The state machine, on ``clock`` seconds, over a store (in memory by default)."""

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic, store=None) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.clock = clock
        self.store = store if store is not None else MemoryStore()
        self.on_change: Callable[[str], None] | None = None
        self._line_noted = -LINE_EVERY

    @property
    def state(self) -> str:
        return self.store.load()["state"]

    def rejecting(self) -> bool:
        """True while open and cooling down: do not even queue a number."""
        s = self.store.load()
        return s["state"] == OPEN and self.clock() < s["opened_at"] + self.cooldown

    def allow(self) -> bool:
        """May a request be sent now? After the cool-down the first to ask is the probe; the
        others are refused while it runs (for a cool-down at most: a probe may die unheard)."""

        def change(s: State) -> tuple[State, bool]:
            if s["state"] == CLOSED:
                return s, True
            if self.clock() < s["opened_at"] + self.cooldown:
                return s, False
            return {**s, "state": HALF_OPEN, "opened_at": self.clock()}, True

        return self._update(change)

    def success(self) -> None:
        self._update(lambda s: ({**s, "failed": 0, "state": CLOSED}, True))

    def failure(self) -> None:
        def change(s: State) -> tuple[State, bool]:
            s = {**s, "failed": s["failed"] + 1}
            if s["state"] == HALF_OPEN or (s["state"] == CLOSED and s["failed"] >= self.failures):
                s.update(state=OPEN, opened_at=self.clock())
            return s, True

        self._update(change)

    def outcome(self, npl_err: str) -> None:
        """Feed one request's outcome: a service failure counts, an answer or a refusal of the
        account (the service works) closes; our own faults (config, lock) say nothing."""
        if npl_err in SERVICE_FAILURES:
            self.failure()
        elif npl_err in ("", "AUTH", "CREDIT", "LOCKED"):
            self.success()

    def line(self) -> None:
        """The service sent a line (noted at most every ``LINE_EVERY`` seconds)."""
        now = self.clock()
        if now - self._line_noted >= LINE_EVERY:
            self._line_noted = now
            self._update(lambda s: ({**s, "line_at": now}, True))

    def silent_since(self, since: float) -> bool:
        """Has no request of the account had a line from the service since ``since``?"""
        return self.store.load()["line_at"] < since

    def _update(self, change: Change) -> bool:
        seen: list[str] = []

        def noted(s: State) -> tuple[State, bool]:
            new, result = change(s)
            if new["state"] != s["state"]:
                seen.append(new["state"])
            return new, result

        result = self.store.update(noted)
        if self.on_change and seen:
            self.on_change(seen[-1])
        return result


def gate(breaker: Breaker, misses: list[str]) -> tuple[dict, list[str]]:
    """Before the misses are asked: while the breaker is open they are ``UNAVAILABLE`` at once
    (and none is asked); otherwise all are asked. Returns the answers given and what to ask."""
    if breaker.allow():
        return {}, misses
    from . import protocol

    why = "the service keeps failing: not asked until the breaker's cool-down ends"
    return {m: protocol.failed(m, UNAVAILABLE, reason=why) for m in misses}, []


def shared_breaker(config, cache) -> Breaker:
    """The account's breaker as every process sees it: in Redis with ``backend = redis``, else
    in a file beside the account lock (in the temp dir when the lock directory is unusable)."""
    from .cache.redis import REDIS_PREFIX, RedisCache
    from .locks import lock_directory, lock_name

    api, cfg = config.api, config.breaker
    name = lock_name(api.url, api.user).removesuffix(".lock")
    if isinstance(cache, RedisCache):
        store = RedisStore(cache, f"{REDIS_PREFIX}breaker:{name}")
    else:
        directory = lock_directory(api, config.cache)
        if not (os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)):
            import tempfile

            directory = tempfile.gettempdir()
        store = FileStore(os.path.join(directory, f"{name}.breaker"))
    return Breaker(cfg.failures, cfg.cooldown, time.time, store)
