"""The API client: numbers in, one ``Answer`` per number out, within a deadline.

Each request holds the account lock from before it connects until its socket is closed, so
npl-agi never opens a second connection for one account. The deadline covers the wait for the
lock, the connection and the whole answer: a watchdog shuts the socket down when it passes, so
a server that drips bytes cannot hold a request longer than its deadline. The answer is parsed
line by line as it arrives: every well-formed line is kept, whatever happens to the rest.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

from . import log, protocol
from .config import ApiConfig
from .errors import TIMEOUT, TRUNCATED, LookupTimeout, NotSent, ProtocolError, RequestRejected, Unreachable
from .locks import FileLock
from .protocol import Answer

MAX_BODY = 4 * 1024 * 1024  # far above 1000 answer lines; stops a runaway server
MAX_LINE = 4096  # far above any answer line
DEADLINE_SLACK = 0.001  # seconds: a socket timeout may end this much before the deadline it was given
_local = threading.local()
_warned_tls = False

OnAnswer = Callable[[Answer], None]


class Client:
    """Talks to one account of the service. Thread-safe; one request at a time per account."""

    def __init__(self, api: ApiConfig, *, lock=None) -> None:
        self.api = api
        self.lock = lock or FileLock.for_account(api.lock_dir, api.url, api.user)
        self._session = None

    def __repr__(self) -> str:
        return f"Client(url={self.api.url!r}, user={self.api.user!r})"

    def lookup(self, msisdns: list[str], timeout: float | None = None) -> dict[str, Answer]:
        """Answers keyed by msisdn; each distinct number is asked once."""
        answers: dict[str, Answer] = {}
        for batch in self.batches(msisdns, timeout):
            answers.update(batch)
        return answers

    def batches(
        self,
        msisdns: list[str],
        timeout: float | None = None,
        *,
        deadline: float | None = None,
        lock_deadline: float | None = None,
        on_answer: OnAnswer | None = None,
    ) -> Iterator[dict[str, Answer]]:
        """Ask in requests of at most ``batch_size`` numbers, one after another.

        Yields each request's answers (``source = "api"``) as it completes, so a caller can
        keep (and cache) what it has paid for if a later request fails. Each request has
        ``timeout`` seconds (default: the configured call-time ``timeout``), and none runs past
        ``deadline`` or waits for the lock past ``lock_deadline`` (``time.monotonic()``
        seconds). ``on_answer`` sees each answer the moment its line arrives.
        """
        unique = list(dict.fromkeys(msisdns))
        size = self.api.batch_size
        for start in range(0, len(unique), size):
            ends = time.monotonic() + (timeout if timeout is not None else self.api.timeout)
            if deadline is not None:
                ends = min(ends, deadline)
            yield self.request(unique[start : start + size], ends, lock_deadline=lock_deadline, on_answer=on_answer)

    def request(
        self,
        msisdns: list[str],
        deadline: float,
        *,
        lock_deadline: float | None = None,
        on_answer: OnAnswer | None = None,
    ) -> dict[str, Answer]:
        """One request: an answer or a per-number failure for every number in ``msisdns``.

        Raises ``ServiceRefused`` subclasses for a refused query, and ``TransportError``
        subclasses when no answer line could be had (nothing was paid for).
        """
        reader = protocol.AnswerReader(msisdns, self.api.password)
        cut = self._exchange(msisdns, deadline, lock_deadline, reader, on_answer)
        return {m: a._replace(source="api") for m, a in reader.finish(TIMEOUT if cut else TRUNCATED).items()}

    def check(self, timeout: float | None = None) -> str:
        """Ask with no numbers: costs no credit, and the service still checks the password.

        Returns the service's line (``FAIL No numbers specified`` means the credentials were
        accepted); raises ``AuthError``, ``LockedError``, ``CreditError`` or a transport error.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else self.api.timeout)
        reader = _FirstLine(self.api.password)
        self._exchange([], deadline, None, reader, None)
        try:
            protocol.check_status(reader.line, self.api.password)
        except RequestRejected:
            if reader.line != protocol.FAIL_NO_NUMBERS:
                raise
        return reader.line

    def _exchange(self, msisdns, deadline: float, lock_deadline: float | None, reader, on_answer) -> bool:
        """Lock, send, read every line into ``reader``; True when our deadline cut the answer."""
        import requests  # noqa: F401 - imported before the lock is taken: the holder must not wait for it

        form = protocol.request_form(self.api.user, self.api.password, self.api.apiver, msisdns)
        start_by = deadline - self.api.request_floor
        if lock_deadline is not None:
            start_by = min(start_by, lock_deadline)
        self.lock.acquire(start_by, hold_until=deadline)
        try:
            if time.monotonic() > start_by:  # the answer could not arrive in time: spend nothing
                raise NotSent("too little time left before the deadline to send a request")
            return self._post(form, deadline, reader, on_answer)
        finally:
            self.lock.release()

    def _post(self, form: dict[str, str], deadline: float, reader, on_answer: OnAnswer | None) -> bool:
        import requests
        from urllib3.exceptions import HTTPError

        left = deadline - time.monotonic()
        if left <= 0:
            raise NotSent("deadline passed before the request could be sent")
        self._tls_warning()
        watchdog = _Watchdog(left)
        lines = _Lines(reader, on_answer)
        try:
            with (
                watchdog,
                self._get_session().post(
                    self.api.url,
                    data=form,
                    timeout=(left, left),
                    stream=True,
                    allow_redirects=False,
                    verify=self.api.ca_file or self.api.verify_tls,
                ) as resp,
            ):
                if resp.status_code != 200:
                    reason = protocol.shown(resp.reason or "", self.api.password)[1:-1]
                    raise ProtocolError(f"the service answered HTTP {resp.status_code} {reason}".rstrip())
                while not lines.complete and not lines.overflow and not _past(deadline, watchdog):
                    chunk = resp.raw.read1(65536)
                    if not chunk:
                        break
                    lines.add(chunk)
        except (requests.exceptions.RequestException, HTTPError, OSError) as e:
            # Decided by the clock: the watchdog, requests' timeout or urllib3's may notice first.
            cut_by_deadline = not lines.complete and _past(deadline, watchdog)
            if not lines.received and not cut_by_deadline:
                if isinstance(e, requests.exceptions.SSLError):
                    raise Unreachable(f"TLS failure talking to the service: {_reason(e)}") from None
                if isinstance(e, requests.exceptions.ConnectionError):
                    raise Unreachable(f"cannot connect to the service: {_reason(e)}") from None
                raise ProtocolError(f"bad HTTP answer from the service: {_reason(e)}") from None
            # Cut off mid-answer (reset, short body, bad chunk, deadline): the lines that
            # arrived are kept, the parser marks the numbers left without one.
        else:
            cut_by_deadline = not lines.complete and _past(deadline, watchdog)
        lines.close(cut_by_deadline)
        if lines.overflow and not lines.status:
            raise ProtocolError(lines.overflow)
        if cut_by_deadline and not lines.status:
            raise LookupTimeout(f"no answer from the service within {left:.1f} s")
        return cut_by_deadline

    def _tls_warning(self) -> None:
        """One warning line per process instead of urllib3's two on every request."""
        global _warned_tls
        if self.api.verify_tls or self.api.url.startswith("http:"):
            return
        import warnings

        from urllib3.exceptions import InsecureRequestWarning

        warnings.simplefilter("ignore", InsecureRequestWarning)
        if not _warned_tls:
            _warned_tls = True
            log.warning("TLS certificate checks are off (verify_tls = no): the service is not authenticated")

    def _get_session(self):
        if self._session is None:
            self._session = _new_session()
        return self._session


