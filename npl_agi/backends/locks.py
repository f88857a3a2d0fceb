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

from npl_agi import log
from npl_agi.backends.permissions import open_shared, shared_directory
from npl_agi.config import ApiConfig, CacheConfig
from npl_agi.core.errors import ConfigError, LockUnavailable, NotSent

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
    count (``npl-agi cache stats``) and a warning a minute. With ``may_fall_back`` false
    (``lock_fallback = none``), ``LockUnavailable`` instead: no request without the configured lock.
    """

    def __init__(self, lock_dir: str, url: str, user: str, *, may_fall_back: bool = True) -> None:
        self.configured = FileLock.for_account(lock_dir, url, user)
        self.url, self.user, self.may_fall_back = url, user, may_fall_back
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
        if not self.may_fall_back:
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
