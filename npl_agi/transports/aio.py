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

from npl_agi.config import ApiConfig
from npl_agi.core.errors import ConfigError, LookupTimeout
from npl_agi.transports import base


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
            verify: object = base.tls_verify(self.api)
            if isinstance(verify, str):  # httpx takes a CA file as a context
                import ssl

                try:
                    verify = ssl.create_default_context(cafile=verify)
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
                headers=base.HEADERS,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=0),
            )
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def stream(self, msisdns: list[str], start_by: float, deadline: float, reader, on_answer, lock=None) -> bool:
        """Ask for ``msisdns``, feeding each line of the answer to ``reader`` as it arrives.

        ``reader`` is a ``protocol.AnswerReader``; ``on_answer`` gets each answer it yields
        (``source = "api"``). The account lock (``lock``, else the client's own; a connection
        slot held already needs none) must be had by ``start_by`` and the whole answer by
        ``deadline`` (both ``time.monotonic()``). Returns True when the deadline cut the answer
        short; raises as ``base.Reply.end`` does, and what the reader raises for a
        refused query.
        """
        form = base.request_form(self.api, msisdns)
        lock = self.lock if lock is None else lock
        await self._acquire(lock, start_by, deadline)
        ex = base.Reply(reader, deadline, self.api.password, on_answer)
        try:
            base.check_time(start_by)
            try:
                async with asyncio.timeout_at(deadline):
                    await self._post(form, ex)
            except TimeoutError as e:
                ex.timer_fired = True
                return ex.end(e)
            except (httpx.HTTPError, OSError) as e:
                return ex.end(e)
            return ex.end()
        finally:
            await asyncio.shield(asyncio.to_thread(lock.release))

    async def _post(self, form: dict[str, str], ex: base.Reply) -> None:
        async with self._client().stream("POST", self.api.url, data=form) as resp:
            ex.http_status(resp.status_code, resp.reason_phrase)
            async for chunk in resp.aiter_raw():
                ex.add(chunk)
                if ex.done:
                    return  # complete, even if the server keeps the connection open

    @staticmethod
    async def _acquire(lock, start_by: float, deadline: float) -> None:
        """Wait for the account lock without blocking the loop (its wait runs in a thread); a
        leased (Redis) lock is then held until the request's ``deadline``, not just ``start_by``."""
        if start_by <= time.monotonic():
            raise LookupTimeout("no time left to wait for the account lock")
        attempt = asyncio.ensure_future(asyncio.to_thread(lock.acquire, start_by, deadline))
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # The thread may still get the lock after we stopped waiting: give it back then.
            attempt.add_done_callback(lambda done: done.exception() is None and lock.release())
            raise
