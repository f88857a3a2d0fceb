"""``npl-agi serve``: the FastAGI door onto the lookup path, for PBXs with many calls.

Each call is a FastAGI session (``fastagi.Session``) whose deadline starts when its connection
is accepted. It is run as the AGI script runs one (``call.Call``), through the same chain's
stages (``Lookup.many_async``), and gets the same variables from the same code; only the
transport differs: the misses of concurrent calls go to the broker (``askers.Brokered``), which
asks for them in one request. Cache steps that may wait
(writes, Redis, validation of a number the cache misses) run in one worker thread (SQLite
connections belong to one thread), so nothing blocks the event loop; a call whose number is an
SQLite cache hit is served from the loop itself (see ``_LoopCache``). In front of either backend
the last answers are kept in memory (``recent.Recent``), so a backend outage costs no credits
for them.

Hostile clients are bounded: a session holds at most its environment block (``fastagi``), at
most ``MAX_READING`` sessions may be reading theirs, and sessions stop short of the descriptor
limit, keeping ``FD_RESERVE`` for the lock file, the cache and the service. Past a limit a new
connection is told ``FAILURE`` and closed at once (the dialplan falls back to the AGI script)
and counted; one log line a minute says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import resource
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from npl_agi import log
from npl_agi.askers.brokered import Broker, Brokered, Shared
from npl_agi.askers.queued import QueueAsker
from npl_agi.backends import backend_class, open_cache
from npl_agi.backends.recent import Recent
from npl_agi.backends.sqlite import SqliteCache
from npl_agi.chain.breaker import Breaker
from npl_agi.chain.lookup import Lookup
from npl_agi.chain.resolved import Resolved
from npl_agi.config import Config, load_config, parse_listen, require_credentials
from npl_agi.core import protocol
from npl_agi.core.codes import TIMEOUT
from npl_agi.core.errors import ConfigError
from npl_agi.doors.call import Call, check_enabled, dialled_number, fresh_asked
from npl_agi.doors.fastagi import MAX_LINE, Session, SessionEnded
from npl_agi.doors.metrics import Metrics
from npl_agi.transports.aio import AsyncClient

SCRIPT = "npl-lookup"
CACHE_RETRY_FIRST = 1.0  # seconds a failed cache backend is skipped before it is probed again,
CACHE_RETRY_LONGEST = 30.0  # doubling with each failed probe up to this
SESSION_GRACE = 5.0  # seconds past its deadline a call has to take its variables
# Seconds a call that failed past its deadline waits for its range holder from the cache's thread.
RANGE_AFTER_DEADLINE = 0.05
RECENT_ENTRIES = 10_000  # answers kept in the server's own memory in front of the cache backend
HITS_RECORD_EVERY = 1.0  # seconds the hits served from the loop are counted for ``cache stats``
MAX_READING = 1024  # sessions reading their environment at once (a burst of calls takes a moment)
FD_RESERVE = 64  # descriptors never taken by sessions: the lock, the cache, the service, the log
LISTEN_BACKLOG = 100  # connections the kernel queues; also the most accepted in one turn of the loop
ACCEPT_RETRY = 1.0  # seconds accepting pauses when the system itself is out of descriptors
REFUSED_LOG_EVERY = 60.0  # seconds between the log lines about refused connections
# What a refused connection is told before it is closed: Asterisk's word for an AGI that could not
# run, so AGISTATUS is FAILURE and the dialplan runs the process script (a bare close is SUCCESS).
REFUSAL = b"FAILURE\n"

logger = logging.getLogger("npl_agi.server")
# The unique id of the call at hand, which masking leaves as it is (see ``Server.mask_record``).
_call_id: contextvars.ContextVar[str] = contextvars.ContextVar("npl_agi_call_id", default="")


class _State:
    """What one configuration builds: the lookup path, its breaker and its broker.

    SIGHUP builds a new one; calls in flight finish with the one they started with.
    """

    def __init__(self, config: Config, server: Server) -> None:
        self.config = config
        recent = Recent(RECENT_ENTRIES) if backend_class(config.cache.backend).keeps_data else None  # a failing backend
        # then costs each recent number nothing
        cache = open_cache(config, timer=server.clock, retry=(CACHE_RETRY_FIRST, CACHE_RETRY_LONGEST), recent=recent)
        self.cache = cache
        self.on_loop: Lookup | None = None
        if isinstance(cache, SqliteCache):  # opened by the loop's thread at its first read, after start()
            on_loop = SqliteCache(config.cache, timer=server.clock, recent=recent, fail_fast=True)
            self.on_loop = Lookup(config, cache=on_loop)
        try:
            require_credentials(config)
            refused: ConfigError | None = None
        except ConfigError as e:  # cache hits are still served, as by the AGI script
            refused = e
        fastagi = config.fastagi
        self.breaker = Breaker(
            config.breaker.failures,
            config.breaker.cooldown,
            server.clock,
            call_probes=False,
            on_change=server.metrics.breaker.state,
        )
        server.metrics.breaker.state(self.breaker.state)
        queue = cache.queue(config.api)
        shared = None
        if queue is not None:  # the process scripts' and other servers' queue: asked by whoever holds a slot
            shared = Shared(server.in_cache_thread, queue, cache.slots(config.api), QueueAsker(config, cache, queue))
        self.broker = Broker(
            AsyncClient(config.api, cache.account_lock(config.api)),
            config.api,
            batch_window=fastagi.batch_window,
            breaker=self.breaker,
            store=functools.partial(server.in_cache_thread, cache.put_many),
            metrics=server.metrics,
            shared=shared,
        )
        breaker = self.breaker
        self.lookup = Lookup(config, cache=cache, asker=Brokered(self.broker, refused), breaker=lambda: breaker)


class Server:
    """The FastAGI server. ``serve()`` runs it until SIGTERM; tests use ``start``/``drain``."""

    def __init__(self, config: Config, *, listen: str | None = None, clock=time.monotonic) -> None:
        self.clock = clock
        self.metrics = Metrics()
        self._cache_thread = ThreadPoolExecutor(1, thread_name_prefix="npl-agi-cache")
        self.state = _State(config, self)
        self.listen = parse_listen(listen or config.fastagi.listen, "--listen" if listen else "[fastagi] listen")
        self._listener: socket.socket | None = None
        self._metrics_listener: asyncio.Server | None = None
        self._calls: set[asyncio.Task] = set()
        self._retired: set[asyncio.Task] = set()
        self._hits_to_record = 0
        self._record_hits_timer: asyncio.TimerHandle | None = None
        self.max_reading = MAX_READING
        self.max_sessions = max(_descriptors() - FD_RESERVE, 1)
        self._sessions = 0  # connections accepted and not yet closed
        self._reading = 0  # of them, those still reading their environment
        self._refused = 0  # connections refused since the last log line about them
        self._refused_logged_at: float | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when the configured one was 0)."""
        return self._listener.getsockname()[:2]

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return self._metrics_listener.sockets[0].getsockname()[:2] if self._metrics_listener else None

    def mask_record(self, record: logging.LogRecord) -> bool:
        """A filter for the process's log handlers: every line, whoever logs it, with its numbers
        masked (``log.mask_numbers``) unless ``[fastagi] log_numbers = full``."""
        if not self._full_numbers(self.state):
            try:
                message = record.getMessage()
            except Exception:  # a malformed line: the handler reports it (never the caller)
                return True
            record.msg, record.args = log.mask_numbers(message, f"[{_call_id.get()}]"), ()
            if record.exc_info:
                record.exc_text = log.mask_numbers(logging.Formatter().formatException(record.exc_info))
        return True

    @staticmethod
    def _full_numbers(state: _State) -> bool:
        return state.config.fastagi.log_numbers == "full"

    async def in_cache_thread(self, work, *args):
        """Run a cache step in the cache's thread, with the calling task's log sink."""
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._cache_thread, functools.partial(context.run, work, *args))

    async def start(self) -> None:
        # Loaded once, not in a call (the numbering plan validates what the queue's asker claims);
        # the cache file created before the loop reads it.
        await self.in_cache_thread(_warm_up, self.state.lookup)
        self._listener = await _listening_socket(*self.listen)
        asyncio.get_running_loop().add_reader(self._listener, self._accept)
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
            asyncio.get_running_loop().remove_reader(self._listener)
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

    def _accept(self) -> None:
        """Take the waiting connections one by one, each counted before the next is taken, so
        that the limits hold before a descriptor runs out (not a turn of the loop later)."""
        for _ in range(LISTEN_BACKLOG):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError:  # the system is out of descriptors or memory: try again in a moment
                self._refuse()
                loop = asyncio.get_running_loop()
                loop.remove_reader(self._listener)
                loop.call_later(ACCEPT_RETRY, self._resume_accepting)
                return
            if self._sessions >= self.max_sessions or self._reading >= self.max_reading:
                with contextlib.closing(conn), contextlib.suppress(OSError):
                    conn.setblocking(False)
                    conn.send(REFUSAL)
                self._refuse()
                continue
            self._sessions += 1
            self._reading += 1
            task = asyncio.get_running_loop().create_task(self._handle(conn))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    def _resume_accepting(self) -> None:
        if self._listener.fileno() != -1:  # not closed by drain() meanwhile
            asyncio.get_running_loop().add_reader(self._listener, self._accept)

    def _refuse(self) -> None:
        """Count a connection refused; at most one log line a minute says how many and why."""
        self._refused += 1
        self.metrics.refused.inc()
        now = self.clock()
        if self._refused_logged_at is not None and now - self._refused_logged_at < REFUSED_LOG_EVERY:
            return
        logger.warning(
            "npl-agi: %d FastAGI connection(s) refused (%d sessions, at most %d; %d reading their environment,"
            " at most %d); those calls fall back to the AGI script",
            self._refused,
            self._sessions,
            self.max_sessions,
            self._reading,
            self.max_reading,
        )
        self._refused, self._refused_logged_at = 0, now

    async def _handle(self, conn: socket.socket) -> None:
        accepted = time.monotonic()
        self.metrics.in_flight.inc()
        state = self.state
        deadline = accepted + state.config.api.timeout
        writer = None
        try:
            async with asyncio.timeout_at(deadline + SESSION_GRACE):
                try:
                    reader, writer = await asyncio.open_connection(sock=conn, limit=MAX_LINE)
                    # An AGI conversation is short lines: receive them in MAX_LINE chunks instead
                    # of asyncio's 256 KiB, a buffer the allocator maps, shrinks and unmaps on
                    # every read (three system calls for each of a call's dozen replies), and
                    # that a flood of sessions would each hold. Only the selector transport has it.
                    if hasattr(writer.transport, "max_size"):
                        writer.transport.max_size = MAX_LINE
                    session = Session(reader, writer)
                    async with asyncio.timeout_at(deadline):
                        await session.read_env()
                finally:
                    self._reading -= 1
                await self._call(state, session, accepted, deadline)
        except (SessionEnded, TimeoutError, OSError):
            # The peer went away or misbehaved: only its own session ends.
            logger.debug("npl-agi: FastAGI session ended early")
        except Exception:
            logger.exception("npl-agi: FastAGI session failed")
        finally:
            (writer or conn).close()
            self._sessions -= 1
            self.metrics.in_flight.dec()

    async def _call(self, state: _State, session: Session, accepted: float, deadline: float) -> None:
        call_id = session.env.get("agi_uniqueid", "-")[:40]
        script, dialled = session.script, dialled_number(session.args, session.env)
        fresh = fresh_asked(session.args)
        session.env.clear()  # a session waiting for its answer holds a few short strings, not its block
        _call_id.set(call_id)
        full = self._full_numbers(state)
        call = Call(
            dialled,
            lambda message: logger.warning("npl-agi: [%s] %s", call_id, message),
            lambda e: logger.error("npl-agi: lookup failed", exc_info=e),
        )
        if script != SCRIPT:
            logger.warning("npl-agi: [%s] unknown FastAGI script %s", call_id, protocol.shown(script))
            message = f"npl-agi: unknown FastAGI script {script[:40]!r}; use agi://…/{SCRIPT}"
            await session.verbose(message if full else log.mask_numbers(message))
            return
        with call.answering():
            check_enabled(state.config)
            answers = await state.lookup.many_async(
                [dialled],
                deadline,
                run=self.in_cache_thread,
                cached=functools.partial(self._cached, state),
                seen=self._seen,
                fresh=fresh,
            )
            call.answer = answers[0]
        if call.failure is not None:
            await self._fall_back(state, call, deadline)
        values = call.variables(accepted)
        shown = dialled if full else log.masked(dialled)
        self._account(call_id, protocol.shown(shown), values, call)
        for name, value in values.items():
            await session.set_variable(name, value)
        if values["NPL_ERR"]:  # Asterisk's console is a log too
            line, level = call.outcome_line(f"'{shown[:40]}'", values)
            await session.verbose(line if full else log.mask_numbers(line), level)

    async def _fall_back(self, state: _State, call: Call, deadline: float) -> None:
        """A failed call's range holder (see ``Call.fall_back``), read in the cache's thread; a
        cache that cannot say by then leaves the failure as it is."""
        work = functools.partial(state.lookup.failed, call.dialled, call.failure, deadline=deadline)
        try:
            async with asyncio.timeout_at(max(deadline, asyncio.get_running_loop().time() + RANGE_AFTER_DEADLINE)):
                answer = await self.in_cache_thread(work)
        except TimeoutError:
            return
        except Exception as e:  # the failure stays the call's outcome
            logger.error("npl-agi: range holder failed", exc_info=e)
            return
        call.fall_back(lambda dialled, failure: answer)

    def _account(self, call_id: str, shown: str, values: dict, call: Call) -> None:
        """One log line (its number as ``shown``) and the metrics of a lookup."""
        logger.info("[%s] %s", call_id, call.outcome_line(shown, values)[0])
        self.metrics.lookups.labels(values["NPL_ERR"], values["NPL_SOURCE"]).inc()
        if values["NPL_ERR"] == TIMEOUT:
            self.metrics.deadline_misses.inc()

    def _seen(self, resolved: Resolved) -> None:
        """What the cache made of a call's numbers, in the metrics."""
        misses = len(resolved.misses)
        self.metrics.cache_hits.inc(resolved.cache_hits)
        self.metrics.cache_misses.inc(misses)

    def _cached(self, state: _State, dialled: list[str]) -> Resolved | None:
        """The call's number resolved from the SQLite cache on the loop, when it is a hit (see
        ``_LoopCache``); None sends it to the worker thread. Its hits are counted in the cache's
        statistics in one write every ``HITS_RECORD_EVERY`` seconds, from the worker thread."""
        if state.on_loop is None:
            return None
        try:
            resolved = state.on_loop.cached(dialled)
        except Exception:  # busy or failing: the worker thread's path waits, or warns
            return None
        if resolved is not None and resolved.msisdn_of:
            self._hits_to_record += resolved.cache_hits
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


def _warm_up(lookup: Lookup) -> None:
    import phonenumbers  # noqa: F401

    lookup.directory  # noqa: B018
    lookup.cache.get_many([])


async def _listening_socket(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on the first address ``host`` resolves to."""
    loop = asyncio.get_running_loop()
    family, *_, address = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))[0]
    sock = socket.create_server(address, family=family, backlog=LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _descriptors() -> int:
    """The process's soft limit of open descriptors (systemd's default is 1024)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def serve(config_path: str | None, listen: str | None) -> int:
    """``npl-agi serve``: log lines to stderr (journald), run until SIGTERM, exit 0."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per lookup is ours
    config = load_config(config_path)
    server = Server(config, listen=listen)
    for handler in logging.getLogger().handlers:
        handler.addFilter(server.mask_record)
    try:
        asyncio.run(server.serve(config_path))
    except OSError as e:  # cannot listen: say so in one line, exit non-zero so systemd retries
        logger.error("npl-agi: cannot listen on %s:%d: %s", *server.listen, e.strerror or e)
        return 1
    return 0
