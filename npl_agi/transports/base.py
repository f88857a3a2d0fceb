"""What one request does with the service's answer, decided once for both clients.

``Client`` (requests, a watchdog thread) and ``AsyncClient`` (httpx on asyncio) only move
bytes: the form they send, whether there is time to send it, the status check, the cutting of
the body into lines, the verdict at its end and the meaning of a foreign exception are all
here, so the two doors read every answer alike. No I/O, and neither HTTP library is imported.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from npl_agi.config import ApiConfig
from npl_agi.core import protocol
from npl_agi.core.codes import TIMEOUT, TRUNCATED
from npl_agi.core.errors import LookupTimeout, NotSent, ProtocolError, TransportError, Unreachable
from npl_agi.core.protocol import Answer

MAX_BODY = 4 * 1024 * 1024  # far above 1000 answer lines; stops a runaway server
MAX_LINE = 4096  # far above any answer line
DEADLINE_SLACK = 0.001  # seconds: a socket timeout may end this much before the deadline it was given
HEADERS = {"User-Agent": "npl-agi", "Connection": "close"}  # closed after each request: one connection

OnAnswer = Callable[[Answer], None]
Clock = Callable[[], float]


def request_form(api: ApiConfig, msisdns: list[str]) -> dict[str, str]:
    """The one form both clients POST (their HTTP library encodes it): the account, the API
    version, the numbers, then ``[api] extra_form``."""
    return protocol.request_form(api.user, api.password, api.apiver, msisdns, api.extra_form)


def start_by(api: ApiConfig, deadline: float, lock_deadline: float | None = None) -> float:
    """The last moment a request may be sent and still have its answer by ``deadline``."""
    latest = deadline - api.request_floor
    return latest if lock_deadline is None else min(latest, lock_deadline)


def check_time(latest: float, clock: Clock = time.monotonic) -> None:
    """Spend nothing on a request whose answer could not arrive in time."""
    if clock() > latest:
        raise NotSent("too little time left before the deadline to send a request")


def answers(reader: protocol.AnswerReader, cut: bool) -> dict[str, Answer]:
    """Every asked number's answer at the end of a request (``cut``: our deadline ended the read):
    a line of the service's is ``source = "api"``; a number it left without one (cut short, timed
    out, not answered) has no source, the same from every door."""
    finished = reader.finish(TIMEOUT if cut else TRUNCATED)
    return {m: a._replace(source="api") if m in reader.found else a for m, a in finished.items()}


def tls_verify(api: ApiConfig) -> bool | str:
    """What to check the service's certificate against: a CA file, the system's, or nothing."""
    return api.ca_file or api.verify_tls


class Reply:
    """One request's answer as it arrives: each whole line goes to ``reader`` at once, so every
    well-formed line is kept whatever happens to the rest; ``end`` gives the verdict."""

    def __init__(
        self,
        reader,
        deadline: float,
        secret: str,
        on_answer: OnAnswer | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.reader = reader
        self.deadline = deadline
        self.secret = secret
        self.on_answer = on_answer
        self.clock = clock
        self.timer_fired = False  # our own deadline timer (watchdog, asyncio.timeout) went off
        self.received = 0
        self.status = False  # a whole first line arrived
        self.overflow = ""  # why reading stopped early: more than any answer could be
        self._partial = b""

    @property
    def done(self) -> bool:
        """Nothing more to read: the answer is complete, too large, or out of time."""
        return self.reader.ended or bool(self.overflow) or self.past()

    def past(self) -> bool:
        """Has our deadline passed? The clock decides, whichever timer noticed first, with a
        millisecond's slack for the rounding of socket timeouts."""
        return self.timer_fired or self.clock() >= self.deadline - DEADLINE_SLACK

    def http_status(self, code: int, reason: str = "") -> None:
        """Anything but 200 is no answer; the reason phrase is shown with the password masked."""
        if code != 200:
            shown = protocol.shown(reason or "", self.secret)[1:-1]
            raise ProtocolError(f"the service answered HTTP {code} {shown}".rstrip())

    def add(self, chunk: bytes) -> None:
        """Take a chunk; past ``MAX_BODY`` or ``MAX_LINE`` stop (the lines before it are kept)."""
        self.received += len(chunk)
        *whole, self._partial = (self._partial + chunk).split(b"\n")
        for raw in whole:
            if len(raw) > MAX_LINE:
                self.overflow = "the service sent a line longer than any lookup answer"
                return
            self._line(raw)
        if len(self._partial) > MAX_LINE:
            self.overflow = "the service sent a line longer than any lookup answer"
        elif self.received > MAX_BODY:
            self.overflow = "the service's answer is larger than any lookup answer"

    def end(self, failure: BaseException | None = None) -> bool:
        """The body ended, cleanly or with ``failure`` (what the transport raised); True when
        our deadline cut it. A read that ends after the deadline is a timeout, whoever noticed.

        Raises ``LookupTimeout``, ``Unreachable`` or ``ProtocolError`` when not even a first
        line could be had (nothing was paid for); otherwise the lines that arrived are kept
        and the reader marks the numbers left without one.
        """
        cut = not self.reader.ended and self.past()
        if failure is not None and not self.received and not cut:
            raise translate(failure) from None
        tail, self._partial = self._partial, b""
        if not self.overflow:
            # A last line without its newline counts only if it is ENDBATCH (or the only line:
            # a status line some servers send without one).
            if tail.strip() == protocol.ENDBATCH.encode() or (tail.strip() and not self.status and not cut):
                self._line(tail)
            if not self.status and not cut:
                self._line(b"")  # nothing at all: the parser's "empty answer"
        if self.overflow and not self.status:
            raise ProtocolError(self.overflow)
        if cut and not self.status:
            raise LookupTimeout("no answer from the service before the deadline")
        return cut

    def _line(self, raw: bytes) -> None:
        self.status = True
        answer = self.reader.feed(raw.decode("utf-8", "replace"))
        if answer is not None and self.on_answer is not None:
            self.on_answer(answer._replace(source="api"))


