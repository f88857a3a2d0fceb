"""The AGI door: read the dialled number from Asterisk, look it up, set channel variables.

Runs on every call setup, so it imports only what the path needs, never raises to Asterisk and
always exits 0: every failure becomes an ``NPL_ERR`` value and one ``VERBOSE`` line.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import math
import os
import signal
import sys
import time
import types
from collections.abc import Iterator

from npl_agi import log
from npl_agi.core import agiwire
from npl_agi.core.errors import LookupTimeout
from npl_agi.doors.call import VARIABLES as VARIABLES
from npl_agi.doors.call import Call, check_enabled, dialled_number, fresh_asked

# typing.TYPE_CHECKING would import typing, which a cache hit does not use.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from npl_agi.chain.asking import Asked, OnBatch
    from npl_agi.chain.lookup import Lookup

# Seconds kept back from the call's deadline for telling Asterisk the outcome (a dozen commands),
# so that the call has its variables by the deadline even on a busy machine.
REPLY_RESERVE = 0.1
ALARM_GRACE = 0.02  # past the lookup's own deadline, for it to come back with what it has
# The dialplan's time of the AGI() call is used when it is at most this long ago (a longer wait
# is a clock step or garbage) and at most a little ahead (another clock's rounding).
ASKED_MAX_AGE = 60.0
ASKED_MAX_AHEAD = 1.0


def import_on_first_use(name: str) -> None:
    """Put a stand-in for the top-level module ``name`` in ``sys.modules`` (unless it is imported
    already) that imports the real module when one of its attributes is first read (a module
    ``__getattr__``, PEP 562) and from then on holds the real module's names.

    The process script defers ``dataclasses`` so: pyst2 imports ``pprint``, which imports it (and
    through it ``inspect``, ``ast``, ``dis`` and ``tokenize``: about 10 ms of every call) only to
    ask ``is_dataclass`` of an object whose repr is too wide and whose type it has no printer
    for, never of the dicts, tuples and strings that pyst2 formats.
    """
    if name in sys.modules:
        return
    stand_in = types.ModuleType(name)

    def __getattr__(attr: str) -> object:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
        real = __import__(name)
        vars(stand_in).update(vars(real))
        return getattr(real, attr)

    stand_in.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules[name] = stand_in


class ChannelGone(Exception):
    """Asterisk hung up, closed the pipe or refused the command: stop talking, exit quietly."""


class Channel:
    """pyst2's AGI session with safe quoting and a hangup that ends the script quietly."""

    def __init__(self, stdin=None, stdout=None) -> None:
        import_on_first_use("dataclasses")  # pyst2's pprint needs it only for dataclasses
        from asterisk.agi import AGI

        class SafeAGI(AGI):
            def _quote(self, string) -> str:
                return agiwire.quote(string)

            def test_hangup(self) -> None:
                # After SIGHUP Asterisk still accepts SET VARIABLE and VERBOSE on the dead
                # channel (the CDR and hangup handlers see them), so keep sending; a refused
                # command ends the script instead.
                pass

        stdin = stdin or io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
        stdout = stdout or io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="replace")
        self._agi = self._talk(lambda: SafeAGI(stdin=stdin, stdout=stdout, stderr=io.StringIO()))
        # pyst2 installed a handler that fails every later command; a hangup instead lets the
        # lookup finish within its deadline (the answer is paid for and gets cached), and the
        # variables still reach the dead channel's CDR.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    @property
    def env(self) -> dict[str, str]:
        return self._agi.env

    def set_variable(self, name: str, value: str) -> None:
        self._talk(lambda: self._agi.set_variable(name, value))

    def verbose(self, message: str, level: int = 1) -> None:
        self._talk(lambda: self._agi.verbose(message[: agiwire.MAX_VERBOSE], level))

    @staticmethod
    def _talk(work):
        from asterisk.agi import AGIException

        try:
            result = work()
        except (AGIException, OSError, ValueError, EOFError) as e:
            raise ChannelGone(str(e)) from None
        return result


