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
from collections.abc import Iterator

from npl_agi import log
from npl_agi.config import ApiConfig
from npl_agi.core import protocol
from npl_agi.core.errors import NotSent, RequestRejected
from npl_agi.core.protocol import Answer
from npl_agi.transports import base

_local = threading.local()
_warned_tls = False

OnAnswer = base.OnAnswer


class Client:
    """Talks to one account of the service. Thread-safe; one request at a time per account."""

    def __init__(self, api: ApiConfig, lock) -> None:
        """``lock``: the account's connection, taken around each request (``acquire(start_by,
        hold_until=...)``, ``release()``): the backend's account lock, or a slot already held."""
        self.api = api
        self.lock = lock
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
        cut = self._stream(msisdns, deadline, lock_deadline, reader, on_answer)
        return base.answers(reader, cut)

    def check(self, timeout: float | None = None) -> str:
        """Ask with no numbers: costs no credit, and the service still checks the password.

        Returns the service's line (``FAIL No numbers specified`` means the credentials were
        accepted); raises ``AuthError``, ``LockedError``, ``CreditError`` or a transport error.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else self.api.timeout)
        reader = _FirstLine(self.api.password)
        self._stream([], deadline, None, reader, None)
        try:
            protocol.check_status(reader.line, self.api.password)
        except RequestRejected:
            if reader.line != protocol.FAIL_NO_NUMBERS:
                raise
        return reader.line

    def _stream(self, msisdns, deadline: float, lock_deadline: float | None, reader, on_answer) -> bool:
        """Lock, send, read every line into ``reader``; True when our deadline cut the answer."""
        import requests  # noqa: F401 - imported before the lock is taken: the holder must not wait for it

        form = base.request_form(self.api, msisdns)
        start_by = base.start_by(self.api, deadline, lock_deadline)
        self.lock.acquire(start_by, hold_until=deadline)
        try:
            base.check_time(start_by)
            return self._post(form, base.Reply(reader, deadline, self.api.password, on_answer))
        finally:
            self.lock.release()

    def _post(self, form: dict[str, str], ex: base.Reply) -> bool:
        import requests
        from urllib3.exceptions import HTTPError

        left = ex.deadline - time.monotonic()
        if left <= 0:
            raise NotSent("deadline passed before the request could be sent")
        self._tls_warning()
        watchdog = _Watchdog(left, ex)
        try:
            with (
                watchdog,
                self._get_session().post(
                    self.api.url,
                    data=form,
                    timeout=(left, left),
                    stream=True,
                    allow_redirects=False,
                    verify=base.tls_verify(self.api),
                ) as resp,
            ):
                ex.http_status(resp.status_code, resp.reason)
                while not ex.done and (chunk := resp.raw.read1(65536)):
                    ex.add(chunk)
        except (requests.exceptions.RequestException, HTTPError, OSError) as e:
            return ex.end(e)
        return ex.end()

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


class _FirstLine:
    """A reader for ``check``: keeps the first line, whatever it says."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.line = ""
        self.ended = False

    def feed(self, line: str) -> None:
        if not self.ended:
            self.line, self.ended = protocol.redact(line.strip(), self.secret), True


class _Watchdog:
    """Shuts down the sockets of the running request when its deadline passes."""

    def __init__(self, seconds: float, ex: base.Reply) -> None:
        self.ex = ex
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
            if self.ex.timer_fired:
                _shutdown(sock)

    def _fire(self) -> None:
        with self._mutex:
            self.ex.timer_fired = True
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
    session.headers.update(base.HEADERS)
    adapter = requests.adapters.HTTPAdapter(max_retries=0)
    adapter.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
