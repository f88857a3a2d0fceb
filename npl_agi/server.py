"""``npl-agi serve``: the FastAGI door onto the lookup path, for PBXs with many calls.

Each call is a FastAGI session (``fastagi.Session``) whose deadline starts when its connection
is accepted. Its number goes through the same steps as the AGI script's (``Lookup.resolve``,
then the service for the misses, ``Lookup.store``, ``Lookup.finish``) and gets the same
variables from the same code (``agi.variables_for``); only the transport differs: the misses of
concurrent calls go to the broker, which asks for them in one request. Cache steps that may wait
(writes, Redis, validation of a number the cache misses) run in one worker thread (SQLite
connections belong to one thread), so nothing blocks the event loop; a call whose number is an
SQLite cache hit is served from the loop itself (see ``_LoopCache``). In front of either backend
the last answers are kept in memory (``recent.Recent``), so a backend outage costs no credits
for them.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from . import log, protocol
from .agi import dialled_number, outcome_line, variables_for
from .aioclient import AsyncClient
from .breaker import Breaker
from .broker import Broker
from .cache import SqliteCache
from .config import Config, load_config, parse_listen, require_credentials
from .errors import TIMEOUT, TRUNCATED, UNAVAILABLE, ConfigError, Disabled, LookupTimeout, NplError
from .fastagi import MAX_LINE, Session, SessionEnded
from .lookup import Lookup, Resolved
from .metrics import Metrics
from .recent import Recent

SCRIPT = "npl-lookup"
CACHE_RETRY_FIRST = 1.0  # seconds a failed cache backend is skipped before it is probed again,
CACHE_RETRY_LONGEST = 30.0  # doubling with each failed probe up to this
SESSION_GRACE = 5.0  # seconds past its deadline a call has to take its variables
RECENT_ENTRIES = 10_000  # answers kept in the server's own memory in front of the cache backend
HITS_RECORD_EVERY = 1.0  # seconds the hits served from the loop are counted for ``cache stats``
# Per-number outcomes that mean the service failed (not the number): a stale answer may stand in.
SERVICE_FAILURES = frozenset({UNAVAILABLE, TIMEOUT, TRUNCATED, "UNREACHABLE", "PROTOCOL"})

logger = logging.getLogger("npl_agi.server")


class _LoopCache(SqliteCache):
    """The SQLite cache as the event loop reads it: cache hits without a hop to the worker thread.

    Reading on the loop does not block it: in WAL mode a reader never waits for a writer (other
    calls' AGI scripts, our own worker thread), and a select of a few rows by primary key from a
    file in the page cache takes microseconds. What could make a reader wait (recovery after a
    crash, a connection holding an exclusive lock) makes this one fail at once instead of
    sleeping in SQLite's busy handler (busy timeout 0): the call then takes the worker thread's
    path, which waits within the call's deadline and says what failed. Nothing is written here.
    """

    announce_replaced = False  # the worker thread's connection says it

    def _busy_timeout(self) -> float:
        return 0.0

    def get_many(self, msisdns: list[str]) -> dict:
        return self._with_recent(msisdns, self._get_many)  # a failure is the caller's: on to the worker thread


class _State:
    """What one configuration builds: the lookup path, its breaker and its broker.

    SIGHUP builds a new one; calls in flight finish with the one they started with.
    """

    def __init__(self, config: Config, server: Server) -> None:
        self.config = config
        self.lookup = Lookup(config)
        cache = self.lookup.cache
        cache.retry_after, cache.retry_longest, cache.timer = CACHE_RETRY_FIRST, CACHE_RETRY_LONGEST, server.clock
        if cache.name != "none":  # a failing backend then costs each recent number nothing
            cache.recent = Recent(RECENT_ENTRIES)
        self.on_loop: Lookup | None = None
        if isinstance(cache, SqliteCache):  # opened by the loop's thread at its first read, after start()
            on_loop = _LoopCache(config.cache)
            on_loop.timer, on_loop.recent = server.clock, cache.recent
            self.on_loop = Lookup(config, cache=on_loop)
        try:
            require_credentials(config)
            self.refused: ConfigError | None = None
        except ConfigError as e:  # cache hits are still served, as by the AGI script
            self.refused = e
        fastagi = config.fastagi
        self.breaker = Breaker(fastagi.breaker_failures, fastagi.breaker_cooldown, server.clock)
        self.breaker.on_change = server.metrics.breaker.state
        server.metrics.breaker.state(self.breaker.state)
        self.broker = Broker(
            AsyncClient(config.api, cache.account_lock(config.api)),
            config.api,
            batch_window=fastagi.batch_window,
            breaker=self.breaker,
            store=functools.partial(server.in_cache_thread, self.lookup.store),
            metrics=server.metrics,
        )


class Server:
    """The FastAGI server. ``serve()`` runs it until SIGTERM; tests use ``start``/``drain``."""

    def __init__(self, config: Config, *, listen: str | None = None, clock=time.monotonic) -> None:
        self.clock = clock
        self.metrics = Metrics()
        self._cache_thread = ThreadPoolExecutor(1, thread_name_prefix="npl-agi-cache")
        self.state = _State(config, self)
        self.listen = parse_listen(listen or config.fastagi.listen, "--listen" if listen else "[fastagi] listen")
        self._listener: asyncio.Server | None = None
        self._metrics_listener: asyncio.Server | None = None
        self._calls: set[asyncio.Task] = set()
        self._retired: set[asyncio.Task] = set()
        self._hits_to_record = 0
        self._record_hits_timer: asyncio.TimerHandle | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when the configured one was 0)."""
        return self._listener.sockets[0].getsockname()[:2]

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return self._metrics_listener.sockets[0].getsockname()[:2] if self._metrics_listener else None

    async def in_cache_thread(self, work, *args):
        """Run a cache step in the cache's thread, with the calling task's log sink."""
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._cache_thread, functools.partial(context.run, work, *args))

    async def start(self) -> None:
        # Loaded once, not in a call; the cache file created before the loop reads it.
        await self.in_cache_thread(lambda: self.state.lookup.directory and self.state.lookup.cache.get_many([]))
        host, port = self.listen
        self._listener = await asyncio.start_server(self._handle, host, port, limit=MAX_LINE)
        metrics_listen = self.state.config.fastagi.metrics_listen
        if metrics_listen:
            try:
                self._metrics_listener = await self.metrics.serve(*parse_listen(metrics_listen))
            except OSError as e:  # calls matter more than metrics
                logger.warning("npl-agi: no metrics on %s: %s", metrics_listen, e.strerror or e)
        logger.info("npl-agi: FastAGI server on %s:%d (agi://%s:%d/%s)", *self.address, *self.address, SCRIPT)

    async def serve(self, config_path: str | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then drain; SIGHUP reloads the configuration."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reloads: set[asyncio.Task] = set()

        def reload() -> None:
            task = asyncio.create_task(self.reload(config_path))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
        await self.start()
        await stop.wait()
        logger.info("npl-agi: stopping: no new calls; finishing %d in flight", len(self._calls))
        await self.drain()

    async def reload(self, config_path: str | None = None) -> None:
        """Read the configuration again; a bad one is logged and the running one kept."""
        try:
            config = await asyncio.to_thread(load_config, config_path or self.state.config.path or None)
            state = await self.in_cache_thread(_State, config, self)
        except ConfigError as e:
            logger.error("npl-agi: configuration not reloaded: %s", e)
            return
        if parse_listen(config.fastagi.listen) != self.listen:
            logger.warning("npl-agi: [fastagi] listen changed: takes effect at the next restart")
        old, self.state = self.state, state
        task = asyncio.create_task(old.broker.close())  # its request in flight still ends and is stored
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        logger.info("npl-agi: configuration reloaded from %s", config.path)

    async def drain(self) -> None:
        """Stop accepting; let every call in flight end (each by its deadline) and every request
        end (keeping what it paid for); then release everything."""
        if self._listener is not None:
            self._listener.close()
        if self._calls:
            await asyncio.wait(set(self._calls))
        await self.state.broker.close()
        if self._retired:
            await asyncio.wait(set(self._retired))
        if self._metrics_listener is not None:
            self._metrics_listener.close()
        self._record_hits()
        await asyncio.to_thread(self._cache_thread.shutdown)
        if self.state.on_loop is not None:
            self.state.on_loop.cache.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = time.monotonic()
        # An AGI conversation is short lines: receive them in MAX_LINE chunks instead of asyncio's
        # 256 KiB, a buffer the allocator maps, shrinks and unmaps on every read (three system
        # calls for each of a call's dozen replies). Only the selector transport has the knob.
        if hasattr(writer.transport, "max_size"):
            writer.transport.max_size = MAX_LINE
        task = asyncio.current_task()
        self._calls.add(task)
        self.metrics.in_flight.inc()
        state = self.state
        deadline = accepted + state.config.api.timeout
        try:
            async with asyncio.timeout_at(deadline + SESSION_GRACE):
                await self._call(state, Session(reader, writer), accepted, deadline)
        except (SessionEnded, TimeoutError, OSError):
            # The peer went away or misbehaved: only its own session ends.
            logger.debug("npl-agi: FastAGI session ended early")
        except Exception:
            logger.exception("npl-agi: FastAGI session failed")
        finally:
            writer.close()
            self.metrics.in_flight.dec()
            self._calls.discard(task)

    async def _call(self, state: _State, session: Session, accepted: float, deadline: float) -> None:
        async with asyncio.timeout_at(deadline):
            await session.read_env()
        call = session.env.get("agi_uniqueid", "-")[:40]
        log.call_sink.set(lambda message: logger.warning("npl-agi: [%s] %s", call, message))
        if session.script != SCRIPT:
            logger.warning("npl-agi: [%s] unknown FastAGI script %s", call, protocol.shown(session.script))
            await session.verbose(f"npl-agi: unknown FastAGI script {session.script[:40]!r}; use agi://…/{SCRIPT}")
            return
        dialled = dialled_number(session.args, session.env)
        answer, failure = await self._lookup(state, dialled, deadline)
        values = variables_for(answer, failure, round((time.monotonic() - accepted) * 1000))
        self._account(state, call, dialled, values, answer, failure)
        for name, value in values.items():
            await session.set_variable(name, value)
        if values["NPL_ERR"]:
            await session.verbose(*outcome_line(f"'{dialled[:40]}'", values, answer, failure))

    def _account(self, state: _State, call: str, dialled: str, values: dict, answer, failure) -> None:
        """One log line and the metrics of a lookup."""
        full = state.config.fastagi.log_numbers == "full"
        shown = protocol.shown(dialled if full or len(dialled) <= 4 else "*" * (len(dialled) - 4) + dialled[-4:])
        logger.info("[%s] %s", call, outcome_line(shown, values, answer, failure)[0])
        self.metrics.lookups.labels(values["NPL_ERR"], values["NPL_SOURCE"]).inc()
        if values["NPL_ERR"] == TIMEOUT:
            self.metrics.deadline_misses.inc()

    async def _lookup(self, state: _State, dialled: str, deadline: float):
        """The call's answer, or the failure that stands for it; never raises."""
        if not state.config.api.enabled:
            return None, Disabled("lookups are switched off (enabled = no)")
        lookup = state.lookup
        try:
            resolved = self._cached(state, dialled)
            if resolved is None:
                async with asyncio.timeout_at(deadline):
                    resolved = await self.in_cache_thread(lookup.resolve, [dialled])
            misses = resolved.misses
            self.metrics.cache_hits.inc(len(resolved.wanted) - len(misses))
            self.metrics.cache_misses.inc(len(misses))
            fresh = {}
            if misses and state.refused is not None:
                fresh = {m: protocol.failed(m, state.refused.npl_err, reason=str(state.refused)) for m in misses}
            elif misses:
                stale = asyncio.ensure_future(self.in_cache_thread(lookup.cache.get_stale_many, misses))
                fresh = await state.broker.ask(misses, deadline)
                fresh.update(await self._stale(fresh, stale))
            return lookup.finish(resolved, fresh)[0], None
        except TimeoutError:
            return None, LookupTimeout("deadline passed while reading the cache")
        except NplError as e:
            return None, e
        except Exception as e:  # never a broken call
            logger.exception("npl-agi: lookup failed")
            return None, NplError(f"internal error: {e.__class__.__name__}")

    def _cached(self, state: _State, dialled: str) -> Resolved | None:
        """The call's number resolved from the SQLite cache on the loop, when it is a hit (see
        ``_LoopCache``); None sends it to the worker thread. Its hits are counted in the cache's
        statistics in one write every ``HITS_RECORD_EVERY`` seconds, from the worker thread."""
        if state.on_loop is None:
            return None
        try:
            resolved = state.on_loop.cached([dialled])
        except Exception:  # busy or failing: the worker thread's path waits, or warns
            return None
        if resolved is not None and resolved.msisdn_of:
            self._hits_to_record += len(resolved.wanted)
            if self._record_hits_timer is None:
                self._record_hits_timer = asyncio.get_running_loop().call_later(HITS_RECORD_EVERY, self._record_hits)
        return resolved

    def _record_hits(self) -> None:
        if self._record_hits_timer is not None:
            self._record_hits_timer.cancel()
            self._record_hits_timer = None
        hits, self._hits_to_record = self._hits_to_record, 0
        if hits:
            self._cache_thread.submit(self.state.lookup.cache.record, hits, 0)

    @staticmethod
    async def _stale(fresh: dict, stale: asyncio.Future) -> dict:
        """Stale cache entries for the numbers the service failed to answer (read meanwhile)."""
        failing = [m for m, a in fresh.items() if a.error in SERVICE_FAILURES]
        if not failing:
            stale.cancel()
            return {}
        try:
            async with asyncio.timeout(0.05):  # it was read while the service was asked
                old = await stale
        except TimeoutError:
            return {}
        return {m: old[m] for m in failing if m in old}


def serve(config_path: str | None, listen: str | None) -> int:
    """``npl-agi serve``: log lines to stderr (journald), run until SIGTERM, exit 0."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per lookup is ours
    config = load_config(config_path)
    server = Server(config, listen=listen)
    try:
        asyncio.run(server.serve(config_path))
    except OSError as e:  # cannot listen: say so in one line, exit non-zero so systemd retries
        logger.error("npl-agi: cannot listen on %s:%d: %s", *server.listen, e.strerror or e)
        return 1
    return 0
