"""The account lock: the service allows one connection per account at a time.

A ``flock`` on a per-account file serialises every process on the machine (AGI scripts, the
CLI, the FastAGI server). It is a few lines of standard library: a lock package would add tens
of milliseconds of imports to every call that goes to the network. The kernel drops the lock
when its holder dies, so a killed AGI never blocks the next call.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable

from .errors import ConfigError, LookupTimeout

_POLL_FIRST, _POLL_MAX = 0.002, 0.05


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
            raise LookupTimeout(f"deadline passed while waiting for the account lock ({holder})")
        time.sleep(min(pause, left))
        pause = min(pause * 2, _POLL_MAX)


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
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                # An existing file is opened without O_CREAT: in a sticky directory such as /tmp
                # the kernel (fs.protected_regular) refuses O_CREAT on another user's file, and
                # the asterisk user and an admin running npl-agi as root share this one.
                return os.open(self.path, flags)
            except FileNotFoundError:
                fd = os.open(self.path, flags | os.O_CREAT, 0o666)
                os.fchmod(fd, 0o666)  # whatever the umask: the other users of the account need it
                return fd
        except OSError as e:
            raise ConfigError(
                f"{self.path}: cannot open the account lock file: {e.strerror} (see [api] lock_dir)"
            ) from None

    def acquire(self, deadline: float, hold_until: float | None = None) -> None:
        """Take the lock before ``deadline`` (``time.monotonic()``), or raise ``LookupTimeout``.

        ``hold_until`` is for leased locks; a file lock is held until ``release`` or death."""
        fd = self._open()

        def attempt() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                return False

        try:
            wait_for(attempt, deadline, "another lookup holds it")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the flock


class FallbackRecord:
    """Counts the lookups that went on with the local lock because the cluster lock failed.

    A file beside the lock files, one byte appended per fallback (``O_APPEND`` is atomic across
    processes): its size is the count, its time the last one. It also spaces the warnings out
    to one a minute, however many processes fall back.
    """

    WARN_EVERY = 60.0  # seconds

    def __init__(self, lock_dir: str, clock: Callable[[], float] = time.time) -> None:
        if not lock_dir:
            import tempfile

            lock_dir = tempfile.gettempdir()
        self.path = os.path.join(lock_dir, "npl-agi-lock-fallbacks")
        self.clock = clock

    def add(self) -> bool:
        """Count one fallback; True when it is time for a warning (none in the last minute)."""
        try:
            last = os.stat(self.path).st_mtime
        except OSError:
            last = None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
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
