"""The lookup cache: SQLite on one PBX (the default), Redis for a cluster, or none.

What is kept: network answers for ``ttl`` (portability changes take days), permanent
per-number errors (``ERR1``, ``ERR11``, ``ERR13``, ``ERR21``) for ``error_ttl``, and nothing
transient. A cache is an optimisation, never a dependency: any failure (locked, corrupt,
read-only or missing file, Redis down or slow) is logged once and the lookup goes on uncached.

The backend also provides the account lock, because it knows the lock's scope: a file lock for
one machine, a Redis lock when several machines share the account through one Redis.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from . import log, protocol
from .config import ApiConfig, CacheConfig, Config
from .errors import LockUnavailable, LookupTimeout
from .protocol import Answer

# The locks are imported where they are taken: a cache hit takes none. typing.TYPE_CHECKING would
# import typing, which a hit does not use either.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from .locks import AccountLock
    from .recent import Recent

PERMANENT_ERRORS = frozenset({"ERR1", "ERR11", "ERR13", "ERR21"})
SQLITE_BUSY_TIMEOUT = 0.5  # seconds; a call waits at most this long for another writer
SQLITE_BACKGROUND_BUSY_TIMEOUT = 10.0  # a request finishing in the background can wait to store its answers
SQLITE_FILE_CHECK_EVERY = 1.0  # seconds between checks that the open file is still the one at the path
REDIS_TIMEOUT = 0.25  # seconds per Redis operation: a slow Redis must not slow calls
REDIS_PREFIX = "npl-agi:"


def ttl_for(answer: Answer, cfg: CacheConfig) -> float:
    """How long an answer may be served from the cache; 0 means not at all."""
    if answer.ok and answer.mccmnc:
        return cfg.ttl
    if answer.error in PERMANENT_ERRORS:
        return cfg.error_ttl
    return 0.0


def _record(answer: Answer) -> tuple[str, str, str, str]:
    return answer.mccmnc, answer.msc, answer.imsi, answer.error


def _answer(msisdn: str, mccmnc: str, msc: str, imsi: str, error: str) -> Answer:
    if error:
        return protocol.failed(msisdn, error, source="cache")
    return Answer(msisdn, mccmnc=mccmnc, msc=msc, imsi=imsi, source="cache")


class Cache:
    """No cache at all (``backend = none``); the base of the real backends.

    Public methods never raise: a backend error disables the backend for ``retry_after``
    seconds after one log line (for the rest of the process by default: an AGI script lives for
    one call). The FastAGI server sets a short first cool-down that doubles with each failed
    probe up to ``retry_longest``, timed by ``timer``; a success starts it again.
    """

    name = "none"
    retry_after = math.inf  # the first cool-down after a failure
    retry_longest = math.inf  # the longest, after failed probes

    def __init__(self, cfg: CacheConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.timer = clock  # times cool-downs and file checks: the server gives its monotonic clock
        self._failures = 0  # failures since the last success
        self.broken = False
        self.recent: Recent | None = None  # the server's first-level cache, read before the backend

    # Seconds one operation may wait for a busy backend, and when no call waits for it.
    longest_wait = 0.0
    background_wait = 0.0

    def _wait(self, deadline: float | None, background: bool = False) -> float:
        """How long one operation may wait: ``longest_wait``, less as the call's ``deadline``
        (``time.monotonic()``) nears; ``background_wait`` when no call waits (a detached request
        storing what it paid for). Arguments of each operation, never attributes: one cache may
        serve concurrent calls."""
        if background:
            return self.background_wait
        if deadline is None:
            return self.longest_wait
        return max(0.0, min(self.longest_wait, deadline - time.monotonic()))

    @property
    def broken(self) -> bool:
        """True while a failed backend is skipped."""
        return self.timer() < self._broken_until

    @broken.setter
    def broken(self, value: bool) -> None:
        if not value:
            self._failures, self._broken_until = 0, -math.inf
            return
        self._failures += 1
        cooldown = min(self.retry_after * 2 ** min(self._failures - 1, 32), self.retry_longest)
        self._broken_until = self.timer() + cooldown
        self.close()  # the probe opens a new connection: the old one may be stuck (read-only, dead socket)

    def get_many(self, msisdns: list[str], *, deadline: float | None = None) -> dict[str, Answer]:
        """The live cached answers among ``msisdns`` (``source = "cache"``); misses are absent."""
        wait = self._wait(deadline)
        return self._with_recent(msisdns, lambda rest: self._safely("read", self._get_many, {}, rest, wait))

    def _with_recent(self, msisdns: list[str], read: Callable[[list[str]], dict]) -> dict[str, Answer]:
        """The answers in ``recent``, then what ``read`` finds of the rest, kept in ``recent``."""
        if self.recent is None:
            return {m: answer for m, (answer, _) in read(msisdns).items()}
        found = self.recent.get_many(msisdns)
        rest = [m for m in msisdns if m not in found]
        if rest or not msisdns:  # an empty read still opens the backend (the server's start makes the file)
            hits = read(rest)
            self.recent.put_many(hits.values())
            found.update((m, answer) for m, (answer, _) in hits.items())
        return found

    def record(self, hits: int, misses: int, *, deadline: float | None = None) -> None:
        """Count hits and misses (for ``npl-agi cache stats``).

        Best effort and quiet: during a burst the file is busy with other calls' writes, and a
        counter is not worth a call's time or a warning (answers are; see ``put_many``).
        """
        if (hits or misses) and not self.broken:
            try:
                self._record(hits, misses, self._wait(deadline))
            except Exception:
                self._record_failed()

    def _record_failed(self) -> None:
        """A counter that could not be written (a busy file): nothing to say or do."""

    def get_stale_many(self, msisdns: list[str], *, deadline: float | None = None) -> dict[str, Answer]:
        """Network answers among ``msisdns`` whose entry expired less than ``stale_ttl`` ago.

        For a service that is failing: a known number keeps its route (``source = "stale"``).
        """
        return self._safely("read", self._get_stale_many, {}, msisdns, self._wait(deadline))

    def put_many(self, answers: list[Answer], *, deadline: float | None = None, background: bool = False) -> None:
        """Keep what deserves keeping (see ``ttl_for``); the rest is dropped silently."""
        now = self.clock()
        rows = [(a, now, now + ttl) for a in answers if (ttl := ttl_for(a, self.cfg)) > 0]
        if rows and self.recent is not None:
            self.recent.put_many((_answer(a.msisdn, *_record(a)), expires) for a, _, expires in rows)
        if rows:
            self._safely("write", self._put_many, None, rows, self._wait(deadline, background))

    def account_lock(self, api: ApiConfig) -> AccountLock | RedisLock:
        """The lock that keeps the account to one connection across this cache's scope."""
        from .locks import AccountLock

        fallback = self.cfg.lock_fallback != "none"
        return AccountLock(lock_directory(api, self.cfg), api.url, api.user, fallback=fallback)

    def _safely(self, what: str, work, fallback, *args):
        if self.broken:
            return fallback
        try:
            done = work(*args)
        except Exception as e:  # whatever a cache does wrong, the call goes on
            self.broken = True
            log.warning("cache %s failed, continuing without the %s cache: %s", what, self.name, _short(e))
            return fallback
        self._failures = 0
        return done

    def close(self) -> None:
        """Let go of the backend's connection. Before a fork: an SQLite connection must never be
        carried into a child process, where its locks and WAL index would be shared unknowingly."""

    # -- overridden by the backends; ``wait`` is the operation's (see ``_wait``) --
    def _get_many(self, msisdns: list[str], wait: float) -> dict[str, tuple[Answer, float]]:
        """The live answers with when each expires (``clock`` seconds)."""
        return {}

    def _get_stale_many(self, msisdns: list[str], wait: float) -> dict[str, Answer]:
        return {}

    def _put_many(self, rows: list[tuple[Answer, float, float]], wait: float) -> None:
        pass

    def _record(self, hits: int, misses: int, wait: float) -> None:
        pass

    def stats(self) -> dict:
        """Entries, hits, misses and credits saved (``npl-agi cache stats``); may raise."""
        return {"backend": self.name}

    def purge(self, msisdns: list[str] | None = None) -> int:
        """Delete these numbers' entries, or all; the number of live entries deleted. May raise."""
        return 0

    def export(self) -> Iterator[dict]:
        """Every live entry as a dict (``npl-agi cache export``); may raise."""
        return iter(())


