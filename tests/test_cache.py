"""The lookup cache against real SQLite files, a real redis-server and the simulator.

What is proved: a cached answer costs no request and no credit; each class of answer lives as
long as it should (success ``ttl``, permanent error ``error_ttl``, transient never); only
misses are asked; many processes can share one SQLite file; a broken cache (corrupt, read-only,
missing, locked, Redis down, killed or hung) never fails a lookup and says so in one log line;
and the account lock holds across machines through Redis, freed by its holder or by expiry.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import write_config

from npl_agi.askers.direct import lookup_here
from npl_agi.backends import REDIS_TIMEOUT, SqliteCache, open_cache
from npl_agi.backends.locks import FallbackRecord, FileLock
from npl_agi.backends.redis_lock import RedisLock
from npl_agi.chain.lookup import Lookup
from npl_agi.config import load_config
from npl_agi.core import protocol
from npl_agi.core.errors import LookupTimeout
from npl_agi.doubles.simulator import Simulator, simulated_answer

pytest_plugins = ("redis_fixture",)

PORTED = "07788450450"  # 447788450450 -> 23415 Vodafone UK
PERMANENT = ["07400000001", "07400000011", "07400000013", "07400000021"]  # ERR1, ERR11, ERR13, ERR21
TRANSIENT = ["07400000029", "07400000036", "07400000077"]  # ERR29, ERR36, and a code npl-agi does not know
SLOW, HANG, TRUNCATE = "07400999901", "07400999902", "07400999903"
SHORT = 0.6  # seconds: a TTL the tests can outlive
LONG = 300.0


def uk(n: int) -> str:
    """A UK mobile number the simulator answers with a home network (not an error, not a fault)."""
    return f"07400{100000 + n:06d}"


def msisdn(dialled: str) -> str:
    return "44" + dialled[1:]


def expected(dialled: str) -> protocol.Answer:
    """What the simulator answers for a number, parsed as the client parses it."""
    return protocol.parse_answer_line(simulated_answer(msisdn(dialled), "2.4"))


def charged(sim: Simulator) -> list[str]:
    return sim.stats()["charged"]


def asked(sim: Simulator) -> list[list[str]]:
    """The numbers of every request the simulator received, in order."""
    return [r["numbers"] for r in sim.stats()["requests"]]


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("npl_agi") and r.levelno >= logging.WARNING]


def assert_one_redis_warning(caplog, lock_fallbacks: int = 1) -> None:
    """One warning for the failed Redis cache, and one for the lock that fell back to the file
    lock (further fallbacks within a minute are counted, not warned about)."""
    fell_back = [w for w in warnings(caplog) if "falling back to the local file lock" in w]
    others = [w for w in warnings(caplog) if w not in fell_back]
    assert len(others) == 1, warnings(caplog)
    assert len(fell_back) == lock_fallbacks, warnings(caplog)


@pytest.fixture(autouse=True)
def _log_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="npl_agi")


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path) -> dict[str, str]:
    """The [cache] settings of each real backend: a fresh SQLite file, or an empty Redis."""
    if request.param == "redis":
        return {"backend": "redis", "redis_url": request.getfixturevalue("redis_server").url}
    return {"backend": "sqlite", "path": str(tmp_path / "cache.sqlite")}


def configure(tmp_path: Path, sim: Simulator, cache: dict, name: str = "npl-agi.conf", **sections) -> Path:
    return write_config(tmp_path / name, sim.url, cache=cache, **sections)


def lookup(conf: Path) -> Lookup:
    """A fresh ``Lookup``, as each AGI process builds one."""
    return lookup_here(load_config(str(conf)))


# --- what a cache hit saves -----------------------------------------------------------------


def test_second_lookup_within_ttl_costs_no_request_and_no_credit(tmp_path, sim, backend):
    conf = configure(tmp_path, sim, backend)

    first = lookup(conf).one(PORTED)
    assert (first.source, first.mccmnc, first.network, first.country) == ("api", "23415", "Vodafone UK", "GB")
    assert charged(sim) == [msisdn(PORTED)]

    again = lookup(conf).one(PORTED)
    assert again.source == "cache"
    assert (again.msisdn, again.mccmnc, again.msc, again.imsi) == (first.msisdn, "23415", first.msc, first.imsi)
    assert (again.network, again.country, again.error) == ("Vodafone UK", "GB", "")
    assert len(sim.stats()["requests"]) == 1
    assert charged(sim) == [msisdn(PORTED)]


def test_dialled_forms_of_one_number_share_its_cache_entry(tmp_path, sim, backend):
    conf = configure(tmp_path, sim, backend)
    lookup(conf).one(PORTED)
    forms = ["+447788450450", "00447788450450", "07788 450 450", "+44 (0)7788 450450"]
    answers = lookup(conf).many(forms)
    assert [a.source for a in answers] == ["cache"] * len(forms)
    assert [a.number for a in answers] == forms
    assert charged(sim) == [msisdn(PORTED)]


# --- how long each class of answer lives ----------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "error_ttl", "expires"),
    [(SHORT, LONG, "success"), (LONG, SHORT, "error")],
    ids=["success-expires-after-ttl", "permanent-error-expires-after-error_ttl"],
)
def test_success_lives_ttl_and_permanent_error_lives_error_ttl(tmp_path, sim, backend, ttl, error_ttl, expires):
    conf = configure(tmp_path, sim, {**backend, "ttl": ttl, "error_ttl": error_ttl})
    good = [PORTED, uk(1)]
    numbers = good + PERMANENT
    first = lookup(conf).many(numbers)
    assert [a.error for a in first] == ["", "", "ERR1", "ERR11", "ERR13", "ERR21"]
    stored = time.monotonic()

    within = lookup(conf).many(numbers)
    assert time.monotonic() - stored < SHORT, "the lookup took longer than the short TTL; nothing proved"
    assert [a.source for a in within] == ["cache"] * len(numbers)
    assert [a.error for a in within] == [a.error for a in first]
    assert [a.error_name for a in within] == [a.error_name for a in first]
    assert len(charged(sim)) == len(numbers)

    time.sleep(max(0.0, stored + SHORT + 0.15 - time.monotonic()))
    sim.reset()
    after = lookup(conf).many(numbers)
    gone = good if expires == "success" else PERMANENT
    assert [a.number for a in after if a.source == "api"] == gone
    assert [a.number for a in after if a.source == "cache"] == [n for n in numbers if n not in gone]
    assert charged(sim) == [msisdn(n) for n in gone]


def test_transient_errors_are_never_cached(tmp_path, sim, backend):
    conf = configure(tmp_path, sim, {**backend, "ttl": LONG, "error_ttl": LONG})
    for attempt in range(2):
        answers = lookup(conf).many(TRANSIENT)
        assert [a.error for a in answers] == ["ERR29", "ERR36", "ERR77"], attempt
        assert [a.source for a in answers] == ["api"] * 3, attempt
    assert charged(sim) == [msisdn(n) for n in TRANSIENT] * 2


@pytest.mark.parametrize(
    ("number", "error"),
    [(SLOW, "TIMEOUT"), (HANG, "TIMEOUT"), (TRUNCATE, "TRUNCATED")],
    ids=["timeout-mid-answer", "timeout-no-answer", "truncated"],
)
def test_timeouts_and_truncated_answers_are_never_cached(tmp_path, backend, number, error):
    with Simulator("127.0.0.1", 0, slow_delay=5.0, hang_seconds=5.0) as sim:
        conf = configure(tmp_path, sim, {**backend, "ttl": LONG, "error_ttl": LONG}, api={"timeout": 0.3})
        for attempt in range(2):
            answer = lookup(conf).one(number)
            assert answer.error == error, (attempt, answer)
        assert asked(sim) == [[msisdn(number)], [msisdn(number)]]
        assert open_cache(load_config(str(conf))).stats()["entries"] == 0


# --- only misses are asked ------------------------------------------------------------------


def test_a_batch_asks_the_service_only_for_its_misses(tmp_path, sim, backend):
    conf = configure(tmp_path, sim, backend)
    lookup(conf).many([uk(1), PERMANENT[0]])
    sim.reset()

    numbers = [uk(1), uk(2), PERMANENT[0], uk(3)]
    answers = lookup(conf).many(numbers)
    assert [a.source for a in answers] == ["cache", "api", "cache", "api"]
    assert [(a.number, a.mccmnc, a.error) for a in answers] == [
        (n, expected(n).mccmnc, expected(n).error) for n in numbers
    ]
    assert asked(sim) == [[msisdn(uk(2)), msisdn(uk(3))]]


def test_bulk_lookup_asks_only_misses_in_requests_of_at_most_1000(tmp_path, sim, backend):
    conf = configure(tmp_path, sim, backend)
    numbers = [uk(n) for n in range(2600)]
    primed = numbers[::4]  # 650 cached, spread through the list
    lookup(conf).many(primed, timeout=60)
    sim.reset()

    answers = lookup(conf).many(numbers, timeout=60)
    requests = asked(sim)
    misses = [msisdn(n) for n in numbers if n not in set(primed)]
    assert [len(r) for r in requests] == [1000, 950]
    assert [m for r in requests for m in r] == misses
    assert charged(sim) == misses
    assert [a.mccmnc for a in answers] == [expected(n).mccmnc for n in numbers]
    assert sum(a.source == "cache" for a in answers) == len(primed)

    sim.reset()
    assert {a.source for a in lookup(conf).many(numbers, timeout=60)} == {"cache"}
    assert asked(sim) == []


def test_sqlite_stores_a_request_s_answers_in_one_transaction(tmp_path, sim):
    """Another process sees none or all of a request's answers: a batch is one commit, not 1000."""
    path = tmp_path / "cache.sqlite"
    conf = configure(tmp_path, sim, {"backend": "sqlite", "path": str(path)})
    lookup(conf).one(uk(0))
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        db = sqlite3.connect(path)
        while not stop.is_set():
            seen.add(db.execute("SELECT count(*) FROM answers").fetchone()[0])
        db.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        lookup(conf).many([uk(n) for n in range(1, 1001)], timeout=60)
    finally:
        stop.set()
        watcher.join()
    assert seen <= {1, 1001}, sorted(seen)[:10]
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM answers").fetchone() == (1001,)
    db.close()