# Foreign exceptions, by (top-level module, class name) anywhere in the class's ancestry or the
# exception's chain of causes; the first row that matches decides. Matched by name so this
# module imports neither requests, urllib3 nor httpx.
FOREIGN: tuple[tuple[type[TransportError], str, frozenset[tuple[str, str]]], ...] = (
    (
        Unreachable,
        "TLS failure talking to the service",
        frozenset({("ssl", "SSLError"), ("requests", "SSLError"), ("urllib3", "SSLError")}),
    ),
    (
        Unreachable,
        "cannot connect to the service",
        frozenset(
            {
                ("builtins", "ConnectionRefusedError"),
                ("socket", "gaierror"),
                ("urllib3", "NewConnectionError"),
                ("httpx", "ConnectError"),
                ("httpcore", "ConnectError"),
            }
        ),
    ),
)


def translate(exc: BaseException) -> TransportError:
    """Our error for what requests, urllib3, httpx, ssl or the socket raised."""
    chain = _chain(exc)
    seen = {(c.__module__.split(".")[0], c.__name__) for e in chain for c in type(e).__mro__}
    for error, what, names in FOREIGN:
        if seen & names:
            return error(f"{what}: {_reason(chain)}")
    return ProtocolError(f"bad HTTP answer from the service: {_reason(chain)}")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first (the libraries nest their errors deeply)."""
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    return chain


def _reason(chain: list[BaseException]) -> str:
    """The innermost cause, short: an OS error by its errno's text, the same whichever library."""
    exc = chain[-1]
    if isinstance(exc, OSError) and exc.errno and type(exc).__module__ == "builtins":  # not ssl's codes
        import os

        text = os.strerror(exc.errno)
    else:
        text = str(exc).split("\n")[0][:160]
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
