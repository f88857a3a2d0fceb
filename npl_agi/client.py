"""The API client: numbers in, one ``Answer`` per number out, within a deadline.

Each request holds the account lock from before it connects until its socket is closed, so
npl-agi never opens a second connection for one account. The deadline covers the wait for the
lock, the connection and the whole answer: a watchdog shuts the socket down when it passes, so
a server that drips bytes cannot hold a call longer than the deadline.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator

from . import protocol
from .config import ApiConfig
from .errors import TIMEOUT, TRUNCATED, LookupTimeout, ProtocolError, RequestRejected, Unreachable
from .locks import FileLock
from .protocol import Answer

MAX_BODY = 4 * 1024 * 1024  # far above 1000 answer lines; stops a runaway server
_ENDBATCH_RE = re.compile(rb"(^|\n)ENDBATCH\r?\n$")
_local = threading.local()


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

    def batches(self, msisdns: list[str], timeout: float | None = None) -> Iterator[dict[str, Answer]]:
        """Ask in requests of at most ``batch_size`` numbers, one after another.

        Yields each request's answers as it completes, so a bulk caller can keep (and cache)
        what it has paid for if a later request fails. ``timeout`` is the total deadline of
        each request; it defaults to the configured call-time ``timeout``.
        """
        unique = list(dict.fromkeys(msisdns))
        size = self.api.batch_size
        for start in range(0, len(unique), size):
            chunk = unique[start : start + size]
            body, cut_by_deadline = self._exchange(chunk, timeout)
            cut = TIMEOUT if cut_by_deadline else TRUNCATED
            yield protocol.parse_response(body, chunk, cut_short=cut)

    def check(self, timeout: float | None = None) -> str:
        """Ask with no numbers: costs no credit, and the service still checks the password.

        Returns the service's line (``FAIL No numbers specified`` means the credentials were
        accepted); raises ``AuthError``, ``LockedError``, ``CreditError`` or a transport error.
        """
        body, _ = self._exchange([], timeout)
        first = body.split("\n", 1)[0].strip()
        try:
            protocol.check_status(first)
        except RequestRejected:
            if first != protocol.FAIL_NO_NUMBERS:
                raise
        return first

    def _exchange(self, msisdns: list[str], timeout: float | None) -> tuple[str, bool]:
        form = protocol.request_form(self.api.user, self.api.password, self.api.apiver, msisdns)
        deadline = time.monotonic() + (timeout if timeout is not None else self.api.timeout)
        self.lock.acquire(deadline)
        try:
            body, cut = self._post(form, deadline)
        finally:
            self.lock.release()
        return self._scrub(body), cut

    def _post(self, form: dict[str, str], deadline: float) -> tuple[str, bool]:
        import requests  # only lookups that go to the network pay for this import

        left = deadline - time.monotonic()
        if left <= 0:
            raise LookupTimeout("deadline passed before the request could be sent")
        watchdog = _Watchdog(left)
        data = bytearray()
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
                    reason = self._scrub(protocol.shown(resp.reason or "")[1:-1])
                    raise ProtocolError(f"the service answered HTTP {resp.status_code} {reason}".rstrip())
                while len(data) <= MAX_BODY:
                    chunk = resp.raw.read1(65536)
                    if not chunk:
                        break
                    data += chunk
                    if _ENDBATCH_RE.search(data[-16:]):
                        break  # complete, even if the server keeps the connection open
                else:
                    raise ProtocolError("the service's answer is larger than any lookup answer")
        except requests.exceptions.RequestException as e:
            cut_by_deadline = watchdog.fired or isinstance(e, requests.exceptions.Timeout)
            if not data and not cut_by_deadline:
                if isinstance(e, requests.exceptions.SSLError):
                    raise Unreachable(f"TLS failure talking to the service: {_reason(e)}") from None
                if isinstance(e, requests.exceptions.ConnectionError):
                    raise Unreachable(f"cannot connect to the service: {_reason(e)}") from None
                raise ProtocolError(f"bad HTTP answer from the service: {_reason(e)}") from None
        else:
            cut_by_deadline = watchdog.fired
        if cut_by_deadline and b"\n" not in data:
            raise LookupTimeout(f"no answer from the service within {left:.1f} s")
        # Lines that arrived are kept; the parser marks the numbers left without one.
        return data.decode("utf-8", "replace"), cut_by_deadline

    def _get_session(self):
        if self._session is None:
            self._session = _new_session()
        return self._session

    def _scrub(self, text: str) -> str:
        """Foreign text with the password removed, before any of it can reach a message.

        A broken server may echo the request back; its answer is quoted in errors.
        """
        secret = self.api.password
        if secret:
            from urllib.parse import quote, quote_plus

            for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
                text = text.replace(form, "***")
        return text


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
