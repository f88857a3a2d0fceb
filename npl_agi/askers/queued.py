"""One request for all who wait: the process script's misses, asked through the backend's queue.

A call that misses the cache puts its number in the queue of waiting numbers (``backends.queue``)
and waits for the number's row to hold a result, until its deadline. Whoever holds one of the
account's connection slots (``slots``) is the *asker*: it claims every number waiting (up to
``batch_size``, oldest first), validates them, asks for them in one request and writes each
answer into the cache and the queue the moment its line arrives. A waiting call that sees its
number unclaimed takes a free slot, if there is one, and forks the asker: a detached process
that outlives the call (``handoff.detach``), keeps everything it paid for, and asks again while
numbers wait. So a burst of calls costs one or a few requests, and a waiting call imports
neither the HTTP stack nor phonenumbers: only the asker does.

An asker that dies strands nothing: its slot frees itself (a flock, a Redis lease), and the
next asker puts its numbers back in the queue (``backends.queue.SqliteQueue.claim``).

The breaker hears from the asker how each request did, and from a waiting call only when it
was left waiting on a request in flight that the service has not sent a line of since the call
began: a call that ended before its number was sent (no CPU, a late start, a connection held
by a healthy request) says nothing of the service.
"""

from __future__ import annotations

import contextlib
import os
import time

from npl_agi import log
from npl_agi.backends.queue import decode, readings_of, report_malformed
from npl_agi.chain.asking import Asked, OnBatch
from npl_agi.core import protocol
from npl_agi.core.codes import CUT_OFF, TIMEOUT, UNAVAILABLE
from npl_agi.core.errors import NotMobile, NotSent, NplError
from npl_agi.core.protocol import Answer

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which a call does not use
if TYPE_CHECKING:
    from npl_agi.backends import Cache
    from npl_agi.config import Config

POLL_FIRST, POLL_MAX = 0.005, 0.025  # seconds between a waiting call's looks at its row
MAX_ASKERS_STARTED = 3  # by one call: an asker that cannot claim must not be forked again and again
FLUSH_EVERY = 0.01  # seconds: answers arriving closer together are written in one transaction