def asked_at(args: list[str], wall: float, mono: float) -> float | None:
    """When the dialplan called ``AGI()``, in ``time.monotonic()`` seconds; None if it did not say.

    The time is a ``t=EPOCH`` argument (wall clock, e.g. ``1733230000.123``) anywhere after the
    number; the last one counts, being the shipped Gosub's own. ``wall`` and ``mono`` are the
    two clocks read together now. Raises ``ValueError`` for a time that is not within
    ``ASKED_MAX_AGE`` before now (garbage, a clock step, a hostile dialplan).
    """
    given = [a[2:] for a in args[1:] if a.startswith("t=")]
    if not given:
        return None
    try:
        epoch = float(given[-1])
    except ValueError:
        epoch = math.nan
    if not wall - ASKED_MAX_AGE <= epoch <= wall + ASKED_MAX_AHEAD:  # also refuses NaN
        raise ValueError(f"t={given[-1][:40]} is not a time within {ASKED_MAX_AGE:g} s before now")
    return mono - max(wall - epoch, 0.0)


def _verbose_quietly(channel: Channel, message: str) -> None:
    """A library warning (cache skipped, lock fell back) on the Asterisk console, if it is still there."""
    with contextlib.suppress(ChannelGone):
        channel.verbose(message, 1)


def run(
    channel: Channel, args: list[str], config_path: str | None = None, started: float | None = None
) -> dict[str, str]:
    """Look up the call's number and set the variables; returns what it set (for tests).

    The call's deadline counts from the dialplan's ``AGI()`` call when a ``t=`` argument gives
    it (see ``asked_at``), so the wait for a busy machine to start the script counts too; else
    from ``started`` (``time.monotonic()`` seconds, default now: ``main`` passes the process's
    start). A script that starts too late to send a request answers at once (see ``_shed``).
    A ``fresh`` argument after the number skips the cache read (see ``call.fresh_asked``).
    """
    dialled = dialled_number(args, channel.env)
    # The console shows the caller's own number as dialled (Asterisk's own lines for the call do)
    # and any other number masked: a reason may quote other calls' numbers (a shared request's).
    call = Call(dialled, lambda message: _verbose_quietly(channel, log.mask_numbers(f"npl-agi: {message}", dialled)))
    now, asked = time.monotonic(), None
    try:
        asked = asked_at(args, time.time(), now)
    except ValueError as e:
        log.warning("%s; the deadline counts from the script's start", e)
    started = asked if asked is not None else now if started is None else started
    lookup = None
    fresh = fresh_asked(args)
    with call.answering():  # Lookup.one() turns service and network failures into the answer's error
        from npl_agi.config import load_config

        config = load_config(config_path)
        deadline = started + config.api.timeout - REPLY_RESERVE
        late = deadline - time.monotonic() < config.api.request_floor
        lookup = None if late else process_lookup(config)  # a late call reads nothing more (see _shed)
        check_enabled(config)
        try:  # the lookup keeps to its deadline; the alarm is for what cannot (imports, a busy cache)
            if late:
                call.answer = _shed(config, call.dialled, deadline, fresh)
            else:
                with _alarm_at(deadline + ALARM_GRACE):
                    call.answer = lookup.one(call.dialled, deadline=deadline, fresh=fresh)
        except _DeadlinePassed:
            if call.answer is None:  # else the alarm rang just as the answer came: keep the answer
                raise LookupTimeout(f"no answer within the call's {config.api.timeout:g} s") from None
    if lookup is not None:  # the range holder still says where the number most likely is
        call.fall_back(functools.partial(lookup.failed, deadline=deadline))
    values = call.variables(started)
    for name, value in values.items():
        channel.set_variable(name, value)
    line, level = call.outcome_line(f"'{call.dialled[:40]}'", values)
    channel.verbose(log.mask_numbers(line, (call.dialled[:40], values["NPL_NUMBER"])), level)
    return values


