"""The FastAGI server's client: one request at a time to the service, read line by line.

The server's event loop must never block, so this is ``httpx`` on ``asyncio`` with a total
deadline (``asyncio.timeout_at``) instead of ``requests`` with a watchdog. Like ``Client`` it
holds the account lock from before it connects until the connection is closed, so the server,
the AGI scripts and other machines sharing the account never hold two connections; the lock's
blocking wait runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from . import protocol
from .client import _Lines
from .config import ApiConfig
from .errors import ConfigError, LookupTimeout, ProtocolError, Unreachable


class AsyncClient:
    """Sends one query and hands each line of the answer to ``on_line`` as it arrives."""

    def __init__(self, api: ApiConfig, lock) -> None:
        self.api = api
        self.lock = lock
        self._http: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"AsyncClient(url={self.api.url!r}, user={self.api.user!r})"

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            verify: object = self.api.verify_tls
            if self.api.ca_file:
                import ssl

                try:
                    verify = ssl.create_default_context(cafile=self.api.ca_file)
                except (OSError, ssl.SSLError) as e:
                    why = e.__class__.__name__
                    raise ConfigError(f"[api] ca_file: cannot load {self.api.ca_file}: {why}") from None
            self._http = httpx.AsyncClient(
                verify=verify,
                trust_env=False,  # no .netrc credentials or proxy surprises on a PBX
                follow_redirects=False,
                timeout=httpx.Timeout(None),  # the whole exchange has one deadline, set around it
                # Closed after each request: an idle kept-alive connection would be a second
                # connection while an AGI script holds the account lock.
                headers={"User-Agent": "npl-agi", "Connection": "close"},
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=0),
            )
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def exchange(self, msisdns: list[str], start_by: float, deadline: float, reader, on_answer) -> bool:
        """Ask for ``msisdns``, feeding each line of the answer to ``reader`` as it arrives.

        ``reader`` is a ``protocol.AnswerReader``; ``on_answer`` gets each answer it yields
        (``source = "api"``). The account lock must be had by ``start_by`` and the whole answer
        by ``deadline`` (both ``time.monotonic()``). Returns True when the deadline cut the
        answer short. Raises ``LookupTimeout`` when not even a first line came in time,
        ``Unreachable`` or ``ProtocolError`` when nothing usable came, and what the reader
        raises for a refused query.
        """
        form = protocol.request_form(self.api.user, self.api.password, self.api.apiver, msisdns)
        await self._acquire(start_by, deadline)
        lines = _Lines(reader, on_answer)
        try:
            if time.monotonic() > start_by:  # the answer could not arrive in time: spend nothing
                raise LookupTimeout("too little time left before the deadline to send a request")
            try:
                async with asyncio.timeout_at(deadline):
                    await self._post(form, lines)
                cut = False
            except TimeoutError:
                cut = True
            except (Unreachable, ProtocolError):
                if not lines.received:
                    raise
                cut = False  # cut off mid-answer: the lines that arrived are kept
        finally:
            await asyncio.shield(asyncio.to_thread(self.lock.release))
        lines.close(cut)
        if lines.overflow and not lines.status:
            raise ProtocolError(lines.overflow)
        if cut and not lines.status:
            raise LookupTimeout("no answer from the service before the deadline")
        return cut

    async def _post(self, form: dict[str, str], lines: _Lines) -> None:
        try:
            async with self._client().stream("POST", self.api.url, data=form) as resp:
                if resp.status_code != 200:
                    raise ProtocolError(f"the service answered HTTP {resp.status_code}")
                async for chunk in resp.aiter_raw():
                    lines.add(chunk)
                    if lines.complete or lines.overflow:
                        return  # complete, even if the server keeps the connection open
        except httpx.ConnectError as e:
            raise Unreachable(f"cannot connect to the service: {_reason(e)}") from None
        except httpx.HTTPError as e:
            raise ProtocolError(f"bad HTTP answer from the service: {_reason(e)}") from None

    async def _acquire(self, start_by: float, deadline: float) -> None:
        """Wait for the account lock without blocking the loop (its wait runs in a thread); a
        leased (Redis) lock is then held until the request's ``deadline``, not just ``start_by``."""
        if start_by <= time.monotonic():
            raise LookupTimeout("no time left to wait for the account lock")
        attempt = asyncio.ensure_future(asyncio.to_thread(self.lock.acquire, start_by, deadline))
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # The thread may still get the lock after we stopped waiting: give it back then.
            attempt.add_done_callback(lambda done: done.exception() is None and self.lock.release())
            raise


def _reason(exc: BaseException) -> str:
    text = str(exc).split("\n")[0][:160]
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