# --- many processes, one SQLite file --------------------------------------------------------

CHILD = r"""
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
from npl_agi.config import load_config
from npl_agi.askers.direct import lookup_here
job = json.loads(sys.argv[1])
config = load_config(job["config"])
print("ready", flush=True)
if job.get("barrier"):
    sys.stdin.readline()
look = lookup_here(config)  # one per process, as each AGI process builds one
out = []
for numbers in job["rounds"]:
    answers = look.many(numbers, timeout=job.get("timeout", 30))
    out.append([[a.number, a.mccmnc, a.error, a.source] for a in answers])
print(json.dumps(out), flush=True)
"""


def start_children(jobs: list[dict], env: dict, prefix: list[str] | None = None) -> list[subprocess.Popen]:
    """Start one process per job and release them together once all have imported npl_agi."""
    procs = [
        subprocess.Popen(
            [*(prefix or []), sys.executable, "-c", CHILD, json.dumps({**job, "barrier": True})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for job in jobs
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[tuple[int, list, str]]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, json.loads(out) if p.returncode == 0 else None, err))
    return results


def test_fifty_processes_share_one_sqlite_file(tmp_path, sim, subprocess_env):
    """Fifty AGI processes at once on one new cache file, each with three lookups.

    Each looks up its own 20 numbers, then its neighbour's 20, then its own again.

    Guaranteed, and asserted: every lookup answers, the file stays intact, a process that
    cannot get at the file within the busy timeout goes on uncached after one log line, and
    a number is charged at least once and at most once per lookup that asked for it.
    When no process lost its cache (the normal case): the counters lose no update (hits +
    misses = numbers asked, misses = numbers charged), a number is charged at most once per
    process asking it, and what a process has stored is a hit for it afterwards.
    Not guaranteed: two processes that miss a number before either has stored it both pay.
    """
    path = tmp_path / "cache.sqlite"
    conf = configure(tmp_path, sim, {"backend": "sqlite", "path": str(path)})
    pool = [uk(n) for n in range(100)]
    own = [[pool[(7 * i + k) % 100] for k in range(20)] for i in range(50)]
    jobs = [{"config": str(conf), "rounds": [own[i], own[(i + 1) % 50], own[i]]} for i in range(50)]

    results = finish(start_children(jobs, subprocess_env))
    uncached = 0
    for (rc, out, err), job in zip(results, jobs, strict=True):
        assert rc == 0, err
        for numbers, answers in zip(job["rounds"], out, strict=True):
            assert [(n, m) for n, m, _, _ in answers] == [(n, expected(n).mccmnc) for n in numbers]
        if err:  # contention beyond the busy timeout: one line, then no cache for this process
            assert len(err.splitlines()) == 1 and err.startswith("WARNING npl_agi cache "), err
            uncached += 1
        else:
            assert {source for _, _, _, source in out[2]} == {"cache"}

    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    counters = dict(db.execute("SELECT name, value FROM counters")) if uncached == 0 else {}
    db.close()
    paid = charged(sim)
    lookups = [n for job in jobs for numbers in job["rounds"] for n in numbers]
    processes = {msisdn(n): sum(n in own[i] or n in own[(i + 1) % 50] for i in range(50)) for n in pool}
    assert set(paid) == set(processes)
    for number in processes:
        assert 1 <= paid.count(number) <= lookups.count("0" + number[2:]), number
    if uncached == 0:
        assert counters["hits"] + counters["misses"] == len(lookups)
        assert counters["misses"] == len(paid)
        sources = [source for _, out, _ in results for answers in out for _, _, _, source in answers]
        assert sources.count("cache") == counters["hits"]
        for number, askers in processes.items():
            assert paid.count(number) <= askers, number

    sim.reset()
    answers = lookup(conf).many(pool)
    assert [a.mccmnc for a in answers] == [expected(n).mccmnc for n in pool]
    if uncached == 0:
        assert charged(sim) == []


# --- a broken SQLite file never fails a lookup ----------------------------------------------


def test_corrupt_sqlite_file_is_skipped_with_one_warning_and_left_alone(tmp_path, sim, caplog):
    path = tmp_path / "cache.sqlite"
    garbage = bytes(range(256)) * 64
    path.write_bytes(garbage)
    conf = configure(tmp_path, sim, {"backend": "sqlite", "path": str(path)})

    look = lookup(conf)
    first = look.one(PORTED)
    second = look.many([PORTED, uk(1)])
    assert (first.source, first.mccmnc) == ("api", "23415")
    assert [(a.source, a.mccmnc) for a in second] == [("api", "23415"), ("api", expected(uk(1)).mccmnc)]
    assert len(warnings(caplog)) == 1, warnings(caplog)
    assert "sqlite" in warnings(caplog)[0]
    assert path.read_bytes() == garbage


def test_missing_directory_that_cannot_be_created_is_skipped_with_one_warning(tmp_path, sim, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be\n")
    conf = configure(tmp_path, sim, {"backend": "sqlite", "path": str(blocker / "npl-agi" / "cache.sqlite")})

    look = lookup(conf)
    answers = [look.one(PORTED), look.one(PORTED)]
    assert [(a.source, a.mccmnc) for a in answers] == [("api", "23415"), ("api", "23415")]
    assert len(warnings(caplog)) == 1, warnings(caplog)
    assert blocker.is_file()


def test_locked_sqlite_file_is_skipped_with_one_warning(tmp_path, sim, caplog):
    path = tmp_path / "cache.sqlite"
    conf = configure(tmp_path, sim, {"backend": "sqlite", "path": str(path)})
    lookup(conf).one(uk(1))  # the file exists, in WAL mode
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # an admin's long transaction, or a stuck writer
    try:
        look = lookup(conf)
        answers = [look.one(PORTED), look.one(uk(1))]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [a.mccmnc for a in answers] == ["23415", expected(uk(1)).mccmnc]
    assert answers[0].source == "api"
    assert len(warnings(caplog)) == 1, warnings(caplog)


def without_root_override() -> list[str]:
    """A command prefix under which file permissions bind, even for root.

    Root ignores read-only modes (``CAP_DAC_OVERRIDE``); dropping that capability for the
    child makes a read-only cache file or directory as real for it as for the asterisk user.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.fail("running as root: the read-only tests need setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]


@pytest.mark.parametrize("layout", ["read-only-file", "read-only-directory", "read-only-directory-no-file"])
def test_read_only_cache_is_skipped_with_one_warning(tmp_path, sim, subprocess_env, layout):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    path = cache_dir / "cache.sqlite"
    conf = configure(tmp_path, sim, {"backend": "sqlite", "path": str(path)})
    if layout != "read-only-directory-no-file":  # a valid cache file with one entry, and no process using it
        [(rc, _, err)] = finish(start_children([{"config": str(conf), "rounds": [[PORTED]]}], subprocess_env))
        assert rc == 0, err
        path.chmod(0o444 if layout == "read-only-file" else 0o666)
    cache_dir.chmod(0o555 if layout.startswith("read-only-directory") else 0o755)
    before = path.read_bytes() if path.exists() else None
    sim.reset()
    try:
        job = {"config": str(conf), "rounds": [[uk(1)], [uk(1), PORTED]]}
        [(rc, out, err)] = finish(start_children([job], subprocess_env, prefix=without_root_override()))
    finally:
        cache_dir.chmod(0o755)
    assert rc == 0, err
    assert [[n, m, e] for n, m, e, _ in out[0]] == [[uk(1), expected(uk(1)).mccmnc, ""]]
    assert out[1][0][:3] == [uk(1), expected(uk(1)).mccmnc, ""]
    assert out[1][1][:3] == [PORTED, "23415", ""]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("WARNING npl_agi cache"), err
    assert (path.read_bytes() if path.exists() else None) == before
    assert msisdn(uk(1)) in charged(sim)


# --- Redis down, killed, hung ---------------------------------------------------------------


def redis_conf(tmp_path: Path, sim: Simulator, url: str, name: str = "npl-agi.conf", **sections) -> Path:
    return configure(tmp_path, sim, {"backend": "redis", "redis_url": url}, name=name, **sections)


def assert_uses_file_lock(look: Lookup, conf: Path, sim: Simulator, number: str) -> None:
    """With the account's file lock held elsewhere, the lookup waits for it and times out."""
    api = load_config(str(conf)).api
    held = FileLock.for_account(api.lock_dir, api.url, api.user)
    held.acquire(time.monotonic() + 1)
    before = len(sim.stats()["requests"])
    try:
        answer = look.one(number, timeout=0.4)
    finally:
        held.release()
    assert answer.error == "TIMEOUT", answer
    assert len(sim.stats()["requests"]) == before


def test_redis_down_from_the_start(tmp_path, sim, dead_redis, caplog):
    conf = redis_conf(tmp_path, sim, dead_redis)
    look = lookup(conf)
    answers = [look.one(PORTED), look.one(PORTED), look.one(uk(1))]
    assert [(a.source, a.mccmnc) for a in answers] == [
        ("api", "23415"),
        ("api", "23415"),
        ("api", expected(uk(1)).mccmnc),
    ]
    assert_uses_file_lock(look, conf, sim, uk(2))
    assert_one_redis_warning(caplog)
    assert "redis" in warnings(caplog)[0].lower()


def test_redis_killed_between_lookups(tmp_path, sim, redis_own, caplog):
    conf = redis_conf(tmp_path, sim, redis_own.url)
    look = lookup(conf)
    assert look.one(PORTED).source == "api"
    assert look.one(PORTED).source == "cache"
    assert warnings(caplog) == []

    redis_own.kill()
    answers = [look.one(PORTED), look.one(uk(1))]
    assert [(a.source, a.mccmnc) for a in answers] == [("api", "23415"), ("api", expected(uk(1)).mccmnc)]
    assert_uses_file_lock(look, conf, sim, uk(2))
    assert_one_redis_warning(caplog)


def test_redis_killed_between_cache_read_and_account_lock(tmp_path, sim, redis_own, caplog):
    conf = redis_conf(tmp_path, sim, redis_own.url)
    look = lookup(conf)
    assert look.one(uk(1)).source == "api"  # connected, client and lock built

    def kill_redis(done: int, total: int) -> None:  # called after the cache read, before the request
        redis_own.kill()

    [answer] = look.many([PORTED], progress=kill_redis)
    assert (answer.source, answer.mccmnc, answer.error) == ("api", "23415", "")
    assert asked(sim)[-1] == [msisdn(PORTED)]
    assert len(warnings(caplog)) == 1, warnings(caplog)
    assert "file lock" in warnings(caplog)[0]


def test_redis_killed_while_the_account_lock_is_held(tmp_path, redis_own, caplog):
    with Simulator("127.0.0.1", 0, line_delay=0.15) as sim:
        conf = redis_conf(tmp_path, sim, redis_own.url)
        look = lookup(conf)

        def kill_when_asked() -> None:
            end = time.monotonic() + 5
            while not sim.stats()["requests"] and time.monotonic() < end:
                time.sleep(0.005)
            redis_own.kill()

        killer = threading.Thread(target=kill_when_asked)
        killer.start()
        answers = look.many([PORTED, uk(1), uk(2)])
        killer.join()
        assert [(a.source, a.error) for a in answers] == [("api", "")] * 3
        again = look.one(PORTED)
        assert (again.source, again.mccmnc) == ("api", "23415")
    assert_one_redis_warning(caplog)


@pytest.fixture
def frozen_redis(redis_own):
    """A real Redis frozen by ``DEBUG SLEEP`` in another connection while the test runs."""
    client = redis.Redis(host="127.0.0.1", port=redis_own.port, socket_timeout=10)
    client.ping()
    freezer = threading.Thread(target=client.execute_command, args=("DEBUG", "SLEEP", "1.5"))
    freezer.start()
    time.sleep(0.1)  # the server is now sleeping, deaf to every other client
    yield redis_own.url
    freezer.join()
    client.close()


@pytest.mark.parametrize("hang", ["never-answers", "debug-sleep"])
def test_hung_redis_costs_at_most_its_short_timeout(tmp_path, sim, request, caplog, hang):
    url = request.getfixturevalue("hung_redis" if hang == "never-answers" else "frozen_redis")
    conf = redis_conf(tmp_path, sim, url)
    started = time.monotonic()
    answer = lookup(conf).one(PORTED)
    took = time.monotonic() - started
    assert (answer.source, answer.mccmnc, answer.error) == ("api", "23415", "")
    # one Redis timeout, the request and slack: well inside the call-time deadline
    assert took < 4 * REDIS_TIMEOUT + 0.5, took
    assert_one_redis_warning(caplog)


def test_malformed_redis_value_is_a_miss_and_keeps_the_redis_lock(tmp_path, sim, redis_server, caplog):
    """A value this version cannot read (another version's format, another writer) is a miss.

    It must not switch the cache off, and with it the cross-machine account lock.
    """
    conf = redis_conf(tmp_path, sim, redis_server.url)
    redis_server.client().set(f"npl-agi:answer:{msisdn(PORTED)}", "23415,1,2,,1700000000,extra-field")
    config = load_config(str(conf))
    look = lookup_here(config)
    api = config.api
    held = FileLock.for_account(api.lock_dir, api.url, api.user)
    held.acquire(time.monotonic() + 1)  # the file lock is taken: only the Redis lock lets the lookup through
    try:
        answer = look.one(PORTED)
    finally:
        held.release()
    assert (answer.source, answer.mccmnc, answer.error) == ("api", "23415", "")
    assert lookup(conf).one(PORTED).source == "cache"  # the unreadable value was replaced
    assert warnings(caplog) == []


# --- the account lock across machines -------------------------------------------------------


def two_machines(tmp_path: Path, sim: Simulator, cache_of, env: dict) -> None:
    """Two processes, each with its own config, lock dir and cache file, look up at once."""
    jobs = []
    for machine in ("a", "b"):
        home = tmp_path / machine
        home.mkdir()
        conf = write_config(home / "npl-agi.conf", sim.url, cache=cache_of(home))
        base = 1000 if machine == "a" else 2000
        rounds = [[uk(base + 10 * r + k) for k in range(5)] for r in range(10)]
        jobs.append({"config": str(conf), "rounds": rounds, "timeout": 10})
    for rc, out, err in finish(start_children(jobs, env)):
        assert rc == 0, err
        assert all(e == "" for rnd in out for _, _, e, _ in rnd), out


def test_redis_lock_keeps_two_machines_to_one_connection(tmp_path, redis_server, subprocess_env):
    with Simulator("127.0.0.1", 0, line_delay=0.02) as sim:
        two_machines(tmp_path, sim, lambda home: {"backend": "redis", "redis_url": redis_server.url}, subprocess_env)
        stats = sim.stats()
    assert len(stats["requests"]) == 20
    assert stats["max_concurrent"]["demo"] == 1


def test_without_redis_two_machines_do_open_two_connections(tmp_path, subprocess_env):
    """The control: the same load with per-machine SQLite caches and file locks overlaps."""
    with Simulator("127.0.0.1", 0, line_delay=0.02) as sim:
        two_machines(
            tmp_path, sim, lambda home: {"backend": "sqlite", "path": str(home / "cache.sqlite")}, subprocess_env
        )
        stats = sim.stats()
    assert len(stats["requests"]) == 20
    assert stats["max_concurrent"]["demo"] == 2


def account_lock(conf: Path) -> RedisLock:
    config = load_config(str(conf))
    lock = open_cache(config).account_lock(config.api)
    assert isinstance(lock, RedisLock)
    return lock


def can_take(conf: Path, wait: float = 0.2) -> bool:
    """Whether another machine could take the account lock within ``wait`` seconds."""
    other = account_lock(conf)
    try:
        other.acquire(time.monotonic() + wait)
    except LookupTimeout:
        return False
    other.release()
    return True


def test_npl_agi_check_waits_for_the_redis_account_lock(tmp_path, sim, redis_server, subprocess_env):
    """``npl-agi check`` connects too: on a cluster it must not open a second connection."""
    homes = [tmp_path / "a", tmp_path / "b"]
    confs = []
    for home in homes:
        home.mkdir()
        confs.append(
            write_config(home / "npl-agi.conf", sim.url, cache={"backend": "redis", "redis_url": redis_server.url})
        )
    other_machine = account_lock(confs[0])
    other_machine.acquire(time.monotonic() + 10)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "npl_agi.admin.cli", "--config", str(confs[1]), "check", "--timeout", "0.5"],
            capture_output=True,
            text=True,
            env=subprocess_env,
            timeout=30,
        )
    finally:
        other_machine.release()
    assert sim.stats()["requests"] == [], result.stdout
    assert result.returncode == 1 and "TIMEOUT" in result.stderr, result


