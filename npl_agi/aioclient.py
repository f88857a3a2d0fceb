"""The FastAGI server's client: one request at a time to the service, read line by line.

The server's event loop must never block, so this is ``httpx`` on ``asyncio`` with a total
deadline (``asyncio.timeout_at``) instead of ``requests`` with a watchdog. Like ``Client`` it
holds the account lock from before it connects until the connection is closed, so the server,
the AGI scripts and other machines sharing the account never hold two connections; the lock's
blocking wait runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import httpx

from . import protocol
from .client import MAX_BODY
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
                    raise ConfigError(f"[api] ca_file: cannot load {self.api.ca_file}: {e.__class__.__name__}") from None
            self._http = httpx.AsyncClient(
                verify=verify,
                trust_env=False,  # no .netrc credentials or proxy surprises on a PBX
                follow_redirects=False,
                timeout=None,  # the whole exchange has one deadline, set around it
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

    async def exchange(self, msisdns: list[str], start_by: float, deadline: float, on_line: Callable[[str], None]) -> None:
        """Ask for ``msisdns``; call ``on_line`` with each line of the answer, without its newline.

        The account lock must be had by ``start_by`` and the whole answer by ``deadline`` (both
        ``time.monotonic()``). Returns when the answer ended (with ``ENDBATCH`` or without);
        raises ``LookupTimeout`` at the deadline, ``Unreachable`` or ``ProtocolError`` when the
        exchange failed, and whatever ``on_line`` raises (a refused query).
        """
        form = protocol.request_form(self.api.user, self.api.password, self.api.apiver, msisdns)
        await self._acquire(start_by)
        try:
            async with asyncio.timeout_at(deadline):
                await self._post(form, on_line)
        except TimeoutError:
            raise LookupTimeout("deadline passed before the service's answer was complete") from None
        finally:
            await _in_thread(self.lock.release)

    async def _post(self, form: dict[str, str], on_line: Callable[[str], None]) -> None:
        try:
            async with self._client().stream("POST", self.api.url, data=form) as resp:
                if resp.status_code != 200:
                    raise ProtocolError(f"the service answered HTTP {resp.status_code}")
                buffer, size = b"", 0
                async for chunk in resp.aiter_raw():
                    size += len(chunk)
                    if size > MAX_BODY:
                        raise ProtocolError("the service's answer is larger than any lookup answer")
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    for raw in lines:
                        line = raw.decode("utf-8", "replace").rstrip("\r")
                        on_line(line)
                        if line.strip() == protocol.ENDBATCH:
                            return  # complete, even if the server keeps the connection open
        except httpx.ConnectError as e:
            raise Unreachable(f"cannot connect to the service: {_reason(e)}") from None
        except httpx.HTTPError as e:
            raise ProtocolError(f"bad HTTP answer from the service: {_reason(e)}") from None

    async def _acquire(self, start_by: float) -> None:
        """Wait for the account lock without blocking the loop (its wait runs in a thread)."""
        if start_by <= time.monotonic():
            raise LookupTimeout("no time left to wait for the account lock")
        attempt = asyncio.ensure_future(asyncio.to_thread(self.lock.acquire, start_by))
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # The thread may still get the lock after we stopped waiting: give it back then.
            attempt.add_done_callback(lambda done: done.exception() is None and self.lock.release())
            raise


async def _in_thread(work: Callable[[], None]) -> None:
    """Run ``work`` in a thread to its end, even if the awaiting task is cancelled meanwhile."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(asyncio.to_thread(work))


def _reason(exc: BaseException) -> str:
    text = str(exc).split("\n")[0][:160]
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
