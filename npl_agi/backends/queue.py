"""The queue of waiting numbers, as the backends keep it: one row per number a call waits for.

A row is keyed by the number's plain readings (``number.normalise``, comma separated): the
waiting call has not validated it (that needs phonenumbers, which only the asker loads). It
holds the latest deadline of the calls waiting for it, whether it is fresh, the token of the
asker that claimed it (``slots``), the canonical number the asker made of it, and its result:
the answer, or the per-number failure, as one line of tab-separated fields.

Rows are claimed oldest first. A row whose asker no longer holds its slot goes back to the
queue; a row nobody can wait for any more (its deadline is too near to send a request) is
dropped unasked; a finished row is kept ``KEEP_DONE`` seconds past its deadline, for its callers
to read. A row another writer left malformed is dropped and reported, never asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from npl_agi import log
from npl_agi.core.codes import SERVICE_FAILURES
from npl_agi.core.protocol import Answer

KEEP_DONE = 5.0  # seconds a finished row outlives its deadline
MAX_READINGS = 2  # normalise gives one reading, or two for a number dialled with no prefix
_FIELDS = len(Answer._fields)

Alive = Callable[[str], bool]


def key_of(readings: Iterable[str]) -> str:
    return ",".join(readings)


def readings_of(key: str) -> tuple[str, ...] | None:
    """The readings a key holds, or None for a key no call could have queued."""
    readings = tuple(key.split(","))
    if not 1 <= len(readings) <= MAX_READINGS:
        return None
    if not all(r.isascii() and r.isdigit() and 7 <= len(r) <= 15 for r in readings):
        return None
    return readings


def encode(answer: Answer) -> str:
    """One answer as a row's result: its fields, tab separated, with no tab or line break inside."""
    return "\t".join(str(f).replace("\t", " ").replace("\n", " ").replace("\r", " ") for f in answer)


def decode(text: str) -> Answer | None:
    """A row's result, or None for one that is not what ``encode`` writes."""
    fields = text.split("\t")
    if len(fields) != _FIELDS:
        return None
    answer = Answer(*fields)
    if answer.msisdn and not (answer.msisdn.isascii() and answer.msisdn.isdigit()):
        return None
    if answer.mccmnc and not (answer.mccmnc.isascii() and answer.mccmnc.isdigit() and len(answer.mccmnc) in (5, 6)):
        return None
    return answer


def reusable(result: str, fresh: bool) -> bool:
    """Can a finished row's result answer a new call? Not a service failure (the new call asks
    again), and never a fresh call's: it reads no answer kept from before it (a request still
    in flight for its number answers it, though)."""
    answer = decode(result)
    return not fresh and answer is not None and answer.error not in SERVICE_FAILURES


def report_malformed(what: str, count: int) -> None:
    if count:
        log.warning("queue of waiting numbers: %d malformed %s ignored (another writer's?)", count, what)


