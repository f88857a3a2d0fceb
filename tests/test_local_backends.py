"""The admin's own data at national scale, as each backend keeps it: ``load_local`` (add,
replace, delta), ``FROM-TO`` blocks, the sizes ``local_size`` reports, run against real SQLite
files and a real redis-server.

Concurrency is paced, never slept: a load's chunks are handed over only once a reader or a
writer in another thread has done one more step, so every step of the load meets them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from npl_agi.backends import RedisCache, SqliteCache
from npl_agi.backends import sqlite_local as tables
from npl_agi.backends.base import KNOWN_NUMBERS, RANGES
from npl_agi.backends.local_load import check_blocks, parts, split
from npl_agi.backends.queue import SqliteQueue
from npl_agi.backends.sqlite import _KNOWN
from npl_agi.config import CacheConfig
from npl_agi.core.protocol import Answer

pytest_plugins = ("redis_fixture",)

NOW = 1_700_000_000.0
STEP = 30.0  # seconds a paced step may take before the test gives up: a failure, not a sleep
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    """Makes one cache of the backend per call, all on the same file or Redis: each is one
    process (or machine) of the PBX."""
    if request.param == "sqlite":
        cfg = CacheConfig(path=str(tmp_path / "cache.sqlite"))
        return lambda: SqliteCache(cfg, clock=lambda: NOW)
    cfg = CacheConfig(backend="redis", redis_url=request.getfixturevalue("redis_server").url)
    return lambda: RedisCache(cfg, clock=lambda: NOW)


def numbers(start: int, count: int, mccmnc: str = "23415", note: str = "") -> list[tuple[str, str, str]]:
    return [(str(start + i), mccmnc, note) for i in range(count)]


def chunked(rows: list, size: int = 5000) -> list[list]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def items(cache) -> list[tuple[str, str, str]]:
    return list(cache.local_items(KNOWN_NUMBERS))


def leftovers(cache) -> list[str]:
    """The tables or keys a load keeps beside the live ones: none once it is over."""
    if isinstance(cache, SqliteCache):
        names = [name for (name,) in cache._conn().execute("SELECT name FROM sqlite_master")]
    else:
        names = cache.admin_client().keys("npl-agi:local:*")
    return sorted(name for name in names if name.endswith(("_staged", "_old", ":staged", ":old")))


# -- round trips --


def test_add_replace_and_delta_round_trip(backend):
    cache = backend()
    first = [("447700900001", "23415", "Sales, 2nd floor"), ("447700900002", "23410", ""), ("4477009003", "23430", "")]
    assert cache.load_local(KNOWN_NUMBERS, [first[:2], first[2:]]) == 3
    assert items(cache) == sorted(first)
    assert cache.load_local(KNOWN_NUMBERS, [[("447700900002", "23420", "moved")]], mode="add") == 1
    assert cache.get_local_many(KNOWN_NUMBERS, ["447700900001", "447700900002", "447700900009"]) == {
        "447700900001": "23415",
        "447700900002": "23420",
    }
    delta = [("447700900001", "-", ""), ("447700900004", "23410", "new"), ("447700900099", "-", "")]
    assert cache.load_local(KNOWN_NUMBERS, [delta], mode="delta") == 3
    assert items(cache) == [
        ("447700900002", "23420", "moved"),
        ("447700900004", "23410", "new"),
        ("4477009003", "23430", ""),
    ]
    assert cache.load_local(KNOWN_NUMBERS, [[("447700900777", "23415", "")]], mode="replace") == 1
    assert items(cache) == [("447700900777", "23415", "")]
    assert cache.load_local(KNOWN_NUMBERS, [[("447700900778", "23410", "")]], mode="replace") == 1
    assert items(cache) == [("447700900778", "23410", "")]
    assert cache.load_local(RANGES, [[("4477", "23410", "own")]]) == 1
    assert cache.get_local_many(RANGES, ["4477", "44"]) == {"4477": "23410"}
    assert cache.load_local(RANGES, [[("4477", "-", ""), ("4478", "23415", "")]], mode="delta") == 2
    assert list(cache.local_items(RANGES)) == [("4478", "23415", "")]
    assert items(cache) == [("447700900778", "23410", "")]  # kinds apart
    assert leftovers(cache) == []


def test_the_list_sorts_by_key_as_text_across_lengths_with_blocks_among_numbers(backend):
    cache = backend()
    rows = [
        ("4477009001", "23415", ""),
        ("447700900123", "23410", ""),
        ("44770090012-44770090019", "23430", "block"),
        ("12425551234", "33801", ""),
        ("4477009", "23415", ""),
        ("447700900000-447700900099", "23420", ""),
    ]
    cache.load_local(KNOWN_NUMBERS, [rows])
    assert [key for key, *_ in items(cache)] == sorted(key for key, *_ in rows)


def test_rows_are_checked_again_before_anything_is_stored(backend):
    cache = backend()
    cache.load_local(KNOWN_NUMBERS, [numbers(447700900000, 3)])
    before = items(cache)
    for bad, mode in [
        (("447700900001", "-", ""), "add"),
        (("447700900001", "2341X", ""), "delta"),
        (("0447700900001", "23415", ""), "add"),
        (("4477009000-447700900999", "23415", ""), "add"),
        (("447700900999-447700900000", "23415", ""), "add"),
    ]:
        with pytest.raises(ValueError):
            cache.load_local(KNOWN_NUMBERS, [numbers(447800000000, 10), [bad]], mode=mode)
        assert items(cache) == before
    with pytest.raises(ValueError):
        cache.load_local(KNOWN_NUMBERS, [], mode="merge")
    with pytest.raises(ValueError):
        cache.load_local(RANGES, [[("4477-4478", "23415", "")]])
    assert leftovers(cache) == []


# -- blocks --


def test_a_block_answers_each_number_of_its_length_in_it_and_a_number_held_alone_wins(backend):
    cache = backend()
    cache.load_local(
        KNOWN_NUMBERS,
        [
            [("447700900000-447700900999", "23410", "block"), ("447700900500", "23415", "ported in")],
            [("999999999999990-999999999999999", "90118", "15 digits")],
        ],
    )
    asked = ["447700900000", "447700900999", "447700900500", "447700901000", "447700899999", "44770090050"]
    asked += ["4477009005000", "999999999999995", "999999999999989", "x", "0447700900001"]
    assert cache.get_local_many(KNOWN_NUMBERS, asked) == {
        "447700900000": "23410",
        "447700900999": "23410",
        "447700900500": "23415",
        "999999999999995": "90118",
    }
    assert cache.local_size(KNOWN_NUMBERS)["blocks"] == 2
    assert cache.delete_local(KNOWN_NUMBERS, ["447700900000-447700900999", "447700900500", "1-2", "5-3"]) == 2
    assert cache.get_local_many(KNOWN_NUMBERS, ["447700900000", "447700900500"]) == {}
    assert items(cache) == [("999999999999990-999999999999999", "90118", "15 digits")]


def test_blocks_that_would_overlap_are_refused_naming_both_and_nothing_changes(backend):
    cache = backend()
    cache.load_local(KNOWN_NUMBERS, [[("447700900000-447700900999", "23410", "")]])
    before = items(cache)
    with pytest.raises(ValueError, match="447700900000-447700900999 and 447700900999-447700901999 overlap"):
        cache.load_local(KNOWN_NUMBERS, [[("447700900999-447700901999", "23415", "")]])
    with pytest.raises(ValueError, match="447700900000-447700900009 and 447700900000-447700900999 overlap"):
        cache.load_local(KNOWN_NUMBERS, [[("447700900000-447700900009", "23415", "")]], mode="delta")
    with pytest.raises(ValueError, match="447800000000-447800000010 and 447800000005-447800000006 overlap"):
        cache.load_local(
            KNOWN_NUMBERS,
            [[("447800000000-447800000010", "23415", "")], [("447800000005-447800000006", "23415", "")]],
            mode="replace",
        )
    assert items(cache) == before
    assert leftovers(cache) == []
    # A delta that takes the block away may put smaller ones in its place; the same key changes.
    delta = [
        ("447700900000-447700900999", "-", ""),
        ("447700900000-447700900499", "23415", ""),
        ("447700900500-447700900999", "23410", "again"),
    ]
    cache.load_local(KNOWN_NUMBERS, [delta], mode="delta")
    cache.load_local(KNOWN_NUMBERS, [[("447700900500-447700900999", "23420", "changed")]])
    assert items(cache) == [
        ("447700900000-447700900499", "23415", ""),
        ("447700900500-447700900999", "23420", "changed"),
    ]


def test_the_overlap_guard_reads_loads_as_applied():
    staged = [(10, 19, "23415", ""), (10, 19, "23415", "again"), (30, 39, "-", "")]
    live = [(10, 19, "23410", ""), (20, 29, "23410", ""), (30, 35, "23410", "")]
    assert check_blocks(staged, live) == [(10, 19, "23415", "again")]
    with pytest.raises(ValueError, match="30-35 and 35-40 overlap"):
        check_blocks([(35, 40, "23415", "")], live)
    assert check_blocks([(30, 35, "-", ""), (35, 40, "23415", "")], live) == []


def test_parts_cut_any_chunks_into_parts_of_one_size():
    rows = numbers(447700000000, 23)
    cut = list(parts([rows[:3], [], rows[3:20], rows[20:]], 5))
    assert [len(p) for p in cut] == [5, 5, 5, 5, 3]
    assert [r for p in cut for r in p] == rows
    assert split([("447700900000-447700900009", "-", "")], "delta", blocks=True) == (
        [],
        [(447700900000, 447700900009, "-", "")],
    )


# -- larger loads: every part, page and apply path --


def test_large_adds_and_deltas_match_a_model_of_the_set(backend, monkeypatch):
    """Past ``APPLY_AT_ONCE`` an SQLite add or delta is merged with the live set and swapped in."""
    monkeypatch.setattr(tables, "APPLY_AT_ONCE", 1000)
    monkeypatch.setattr(tables, "COPY_ROWS", 700)
    cache = backend()
    model = {}

    def load(rows, mode):
        cache.load_local(KNOWN_NUMBERS, chunked(rows, 3000), mode=mode)
        for key, mccmnc, note in rows:
            if mccmnc == "-":
                model.pop(key, None)
            else:
                model[key] = (key, mccmnc, note)
        assert items(cache) == [model[k] for k in sorted(model)]

    blocks = [(f"{447900000000 + i * 10}-{447900000000 + i * 10 + 4}", "23430", "") for i in range(6000)]
    load(numbers(447700000000, 12000) + blocks, "add")
    load(numbers(447700006000, 12000, "23410", "changed"), "add")
    load(numbers(447700000000, 500, "23420"), "add")  # small: one transaction
    delta = [(str(447700000000 + i), "-", "") for i in range(0, 18000, 2)] + numbers(447800000000, 3000)
    delta += [(key, "-", "") for key, *_ in blocks[::3]]
    load(delta, "delta")
    assert cache.local_size(KNOWN_NUMBERS)["entries"] == 12000
    assert cache.local_size(KNOWN_NUMBERS)["blocks"] == 4000
    assert leftovers(cache) == []


# -- a swap while calls read --


class Reader(threading.Thread):
    """Reads ``asked`` in a loop, with a cache of its own (another process's), until stopped;
    each read must be one of ``sets`` whole, which ``seen`` records in order."""

    def __init__(self, make_cache, asked: list[str], sets: dict[str, dict[str, str]]) -> None:
        super().__init__(daemon=True)
        self.make_cache, self.asked, self.sets = make_cache, asked, sets
        self.reads, self.seen, self.wrong = 0, [], None
        self.stop = threading.Event()
        self.progress = threading.Condition()

    def run(self) -> None:
        cache = self.make_cache()
        while not self.stop.is_set():
            got = cache.get_local_many(KNOWN_NUMBERS, self.asked)
            which = [name for name, expected in self.sets.items() if got == expected]
            with self.progress:
                if not which:
                    self.wrong = got
                    self.progress.notify_all()
                    return
                if not self.seen or self.seen[-1] != which[0]:
                    self.seen.append(which[0])
                self.reads += 1
                self.progress.notify_all()

    def one_more_read(self) -> None:
        with self.progress:
            done = self.reads
            assert self.progress.wait_for(lambda: self.reads > done or self.wrong is not None, STEP)

    def paced(self, chunks: list[list]):
        """The chunks, each handed over once the reader has read again."""
        for chunk in chunks:
            self.one_more_read()
            yield chunk
        self.one_more_read()

    def finish(self) -> None:
        if self.wrong is None:
            self.one_more_read()
        self.stop.set()
        self.join(STEP)


def national_sets() -> tuple[list, list, list[str], dict[str, dict[str, str]]]:
    """An old set (07700…) and a new one (07800…), numbers and a block each, and what a call
    asking for the first, middle and last of each, and a number in each block, gets from each."""
    old = [*numbers(447700000000, 30000, "23415"), ("447700500000-447700500999", "23410", "")]
    new = [*numbers(447800000000, 30000, "23420"), ("447800500000-447800500999", "23430", "")]
    asked = ["447700000000", "447700015000", "447700029999", "447700500500"]
    asked += ["447800000000", "447800015000", "447800029999", "447800500500"]
    sets = {
        "old": {asked[0]: "23415", asked[1]: "23415", asked[2]: "23415", asked[3]: "23410"},
        "new": {asked[4]: "23420", asked[5]: "23420", asked[6]: "23420", asked[7]: "23430"},
    }
    return old, new, asked, sets


def test_a_replace_while_calls_read_shows_them_the_whole_old_set_or_the_whole_new_one(backend):
    old, new, asked, sets = national_sets()
    loader = backend()
    loader.load_local(KNOWN_NUMBERS, chunked(old))
    reader = Reader(backend, asked, sets)
    reader.start()
    try:
        assert loader.load_local(KNOWN_NUMBERS, reader.paced(chunked(new)), mode="replace") == len(new)
    finally:
        reader.finish()
    assert reader.wrong is None
    assert reader.seen == ["old", "new"]
    assert reader.reads > len(chunked(new))
    assert leftovers(loader) == []


def test_the_reader_catches_a_replace_that_empties_the_set_first(tmp_path):
    """The check above can fail: a load that clears and refills is caught half-way."""
    old, new, asked, sets = national_sets()
    cfg = CacheConfig(path=str(tmp_path / "cache.sqlite"))
    loader = SqliteCache(cfg)
    loader.load_local(KNOWN_NUMBERS, chunked(old))
    reader = Reader(lambda: SqliteCache(cfg), asked, sets)
    reader.start()
    try:
        loader.delete_local(KNOWN_NUMBERS)
        for chunk in reader.paced(chunked(new)):
            loader.load_local(KNOWN_NUMBERS, [chunk])
    finally:
        reader.finish()
    assert reader.wrong is not None


# -- failures part-way --


@pytest.mark.parametrize("mode", ["add", "replace", "delta"])
def test_a_load_failing_part_way_leaves_the_live_set_as_it_was(backend, mode):
    cache = backend()
    cache.load_local(KNOWN_NUMBERS, [numbers(447700000000, 100), [("447700500000-447700500999", "23410", "")]])
    before = items(cache)

    def failing():
        yield numbers(447700000000, 6000, "23420")
        yield [("447700500000-447700500999", "-" if mode == "delta" else "23430", "")]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.load_local(KNOWN_NUMBERS, failing(), mode=mode)
    assert items(cache) == before
    assert leftovers(cache) == []


CRASHING_LOAD = """
import os, sys
from npl_agi.backends import RedisCache, SqliteCache
from npl_agi.backends.base import KNOWN_NUMBERS
from npl_agi.config import CacheConfig

where = sys.argv[1]
if where.startswith("redis"):
    cache = RedisCache(CacheConfig(backend="redis", redis_url=where))
else:
    cache = SqliteCache(CacheConfig(path=where))

def chunks():
    yield [(str(447800000000 + i), "23420", "") for i in range(7000)]
    yield [("447800500000-447800500999", "23430", "")]
    os._exit(3)  # killed half-way: nothing after this runs

cache.load_local(KNOWN_NUMBERS, chunks(), mode="replace")
"""


def test_a_load_killed_part_way_leaves_the_live_set_and_the_next_load_clears_its_rows(backend):
    cache = backend()
    cache.load_local(KNOWN_NUMBERS, [numbers(447700000000, 50)])
    before = items(cache)
    where = cache.cfg.redis_url if isinstance(cache, RedisCache) else cache.cfg.path
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", CRASHING_LOAD, where], env=env, capture_output=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert items(cache) == before
    assert leftovers(cache) != []  # what the killed load staged
    assert cache.load_local(KNOWN_NUMBERS, [numbers(447900000000, 10)], mode="delta") == 10
    assert leftovers(cache) == []
    assert len(items(cache)) == 60


# -- other writers meanwhile (SQLite: one writer at a time) --


def test_calls_storing_answers_wait_for_one_part_of_a_national_load_at_most(tmp_path):
    """A call's write waits ``write_wait`` at most for the file's lock; the load holds it one
    part at a time (staging, swapping, dropping the old set), never for the whole load. Staging
    the 300,000 rows in one transaction instead holds it for longer than that, and fails this."""
    write_wait = 0.2
    cfg = CacheConfig(path=str(tmp_path / "cache.sqlite"))
    loader = SqliteCache(cfg)
    loader.load_local(KNOWN_NUMBERS, chunked(numbers(447700000000, 100_000)))
    writes, failures = [0], []
    progress, stop = threading.Condition(), threading.Event()

    def writer():
        cache = SqliteCache(cfg, clock=lambda: NOW)
        while not stop.is_set():
            answer = Answer(str(447400000000 + writes[0]), mccmnc="23415")
            try:
                cache._put_many([(answer, NOW, NOW + 3600)], write_wait)
            except Exception as e:  # a busy file past the wait: what a call would give up on
                failures.append(e)
            with progress:
                writes[0] += 1
                progress.notify_all()

    def one_more_write():
        with progress:
            done = writes[0]
            assert progress.wait_for(lambda: writes[0] > done, STEP)

    def paced(chunks):
        for chunk in chunks:
            one_more_write()
            yield chunk

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        loader.load_local(KNOWN_NUMBERS, paced(chunked(numbers(447800000000, 300_000))), mode="replace")
        one_more_write()
    finally:
        stop.set()
        thread.join(STEP)
    assert failures == []
    assert writes[0] > 60  # one at least between any two chunks
    assert loader.local_size(KNOWN_NUMBERS)["entries"] == 300_000


# -- sizes --


def test_local_size_counts_entries_and_blocks_and_bytes_per_number_are_sane(backend):
    cache = backend()
    blocks = [(f"{447900000000 + i * 100}-{447900000000 + i * 100 + 9}", "23430", "") for i in range(100)]
    cache.load_local(KNOWN_NUMBERS, [*chunked(numbers(447700000000, 20000)), blocks])
    cache.load_local(RANGES, [[("4477", "23410", ""), ("4478", "23415", "")]])
    size = cache.local_size(KNOWN_NUMBERS)
    assert (size["entries"], size["blocks"]) == (20000, 100)
    assert 10 <= size["bytes"] / 20100 <= 200, size
    assert cache.local_size(RANGES)["entries"] == 2
    cache.delete_local(KNOWN_NUMBERS)
    empty = cache.local_size(KNOWN_NUMBERS)
    assert (empty["entries"], empty["blocks"]) == (0, 0)
    assert empty["bytes"] < 20000  # at most a page or so a table


def test_sqlite_bytes_without_dbstat_are_estimated_close_to_the_measure(tmp_path):
    cache = SqliteCache(CacheConfig(path=str(tmp_path / "cache.sqlite")))
    cache.load_local(KNOWN_NUMBERS, chunked(numbers(447700000000, 50000)))
    measured = cache.local_size(KNOWN_NUMBERS)["bytes"]
    assert 10 * 50000 <= measured <= 40 * 50000
    local = cache._local()
    estimated = local.estimated_bytes(cache._conn(), tables.TABLES_OF[KNOWN_NUMBERS])
    assert 0.8 <= estimated / measured <= 1.5


# -- what a call costs --


def test_a_call_reads_known_numbers_by_index_seeks_only(tmp_path):
    """Nothing in a call's read grows with the numbers held: no table is scanned."""
    cache = SqliteCache(CacheConfig(path=str(tmp_path / "cache.sqlite")))
    db = cache._conn()
    plan = [row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + _KNOWN.format("(?),(?)"), (1, 2))]
    assert [step for step in plan if "known_" in step and not step.startswith("SEARCH")] == [], plan


