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

from npl_agi.askers.queued import FLUSH_EVERY, Held, QueueAsker
from npl_agi.backends.queue import decode
from npl_agi.chain.asking import Asked, OnBatch, failed_all
from npl_agi.chain.breaker import Breaker
from npl_agi.config import ApiConfig
from npl_agi.core import protocol
from npl_agi.core.codes import TIMEOUT, UNAVAILABLE
from npl_agi.core.errors import ConfigError, LockUnavailable, NotSent, NplError, ServiceRefused
from npl_agi.core.protocol import Answer
from npl_agi.transports import base

Store = Callable[[list[Answer]], Awaitable[None]]
SHARED_POLL = 0.01  # seconds between looks at the shared queue while this server's calls wait
logger = logging.getLogger("npl_agi.server")


class _Pending:
    """One number queued or in flight, the latest deadline among the calls waiting for it, and
    whether one of them is fresh."""

    __slots__ = ("deadline", "fresh", "future", "reader")

    def __init__(self, future: asyncio.Future, deadline: float, fresh: bool = False) -> None:
        self.future = future
        self.deadline = deadline
        self.fresh = fresh
        self.reader: protocol.AnswerReader | None = None  # its request's, once sent


class Shared:
    """The backend's queue of waiting numbers as the broker reaches it: each step runs in the
    server's cache thread (``run``), so the event loop never waits for the file or Redis."""

    def __init__(self, run, queue, slots, asker: QueueAsker) -> None:
        self.run, self.queue, self.slots, self.asker = run, queue, slots, asker
        self.wait = asker.cache.longest_wait  # a busy file: the cache thread waits, never the loop

    async def enqueue(self, items: dict[str, tuple[float, bool]], most: int) -> set[str]:
        return await self.run(self.queue.enqueue, items, most, time.time(), self.wait)

    async def look(self, keys: list[str]) -> tuple[dict[str, tuple[str, str, str]], bool]:
        """The keys' rows, and whether one waits for an asker (unclaimed, or its asker gone)."""
        return await self.run(self._look, keys)

    def _look(self, keys: list[str]) -> tuple[dict[str, tuple[str, str, str]], bool]:
        rows = self.queue.peek(keys, self.wait)
        unclaimed = any(not r[2] and (not r[0] or not self.slots.alive(r[0])) for r in rows.values())
        return rows, unclaimed

    async def take_slot(self):
        return await self.run(self.slots.take)

    async def free(self, slot) -> None:
        try:
            await self.run(self.queue.unclaim, slot.token, self.wait)
        finally:
            await self.run(slot.release)


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
        shared: Shared | None = None,
    ) -> None:
        """``shared``: the backend's queue, which this server's calls, the process scripts and
        other servers on the account share (none with ``backend = none``: the server then asks
        for its own calls alone, behind the account lock that ``client`` takes)."""
        self.shared = shared
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
        self._waiting: dict[str, _Pending] = {}  # in the shared queue, not answered yet
        self._serving: asyncio.Task | None = None  # this server asking for the shared queue
        self._publishing: list[Answer] = []  # answers of our request, for the shared queue
        self.requests = 0  # sent so far (for logs and tests)

    async def ask(self, msisdns: Iterable[str], deadline: float, fresh: bool = False) -> dict[str, Answer]:
        """An answer or a per-number failure for each msisdn, by ``deadline`` (``time.monotonic()``)."""
        msisdns = list(dict.fromkeys(msisdns))
        waits = {m: self._enqueue(m, deadline, fresh) for m in msisdns}
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
        breaker), so their calls get ``UNAVAILABLE`` now instead of at their deadline; so do
        those waiting in the shared queue that no request of ours carries."""
        while self._queue:
            m, p = self._queue.popitem()
            self._settle(m, p, protocol.failed(m, UNAVAILABLE))
        for m, p in list(self._waiting.items()):
            if p.reader is None:
                del self._waiting[m]
                self._settle(m, p, protocol.failed(m, UNAVAILABLE))

    def _unanswered(self, p: _Pending) -> bool:
        """Is the number in flight, or queued behind the request in flight, on a request the
        service has not sent a line of? Either way it is the service that kept the call waiting."""
        reader = p.reader or self._sending
        return reader is not None and not reader.started

    def _enqueue(self, msisdn: str, deadline: float, fresh: bool = False) -> _Pending:
        p = self._pending.get(msisdn)
        if p is not None:
            p.deadline = max(p.deadline, deadline)
            p.fresh = p.fresh or fresh
            return p
        p = self._pending[msisdn] = _Pending(asyncio.get_running_loop().create_future(), deadline, fresh)
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
        """Send batches while numbers are queued (or, with the shared queue, queue them there and
        look for their answers while they wait); a new task starts with the next miss."""
        try:
            while self._queue or self._waiting:
                await self._gather()
                full = len(self._queue) >= self.api.batch_size
                if self._queue and (full or time.monotonic() >= self._queued_at + self.window):
                    batch = self._take()
                    if batch and self.shared is None:
                        await self._send(batch)
                    elif batch:
                        await self._share(batch)
                if self._waiting:
                    await self._look()
        finally:
            self._task = None

    async def _gather(self) -> None:
        """Wait out the batch window (a full batch goes at once), or, while calls wait in the
        shared queue, until the next look at it."""
        wait = self._queued_at + self.window - time.monotonic() if self._queue else SHARED_POLL
        if self._waiting:
            wait = min(wait, SHARED_POLL)
        if wait > 0 and len(self._queue) < self.api.batch_size:
            self._full.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._full.wait()

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
        """Ask for a batch of this server's own (no shared queue: ``backend = none``)."""
        msisdns = list(batch)
        if not self.breaker.allow():
            for m, p in batch.items():
                self._settle(m, p, protocol.failed(m, UNAVAILABLE))
            return
        start_by = max(p.deadline for p in batch.values()) - self.api.request_floor
        try:
            await self._request(msisdns, batch, start_by)
        finally:
            for m, p in batch.items():
                if self._pending.get(m) is p:
                    del self._pending[m]

    async def _request(
        self, msisdns: list[str], batch: dict[str, _Pending], start_by: float, on_line=None, lock=None
    ) -> dict[str, Answer]:
        """One request for ``msisdns``, sent by ``start_by`` and read to its end: each answer
        settles its waiting call (``batch``) the moment its line arrives and goes to ``on_line``;
        what it paid for is stored. The breaker and the metrics hear how it went. ``lock``: for
        a connection slot held already (``waiting.Held``); else the client takes the account lock."""
        reader = self._sending = protocol.AnswerReader(msisdns, self.api.password)
        for p in batch.values():
            p.reader = reader

        def on_answer(answer: Answer) -> None:
            p = batch.get(answer.msisdn)
            if p is not None and not p.future.done():
                p.future.set_result(answer)
            if on_line is not None:
                on_line(answer)

        started = time.monotonic()
        deadline = max(start_by + self.api.request_floor, started + self.api.finish_timeout)
        self.requests += 1
        answers: dict[str, Answer] = {}
        outcome = "ok"
        try:
            cut = await self.client.stream(msisdns, start_by, deadline, reader, on_answer, lock)
            answers = base.answers(reader, cut)
            if reader.ended:
                self.breaker.success()
            else:
                outcome = "timeout" if cut else "truncated"
                self.breaker.failure()
        except ServiceRefused as e:  # the service works; the account is refused
            outcome = e.npl_err.lower()
            self.breaker.success()
            answers = failed_all(msisdns, e)
        except (ConfigError, LockUnavailable) as e:  # ours, not the service's
            outcome = e.npl_err.lower()
            answers = failed_all(msisdns, e)
        except NotSent as e:  # nothing was sent: nothing said of the service
            outcome = "not_sent"
            answers = failed_all(msisdns, e)
        except NplError as e:
            outcome = e.npl_err.lower()
            self.breaker.failure()
            answers = failed_all(msisdns, e)
        except Exception as e:  # never leave a caller without an answer
            outcome = "internal"
            logger.exception("npl-agi: request failed")
            answers = failed_all(msisdns, NplError(f"internal error: {e.__class__.__name__}"))
        finally:
            self._sending = None
            if self.metrics is not None:
                self.metrics.batch_numbers.observe(len(msisdns))
                self.metrics.service_seconds.observe(time.monotonic() - started)
                self.metrics.requests.labels(outcome).inc()
            for m, p in batch.items():
                if not p.future.done():
                    p.future.set_result(answers.get(m) or protocol.failed(m, TIMEOUT))
            if reader.found:  # paid for: kept, whoever still waits for it
                await self.store(list(reader.found.values()))
        return answers

    # -- the shared queue (see ``waiting``): this server is one of its waiters and askers --

    async def _share(self, batch: dict[str, _Pending]) -> None:
        """Put a batch into the shared queue; a number refused there (the queue is full) is
        ``TIMEOUT`` at once."""
        now_wall, now = time.time(), time.monotonic()
        items = {m: (now_wall + p.deadline - now, p.fresh) for m, p in batch.items()}
        try:
            refused = await self.shared.enqueue(items, self.api.connections * self.api.batch_size)
        except Exception as e:  # the queue cannot be written: ask alone, as without it
            logger.warning("npl-agi: queue of waiting numbers failed, asking alone: %s", e.__class__.__name__)
            await self._send(batch)
            return
        why = "more numbers wait than the account's connections can ask before the deadline"
        for m, p in batch.items():
            if m in refused:
                self._settle(m, p, protocol.failed(m, TIMEOUT, reason=why))
            else:
                self._waiting[m] = p

    async def _look(self) -> None:
        """Answer the waiting calls whose numbers have a result; ask for the queue when a
        number waits unclaimed (or its asker is gone) and a connection slot is free."""
        try:
            rows, unclaimed = await self.shared.look(list(self._waiting))
        except Exception:  # busy: look again at the next turn
            rows, unclaimed = {}, False
        now = time.monotonic()
        for m, p in list(self._waiting.items()):
            answer = decode(rows[m][2]) if rows.get(m) and rows[m][2] else None
            if answer is not None:
                self._settle(m, p, answer)
            if p.future.done() or p.deadline <= now:  # the row stays for its asker to answer
                del self._waiting[m]
                if self._pending.get(m) is p:
                    del self._pending[m]
        if self._serving is None and unclaimed:
            with contextlib.suppress(Exception):  # no slot now: the next look tries again
                slot = await self.shared.take_slot()
                if slot is not None:
                    slot.keep()  # a Redis slot's lease, renewed until it is freed
                    self._serving = asyncio.create_task(self._serve(slot), name="npl-agi-asker")

    async def _serve(self, slot) -> None:
        """Holding a connection slot: ask for every number waiting in the shared queue, this
        server's and the process scripts' alike, until none is left."""
        try:
            while True:
                prepared = await self.shared.run(self.shared.asker.prepare, slot.token)
                if prepared is None:
                    return
                ask, latest = prepared
                if ask:
                    await self._ask_shared(ask, latest)
        except Exception:
            logger.exception("npl-agi: asking for the queue of waiting numbers failed")
        finally:
            with contextlib.suppress(Exception):
                await self.shared.free(slot)
            self._serving = None

    async def _ask_shared(self, ask: list[str], latest: float) -> None:
        """One request for numbers claimed from the shared queue (``latest``: the wall-clock
        deadline of the last call waiting for one); each answer goes to the queue as it arrives."""
        if not self.breaker.allow():
            await self.shared.run(self.shared.asker.publish, [protocol.failed(m, UNAVAILABLE) for m in ask])
            return
        own = {m: self._pending[m] for m in ask if m in self._pending}
        start_by = time.monotonic() + (latest - time.time()) - self.api.request_floor
        flushing: list[asyncio.Task] = []

        def on_line(answer: Answer) -> None:
            self._publishing.append(answer)
            if len(self._publishing) == 1:
                flushing.append(asyncio.ensure_future(self._flush()))

        answers = await self._request(ask, own, start_by, on_line, Held())
        if flushing:
            await asyncio.gather(*flushing, return_exceptions=True)
        await self.shared.run(self.shared.asker.publish, list(answers.values()))

    async def _flush(self) -> None:
        """The answers that arrived meanwhile, to the shared queue in one write."""
        await asyncio.sleep(FLUSH_EVERY)
        answers, self._publishing = self._publishing, []
        await self.shared.run(self.shared.asker.publish, answers)

    def _settle(self, msisdn: str, p: _Pending, answer: Answer) -> None:
        if not p.future.done():
            p.future.set_result(answer)
        if self._pending.get(msisdn) is p:
            del self._pending[msisdn]

    async def settled(self) -> None:
        """Wait until nothing is queued or in flight."""
        while self._task is not None or self._serving is not None:
            await asyncio.shield(self._task or self._serving)

    async def close(self) -> None:
        """Let the queued and in-flight requests end (they keep what they pay for), then close."""
        await self.settled()
        await self.client.aclose()


class Brokered:
    """The FastAGI server's asker (``chain.asking``): its broker, or every miss refused at once
    when the configuration cannot ask at all (no credentials; cache hits are still served)."""

    takes_readings = False

    def __init__(self, broker: Broker, refused: NplError | None = None) -> None:
        self.broker = broker
        self.refused = refused

    async def ask(
        self,
        misses: list[str],
        deadline: float,
        *,
        timeout: float | None = None,
        fresh: bool = False,
        on_batch: OnBatch | None = None,
    ) -> Asked:
        if self.refused is not None:
            return Asked(failed_all(misses, self.refused), self.refused)
        answers = await self.broker.ask(misses, deadline, fresh)
        if on_batch is not None:
            on_batch(answers)
        return Asked(answers, None)
