"""The broker: the cache misses of concurrent calls become one request on the account's one
connection.

Numbers are gathered for ``batch_window`` seconds (or until ``batch_size``) and sent together;
while a request is in flight the next batch fills. A number already queued or in flight is
never asked twice: its callers share one future. Each answer is handed to its callers the
moment its line arrives. A caller waits only until its own deadline (then ``TIMEOUT``), while
the request goes on to its end and what it paid for is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from . import exchange, protocol
from .breaker import Breaker
from .config import ApiConfig
from .errors import TIMEOUT, UNAVAILABLE, ConfigError, LockUnavailable, NplError, ServiceRefused
from .protocol import Answer

Store = Callable[[list[Answer]], Awaitable[None]]
logger = logging.getLogger("npl_agi.server")


class _Pending:
    """One number queued or in flight, and the latest deadline among the calls waiting for it."""

    __slots__ = ("deadline", "future", "reader")

    def __init__(self, future: asyncio.Future, deadline: float) -> None:
        self.future = future
        self.deadline = deadline
        self.reader: protocol.AnswerReader | None = None  # its request's, once sent


class Broker:
    def __init__(
        self,
        client,
        api: ApiConfig,
        *,
        batch_window: float,
        breaker: Breaker,
        store: Store,
        metrics=None,
    ) -> None:
        self.client = client
        self.api = api
        self.window = batch_window
        self.breaker = breaker
        self.store = store
        self.metrics = metrics
        self._pending: dict[str, _Pending] = {}  # queued or in flight
        self._queue: dict[str, _Pending] = {}  # not sent yet, in arrival order
        self._queued_at = 0.0
        self._full = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sending: protocol.AnswerReader | None = None  # the request in flight's
        self.requests = 0  # sent so far (for logs and tests)

    async def ask(self, msisdns: Iterable[str], deadline: float) -> dict[str, Answer]:
        """An answer or a per-number failure for each msisdn, by ``deadline`` (``time.monotonic()``)."""
        msisdns = list(dict.fromkeys(msisdns))
        if self.breaker.rejecting():
            return {m: protocol.failed(m, UNAVAILABLE) for m in msisdns}
        waits = {m: self._enqueue(m, deadline) for m in msisdns}
        open_futures = [p.future for p in waits.values() if not p.future.done()]
        left = deadline - time.monotonic()
        if open_futures and left > 0:
            await asyncio.wait(open_futures, timeout=left)
        out = {m: p.future.result() if p.future.done() else protocol.failed(m, TIMEOUT) for m, p in waits.items()}
        if any(self._unanswered(p) for p in waits.values() if not p.future.done()):
            self.breaker.failure()  # once per call: the service is hanging
            if self.breaker.rejecting():
                self._refuse_queued()
        return out

    def _refuse_queued(self) -> None:
        """The breaker has opened: the numbers queued will not be sent (``_send`` asks the
        breaker), so their calls get ``UNAVAILABLE`` now instead of at their deadline."""
        while self._queue:
            m, p = self._queue.popitem()
            self._settle(m, p, protocol.failed(m, UNAVAILABLE))

    def _unanswered(self, p: _Pending) -> bool:
        """Is the number in flight, or queued behind the request in flight, on a request the
        service has not sent a line of? Either way it is the service that kept the call waiting."""
        reader = p.reader or self._sending
        return reader is not None and not reader.started

    def _enqueue(self, msisdn: str, deadline: float) -> _Pending:
        p = self._pending.get(msisdn)
        if p is not None:
            p.deadline = max(p.deadline, deadline)
            return p
        p = self._pending[msisdn] = _Pending(asyncio.get_running_loop().create_future(), deadline)
        if not self._queue:
            self._queued_at = time.monotonic()
        self._queue[msisdn] = p
        if len(self._queue) >= self.api.batch_size:
            self._full.set()
        if self._task is None:
            # A context of its own: its warnings belong to no call (see log.call_sink).
            self._task = asyncio.create_task(self._run(), name="npl-agi-broker", context=contextvars.Context())
        return p

    async def _run(self) -> None:
        """Send batches while numbers are queued; a new task starts with the next miss."""
        try:
            while self._queue:
                wait = self._queued_at + self.window - time.monotonic()
                if wait > 0 and len(self._queue) < self.api.batch_size:
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._full.wait()
                batch = self._take()
                if batch:
                    await self._send(batch)
        finally:
            self._task = None

    def _take(self) -> dict[str, _Pending]:
        """The next batch, without the numbers nobody can wait for any more (never paid for)."""
        batch: dict[str, _Pending] = {}
        latest_start = time.monotonic() + self.api.request_floor
        while self._queue and len(batch) < self.api.batch_size:
            m, p = next(iter(self._queue.items()))
            del self._queue[m]
            if p.deadline < latest_start:
                self._settle(m, p, protocol.failed(m, TIMEOUT, reason="too little time left to send a request"))
            else:
                batch[m] = p
        self._queued_at = 0.0  # what is left has waited long enough
        return batch

    async def _send(self, batch: dict[str, _Pending]) -> None:
        msisdns = list(batch)
        if not self.breaker.allow():
            for m, p in batch.items():
                self._settle(m, p, protocol.failed(m, UNAVAILABLE))
            return
        reader = self._sending = protocol.AnswerReader(msisdns, self.api.password)
        for p in batch.values():
            p.reader = reader

        def on_answer(answer: Answer) -> None:
            p = batch.get(answer.msisdn)
            if p is not None and not p.future.done():
                p.future.set_result(answer)

        started = time.monotonic()
        start_by = max(p.deadline for p in batch.values()) - self.api.request_floor
        deadline = max(start_by + self.api.request_floor, started + self.api.finish_timeout)
        self.requests += 1
        answers: dict[str, Answer] = {}
        outcome = "ok"
        try:
            cut = await self.client.exchange(msisdns, start_by, deadline, reader, on_answer)
            answers = exchange.answers(reader, cut)
            if reader.ended:
                self.breaker.success()
            else:
                outcome = "timeout" if cut else "truncated"
                self.breaker.failure()
        except ServiceRefused as e:  # the service works; the account is refused
            outcome = e.npl_err.lower()
            self.breaker.success()
            answers = _all_failed(msisdns, e)
        except (ConfigError, LockUnavailable) as e:  # ours, not the service's
            outcome = e.npl_err.lower()
            answers = _all_failed(msisdns, e)
        except NplError as e:
            outcome = e.npl_err.lower()
            self.breaker.failure()
            answers = _all_failed(msisdns, e)
        except Exception as e:  # never leave a caller without an answer
            outcome = "internal"
            logger.exception("npl-agi: request failed")
            answers = _all_failed(msisdns, NplError(f"internal error: {e.__class__.__name__}"))
        finally:
            self._sending = None
            if self.metrics is not None:
                self.metrics.batch_numbers.observe(len(msisdns))
                self.metrics.service_seconds.observe(time.monotonic() - started)
                self.metrics.requests.labels(outcome).inc()
            for m, p in batch.items():
                if not p.future.done():
                    p.future.set_result(answers.get(m) or protocol.failed(m, TIMEOUT))
            try:
                if reader.found:  # paid for: kept, whoever still waits for it
                    await self.store(list(reader.found.values()))
            finally:
                for m, p in batch.items():
                    if self._pending.get(m) is p:
                        del self._pending[m]

    def _settle(self, msisdn: str, p: _Pending, answer: Answer) -> None:
        if not p.future.done():
            p.future.set_result(answer)
        if self._pending.get(msisdn) is p:
            del self._pending[msisdn]

    async def settled(self) -> None:
        """Wait until nothing is queued or in flight."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Let the queued and in-flight requests end (they keep what they pay for), then close."""
        await self.settled()
        await self.client.aclose()


def _all_failed(msisdns: list[str], e: NplError) -> dict[str, Answer]:
    return {m: protocol.failed(m, e.npl_err, reason=str(e)) for m in msisdns}