class Queued:
    """The process script's asker: its misses wait in the backend's queue (see the module).

    It takes the numbers as ``normalise`` read them (``takes_readings``): the asker validates
    them, so a waiting call never loads phonenumbers. Without a queue (``backend = none``) or
    when the queue cannot be written (a broken cache file, Redis down), it asks alone through
    ``alone`` (``askers.direct.Detached``), as every call did before the queue.
    """

    takes_readings = True

    def __init__(self, config: Config, cache: Cache, alone) -> None:
        self.config = config
        self.cache = cache
        self.alone = alone

    def ask(
        self,
        keys: list[str],
        deadline: float | None,
        *,
        timeout: float | None = None,
        fresh: bool = False,
        on_batch: OnBatch | None = None,
    ) -> Asked:
        api = self.config.api
        if deadline is None:
            deadline = time.monotonic() + (api.timeout if timeout is None else timeout)
        queue = self.cache.queue(api)
        if queue is None or self.cache.broken:  # backend = none, or it failed in this call already
            return self._alone(keys, timeout, deadline)
        try:
            refused = self._enqueue(queue, keys, deadline, fresh)
        except Exception as e:  # nothing was queued: ask alone, as before the queue
            log.warning("queue of waiting numbers failed, asking alone: %s", log.short(e))
            return self._alone(keys, timeout, deadline)
        why = "more numbers wait than the account's connections can ask before the deadline"
        out = {k: _failed(k, "", TIMEOUT, why) for k in refused}
        out.update(self._wait([k for k in keys if k not in refused], deadline))
        return Asked(out, None)

    def _enqueue(self, queue, keys: list[str], deadline: float, fresh: bool) -> set[str]:
        api = self.config.api
        now = time.time()
        at = now + (deadline - time.monotonic())  # rows are shared across processes and machines: wall clock
        most = api.connections * api.batch_size
        return queue.enqueue(dict.fromkeys(keys, (at, fresh)), most, now, self.cache.wait_for(deadline))

    def _wait(self, keys: list[str], deadline: float) -> dict[str, Answer]:
        """Each key's result, by ``deadline``; ``TIMEOUT`` for the rest."""
        api = self.config.api
        queue = self.cache.queue(api)
        slots = self.cache.slots(api)
        since, out, rows = time.time(), {}, {}
        waiting, pause, started, asker = list(keys), POLL_FIRST, 0, None
        try:
            while waiting:
                with contextlib.suppress(Exception):  # a busy file: look again
                    rows = queue.peek(waiting, self.cache.wait_for(deadline))
                for key in list(waiting):
                    answer = _result(rows.get(key))
                    if answer is not None:
                        out[key] = answer
                        waiting.remove(key)
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    break
                may_start = asker is None and started < MAX_ASKERS_STARTED and left > api.request_floor
                if may_start and self._unclaimed(rows, waiting, slots) and (asker := self._start_asker(slots)):
                    started += 1
                if asker is not None and not _heard(asker, min(pause, left)):
                    asker = _ended(asker)
                elif asker is None:
                    time.sleep(min(pause, left))
                pause = min(pause * 2, POLL_MAX)
        finally:
            if asker is not None:
                _ended(asker)
        why = "no answer before the call's deadline (a request asked for it goes on, to cache its answer)"
        out.update({k: _failed(k, (rows.get(k) or ("", "", ""))[1], TIMEOUT, why) for k in waiting})
        if waiting:
            self._left_waiting(queue, [rows.get(k) for k in waiting], since)
        return out

    @staticmethod
    def _unclaimed(rows: dict, waiting: list[str], slots) -> bool:
        """Does a number of this call wait for an asker: unclaimed, or claimed by one that is gone?"""
        for key in waiting:
            row = rows.get(key)
            if row is not None and not row[2] and (not row[0] or not slots.alive(row[0])):
                return True
        return False

    def _start_asker(self, slots) -> tuple[int, int] | None:
        """Take a free slot and fork the asker holding it: its pid and warnings' pipe, or None
        when every slot is held (their askers will claim the number)."""
        try:
            slot = slots.take()
        except Exception as e:  # the slots' directory or Redis failed: the next look tries again
            log.warning("cannot take a connection slot: %s", log.short(e))
            return None
        if slot is None:
            return None
        from npl_agi.askers.handoff import fork_detached

        self.cache.close()  # an SQLite connection must never cross a fork
        return fork_detached(lambda: serve_queue(self.config, slot), slot.handed_over)

    def _left_waiting(self, queue, rows: list, since: float) -> None:
        """A call left without its answer: a failure of the service only if a request was in
        flight (its number's, or one its number queued behind) and the service has sent no line
        since the call began waiting."""
        from npl_agi.chain.breaker import shared_breaker

        try:
            in_flight = any(r is not None and r[0] and not r[2] for r in rows) or queue.in_flight(0.0)
        except Exception:
            return
        breaker = shared_breaker(self.config, self.cache)
        if in_flight and breaker.silent_since(since):
            breaker.failure()

    def _alone(self, keys: list[str], timeout: float | None, deadline: float) -> Asked:
        """Validate here and ask alone (``alone``), answers keyed as the queue's."""
        msisdn_of, out = _validated(keys, self.config)
        by_msisdn: dict[str, list[str]] = {}
        for key, msisdn in msisdn_of.items():
            by_msisdn.setdefault(msisdn, []).append(key)
        if not by_msisdn:
            return Asked(out, None)
        asked = self.alone.ask(list(by_msisdn), deadline, timeout=timeout)
        out.update({k: a for m, a in asked.answers.items() for k in by_msisdn.get(m, [])})
        return Asked(out, asked.failure)


