"""The transports' shared rules on their own (transports.base): the verdict comes from the
clock, foreign errors from one table."""

from __future__ import annotations

import ssl

import pytest

from npl_agi.core import protocol
from npl_agi.core.codes import TIMEOUT, TRUNCATED
from npl_agi.core.errors import LookupTimeout, ProtocolError, Unreachable
from npl_agi.doubles.simulator import simulated_answer
from npl_agi.transports import base

ASKED = ["447788450450", "447810701702"]
FIRST = b"QUERYOK\n" + simulated_answer(ASKED[0], "2.4").encode() + b"\n"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def started(clock: Clock, secret: str = "123") -> tuple[base.Reply, protocol.AnswerReader]:
    reader = protocol.AnswerReader(ASKED, secret)
    ex = base.Reply(reader, deadline=101.0, secret=secret, clock=clock)
    ex.add(FIRST)
    return ex, reader


@pytest.mark.parametrize("failure", [None, ConnectionResetError(104, "reset"), TimeoutError()])
def test_a_read_that_ends_after_the_deadline_is_a_timeout_whoever_noticed(failure):
    clock = Clock()
    ex, reader = started(clock)
    clock.now = 101.0
    assert ex.end(failure) is True
    got = reader.finish(TIMEOUT)
    assert got[ASKED[0]].mccmnc and got[ASKED[1]].error == TIMEOUT


@pytest.mark.parametrize("failure", [None, ConnectionResetError(104, "reset")])
def test_a_read_that_ends_before_the_deadline_is_cut_short(failure):
    ex, reader = started(Clock())
    assert ex.end(failure) is False
    assert reader.finish(TRUNCATED)[ASKED[1]].error == TRUNCATED


def test_nothing_before_the_deadline_is_a_lookup_timeout():
    clock = Clock()
    ex = base.Reply(protocol.AnswerReader(ASKED), deadline=101.0, secret="", clock=clock)
    clock.now = 102.0
    with pytest.raises(LookupTimeout):
        ex.end(TimeoutError())


def test_a_password_equal_to_the_status_line_masks_messages_only():
    ex, reader = started(Clock(), secret="QUERYOK")
    with pytest.raises(ProtocolError, match=r"HTTP 503 no \*\*\*$"):
        ex.http_status(503, "no QUERYOK")
    assert reader.started and reader.found[ASKED[0]].mccmnc


def test_too_little_time_left_sends_nothing():
    clock = Clock()
    base.check_time(100.0, clock)
    clock.now = 100.5
    with pytest.raises(LookupTimeout, match="too little time"):
        base.check_time(100.0, clock)


def caused(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(
    ("exc", "error", "message"),
    [
        (ConnectionRefusedError(111, "x"), Unreachable, "cannot connect to the service: ConnectionRefusedError"),
        (
            caused(RuntimeError("wrapped"), ssl.SSLError(1, "bad cert")),
            Unreachable,
            "TLS failure talking to the service: SSLError: bad cert",
        ),
        (ConnectionResetError(104, "x"), ProtocolError, "bad HTTP answer from the service: ConnectionResetError"),
    ],
)
def test_one_table_maps_foreign_errors_to_ours(exc, error, message):
    got = base.translate(exc)
    assert isinstance(got, error) and str(got).startswith(message)


def test_the_core_imports_no_http_library():
    import subprocess
    import sys

    code = "import sys, npl_agi.transports.base; print(sorted({'requests', 'urllib3', 'httpx'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
