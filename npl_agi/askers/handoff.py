"""Requests that outlive their call: the AGI script's lookups run in a detached child process.

A call waits for its answer until its deadline and not a moment longer. The request it started
must not be cut off then: the credit is already spent, and a lock released while the service is
still answering would let the next caller open a second connection. So the script forks before
the account lock is taken. The child takes the lock, asks, hands each answer to the parent over
a pipe the moment its line arrives, caches everything it was charged for, and only then releases
the lock and exits. The parent reads the pipe until its deadline. The child runs in a process group
of its own, ignoring SIGHUP, with its standard streams on /dev/null, so Asterisk sees the script
end when the parent exits, and the call's hangup never reaches the child. Not in a session of its
own: the kernel schedules each session as a group of its own, and a new group on a machine whose
cores are all busy can wait seconds for its first time slice.

The account's breaker (``chain.breaker.shared_breaker``) hears of the service from the child, by the
FastAGI server's rules, so the call itself does nothing past its deadline. Its request: an
answer that ended, or a refusal of the account, is a success (told before the answer is
stored, so the next call sees it); a request cut off or failed in transport is a failure. The
call: when it is left without a line of answer (its deadline passed, or the lock wait gave up,
``NotSent``) and no request of the account has had a line since the call began, that is one
failure more: its own request was hanging, or the one it queued behind for the lock.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from npl_agi import log
from npl_agi.core import protocol
from npl_agi.core.codes import TIMEOUT, TRUNCATED
from npl_agi.core.errors import NotSent, NplError, ProtocolError, error_for
from npl_agi.core.protocol import Answer

_FIELDS = len(Answer._fields)
# What the child asks with, made in the child: a client (it takes the account lock), a store and
# the account's breaker.
Parts = Callable[[object], tuple[object, Callable[[Iterable[Answer]], None], object]]


def ask_detached(config, misses: list[str], deadline: float, parts: Parts) -> Iterator[dict[str, Answer]]:
    """Answers for ``misses`` from a detached child, as ``Lookup`` takes a request's answers.

    ``parts(config)`` is called in the child: nothing opened before the fork (an SQLite
    connection above all) may be used there. What has not arrived by ``deadline`` is
    ``TIMEOUT`` here, while the child goes on to cache it. When the child's request failed as a
    whole, the answers that did arrive are yielded first, then its ``NplError`` is raised.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns from here
        os.close(read_end)
        _child(config, misses, deadline, write_end, parts)
    os.close(write_end)
    try:
        got, failure = _collect(read_end, misses, deadline)
    finally:
        os.close(read_end)
        reap(pid)
    if got:
        yield got
    if failure is not None:
        raise failure


def _collect(fd: int, misses: list[str], deadline: float) -> tuple[dict[str, Answer], NplError | None]:
    got: dict[str, Answer] = {}
    failure: NplError | None = None
    ended = False
    pending = b""
    while len(got) < len(misses) and failure is None and not ended:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        ended = not chunk
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            kind, _, rest = line.decode("utf-8", "replace").partition("\t")
            if kind == "A":
                fields = rest.split("\t")
                if len(fields) == _FIELDS:
                    answer = Answer(*fields)
                    got[answer.msisdn] = answer
            elif kind == "W":
                log.warning("%s", rest)
            elif kind == "F":
                code, _, message = rest.partition("\t")
                failure = error_for(code, message)
    if len(got) < len(misses) and failure is None:
        if ended:
            failure = ProtocolError("the lookup process ended without an answer")
        else:
            why = "no answer before the call's deadline (the request goes on, to cache its answer)"
            got.update({m: protocol.failed(m, TIMEOUT, reason=why) for m in misses if m not in got})
    return got, failure


def _request_outcome(batch: dict[str, Answer]) -> str:
    """A request's outcome for the breaker: did its answer end?"""
    return next((a.error for a in batch.values() if a.error in (TIMEOUT, TRUNCATED)), "")


def reap(pid: int) -> None:
    """Collect the child if it is done already; otherwise it outlives us and init reaps it."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


class _Pipe:
    """The child's side: answers, warnings and a failure, one line each, to the waiting parent."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sent: set[str] = set()

    def _send(self, *fields: str) -> None:
        if self.fd < 0:
            return
        line = "\t".join(f.replace("\t", " ").replace("\n", " ").replace("\r", " ") for f in fields) + "\n"
        try:
            os.write(self.fd, line.encode())
        except OSError:  # the parent is gone (its deadline passed): go on without it
            os.close(self.fd)
            self.fd = -1

    def answer(self, answer: Answer) -> None:
        if answer.msisdn not in self.sent:
            self.sent.add(answer.msisdn)
            self._send("A", *answer)

    def warning(self, message: str) -> None:
        self._send("W", message)

    def failure(self, error: NplError) -> None:
        self._send("F", error.npl_err, str(error))


def detach(fd: int) -> _Pipe:
    """Make this forked child outlive its call: a process group of its own (not a session: see
    the module), SIGHUP ignored, standard streams on /dev/null, and its warnings sent to the
    parent over ``fd`` while the parent listens."""
    os.setpgid(0, 0)
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pipe = _Pipe(fd)
    log.set_sink(pipe.warning)
    log.call_sink.set(None)  # the parent's call and its console are not this process's
    return pipe


def fork_detached(work: Callable[[], None], handed_over: Callable[[], None]) -> tuple[int, int]:
    """Run ``work`` in a detached child (see ``detach``); returns its pid and the read end of
    its warnings' pipe. ``handed_over`` runs in the parent once the child has its copy of
    whatever it inherits (a slot's descriptor)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns from here
        status = 1
        try:
            os.close(read_end)
            detach(write_end)
            work()
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    handed_over()
    return pid, read_end


def read_warnings(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for the child's warnings on ``fd`` and say them; False once the
    child has closed its end (it exited)."""
    if not select.select([fd], [], [], max(timeout, 0.0))[0]:
        return True
    chunk = os.read(fd, 65536)
    for line in chunk.decode("utf-8", "replace").splitlines():
        kind, _, rest = line.partition("\t")
        if kind == "W":
            log.warning("%s", rest)
    return bool(chunk)


def _child(config, misses: list[str], call_deadline: float, fd: int, parts: Parts) -> None:
    status = 1
    try:
        pipe = detach(fd)
        api = config.api
        since = time.time()  # the breaker's clock, shared with other processes
        breaker, at_deadline = None, None
        once = threading.Lock()

        def on_answer(answer: Answer) -> None:
            pipe.answer(answer)
            breaker.line()

        def call_left_waiting() -> None:  # at the call's deadline, or when the lock wait gave up
            if once.acquire(blocking=False) and not pipe.sent and breaker.silent_since(since):
                breaker.failure()

        try:
            client, store, breaker = parts(config)
            at_deadline = threading.Timer(max(0.0, call_deadline - time.monotonic()), call_left_waiting)
            at_deadline.daemon = True
            at_deadline.start()
            for batch in client.batches(
                misses,
                api.finish_timeout,
                lock_deadline=call_deadline - api.request_floor,
                on_answer=on_answer,
            ):
                breaker.outcome(_request_outcome(batch))
                store(batch.values())
                for answer in batch.values():
                    pipe.answer(answer)
        except NplError as e:
            pipe.failure(e)
            if breaker is None:  # the parts could not be made (no credentials): nothing of the service
                pass
            elif isinstance(e, NotSent):
                call_left_waiting()
            else:
                breaker.outcome(e.npl_err)
        finally:
            if at_deadline is not None:
                at_deadline.cancel()
        status = 0
    finally:
        os._exit(status)