def test_redis_lock_is_held_for_a_request_longer_than_its_lease(tmp_path, sim, redis_server):
    conf = redis_conf(tmp_path, sim, redis_server.url)
    holder = account_lock(conf)
    holder.acquire(time.monotonic() + 3 * RedisLock.LEASE)
    try:
        end = time.monotonic() + 2 * RedisLock.LEASE
        while time.monotonic() < end:
            assert not can_take(conf, wait=0.3)
    finally:
        holder.release()
    assert can_take(conf)


def test_redis_lock_is_released_only_by_its_holder(tmp_path, sim, redis_server, caplog):
    conf = redis_conf(tmp_path, sim, redis_server.url)
    stale = account_lock(conf)
    stale.acquire(time.monotonic() + 0.1)  # a holder whose request ended without releasing

    bystander = account_lock(conf)
    bystander.release()  # never acquired: frees nothing
    assert not can_take(conf, wait=0.05)

    successor = account_lock(conf)
    successor.acquire(time.monotonic() + RedisLock.LEASE + 2)  # waits for the stale lock's expiry
    try:
        stale.release()  # too late: the lock is the successor's now
        assert not can_take(conf)
    finally:
        successor.release()
    assert can_take(conf)
    assert len(warnings(caplog)) == 1, warnings(caplog)


