"""The Redis backend: one cache, and one account lock, for every PBX of a cluster."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from npl_agi.backends.base import KNOWN_NUMBERS, LOCAL_KINDS, Cache, _answer, _record, _stats, ttl_for
from npl_agi.backends.local_load import is_number
from npl_agi.backends.redis_local import holder
from npl_agi.config import ApiConfig, CacheConfig
from npl_agi.core.protocol import Answer

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which a cache hit does not use
if TYPE_CHECKING:
    from npl_agi.backends.breaker_store import RedisStore
    from npl_agi.backends.redis_local import LocalKeys
    from npl_agi.backends.redis_lock import RedisLock
    from npl_agi.backends.redis_queue import RedisQueue
    from npl_agi.backends.slots import RedisSlots

REDIS_TIMEOUT = 0.25  # seconds per Redis operation: a slow Redis must not slow calls
REDIS_ADMIN_TIMEOUT = 10.0  # seconds per operation of the admin's commands on their own data
REDIS_PREFIX = "npl-agi:"


def _fields(value: str | None) -> list[str] | None:
    """The five fields of a stored Redis value, or ``None`` for a value this version cannot read.

    An unreadable value (another version's format, another writer) is a miss, not a broken
    cache: a broken cache would also give up the cross-machine account lock.
    """
    fields = value.split(",") if value else []
    if len(fields) != 5 or not fields[4].isdigit():
        return None
    return fields


def _without_password(url: str) -> str:
    """The Redis URL to show an admin: its password masked."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


class RedisCache(Cache):
    """A cache shared by several PBXs through one Redis, with native expiry per key."""

    name = "redis"
    keeps_data = True
    timeout = REDIS_TIMEOUT  # what one operation may take, for the account lock too
    longest_wait = background_wait = REDIS_TIMEOUT

    def __init__(self, cfg: CacheConfig, clock: Callable[[], float] = time.time, **tuning) -> None:
        """``tuning``: as ``Cache``'s (``timer``, ``retry``, ``recent``)."""
        super().__init__(cfg, clock, **tuning)
        self._redis = None
        self._admin = None

    def close(self) -> None:
        """Make the next operation use a new client. The old one is dropped, not closed: an
        account lock taken through it goes on renewing its lease on its connection."""
        self._redis = self._admin = None

    def client(self, wait: float = REDIS_TIMEOUT):
        """The redis-py client, made on first use; every operation gives up after ``wait``
        (``REDIS_TIMEOUT``, or what was left of the first call's deadline)."""
        if self._redis is None:
            import redis

            wait = max(wait, 0.01)
            self._redis = redis.Redis.from_url(
                self.cfg.redis_url, socket_timeout=wait, socket_connect_timeout=wait, decode_responses=True
            )
        return self._redis

    def admin_client(self):
        """A client for the admin's commands on their own data: one step of a national load may
        wait for a Redis busy with every PBX's calls longer than a call would."""
        if self._admin is None:
            import redis

            self._admin = redis.Redis.from_url(
                self.cfg.redis_url,
                socket_timeout=REDIS_ADMIN_TIMEOUT,
                socket_connect_timeout=REDIS_ADMIN_TIMEOUT,
                decode_responses=True,
            )
        return self._admin

    @staticmethod
    def key(msisdn: str) -> str:
        """The Redis key of a number's answer, under the shared ``npl-agi:`` prefix."""
        return f"{REDIS_PREFIX}answer:{msisdn}"

    @staticmethod
    def stale_key(msisdn: str) -> str:
        """A network answer's second copy, kept ``stale_ttl`` longer for ``get_stale_many``."""
        return f"{REDIS_PREFIX}stale:{msisdn}"

    @staticmethod
    def lock_key(name: str) -> str:
        """The Redis key of the account lock called ``name`` (``locks.lock_name``)."""
        return f"{REDIS_PREFIX}lock:{name}"

    @staticmethod
    def local_key(kind: str) -> str:
        """The hash of the admin's local data of ``kind``: key -> ``mccmnc,note``."""
        return f"{REDIS_PREFIX}local:{kind}"

    @staticmethod
    def blocks_key(kind: str) -> str:
        """The sorted set of the admin's ``FROM-TO`` blocks of ``kind`` (see ``redis_local``)."""
        return f"{REDIS_PREFIX}local:{kind}:blocks"

    def _get_local_many(self, kind: str, keys: list[str], wait: float) -> dict[str, str]:
        """Numbers held on their own, else by the last block scored at or below them: one
        MULTI/EXEC round trip (one snapshot, even while a load swaps the keys)."""
        r = self.client(wait)
        if kind != KNOWN_NUMBERS:
            values = r.hmget(self.local_key(kind), keys)
            return {k: v.partition(",")[0] for k, v in zip(keys, values, strict=True) if v}
        numbers = [k for k in keys if is_number(k)]  # no other key is in a block
        pipe = r.pipeline(transaction=True)
        pipe.hmget(self.local_key(kind), keys)
        for number in numbers:
            pipe.zrevrangebyscore(self.blocks_key(kind), number, "-inf", start=0, num=1)
        values, *below = pipe.execute()
        found = {k: v.partition(",")[0] for k, v in zip(keys, values, strict=True) if v}
        for number, members in zip(numbers, below, strict=True):
            if number not in found and members and (mccmnc := holder(members[0], number)):
                found[number] = mccmnc
        return found

    # -- the admin's data, loaded and read by ``redis_local`` --
    def _local(self, kind: str) -> LocalKeys:
        from npl_agi.backends.redis_local import LocalKeys

        if kind not in LOCAL_KINDS:
            raise ValueError(f"no local data of kind {kind!r}")
        blocks = self.blocks_key(kind) if kind == KNOWN_NUMBERS else None
        return LocalKeys(self.admin_client(), self.local_key(kind), blocks)

    def load_local(self, kind: str, chunks: Iterable[list[tuple[str, str, str]]], *, mode: str = "add") -> int:
        return self._local(kind).load(chunks, mode)

    def local_size(self, kind: str) -> dict[str, int]:
        return self._local(kind).size()

    def local_items(self, kind: str) -> Iterator[tuple[str, str, str]]:
        return self._local(kind).items()

    def delete_local(self, kind: str, keys: list[str] | None = None) -> int:
        return self._local(kind).delete(keys)

    def _get_stale_many(self, msisdns: list[str], wait: float) -> dict[str, Answer]:
        r = self.client(wait)
        found = {}
        for m, value in zip(msisdns, r.mget([self.stale_key(m) for m in msisdns]), strict=True):
            fields = _fields(value)
            if fields and fields[0] and not fields[3] and float(fields[4]) + self.cfg.ttl <= self.clock():
                found[m] = _answer(m, *fields[:4])._replace(source="stale")
        return found

    def _get_many(self, msisdns: list[str], wait: float) -> dict[str, tuple[Answer, float]]:
        r = self.client(wait)
        found = {}
        for m, value in zip(msisdns, r.mget([self.key(m) for m in msisdns]), strict=True):
            fields = _fields(value)
            if fields:
                answer = _answer(m, *fields[:4])
                found[m] = (answer, float(fields[4]) + ttl_for(answer, self.cfg))  # as put_many set its expiry
        return found

    def _record_failed(self) -> None:
        """A Redis that cannot count cannot answer either: skip it for the cool-down instead of
        waiting ``REDIS_TIMEOUT`` for it in every call that the first-level cache answers."""
        self.mark_failed()

    def _record(self, hits: int, misses: int, wait: float) -> None:
        pipe = self.client(wait).pipeline(transaction=False)
        pipe.hsetnx(f"{REDIS_PREFIX}counters", "created", int(self.clock()))
        pipe.hincrby(f"{REDIS_PREFIX}counters", "hits", hits)
        pipe.hincrby(f"{REDIS_PREFIX}counters", "misses", misses)
        pipe.execute()

    def _put_many(self, rows: list[tuple[Answer, float, float]], wait: float) -> None:
        pipe = self.client(wait).pipeline(transaction=False)
        for a, stored, expires in rows:
            value = ",".join((*_record(a), f"{stored:.0f}"))
            pipe.set(self.key(a.msisdn), value, px=max(1, int((expires - stored) * 1000)))
            if a.mccmnc and not a.error:
                pipe.set(self.stale_key(a.msisdn), value, px=int((expires - stored + self.cfg.stale_ttl) * 1000))
        pipe.execute()

    def queue(self, api: ApiConfig) -> RedisQueue:
        """The account's queue of waiting numbers in Redis, shared by every PBX using this Redis."""
        from npl_agi.backends.locks import lock_name
        from npl_agi.backends.redis_queue import RedisQueue

        return RedisQueue(self.client, f"{REDIS_PREFIX}queue:{lock_name(api.url, api.user).removesuffix('.lock')}:")

    def slots(self, api: ApiConfig) -> RedisSlots:
        """The account's connection slots in Redis. Slot 0 is the key ``RedisLock`` takes, so an
        asker and an older lookup keep to one connection together."""
        from npl_agi.backends.slots import RedisSlots, slot_names

        names = slot_names(api.url, api.user, api.connections)
        return RedisSlots(self.client, [self.lock_key(name) for name in names])

    def lock_fallbacks(self, api: ApiConfig) -> tuple[int, float | None]:
        """How often the Redis lock fell back to the file lock, and when last."""
        from npl_agi.backends.locks import FallbackRecord, lock_directory

        return FallbackRecord(lock_directory(api, self.cfg)).read()

    def breaker_store(self, api: ApiConfig) -> RedisStore:
        """The account's breaker state in one key, ``npl-agi:breaker:<lock name>``: shared by every
        PBX on this Redis."""
        from npl_agi.backends.breaker_store import RedisStore
        from npl_agi.backends.locks import lock_name

        return RedisStore(self.client, f"{REDIS_PREFIX}breaker:{lock_name(api.url, api.user).removesuffix('.lock')}")

    def account_lock(self, api: ApiConfig) -> RedisLock:
        """The account lock in Redis, shared by every PBX using this Redis."""
        from npl_agi.backends.locks import lock_directory
        from npl_agi.backends.redis_lock import RedisLock

        return RedisLock(self, api._replace(lock_dir=lock_directory(api, self.cfg)))

    def _scan(self) -> Iterator[str]:
        return self.client().scan_iter(match=self.key("*"), count=1000)

    def stats(self) -> dict:
        r = self.client()
        keys = list(self._scan())
        stored = [float(f[4]) for v in (r.mget(keys) if keys else []) if (f := _fields(v))]
        counters = r.hgetall(f"{REDIS_PREFIX}counters")
        return _stats(
            self.name, _without_password(self.cfg.redis_url), len(stored), min(stored, default=None), counters
        )

    def purge(self, msisdns: list[str] | None = None) -> int:
        r = self.client()
        if msisdns is None:
            keys = list(self._scan())
            stale = list(r.scan_iter(match=self.stale_key("*"), count=1000))
        else:
            keys, stale = [self.key(m) for m in msisdns], [self.stale_key(m) for m in msisdns]
        if stale:
            r.delete(*stale)
        return r.delete(*keys) if keys else 0

    def export(self) -> Iterator[dict]:
        """Live entries by msisdn. The keys are read now, so a Redis that is down fails before any output."""
        r = self.client()
        return self._exported(r, sorted(self._scan()))

    def _exported(self, r, keys: list[str]) -> Iterator[dict]:
        for key in keys:
            fields, left_ms = _fields(r.get(key)), r.pttl(key)
            if fields and left_ms > 0:
                mccmnc, msc, imsi, error, stored = fields
                msisdn = key.rsplit(":", 1)[1]
                yield {
                    **_answer(msisdn, mccmnc, msc, imsi, error).as_dict(),
                    "stored": float(stored),
                    "expires": self.clock() + left_ms / 1000,
                }
