"""The floor of ``npl-agi local import``: the least a script can do to store the same rows.

``local_floor.py sqlite FILE DB``: each ``number,mccmnc`` line of FILE into a table of the
shape npl-agi keeps numbers you know in (the number an INTEGER PRIMARY KEY, the network, a
note), by ``executemany`` in one transaction; a line ``number,-`` deletes the number.
``local_floor.py redis FILE URL KEY``: the same rows into a hash as npl-agi holds them
(number -> ``mccmnc,note``), HSETs of 1000 fields sent by a redis-py pipeline; ``-`` HDELs.

Nothing is checked, nothing staged, nothing swapped: what is left of an import's time after
this is what npl-agi adds.
"""

import itertools
import sys

CHUNK = 20_000  # rows read at a time: memory bounded, as npl-agi's is
FIELDS = 1000  # fields an HSET


def chunks(path: str):
    """The file's rows, ``CHUNK`` at a time, each split into (stored, removed)."""
    with open(path) as f:
        while part := list(itertools.islice(f, CHUNK)):
            rows = [line.rstrip("\n").split(",")[:2] for line in part]
            yield [r for r in rows if r[1] != "-"], [r[0] for r in rows if r[1] == "-"]


def into_sqlite(path: str, db: str) -> None:
    import sqlite3

    con = sqlite3.connect(db)
    columns = "number INTEGER PRIMARY KEY, mccmnc TEXT NOT NULL, note TEXT NOT NULL"
    con.execute(f"CREATE TABLE IF NOT EXISTS known_numbers ({columns})")
    with con:
        for stored, removed in chunks(path):
            con.executemany("INSERT OR REPLACE INTO known_numbers VALUES (?, ?, '')", stored)
            con.executemany("DELETE FROM known_numbers WHERE number = ?", ((n,) for n in removed))
    con.close()


def into_redis(path: str, url: str, key: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for stored, removed in chunks(path):
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(stored), FIELDS):
            pipe.hset(key, mapping={n: f"{m}," for n, m in stored[i : i + FIELDS]})
        for i in range(0, len(removed), FIELDS):
            pipe.hdel(key, *removed[i : i + FIELDS])
        pipe.execute()
    client.close()


if __name__ == "__main__":
    if sys.argv[1] == "sqlite":
        into_sqlite(sys.argv[2], sys.argv[3])
    else:
        into_redis(sys.argv[2], sys.argv[3], sys.argv[4])
