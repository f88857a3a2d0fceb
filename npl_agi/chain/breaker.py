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

import time
from collections.abc import Callable

from npl_agi.backends.breaker_store import CLOSED, HALF_OPEN, OPEN, Change, MemoryStore, State
from npl_agi.core.codes import SERVICE_FAILURES, SERVICE_WORKS, UNAVAILABLE

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Breaker", "gate", "shared_breaker"]
LINE_EVERY = 1.0  # seconds between the notes that the service sent a line (see ``Breaker.line``)


class Breaker:
    """The state machine, on ``clock`` seconds, over a store (in memory by default)."""

    def __init__(
        self,
        failures: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        store=None,
        *,
        call_probes: bool = True,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        """``call_probes``: after the cool-down the first call through the gate is the probe
        (the process script, whose calls each may send a request); otherwise calls pass once
        the cool-down ends and the first request sent is the probe (``allow``: the FastAGI
        server's broker, which sends one request for many calls). ``on_change`` hears each new
        state (the server's metrics)."""
        self.failures = failures
        self.cooldown = cooldown
        self.clock = clock
        self.store = store if store is not None else MemoryStore()
        self.call_probes = call_probes
        self.on_change = on_change
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
        elif npl_err in SERVICE_WORKS:
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
    """Before the misses are asked, in both drivers of the chain: while the breaker is open they
    are ``UNAVAILABLE`` at once (and none is asked); otherwise all are asked (see
    ``Breaker.__init__`` for who is the probe). Returns the answers given and what to ask."""
    if breaker.allow() if breaker.call_probes else not breaker.rejecting():
        return {}, misses
    from npl_agi.core import protocol

    why = "the service keeps failing: not asked until the breaker's cool-down ends"
    return {m: protocol.failed(m, UNAVAILABLE, reason=why) for m in misses}, []


def shared_breaker(config, cache) -> Breaker:
    """The account's breaker as every process sees it, in the store the backend keeps for the
    account (``Cache.breaker_store``), on wall-clock time."""
    cfg = config.breaker
    return Breaker(cfg.failures, cfg.cooldown, time.time, cache.breaker_store(config.api))