def lock_directory(api: ApiConfig, cfg: CacheConfig) -> str:
    """``[api] lock_dir``, else the cache's directory; made (like the cache's) when missing.

    A directory of npl-agi's own that Asterisk and the admin share, not the system's /tmp.
    A directory that cannot be made is left to the lock, which falls back to the temp dir.
    """
    path = api.lock_dir or os.path.dirname(os.path.abspath(cfg.path))
    with suppress(OSError):
        shared_directory(path)
    return path


def _short(e: BaseException) -> str:
    return f"{e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}".rstrip(": ")


class SqliteCache(Cache):
    """One SQLite file shared by every AGI process on the machine (WAL, short busy timeout)."""

    name = "sqlite"
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS answers (
            msisdn TEXT PRIMARY KEY, mccmnc TEXT, msc TEXT, imsi TEXT, error TEXT,
            stored REAL NOT NULL, expires REAL NOT NULL);
        CREATE INDEX IF NOT EXISTS answers_expires ON answers(expires);
        CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value REAL NOT NULL);
        INSERT OR IGNORE INTO counters VALUES ('created', strftime('%s','now')), ('hits', 0), ('misses', 0);
    """

    announce_replaced = True  # warn when the file under the path is not the one open
    longest_wait = SQLITE_BUSY_TIMEOUT
    background_wait = SQLITE_BACKGROUND_BUSY_TIMEOUT

    def __init__(self, cfg: CacheConfig, clock: Callable[[], float] = time.time) -> None:
        super().__init__(cfg, clock)
        self._db = None
        self._busy_ms = -1  # the connection's busy timeout as last set
        self._opened: tuple[int, int] | None = None  # st_dev, st_ino of the file open
        self._next_check = -math.inf

    def close(self) -> None:
        db, self._db = self._db, None
        self._busy_ms = -1
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()

    def _conn(self, create: bool = True, wait: float = SQLITE_BUSY_TIMEOUT):
        """The open database, waiting at most ``wait`` seconds for another writer; ``None`` if
        it does not exist and ``create`` is false.

        Admin commands do not create it. When a lookup as root does, the file still belongs to
        the directory's owner and group (see ``create_shared_file``), so Asterisk can write it.
        """
        if self._db is not None and self._replaced():
            self.close()
        if self._db is None:
            import sqlite3

            path = self.cfg.path
            if not create and not os.path.exists(path):
                return None
            shared_directory(os.path.dirname(path) or ".")
            if not os.path.exists(path):
                create_shared_file(path)
            db = sqlite3.connect(path, timeout=wait, isolation_level=None)
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'counters'").fetchone():
                    db.executescript(self.SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
            self._opened = _identity(path)
            self._next_check = self.timer() + SQLITE_FILE_CHECK_EVERY
        # Another process's write makes us wait, but never past the call's deadline.
        busy_ms = int(wait * 1000)
        if busy_ms != self._busy_ms:
            self._db.execute(f"PRAGMA busy_timeout = {busy_ms}")
            self._busy_ms = busy_ms
        return self._db

    def _replaced(self) -> bool:
        """Whether the path no longer names the file open (deleted, or another file moved there),
        checked at most every ``SQLITE_FILE_CHECK_EVERY`` seconds. A long-lived process would
        otherwise go on storing what it paid for in a file that nobody else can read."""
        now = self.timer()
        if now < self._next_check:
            return False
        self._next_check = now + SQLITE_FILE_CHECK_EVERY
        if _identity(self.cfg.path) == self._opened:
            return False
        if self.announce_replaced:
            log.warning("cache file %s was deleted or replaced while open, opening it again", self.cfg.path)
        return True

    @contextmanager
    def _writing(self, wait: float = SQLITE_BUSY_TIMEOUT) -> Iterator:
        """One write transaction: others see all of it or none, and it takes the lock once."""
        db = self._conn(wait=wait)
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _get_many(self, msisdns: list[str], wait: float) -> dict[str, tuple[Answer, float]]:
        rows = self._select("expires > ?", [self.clock()], msisdns, wait)
        return {row[0]: (_answer(*row[:5]), row[5]) for row in rows}

    def _select(self, where: str, params: list, msisdns: list[str], wait: float) -> Iterator[tuple]:
        """The answer rows of ``msisdns`` that match ``where`` (500 placeholders a query)."""
        db = self._conn(wait=wait)
        for start in range(0, len(msisdns), 500):
            part = msisdns[start : start + 500]
            marks = ",".join("?" * len(part))
            yield from db.execute(
                f"SELECT msisdn, mccmnc, msc, imsi, error, expires FROM answers WHERE {where} AND msisdn IN ({marks})",  # noqa: S608 - placeholders only
                [*params, *part],
            )

    def _record(self, hits: int, misses: int, wait: float) -> None:
        with self._writing(wait) as db:
            db.executemany("UPDATE counters SET value = value + ? WHERE name = ?", [(hits, "hits"), (misses, "misses")])

    def _put_many(self, rows: list[tuple[Answer, float, float]], wait: float) -> None:
        with self._writing(wait) as db:
            db.executemany(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(a.msisdn, *_record(a), stored, expires) for a, stored, expires in rows],
            )
            # Expired entries stay for stale_ttl: get_stale_many serves them while the service fails.
            db.execute("DELETE FROM answers WHERE expires <= ?", (self.clock() - self.cfg.stale_ttl,))

    def _get_stale_many(self, msisdns: list[str], wait: float) -> dict[str, Answer]:
        now = self.clock()
        where = "expires <= ? AND expires > ? AND error = '' AND mccmnc != ''"
        rows = self._select(where, [now, now - self.cfg.stale_ttl], msisdns, wait)
        return {row[0]: _answer(*row[:5])._replace(source="stale") for row in rows}

    def stats(self) -> dict:
        db = self._conn(create=False)
        if db is None:
            return _stats(self.name, self.cfg.path, 0, None, {})
        now = self.clock()
        counters = dict(db.execute("SELECT name, value FROM counters"))
        entries, oldest = db.execute("SELECT count(*), min(stored) FROM answers WHERE expires > ?", (now,)).fetchone()
        path = self.cfg.path
        sharer, unwritable = sharing_problems(os.path.dirname(path) or ".", [path, f"{path}-wal", f"{path}-shm"])
        return {**_stats(self.name, path, entries, oldest, counters), "shared_with": sharer, "unwritable": unwritable}

    def purge(self, msisdns: list[str] | None = None) -> int:
        """Delete entries; the count is of live ones, as ``stats`` counts them."""
        if self._conn(create=False) is None:
            return 0
        with self._writing() as db:
            db.execute("DELETE FROM answers WHERE expires <= ?", (self.clock(),))
            if msisdns is None:
                return db.execute("DELETE FROM answers").rowcount
            return sum(db.execute("DELETE FROM answers WHERE msisdn = ?", (m,)).rowcount for m in msisdns)

    def export(self) -> Iterator[dict]:
        """Live entries by msisdn. The query runs now, so a broken file fails before any output."""
        db = self._conn(create=False)
        if db is None:
            return iter(())
        rows = db.execute(
            "SELECT msisdn, mccmnc, msc, imsi, error, stored, expires FROM answers WHERE expires > ? ORDER BY msisdn",
            (self.clock(),),
        )
        return (
            {**_answer(msisdn, mccmnc, msc, imsi, error).as_dict(), "stored": stored, "expires": expires}
            for msisdn, mccmnc, msc, imsi, error, stored, expires in rows
        )


def _identity(path: str) -> tuple[int, int] | None:
    """The file a path names (device, inode), or None when there is none. Taken when the
    database is opened: sqlite3 does not give its file descriptor for an ``fstat``."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


