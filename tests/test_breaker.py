"""The circuit breaker, on an injectable clock."""

from npl_agi.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_then_probes_after_the_cooldown() -> None:
    clock = Clock()
    seen = []
    b = Breaker(3, 30, clock)
    b.on_change = seen.append
    b.failure()
    b.failure()
    b.success()  # not consecutive
    b.failure()
    b.failure()
    assert b.state == CLOSED and b.allow()
    b.failure()
    assert b.state == OPEN and b.rejecting() and not b.allow()
    clock.now = 29.9
    assert b.rejecting()
    clock.now = 30.0
    assert not b.rejecting() and b.allow() and b.state == HALF_OPEN
    b.failure()  # the probe failed: open again for a whole cool-down
    assert b.state == OPEN and b.rejecting()
    clock.now = 60.0
    assert b.allow()
    b.success()
    assert b.state == CLOSED and not b.rejecting()
    assert seen == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]