class _Lines:
    """Cuts the body into lines as bytes arrive and hands each to the parser at once."""

    def __init__(self, reader, on_answer: OnAnswer | None) -> None:
        self.reader = reader
        self.on_answer = on_answer
        self.received = 0
        self.status = False  # a whole first line arrived
        self.overflow = ""  # why reading stopped early: more than any answer could be
        self._partial = b""

    @property
    def complete(self) -> bool:
        return self.reader.ended

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

    def _line(self, raw: bytes) -> None:
        self.status = True
        answer = self.reader.feed(raw.decode("utf-8", "replace"))
        if answer is not None and self.on_answer is not None:
            self.on_answer(answer._replace(source="api"))

    def close(self, cut: bool) -> None:
        """The body ended; a last line without its newline counts only if it is ``ENDBATCH``
        (or the only line: a status line some servers send without one)."""
        tail, self._partial = self._partial, b""
        if self.overflow:
            return
        if tail.strip() == protocol.ENDBATCH.encode() or (tail.strip() and not self.status and not cut):
            self._line(tail)
        if not self.status and not cut:
            self._line(b"")  # nothing at all: the parser's "empty answer"


class _FirstLine:
    """A reader for ``check``: keeps the first line, whatever it says."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.line = ""
        self.ended = False

    def feed(self, line: str) -> None:
        if not self.ended:
            self.line, self.ended = protocol.redact(line.strip(), self.secret), True


def _past(deadline: float, watchdog: _Watchdog) -> bool:
    """Has our deadline passed? The socket's read timeout can fire a hair before the watchdog's
    timer thread runs (a busy machine), so the clock decides, with a millisecond's slack for the
    rounding of socket timeouts."""
    return watchdog.fired or time.monotonic() >= deadline - DEADLINE_SLACK


def _reason(exc: BaseException) -> str:
    """The innermost cause's class and message, short: urllib3 nests its errors deeply."""
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    text = str(exc).split("\n")[0][:160]
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


class _Watchdog:
    """Shuts down the sockets of the running request when its deadline passes."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._socks: list[socket.socket] = []
        self._mutex = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        _local.watchdog = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        _local.watchdog = None

    def watch(self, sock: socket.socket) -> None:
        with self._mutex:
            self._socks.append(sock)
            if self.fired:
                _shutdown(sock)

    def _fire(self) -> None:
        with self._mutex:
            self.fired = True
            for sock in self._socks:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed: nothing to stop
        sock.shutdown(socket.SHUT_RDWR)


def _new_session():
    """A requests session whose connections register with the running request's watchdog."""
    import requests
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def watched(base):
        class Watched(base):
            def connect(self) -> None:
                super().connect()
                watchdog = getattr(_local, "watchdog", None)
                if watchdog is not None:
                    watchdog.watch(self.sock)

        return Watched

    class HTTPPool(HTTPConnectionPool):
        ConnectionCls = watched(HTTPConnection)

    class HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = watched(HTTPSConnection)

    session = requests.Session()
    session.trust_env = False  # no .netrc credentials or proxy surprises on a PBX
    session.headers.update({"User-Agent": "npl-agi", "Connection": "close"})
    adapter = requests.adapters.HTTPAdapter(max_retries=0)
    adapter.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