HOLDER = r"""
import sys, time
from npl_agi.config import load_config
from npl_agi.backends import open_cache
config = load_config(sys.argv[1])
lock = open_cache(config).account_lock(config.api)
lock.acquire(time.monotonic() + float(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("deadline", [2.0, 600.0], ids=["call-time-holder", "bulk-holder"])
def test_redis_lock_of_a_killed_holder_expires(tmp_path, sim, redis_server, subprocess_env, deadline):
    """A PBX that dies holding the lock (OOM kill, power loss) frees it within its lease.

    A bulk request's deadline is minutes long: the lock must not outlive its holder by that
    much, or every call on every PBX sharing the account times out until it passes.
    """
    conf = redis_conf(tmp_path, sim, redis_server.url)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(conf), str(deadline)], stdout=subprocess.PIPE, text=True, env=subprocess_env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not can_take(conf)
        holder.send_signal(signal.SIGKILL)
        holder.wait(5)
        killed = time.monotonic()
        assert can_take(conf, wait=RedisLock.LEASE + 1.0)
        assert time.monotonic() - killed <= RedisLock.LEASE + 1.0
    finally:
        holder.kill()
        holder.wait(5)


def test_sqlite_backend_takes_the_file_lock(tmp_path, sim):
    conf = configure(tmp_path, sim, {"backend": "sqlite", "path": str(tmp_path / "cache.sqlite")})
    config = load_config(str(conf))
    assert isinstance(open_cache(config), SqliteCache)
    assert_uses_file_lock(lookup(conf), conf, sim, PORTED)


def test_a_crashed_redis_lock_holder_costs_no_credit(tmp_path, sim, redis_server, subprocess_env):
    """The next call waits for the dead holder's lease; with too little time left after it, it
    answers TIMEOUT without connecting, rather than pay for an answer it cannot wait for."""
    conf = redis_conf(tmp_path, sim, redis_server.url, api={"timeout": "1", "min_request_time": "0.3"})
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(conf), "600"], stdout=subprocess.PIPE, text=True, env=subprocess_env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGKILL)
        holder.wait(5)
        answer = lookup(conf).one(uk(7))
    finally:
        holder.kill()
        holder.wait(5)
    assert answer.error == "TIMEOUT", answer
    assert sim.stats()["requests"] == []


def test_redis_lock_waiters_back_off(tmp_path, sim, redis_server):
    conf = redis_conf(tmp_path, sim, redis_server.url)
    held = account_lock(conf)
    held.acquire(time.monotonic() + 5)
    r = redis_server.client()
    before = r.info("commandstats").get("cmdstat_set", {}).get("calls", 0)
    try:
        assert not can_take(conf, wait=1.0)
    finally:
        held.release()
    tries = r.info("commandstats")["cmdstat_set"]["calls"] - before
    assert 5 <= tries <= 60, tries  # polling every 5 ms would be some 200 tries a second


def test_without_redis_the_lock_falls_back_counted_and_warned_once(tmp_path, sim, dead_redis, caplog):
    conf = redis_conf(tmp_path, sim, dead_redis)
    for n in range(3):
        assert lookup(conf).one(uk(n)).source == "api"
    fell_back = [w for w in warnings(caplog) if "falling back to the local file lock" in w]
    assert len(fell_back) == 1, warnings(caplog)
    assert FallbackRecord(str(tmp_path)).read()[0] == 3


def test_cache_stats_counts_the_lock_fallbacks(tmp_path, sim, redis_server, subprocess_env):
    conf = redis_conf(tmp_path, sim, redis_server.url)
    for _ in range(2):
        FallbackRecord(str(tmp_path)).add()
    result = subprocess.run(
        [sys.executable, "-m", "npl_agi.admin.cli", "--config", str(conf), "cache", "stats", "--json"],
        capture_output=True, text=True, env=subprocess_env, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["lock_fallbacks"] == 2


def test_lock_fallback_none_sends_nothing_without_the_cluster_lock(tmp_path, sim, dead_redis):
    conf = configure(tmp_path, sim, {"backend": "redis", "redis_url": dead_redis, "lock_fallback": "none"})
    answer = lookup(conf).one(PORTED)
    assert answer.error == "NOLOCK" and "lock_fallback = none" in answer.error_name
    assert sim.stats()["requests"] == []


def test_fallback_warnings_are_a_minute_apart_across_processes(tmp_path):
    offset = [0.0]
    record = FallbackRecord(str(tmp_path), clock=lambda: time.time() + offset[0])
    assert record.add() is True
    offset[0] = 30.0
    assert FallbackRecord(str(tmp_path), clock=record.clock).add() is False
    offset[0] = FallbackRecord.WARN_EVERY + 1
    assert record.add() is True
    count, last = record.read()
    assert count == 3 and last is not None


# --- a cache and a lock directory every user of the group can share ---------------------------


def test_cache_directory_and_files_are_shared_with_the_group_whatever_the_umask(tmp_path, sim):
    """An admin's umask (077, 027) must not make a cache the asterisk user cannot write."""
    cache_dir = tmp_path / "lib" / "npl-agi"
    path = cache_dir / "cache.sqlite"
    conf = configure(tmp_path, sim, {"backend": "sqlite", "path": str(path)})
    old = os.umask(0o077)
    try:
        look = lookup(conf)
        look.one(PORTED)
        wal = [cache_dir / "cache.sqlite-wal", cache_dir / "cache.sqlite-shm"]
        modes = {p.name: p.stat().st_mode & 0o7777 for p in (path, *wal)}  # while the connection is open
    finally:
        os.umask(old)
    assert cache_dir.stat().st_mode & 0o7777 == 0o2770  # setgid: new files take the directory's group
    assert modes == {"cache.sqlite": 0o660, "cache.sqlite-wal": 0o660, "cache.sqlite-shm": 0o660}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can create files for another owner")
