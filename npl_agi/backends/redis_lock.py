"""The account lock in Redis, so PBXs sharing an account never hold two connections; the file
lock when Redis cannot be reached and ``lock_fallback`` allows it."""

from __future__ import annotations

import time

from npl_agi import log
from npl_agi.backends.base import Cache
from npl_agi.backends.locks import AccountLock, FallbackRecord, lock_name, wait_for
from npl_agi.config import ApiConfig
from npl_agi.core.errors import LockUnavailable, LookupTimeout


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

    def __init__(self, cache: Cache, api: ApiConfig) -> None:
        """``cache``: the Redis backend whose client and health the lock shares."""
        self.cache = cache
        self.name = cache.lock_key(lock_name(api.url, api.user))
        self.file_lock = AccountLock(api.lock_dir, api.url, api.user)
        self.file_locks = FallbackRecord(api.lock_dir)
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
                self.cache.mark_failed()
                self._fall_back(log.short(e))
            else:
                self._held = lock
                self._start_renewing(lock, deadline if hold_until is None else hold_until)
                return
        else:
            self._fall_back("the redis cache failed earlier in this lookup")
        self.file_lock.acquire(deadline, hold_until)
        self._held = self.file_lock

    def _fall_back(self, reason: str) -> None:
        """Go on with the local file lock, counted and warned about, unless that is forbidden."""
        if self.cache.cfg.lock_fallback == "none":
            raise LockUnavailable(f"cannot take the account lock in Redis (lock_fallback = none): {reason}")
        if self.file_locks.add():
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
        if held is self.file_lock:
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
                self.cache.mark_failed()
                log.warning(
                    "Redis lost while holding the account lock, continuing without the redis cache: %s", log.short(e)
                )
