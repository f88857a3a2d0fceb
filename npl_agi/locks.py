"""The account locks: the service allows one connection per account at a time.

A ``flock`` on a per-account file serialises every process on the machine (AGI scripts, the
CLI, the FastAGI server). It is a few lines of standard library: a lock package would add tens
of milliseconds of imports to every call that goes to the network. The kernel drops the lock
when its holder dies, so a killed AGI never blocks the next call. PBXs sharing an account
through one Redis take ``RedisLock`` instead, with the file lock as its fallback. The cache
backend in use hands out the lock of its scope (``Cache.account_lock``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable

from . import log
from .config import ApiConfig, CacheConfig
from .errors import ConfigError, LockUnavailable, LookupTimeout, NotSent
from .permissions import open_shared, shared_directory

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .cache.redis import RedisCache

_POLL_FIRST, _POLL_MAX = 0.002, 0.05
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)  # an O_RDWR open refused, an O_RDONLY one may not be
LOCK_DIR_FALLBACKS = "npl-agi-lock-dir-fallbacks"


def lock_name(url: str, user: str) -> str:
    """A file name per account (service URL and user), without the user name in clear."""
    import hashlib  # imported here: only lookups that go to the network take the lock

    digest = hashlib.sha256(f"{url}\0{user}".encode()).hexdigest()[:16]
    return f"npl-agi-{digest}.lock"


def wait_for(attempt: Callable[[], bool], deadline: float, holder: str) -> None:
    """Call ``attempt`` until it succeeds, backing off from 2 ms to 50 ms between tries.

    Raises ``LookupTimeout`` at ``deadline`` (``time.monotonic()`` seconds). Many waiters poll
    at once during a burst of calls, so the pause grows instead of hammering the lock.
    """
    pause = _POLL_FIRST
    while not attempt():
        left = deadline - time.monotonic()
        if left <= 0:
            raise NotSent(f"deadline passed while waiting for the account lock ({holder})")
        time.sleep(min(pause, left))
        pause = min(pause * 2, _POLL_MAX)


def try_flock(fd: int) -> bool:
    """Take the exclusive ``flock`` of ``fd`` now if it is free; False if another holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False


class FileLock:
    """An exclusive ``flock`` taken before a deadline (``time.monotonic()`` seconds)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @classmethod
    def for_account(cls, lock_dir: str, url: str, user: str) -> FileLock:
        if not lock_dir:
            import tempfile

            lock_dir = tempfile.gettempdir()
        return cls(os.path.join(lock_dir, lock_name(url, user)))

    def _open(self) -> int:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                return open_shared(self.path, flags | os.O_RDWR)
            except OSError as e:
                if e.errno not in _READ_ONLY:
                    raise
                # A file system remounted read-only after a disk error, or a file this user may
                # not write: flock needs only a descriptor, and it is the same file as the others'.
                try:
                    return os.open(self.path, flags | os.O_RDONLY)
                except OSError:
                    raise e from None
        except OSError as e:
            raise ConfigError(
                f"{self.path}: cannot open the account lock file: {e.strerror} (see [api] lock_dir)"
            ) from None

    def acquire(self, deadline: float, hold_until: float | None = None) -> None:
        """Take the lock before ``deadline`` (``time.monotonic()``), or raise ``LookupTimeout``.

        ``hold_until`` is for leased locks; a file lock is held until ``release`` or death."""
        fd = self._open()
        try:
            wait_for(lambda: try_flock(fd), deadline, "another lookup holds it")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the flock


class FallbackRecord:
    """Counts the lookups that went on with a fallback lock: the local one because the cluster
    lock failed, or the temp dir's because the lock directory could not be used.

    A file beside the lock files, one byte appended per fallback (``O_APPEND`` is atomic across
    processes): its size is the count, its time the last one. It also spaces the warnings out
    to one a minute, however many processes fall back.
    """

    WARN_EVERY = 60.0  # seconds

    def __init__(
        self, lock_dir: str, clock: Callable[[], float] = time.time, name: str = "npl-agi-lock-fallbacks"
    ) -> None:
        if not lock_dir:
            import tempfile

            lock_dir = tempfile.gettempdir()
        self.path = os.path.join(lock_dir, name)
        self.clock = clock

    def add(self) -> bool:
        """Count one fallback; True when it is time for a warning (none in the last minute)."""
        try:
            last = os.stat(self.path).st_mtime
        except OSError:
            last = None
        try:
            fd = open_shared(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.write(fd, b".")
            finally:
                os.close(fd)
        except OSError:
            return True  # cannot count: warn every time rather than never
        return last is None or self.clock() - last >= self.WARN_EVERY

    def read(self) -> tuple[int, float | None]:
        """How many fallbacks so far, and when the last one was (``None``: never)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return 0, None
        return st.st_size, st.st_mtime


def lock_dir_fallbacks() -> FallbackRecord:
    """The count of lookups that took the temp dir's lock file: kept in the temp dir, which is
    writable when the lock directory is not."""
    return FallbackRecord("", name=LOCK_DIR_FALLBACKS)