def test_cache_created_by_root_belongs_to_the_directory_s_owner_and_group(tmp_path, sim):
    """``npl-agi lookup`` run as root first: the file is still the asterisk user's (here uid 4321)."""
    cache_dir = tmp_path / "npl-agi"
    cache_dir.mkdir()
    os.chown(cache_dir, 4321, 4322)
    cache_dir.chmod(0o770)  # not even setgid: root still gives the file the directory's group
    path = cache_dir / "cache.sqlite"
    conf = configure(tmp_path, sim, {"backend": "sqlite", "path": str(path)})
    lookup(conf).one(PORTED)
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (4321, 4322, 0o660)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can create a directory for another owner")
def test_cache_directory_created_by_root_takes_its_parent_s_owner_and_group(tmp_path, sim):
    parent = tmp_path / "asterisk"
    parent.mkdir()
    os.chown(parent, 4321, 4322)
    conf = configure(tmp_path, sim, {"backend": "sqlite", "path": str(parent / "npl-agi" / "cache.sqlite")})
    lookup(conf).one(PORTED)
    st = (parent / "npl-agi").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (4321, 4322, 0o2770)


@pytest.mark.parametrize("cache_backend", ["sqlite", "none"])
def test_lock_file_defaults_to_the_cache_directory(tmp_path, sim, cache_backend):
    """Not the system's /tmp: the directory is made when missing, whatever the backend."""
    cache_dir = tmp_path / "npl-agi"
    cache = {"backend": cache_backend, "path": str(cache_dir / "cache.sqlite")}
    conf = configure(tmp_path, sim, cache, api={"lock_dir": ""})
    assert load_config(str(conf)).api.lock_dir == ""
    answer = lookup(conf).one(PORTED)
    assert answer.mccmnc == "23415", answer
    locks = [p.name for p in cache_dir.iterdir() if p.name.endswith(".lock")]
    assert len(locks) == 1 and locks[0].startswith("npl-agi-"), locks
    assert cache_dir.stat().st_mode & 0o7777 == 0o2770
