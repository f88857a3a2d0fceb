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

from .errors import ConfigError, LookupTimeout

_POLL_FIRST, _POLL_MAX = 0.002, 0.05


def lock_name(url: str, user: str) -> str:
    """A file name per account (service URL and user), without the user name in clear."""
    import hashlib  # imported here: only lookups that go to the network take the lock

    digest = hashlib.sha256(f"{url}\0{user}".encode()).hexdigest()[:16]
    return f"npl-agi-{digest}.lock"


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

    def acquire(self, deadline: float) -> None:
        fd = self._open()
        pause = _POLL_FIRST
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            left = deadline - time.monotonic()
            if left <= 0:
                os.close(fd)
                raise LookupTimeout("deadline passed while waiting for the account lock (another lookup holds it)")
            time.sleep(min(pause, left))
            pause = min(pause * 2, _POLL_MAX)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the flock