def test_a_redis_read_is_one_round_trip_whatever_is_held(redis_server):
    cache = RedisCache(CacheConfig(backend="redis", redis_url=redis_server.url))
    cache.load_local(KNOWN_NUMBERS, [numbers(447700000000, 10), [("447700500000-447700500999", "23410", "")]])
    client = cache.client()
    sent, round_trips = [], []
    execute, pipeline = client.execute_command, client.pipeline
    client.execute_command = lambda *args, **kw: sent.append(args[0]) or execute(*args, **kw)

    def counted(*args, **kw):
        pipe = pipeline(*args, **kw)
        run = pipe.execute
        pipe.execute = lambda: round_trips.append([c[0][0] for c in pipe.command_stack]) or run()
        return pipe

    client.pipeline = counted
    got = cache.get_local_many(KNOWN_NUMBERS, ["447700000001", "447700500001", "447700600000"])
    assert got == {"447700000001": "23415", "447700500001": "23410"}
    assert sent == []
    assert round_trips == [["HMGET", "ZREVRANGEBYSCORE", "ZREVRANGEBYSCORE", "ZREVRANGEBYSCORE"]]  # MULTI/EXEC


def test_a_member_another_writer_left_in_the_blocks_is_never_an_answer(redis_server):
    cache = RedisCache(CacheConfig(backend="redis", redis_url=redis_server.url))
    r = redis_server.client()
    r.zadd("npl-agi:local:number:blocks", {"garbage": 447700000000, "4477-4478,23415,": 447700000000})
    r.zadd("npl-agi:local:number:blocks", {"447700000000-447700000009,2341X,": 447700000000})
    assert cache.get_local_many(KNOWN_NUMBERS, ["447700000005", "4477"]) == {}
    # A well-formed member is listed as it is, for the admin to see; "garbage" is not a block.
    assert items(cache) == [("4477-4478", "23415", ""), ("447700000000-447700000009", "2341X", "")]


# -- an earlier version's file --


def test_an_earlier_versions_file_has_its_numbers_and_ranges_moved_once(tmp_path):
    import sqlite3

    path = tmp_path / "cache.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(SqliteCache.SCHEMA)
    db.executescript(SqliteQueue.SCHEMA)
    db.executemany(
        "INSERT INTO local_data VALUES (?, ?, ?, ?)",
        [("number", "447700900001", "23415", "Sales"), ("number", "bad", "23415", ""), ("range", "4477", "23410", "")],
    )
    db.close()
    cache = SqliteCache(CacheConfig(path=str(path)))
    assert items(cache) == [("447700900001", "23415", "Sales")]
    assert list(cache.local_items(RANGES)) == [("4477", "23410", "")]
    assert cache.get_local_many(KNOWN_NUMBERS, ["447700900001"]) == {"447700900001": "23415"}
    cache._conn().executescript(tables.SCHEMA)  # run again (another process opening it at once): no change
    assert items(cache) == [("447700900001", "23415", "Sales")]
    assert cache._conn().execute("SELECT count(*) FROM local_data").fetchone() == (0,)
