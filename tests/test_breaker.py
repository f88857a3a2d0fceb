"""The circuit breaker, on an injectable clock."""

from npl_agi.chain.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


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


def test_while_the_probe_runs_no_other_request_is_allowed_until_a_cool_down_passes() -> None:
    """One probe at a time; a probe that never reports (its process died) is replaced later."""
    clock = Clock()
    b = Breaker(1, 30, clock)
    b.failure()
    clock.now = 30.0
    assert b.allow() and b.state == HALF_OPEN  # the probe
    assert not b.allow()  # another caller, while it runs
    clock.now = 60.0
    assert b.allow()  # it never reported: the next one probes


def test_the_same_machine_over_a_shared_file(tmp_path) -> None:
    from npl_agi.backends.breaker_store import FileStore

    clock = Clock()
    path = str(tmp_path / "account.breaker")
    one, two = Breaker(2, 30, clock, FileStore(path)), Breaker(2, 30, clock, FileStore(path))
    one.failure()
    two.failure()  # two processes' failures add up
    assert one.state == OPEN and two.rejecting() and not one.allow()
    clock.now = 30.0
    assert two.allow() and not one.allow()
    one.success()
    assert two.state == CLOSED and two.allow()