def process_lookup(config) -> Lookup:
    """The chain as the process script runs it: its misses wait in the backend's queue, asked
    by whichever process holds one of the account's connections (``askers.queued.Queued``; alone in
    a detached child without a queue, ``askers.direct.Detached``), behind the breaker every process
    of the account shares (``chain.breaker.shared_breaker``). The asker and the breaker are made
    by the first miss: a cache hit imports neither."""
    from npl_agi.backends import open_cache
    from npl_agi.chain.lookup import Lookup

    cache = open_cache(config)
    return Lookup(
        config, cache=cache, asker=_AskerOnMiss(config, cache), breaker=lambda: _shared_breaker(config, cache)
    )


class _AskerOnMiss:
    """The process script's asker (see ``process_lookup``), made when a miss first asks."""

    takes_readings = True  # as Queued's: read by the chain before anything is asked

    def __init__(self, config, cache) -> None:
        self.config = config
        self.cache = cache
        self._asker = None

    def ask(
        self,
        misses: list[str],
        deadline: float | None,
        *,
        timeout: float | None = None,
        fresh: bool = False,
        on_batch: OnBatch | None = None,
    ) -> Asked:
        # agi-bin's script turns the garbage collector off for a cache hit; a miss may wait for
        # seconds, and forks the asker, which may run for minutes.
        gc.enable()
        if self._asker is None:
            from npl_agi.askers.direct import Detached
            from npl_agi.askers.queued import Queued

            self._asker = Queued(self.config, self.cache, Detached(self.config, self.cache))
        return self._asker.ask(misses, deadline, timeout=timeout, fresh=fresh, on_batch=on_batch)


def _shared_breaker(config, cache):
    from npl_agi.chain.breaker import shared_breaker

    return shared_breaker(config, cache)


def _shed(config, dialled: str, deadline: float, fresh: bool = False):
    """The answer of a call that started too late to send a request: under overload, calls are
    shed, not queued. Before the deadline a cached answer is read, with nothing heavier than
    sqlite3 (a Redis cache would need its client), unless the call is ``fresh``; otherwise, or
    on a miss, ``TIMEOUT`` at once, without its range holder."""
    why = f"started too late to ask the service within the call's {config.api.timeout:g} s"
    if time.monotonic() < deadline and _reads_cheaply(config):
        from npl_agi.chain.lookup import Lookup

        lookup = Lookup(config)
        with _alarm_at(deadline + ALARM_GRACE):
            resolved = lookup.cached([dialled], deadline=deadline, fresh=fresh)
            if resolved is not None:
                return lookup.finish(resolved, {})[0]
        why += ", and a fresh lookup takes no cached answer" if fresh else ", and it is not cached"
    raise LookupTimeout(why)


def _reads_cheaply(config) -> bool:
    from npl_agi.backends import reads_cheaply

    return reads_cheaply(config)


class _DeadlinePassed(BaseException):
    """Raised by the alarm wherever the script is when the call's deadline passes.

    A ``BaseException``, so that no ``except Exception`` on the way (a cache that skips its
    own failures) can swallow it and let the call wait on.
    """


@contextlib.contextmanager
def _alarm_at(deadline: float) -> Iterator[None]:
    """Interrupt whatever runs past ``deadline`` (``time.monotonic()``): CPU-bound imports under
    a burst of calls, a busy cache, the wait for the answer. A detached request goes on."""

    def ring(signum, frame) -> None:
        raise _DeadlinePassed

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def process_started() -> float:
    """When this process started, in ``time.monotonic()`` seconds (to the kernel's 10 ms tick).

    The deadline's start when the dialplan passes no time of its own (see ``asked_at``): the
    interpreter's start and the imports are inside it, the wait for Asterisk to fork is not.
    The kernel counts the start in whole ticks, rounded down: the end of that tick is taken, the
    earliest time surely not before the start, so that ``NPL_LOOKUP_MS`` never says more than
    the call took.
    """
    now = time.monotonic()
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, counted from field 3 after the name
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - (ticks + 1) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - min(max(age, 0.0), 60.0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``agi-bin/npl-lookup.agi``. Always returns 0."""
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # ChannelGone: the caller hung up or Asterisk went away, nothing left to tell. Anything
    # else: never a traceback to Asterisk.
    with contextlib.suppress(BaseException):
        run(Channel(), args, started=process_started())
    return 0