class AccountLock:
    """The account's file lock in its lock directory, else the account's lock file in the temp dir.

    A lock directory that cannot be used (missing, not a directory, read-only with no lock file
    in it yet) is a cache fault, and must not fail every call. Every process that falls back
    takes the same file in the temp dir (``lock_name``), so those keep to one connection among
    themselves; a process that can use the lock directory does not see their lock, hence the
    count (``npl-agi cache stats``) and a warning a minute. With ``fallback`` false
    (``lock_fallback = none``), ``LockUnavailable`` instead: no request without the configured lock.
    """

    def __init__(self, lock_dir: str, url: str, user: str, *, fallback: bool = True) -> None:
        self.configured = FileLock.for_account(lock_dir, url, user)
        self.url, self.user, self.fallback = url, user, fallback
        self._held: FileLock | None = None

    def acquire(self, deadline: float, hold_until: float | None = None) -> None:
        """Take the lock before ``deadline`` (``time.monotonic()``), or raise ``LookupTimeout``."""
        try:
            self.configured.acquire(deadline, hold_until)
            self._held = self.configured
            return
        except ConfigError as e:
            reason = str(e)
        spare = FileLock.for_account("", self.url, self.user)
        if not self.fallback:
            raise LockUnavailable(f"{reason}; no request without it (lock_fallback = none)")
        if spare.path == self.configured.path:
            raise LockUnavailable(reason)
        if lock_dir_fallbacks().add():
            log.warning(
                "lock directory cannot hold the account lock, falling back to %s (lookups that can use "
                "the lock directory may query at the same time; lock_fallback = none forbids it): %s",
                spare.path,
                reason,
            )
        try:
            spare.acquire(deadline, hold_until)
        except ConfigError as e:
            raise LockUnavailable(f"{reason}; {e}") from None
        self._held = spare

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.release()


def lock_directory(api: ApiConfig, cfg: CacheConfig) -> str:
    """``[api] lock_dir``, else the cache's directory; made (like the cache's) when missing.

    A directory of npl-agi's own that Asterisk and the admin share, not the system's /tmp.
    A directory that cannot be made is left to the lock, which falls back to the temp dir.
    """
    path = api.lock_dir or os.path.dirname(os.path.abspath(cfg.path))
    with contextlib.suppress(OSError):
        shared_directory(path)
    return path


class RedisLock:
    """The account lock held in Redis, so PBXs sharing an account never hold two connections.

    A token-checked lock (redis-py's ``Lock``): only its holder releases it. It is taken for a
    short lease that the holder renews while its request runs (a bulk request may run for
    minutes), so a holder that dies blocks the account for at most ``LEASE`` seconds. Waiters
    back off between tries. If Redis cannot be reached, the lock falls back to the local file
    lock (``[cache] lock_fallback = file``: calls go on, counted, with a warning a minute) or
    the lookup fails with ``NOLOCK`` (``lock_fallback = none``: never two connections).
    """

    LEASE = 1.0  # seconds a lock outlives its last renewal: how long a dead holder blocks the account
    RENEW_EVERY = LEASE / 4  # leaves room for a few slow Redis answers before the lease runs out

    def __init__(self, cache: RedisCache, api: ApiConfig) -> None:
        self.cache = cache
        self.name = cache.lock_key(lock_name(api.url, api.user))
        self.fallback = AccountLock(api.lock_dir, api.url, api.user)
        self.fallbacks = FallbackRecord(api.lock_dir)
        self._held = None
        self._stop_renewing = None  # a threading.Event while the lease is renewed
        self._renewer = None  # the threading.Thread renewing it

    def acquire(self, deadline: float, hold_until: float | None = None) -> None:
        """Take the lock before ``deadline`` (``time.monotonic()``), or raise ``LookupTimeout``.

        The lease is renewed until ``release``, or at the latest until ``hold_until`` (default
        ``deadline``), when the request that holds it has been cut off.
        """
        if not self.cache.broken:
            try:
                # thread_local=False: the renewing thread must see the token this thread got
                lock = self.cache.client().lock(self.name, timeout=self.LEASE, thread_local=False)
                wait_for(lambda: lock.acquire(blocking=False), deadline, "held in Redis by another lookup")
            except LookupTimeout:
                raise
            except Exception as e:  # Redis down, slow or misconfigured
                self.cache.broken = True
                self._fall_back(log.short(e))
            else:
                self._held = lock
                self._start_renewing(lock, deadline if hold_until is None else hold_until)
                return
        else:
            self._fall_back("the redis cache failed earlier in this lookup")
        self.fallback.acquire(deadline, hold_until)
        self._held = self.fallback

    def _fall_back(self, reason: str) -> None:
        """Go on with the local file lock, counted and warned about, unless that is forbidden."""
        if self.cache.cfg.lock_fallback == "none":
            raise LockUnavailable(f"cannot take the account lock in Redis (lock_fallback = none): {reason}")
        if self.fallbacks.add():
            log.warning(
                "Redis lock failed, falling back to the local file lock (other PBXs on this account may "
                "query at the same time; lock_fallback = none forbids it): %s",
                reason,
            )

    def _start_renewing(self, lock, deadline: float) -> None:
        import threading  # only lookups that go to the network take the lock

        stop = threading.Event()

        def renew() -> None:
            # Past the deadline the client has closed its connection: the lease may run out.
            while not stop.wait(self.RENEW_EVERY) and time.monotonic() < deadline:
                try:
                    lock.reacquire()
                except Exception:  # expired or Redis gone: release() tells
                    return

        self._stop_renewing = stop
        self._renewer = threading.Thread(target=renew, name="npl-agi-lock-lease", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        """Free the lock if this object holds it; never raises."""
        held, self._held = self._held, None
        if held is self.fallback:
            held.release()
            return
        if held is None:
            return
        from redis.exceptions import LockError

        if self._stop_renewing is not None and self._renewer is not None:
            self._stop_renewing.set()
            self._renewer.join(2 * self.cache.timeout)
        try:
            held.release()
        except LockError as e:  # its lease ran out: another PBX may have connected meanwhile
            log.warning("Redis lock had expired before its release: %s", log.short(e))
        except Exception as e:  # Redis gone: one line for it, and no more Redis in this process
            if not self.cache.broken:
                self.cache.broken = True
                log.warning(
                    "Redis lost while holding the account lock, continuing without the redis cache: %s", log.short(e)
                )