class SqliteQueue:
    """The queue as a table of the SQLite cache file, shared by every process of the PBX.

    Every change is one ``BEGIN IMMEDIATE`` transaction, so two askers never claim one row.
    Methods may raise: the caller (``waiting``) falls back to asking alone.
    """

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS waiting (
            key TEXT PRIMARY KEY, queued REAL NOT NULL, deadline REAL NOT NULL, fresh INTEGER NOT NULL,
            asker TEXT NOT NULL, msisdn TEXT NOT NULL, result TEXT NOT NULL) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS waiting_msisdn ON waiting(msisdn);
        CREATE INDEX IF NOT EXISTS waiting_queued ON waiting(queued);
    """

    def __init__(self, cache) -> None:
        """``cache``: the ``SqliteCache`` whose file (and connection) the queue shares."""
        self.cache = cache

    def enqueue(self, items: dict[str, tuple[float, bool]], most: int, now: float, wait: float) -> set[str]:
        """Queue each key (deadline, fresh) unless it is queued or in flight already (its
        deadline is then the later one). Returns the keys refused because ``most`` numbers are
        waiting already: more than the next requests can carry."""
        refused: set[str] = set()
        with self.cache._writing(wait) as db:
            db.execute("DELETE FROM waiting WHERE deadline < ? AND (result != '' OR asker = '')", (now - KEEP_DONE,))
            waiting = db.execute("SELECT count(*) FROM waiting WHERE asker = '' AND result = ''").fetchone()[0]
            for n, (key, (deadline, fresh)) in enumerate(items.items()):
                row = db.execute("SELECT result FROM waiting WHERE key = ?", (key,)).fetchone()
                if row is not None and (not row[0] or reusable(row[0], fresh)):
                    db.execute(
                        "UPDATE waiting SET deadline = max(deadline, ?), fresh = max(fresh, ?) WHERE key = ?",
                        (deadline, int(fresh), key),
                    )
                elif waiting >= most:
                    refused.add(key)
                else:
                    queued = now + n * 1e-6  # a call's numbers are asked in the order given
                    db.execute(
                        "INSERT OR REPLACE INTO waiting VALUES (?, ?, ?, ?, '', '', '')",
                        (key, queued, deadline, int(fresh)),
                    )
                    waiting += 1
        return refused

    def peek(self, keys: list[str], wait: float) -> dict[str, tuple[str, str, str]]:
        """Each key's row as (asker, msisdn, result); a key with no row is absent."""
        db, found = self.cache._conn(wait=wait), {}
        for start in range(0, len(keys), 500):  # 500 placeholders a statement
            part = keys[start : start + 500]
            query = f"SELECT key, asker, msisdn, result FROM waiting WHERE key IN ({','.join('?' * len(part))})"  # noqa: S608 - placeholders only
            found.update((row[0], row[1:]) for row in db.execute(query, part))
        return found

    def in_flight(self, wait: float) -> bool:
        """Is any number claimed by an asker and not answered yet?"""
        db = self.cache._conn(wait=wait)
        return db.execute("SELECT 1 FROM waiting WHERE asker != '' AND result = '' LIMIT 1").fetchone() is not None

    def claim(self, token: str, most: int, now: float, floor: float, alive: Alive, wait: float) -> list[tuple]:
        """Up to ``most`` waiting rows, oldest first, claimed for the asker ``token``: (key,
        deadline, fresh). The rows of askers that are gone are waiting again first; rows nobody
        can wait for any more are dropped."""
        with self.cache._writing(wait) as db:
            askers = [a for (a,) in db.execute("SELECT DISTINCT asker FROM waiting WHERE asker != '' AND result = ''")]
            for gone in (a for a in askers if a != token and not alive(a)):
                db.execute("UPDATE waiting SET asker = '', msisdn = '' WHERE asker = ? AND result = ''", (gone,))
            db.execute("DELETE FROM waiting WHERE asker = '' AND result = '' AND deadline < ?", (now + floor,))
            rows = db.execute(
                "SELECT key, deadline, fresh FROM waiting WHERE asker = '' AND result = '' ORDER BY queued LIMIT ?",
                (most,),
            ).fetchall()
            bad = [key for key, *_ in rows if readings_of(key) is None]
            db.executemany("DELETE FROM waiting WHERE key = ?", [(k,) for k in bad])
            rows = [(key, deadline, bool(fresh)) for key, deadline, fresh in rows if key not in bad]
            db.executemany("UPDATE waiting SET asker = ? WHERE key = ?", [(token, key) for key, *_ in rows])
        report_malformed("rows", len(bad))
        return rows

    def assign(self, token: str, msisdn_of: dict[str, str], fresh: dict[str, bool], wait: float) -> list[str]:
        """Record each claimed key's canonical number; returns the numbers to ask. A number
        another live asker is asking already is not asked twice: the key follows that asker
        (and goes back to the queue with its rows if it dies). A number answered lately in
        another row takes that answer."""
        ask: dict[str, None] = {}
        with self.cache._writing(wait) as db:
            for key, msisdn in msisdn_of.items():
                done = db.execute(
                    "SELECT result FROM waiting WHERE msisdn = ? AND result != '' AND key != ?", (msisdn, key)
                ).fetchall()
                result = next((r for (r,) in done if reusable(r, fresh.get(key, False))), "")
                other = db.execute(
                    "SELECT asker FROM waiting WHERE msisdn = ? AND result = '' AND asker NOT IN ('', ?) LIMIT 1",
                    (msisdn, token),
                ).fetchone()
                if result:
                    db.execute("UPDATE waiting SET msisdn = ?, result = ? WHERE key = ?", (msisdn, result, key))
                elif other is not None:
                    db.execute("UPDATE waiting SET msisdn = ?, asker = ? WHERE key = ?", (msisdn, other[0], key))
                else:
                    db.execute("UPDATE waiting SET msisdn = ? WHERE key = ?", (msisdn, key))
                    ask[msisdn] = None
        return list(ask)

    def publish(self, by_msisdn: Iterable[Answer], by_key: dict[str, Answer], wait: float) -> None:
        """The results: each answer for every unfinished row of its number, and answers for
        keys (numbers refused before any request, answers found without one)."""
        rows = [(encode(a), a.msisdn) for a in by_msisdn]
        keyed = [(encode(a), a.msisdn, k) for k, a in by_key.items()]
        if not rows and not keyed:
            return
        with self.cache._writing(wait) as db:
            db.executemany("UPDATE waiting SET result = ? WHERE msisdn = ? AND result = ''", rows)
            db.executemany("UPDATE waiting SET result = ?, msisdn = ? WHERE key = ?", keyed)

    def unclaim(self, token: str, wait: float) -> None:
        """An asker giving up: its unfinished rows wait for the next."""
        with self.cache._writing(wait) as db:
            db.execute("UPDATE waiting SET asker = '', msisdn = '' WHERE asker = ? AND result = ''", (token,))