def _heard(asker: tuple[int, int], seconds: float) -> bool:
    """Wait ``seconds``, saying the asker's warnings meanwhile; False once it has exited."""
    from npl_agi.askers.handoff import read_warnings

    return read_warnings(asker[1], seconds)


def _ended(asker: tuple[int, int]) -> None:
    """Stop listening to an asker (it may go on): close its pipe, collect it if it is done."""
    from npl_agi.askers.handoff import reap

    os.close(asker[1])
    reap(asker[0])


def _result(row: tuple[str, str, str] | None) -> Answer | None:
    if row is None or not row[2]:
        return None
    answer = decode(row[2])
    if answer is None:
        report_malformed("results", 1)
    return answer


def _failed(key: str, msisdn: str, code: str, reason: str) -> Answer:
    """A failure for a queued key: its number as the asker made it, else its first reading."""
    return protocol.failed(msisdn or key.partition(",")[0], code, reason=reason)


def _validated(keys, config) -> tuple[dict[str, str], dict[str, Answer]]:
    """Each key's canonical number (``number.validate``), and the keys refused without a credit."""
    from npl_agi.core.number import validate

    msisdn_of: dict[str, str] = {}
    refused: dict[str, Answer] = {}
    for key in keys:
        readings = readings_of(key)
        try:
            if readings is None:
                raise NplError("a queued number that no call could have queued")
            msisdn_of[key] = validate(readings, config.number)
        except NplError as e:
            msisdn = e.msisdn if isinstance(e, NotMobile) else ""
            refused[key] = protocol.failed(msisdn, e.npl_err, reason=str(e))
    return msisdn_of, refused


class Held:
    """The account lock of a client whose asker holds a slot already: nothing to take."""

    def acquire(self, deadline: float, hold_until: float | None = None) -> None:
        pass

    def release(self) -> None:
        pass


def serve_queue(config: Config, slot) -> None:
    """The asker (in its detached process): claim and ask while numbers wait, then free the slot."""
    import requests  # noqa: F401 - loaded before the first claim: the burst gathers meanwhile

    from npl_agi.backends import open_cache
    from npl_agi.chain.breaker import shared_breaker
    from npl_agi.config import require_credentials
    from npl_agi.transports.sync import Client

    cache = open_cache(config)
    slot.adopt(cache.slots(config.api))
    slot.keep()
    queue = cache.queue(config.api)
    try:
        require_credentials(config)
        asker = QueueAsker(config, cache, queue, Client(config.api, Held()), shared_breaker(config, cache))
        while asker.round(slot.token):
            pass
    except NplError as e:  # no credentials: every number waiting hears why, at once
        with contextlib.suppress(Exception):
            _refuse_all(config, cache, queue, slot.token, e)
    finally:
        with contextlib.suppress(Exception):
            queue.unclaim(slot.token, cache.background_wait)
        slot.release()


def _refuse_all(config, cache, queue, token: str, e: NplError) -> None:
    api = config.api
    while rows := queue.claim(token, api.batch_size, time.time(), 0.0, lambda _: True, cache.background_wait):
        queue.publish([], {key: _failed(key, "", e.npl_err, str(e)) for key, *_ in rows}, cache.background_wait)