SHARED_DIR_MODE = 0o2770  # setgid: what is created inside takes the directory's group
SHARED_FILE_MODE = 0o660
ASTERISK_USER = "asterisk"


def shared_directory(path: str) -> None:
    """Make the directory of the cache or the lock, for every user of its group, whatever the umask.

    Setgid, so files created in it get its group (Asterisk's, when install.sh made it). Made
    by root, it takes the owner and group of its parent (e.g. /var/lib/asterisk).
    """
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, SHARED_DIR_MODE)
    except FileExistsError:
        return
    if os.geteuid() == 0:
        above = os.stat(parent)
        os.chown(path, above.st_uid, above.st_gid)
    os.chmod(path, SHARED_DIR_MODE)  # mkdir's mode passed through the umask; chown cleared setgid


def create_shared_file(path: str) -> None:
    """Create an empty file mode 0660 whatever the umask; made by root, it gets the directory's
    owner and group, so the Asterisk user can still write it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, SHARED_FILE_MODE)
    except FileExistsError:  # another process was first
        return
    try:
        if os.geteuid() == 0:
            above = os.stat(os.path.dirname(os.path.abspath(path)))
            os.fchown(fd, above.st_uid, above.st_gid)
        os.fchmod(fd, SHARED_FILE_MODE)
    finally:
        os.close(fd)


def sharing_problems(directory: str, files: list[str]) -> tuple[str, list[str]]:
    """Who must be able to write the cache, and what they could not write.

    That is the user ``asterisk`` when it exists, else any member of the directory's group.
    Each problem names the path, its owner, group and mode.
    """
    import grp
    import pwd

    try:
        user = pwd.getpwnam(ASTERISK_USER)
    except KeyError:
        user = None
    try:
        top = os.stat(directory)
    except OSError as e:
        return ASTERISK_USER, [f"{directory}: {e.strerror}"]
    if user is not None:
        sharer, uid = ASTERISK_USER, user.pw_uid
        gids = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if ASTERISK_USER in g.gr_mem}
    else:
        sharer, uid, gids = f"group {_group_name(top.st_gid)}", -1, {top.st_gid}
    if uid == 0:
        return sharer, []
    problems = []
    for path, need in [(directory, 0o3), *((f, 0o2) for f in files)]:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if st.st_uid == uid:
            bits = st.st_mode >> 6
        elif st.st_gid in gids:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        if bits & need != need:
            owner = f"{_user_name(st.st_uid)}:{_group_name(st.st_gid)}"
            problems.append(f"{path} ({owner} {st.st_mode & 0o7777:04o})")
    return sharer, problems


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _stats(backend: str, where: str, entries: int, oldest: float | None, counters: dict) -> dict:
    hits, misses = int(counters.get("hits", 0)), int(counters.get("misses", 0))
    return {
        "backend": backend,
        "location": where,
        "entries": entries,
        "oldest": oldest,
        "since": float(counters["created"]) if counters.get("created") else None,
        "hits": hits,
        "misses": misses,
        "hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
        "credits_saved": hits,
    }


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
    longest_wait = background_wait = REDIS_TIMEOUT

    def __init__(self, cfg: CacheConfig, clock: Callable[[], float] = time.time) -> None:
        super().__init__(cfg, clock)
        self._redis = None

    def close(self) -> None:
        """Make the next operation use a new client. The old one is dropped, not closed: an
        account lock taken through it goes on renewing its lease on its connection."""
        self._redis = None

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

    @staticmethod
    def key(msisdn: str) -> str:
        """The Redis key of a number's answer, under the shared ``npl-agi:`` prefix."""
        return f"{REDIS_PREFIX}answer:{msisdn}"

    @staticmethod
    def stale_key(msisdn: str) -> str:
        """A network answer's second copy, kept ``stale_ttl`` longer for ``get_stale_many``."""
        return f"{REDIS_PREFIX}stale:{msisdn}"

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
        self.broken = True

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

    def account_lock(self, api: ApiConfig) -> RedisLock:
        """The account lock in Redis, shared by every PBX using this Redis."""
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
        from .locks import AccountLock, FallbackRecord, lock_name

        self.cache = cache
        self.name = f"{REDIS_PREFIX}lock:{lock_name(api.url, api.user)}"
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
        from .locks import wait_for

        if not self.cache.broken:
            try:
                # thread_local=False: the renewing thread must see the token this thread got
                lock = self.cache.client().lock(self.name, timeout=self.LEASE, thread_local=False)
                wait_for(lambda: lock.acquire(blocking=False), deadline, "held in Redis by another lookup")
            except LookupTimeout:
                raise
            except Exception as e:  # Redis down, slow or misconfigured
                self.cache.broken = True
                self._fall_back(_short(e))
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
            self._renewer.join(2 * REDIS_TIMEOUT)
        try:
            held.release()
        except LockError as e:  # its lease ran out: another PBX may have connected meanwhile
            log.warning("Redis lock had expired before its release: %s", _short(e))
        except Exception as e:  # Redis gone: one line for it, and no more Redis in this process
            if not self.cache.broken:
                self.cache.broken = True
                log.warning(
                    "Redis lost while holding the account lock, continuing without the redis cache: %s", _short(e)
                )


BACKENDS = {"none": Cache, "sqlite": SqliteCache, "redis": RedisCache}


def open_cache(config: Config) -> Cache:
    """The backend the configuration names; opening is lazy, so this never fails a call."""
    return BACKENDS[config.cache.backend](config.cache)
