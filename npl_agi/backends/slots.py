"""The account's connection slots: ``[api] connections`` requests at once, never more.

An asker (the process that sends the waiting numbers' request, see ``waiting``) holds one slot
for as long as it asks. A slot is taken without waiting: a call whose number is queued does not
queue for a connection too, it waits for its answer, and whoever holds a slot asks for it.

- ``FileSlots``: one ``flock``ed file per slot in the lock directory (slot 0 is the account
  lock file every older lookup takes, so both keep to one connection together). The kernel
  drops the flock when its holder dies.
- ``RedisSlots``: one token-checked key per slot in Redis, for PBXs sharing an account; its
  lease is renewed while the asker lives, so a dead holder frees it within ``LEASE`` seconds.

A slot's token names its holder. The queue marks the numbers an asker claimed with its token,
and ``alive(token)`` tells whether that holder still holds its slot: when it does not (killed,
OOM, a reboot), its numbers go back to the queue at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading

from npl_agi import log
from npl_agi.backends.locks import lock_name, try_flock
from npl_agi.backends.permissions import open_shared

TOKEN_BYTES = 8


def slot_names(url: str, user: str, count: int) -> list[str]:
    """The lock names of the account's slots: the account lock's own name first."""
    base = lock_name(url, user)
    return [base] + [f"{base}.{i}" for i in range(1, count)]


def new_token(index: int) -> str:
    """``<slot>:<pid>:<random>``: who holds a slot, checkable by anyone on the same machine."""
    return f"{index}:{os.getpid()}:{secrets.token_hex(TOKEN_BYTES)}"


def _token_slot(token: str) -> int | None:
    index, _, rest = token.partition(":")
    return int(index) if index.isascii() and index.isdigit() and rest else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


class FileSlot:
    """A held file slot: its descriptor carries the flock (inherited by a forked asker)."""

    def __init__(self, index: int, fd: int, token: str) -> None:
        self.index, self.fd, self.token = index, fd, token

    def adopt(self, slots: FileSlots) -> None:
        """In the forked asker, which holds the flock through its inherited descriptor: a token
        of its own, naming its pid (the waiting call that forked it ends soon)."""
        self.token = new_token(self.index)
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, self.token.encode(), 0)

    def keep(self) -> None:
        """A flock needs no renewal: it lasts until its holder closes it or dies."""

    def handed_over(self) -> None:
        """The forked asker holds it now: close this process's descriptor without unlocking (a
        flock belongs to the open file, which the child's copy keeps)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def release(self) -> None:
        """Free the slot: the token is wiped first, so nobody takes its rows for this holder's."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)


class FileSlots:
    """``count`` slots as lock files in ``lock_dir`` (see the module).

    A lock directory that cannot be used is a cache fault and must not fail calls: with
    ``may_fall_back`` the slots are taken in the temp dir instead (as ``locks.AccountLock`` does),
    counted and warned about; their tokens are numbered after the configured ones.
    """

    def __init__(self, lock_dir: str, url: str, user: str, count: int, *, may_fall_back: bool = True) -> None:
        import tempfile

        names = slot_names(url, user, count)
        self.count = count
        self.paths = [os.path.join(lock_dir, name) for name in names]
        spare = tempfile.gettempdir()
        if may_fall_back and os.path.abspath(lock_dir) != os.path.abspath(spare):
            self.paths += [os.path.join(spare, name) for name in names]

    def _open(self, path: str) -> int:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return open_shared(path, flags | os.O_RDWR)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            return os.open(path, flags | os.O_RDONLY)

    def take(self) -> FileSlot | None:
        """A free slot, taken now, or None when every slot is held. Raises ``OSError`` when
        neither the lock directory nor its fallback can be used."""
        try:
            return self._take(0)
        except OSError as e:
            if len(self.paths) == self.count:
                raise
            from npl_agi.backends.locks import lock_dir_fallbacks

            if lock_dir_fallbacks().add():
                log.warning(
                    "lock directory cannot hold the connection slots, falling back to %s (lookups that can use "
                    "the lock directory may query at the same time; lock_fallback = none forbids it): %s",
                    os.path.dirname(self.paths[-1]),
                    log.short(e),
                )
            return self._take(self.count)

    def _take(self, first: int) -> FileSlot | None:
        for index in range(first, first + self.count):
            fd = self._open(self.paths[index])
            if not try_flock(fd):
                os.close(fd)
                continue
            token = new_token(index)
            with contextlib.suppress(OSError):  # a read-only file still locks; its token is then unknown
                os.ftruncate(fd, 0)
                os.pwrite(fd, token.encode(), 0)
            return FileSlot(index, fd, token)
        return None

    def alive(self, token: str) -> bool:
        """Does the holder named by ``token`` still hold its slot? (False for a token of no slot.)"""
        index = _token_slot(token)
        if index is None or index >= len(self.paths):
            return False
        try:
            fd = self._open(self.paths[index])
        except OSError:
            return True  # cannot tell: never take a live asker's numbers
        try:
            if try_flock(fd):
                return False  # nobody holds it: its holder is gone (closing fd frees it again)
            held = os.pread(fd, 256, 0).decode("ascii", "replace")
        finally:
            os.close(fd)
        pid = token.split(":")[1]
        return held == token and pid.isdigit() and _pid_alive(int(pid))


class RedisSlot:
    """A held Redis slot: a key holding its token, with a lease that a thread renews."""

    def __init__(self, slots: RedisSlots, index: int, token: str) -> None:
        self.slots, self.index, self.token = slots, index, token
        self._stop: threading.Event | None = None

    def adopt(self, slots: RedisSlots) -> None:
        """In the forked asker: renew and release through its own client."""
        self.slots = slots

    def handed_over(self) -> None:
        """The forked asker renews and releases it (with a client of its own)."""

    def keep(self) -> None:
        """Renew the lease until ``release`` (in the process that asks)."""
        stop = self._stop = threading.Event()
        key, lease_ms = self.slots.keys[self.index], int(self.slots.LEASE * 1000)

        def renew() -> None:
            while not stop.wait(self.slots.LEASE / 4):
                try:
                    if not self.slots.extend(key, self.token, lease_ms):
                        return
                except Exception:  # Redis gone: the lease runs out, the slot frees itself
                    return

        threading.Thread(target=renew, name="npl-agi-slot-lease", daemon=True).start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        with contextlib.suppress(Exception):
            self.slots.delete_if(self.slots.keys[self.index], self.token)


# KEYS[1] the slot, ARGV[1] the token, ARGV[2] the lease (ms): renew only one's own slot.
_EXTEND = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_DELETE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class RedisSlots:
    """``count`` slots as Redis keys (see the module); ``client`` gives the backend's client."""

    LEASE = 1.0  # seconds a slot outlives its holder's last renewal

    def __init__(self, client, keys: list[str]) -> None:
        self.client = client
        self.keys = keys

    def take(self) -> RedisSlot | None:
        """A free slot, taken now, or None; raises what redis-py raises when Redis is down."""
        r = self.client()
        for index, key in enumerate(self.keys):
            token = new_token(index)
            if r.set(key, token, nx=True, px=int(self.LEASE * 1000)):
                return RedisSlot(self, index, token)
        return None

    def alive(self, token: str) -> bool:
        index = _token_slot(token)
        if index is None or index >= len(self.keys):
            return False
        try:
            return self.client().get(self.keys[index]) == token
        except Exception:
            return True  # cannot tell: never take a live asker's numbers

    def extend(self, key: str, token: str, lease_ms: int) -> bool:
        return bool(self.client().eval(_EXTEND, 1, key, token, lease_ms))

    def delete_if(self, key: str, token: str) -> None:
        self.client().eval(_DELETE, 1, key, token)