class QueueAsker:
    """An asker's rounds: claim, validate, ask once for what is left, write each answer.

    ``prepare`` and ``publish`` are the queue's side, the same for both doors (the FastAGI
    server runs them in its cache thread and sends the request itself, asynchronously);
    ``round`` is the detached process's whole round, its request sent with ``client``.
    """

    def __init__(self, config: Config, cache, queue, client=None, breaker=None) -> None:
        self.config, self.cache, self.queue, self.client, self.breaker = config, cache, queue, client, breaker
        self.wait = cache.background_wait

    def prepare(self, token: str) -> tuple[list[str], float] | None:
        """Claim the numbers waiting; answer those that need no request (refused by validation,
        known, cached under their canonical form); the numbers to ask and the latest deadline
        (wall clock) of their calls. None when nothing was waiting."""
        api = self.config.api
        slots = self.cache.slots(api)
        rows = self.queue.claim(token, api.batch_size, time.time(), api.request_floor, slots.alive, self.wait)
        if not rows:
            return None
        fresh = {key: f for key, _, f in rows}
        msisdn_of, by_key = _validated(fresh, self.config)
        by_key.update(self._known(msisdn_of, fresh))
        self.queue.publish([], by_key, self.wait)
        return self.queue.assign(token, msisdn_of, fresh, self.wait), max(deadline for _, deadline, _ in rows)

    def round(self, token: str) -> bool:
        """One claim and its request; False when nothing was waiting."""
        prepared = self.prepare(token)
        if prepared is None:
            return False
        if prepared[0]:
            self._request(*prepared)
        return True

    def _known(self, msisdn_of: dict[str, str], fresh: dict[str, bool]) -> dict[str, Answer]:
        """Keys whose canonical number (``+44 (0)7…`` dialled) is a number the admin knows or a
        live cache entry: answered without a credit (and removed from ``msisdn_of``)."""
        from npl_agi.backends.base import KNOWN_NUMBERS

        wanted = sorted(set(msisdn_of.values()))
        known = self.cache.get_local_many(KNOWN_NUMBERS, wanted)
        cached = self.cache.get_many([m for m in wanted if m not in known])
        out: dict[str, Answer] = {}
        for key, msisdn in list(msisdn_of.items()):
            if msisdn in known:
                out[key] = Answer(msisdn, mccmnc=known[msisdn], source="local")
            elif msisdn in cached and not fresh[key]:
                out[key] = cached[msisdn]
            else:
                continue
            del msisdn_of[key]
        return out

    def _request(self, ask: list[str], latest: float) -> None:
        """One request for ``ask``, sent while the latest of its calls can still get the answer
        (``latest``, wall clock), read to its end however long the calls wait."""
        api = self.config.api
        if self.breaker.rejecting():  # opened since its calls passed the gate (``breaker.gate``)
            why = "the service keeps failing: not asked until the breaker's cool-down ends"
            self._publish([protocol.failed(m, UNAVAILABLE, reason=why) for m in ask])
            return
        ends = time.monotonic() + (latest - time.time())
        deadline = max(ends, time.monotonic() + api.finish_timeout)
        pending: list[Answer] = []
        published: set[str] = set()
        flushed = [time.monotonic()]

        def flush() -> None:
            self._publish(pending)
            published.update(a.msisdn for a in pending)
            pending.clear()
            flushed[0] = time.monotonic()

        def on_answer(answer: Answer) -> None:
            self.breaker.line()
            pending.append(answer)
            if time.monotonic() - flushed[0] >= FLUSH_EVERY:
                flush()

        try:
            answers = self.client.request(ask, deadline, lock_deadline=ends - api.request_floor, on_answer=on_answer)
        except NotSent as e:  # nothing was sent: nothing said of the service
            answers = {m: protocol.failed(m, TIMEOUT, reason=str(e)) for m in ask}
        except NplError as e:
            self.breaker.outcome(e.npl_err)
            answers = {m: protocol.failed(m, e.npl_err, reason=str(e)) for m in ask}
        else:
            self.breaker.outcome(next((a.error for a in answers.values() if a.error in CUT_OFF), ""))
        flush()
        self._publish([a for m, a in answers.items() if m not in published])

    def _publish(self, answers: list[Answer]) -> None:
        """Into the cache first (what deserves keeping), then to the waiting calls."""
        if answers:
            self.cache.put_many(answers, background=True)
            self.publish(answers)

    def publish(self, answers: list[Answer]) -> None:
        """To the calls waiting for these numbers, on any door."""
        self.queue.publish(answers, {}, self.wait)
