"""A circuit breaker for the FastAGI server: stop asking a service that keeps failing.

After ``failures`` consecutive failures it opens: calls are answered at once (from stale cache
entries, else ``UNAVAILABLE``) instead of each waiting out its deadline. After ``cooldown``
seconds one request goes through as a probe; its success closes the breaker, its failure opens
it again. The clock is injectable, so tests move time instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class Breaker:
    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.clock = clock
        self.state = CLOSED
        self.failed = 0  # consecutive failures
        self.opened_at = 0.0
        self.on_change: Callable[[str], None] | None = None

    def rejecting(self) -> bool:
        """True while open and cooling down: do not even queue a number."""
        return self.state == OPEN and self.clock() < self.opened_at + self.cooldown

    def allow(self) -> bool:
        """May a request be sent now? After the cool-down the next one is the probe."""
        if self.state == OPEN:
            if self.clock() < self.opened_at + self.cooldown:
                return False
            self._set(HALF_OPEN)
        return True

    def success(self) -> None:
        self.failed = 0
        if self.state != CLOSED:
            self._set(CLOSED)

    def failure(self) -> None:
        self.failed += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failed >= self.failures):
            self.opened_at = self.clock()
            self._set(OPEN)

    def _set(self, state: str) -> None:
        self.state = state
        if self.on_change:
            self.on_change(state)
