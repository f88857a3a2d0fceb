"""One run of ``npl-agi lookup`` asks each number at most once, whatever the cache keeps.

The file is streamed ``batch_size`` lines at a time; a number repeated further apart than that
must still be answered from what this run already paid for, not asked again. Real subprocesses,
the simulator on loopback, real SQLite files and a real redis-server.
"""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_config

from npl_agi.core.protocol import Answer
from npl_agi.doubles.simulator import Simulator

pytest_plugins = ("redis_fixture",)

ABSENT = "07700 000029"  # the simulator answers ERR29 absent subscriber: never cached
FAILING = "07700 000036"  # ERR36 system failure: never cached
PORTED = "07788450450"
HANGING = "07400999902"  # the simulator's "hang" fault
LOOKUP = [sys.executable, "-m", "npl_agi.admin.cli", "lookup"]


def distinct(count: int) -> list[str]:
    """``count`` distinct UK mobiles the simulator answers with a network."""
    return [f"07400{100000 + i:06d}" for i in range(count)]


def lookup_file(conf: Path, numbers: list[str], out: Path, env: dict[str, str]) -> list[dict[str, str]]:
    """``npl-agi lookup --file F --output out`` on these lines; the CSV rows."""
    source = out.with_suffix(".txt")
    source.write_text("".join(f"{n}\n" for n in numbers))
    done = subprocess.run(
        [*LOOKUP, "--config", str(conf), "--file", str(source), "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    with out.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def charged_once(sim: Simulator) -> Counter[str]:
    """What the simulator charged, by number; every count must be 1."""
    charged = Counter(sim.stats()["charged"])
    assert [n for n, times in charged.items() if times > 1] == []
    return charged


@pytest.fixture
def run_env(tmp_path, subprocess_env) -> dict[str, str]:
    """The subprocess environment with a temporary directory of the test's own (``$TMPDIR``)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**subprocess_env, "TMPDIR": str(tmp)}


def test_without_a_cache_duplicates_further_apart_than_a_batch_are_not_paid_twice(tmp_path, sim, run_env):
    """2,500 lines, the last 300 repeating the first 300, three batches of 1000: 2,200 credits."""
    numbers = distinct(2200)
    numbers += numbers[:300]
    conf = write_config(tmp_path / "c.conf", sim.url, api={"batch_size": "1000"}, cache={"backend": "none"})
    rows = lookup_file(conf, numbers, tmp_path / "answers.csv", run_env)
    assert len(charged_once(sim)) == 2200
    assert [r["number"] for r in rows] == numbers
    assert rows[2200:] == rows[:300]
    assert all(r["mccmnc"] and not r["error"] for r in rows)
    assert list(Path(run_env["TMPDIR"]).iterdir()) == []  # the run's memory is gone with the run


@pytest.fixture(params=["none", "sqlite", "redis"])
def cache_section(request, tmp_path) -> dict[str, str]:
    if request.param == "redis":
        return {"backend": "redis", "redis_url": request.getfixturevalue("redis_server").url}
    return {"backend": request.param, "path": str(tmp_path / "cache.sqlite")}


def test_an_uncacheable_answer_is_not_asked_again_in_the_same_run(tmp_path, sim, run_env, cache_section):
    """ERR29 and ERR36 are never cached; repeated two batches later they are still asked once."""
    numbers = [ABSENT, FAILING, *distinct(3), ABSENT, FAILING, PORTED, ABSENT]
    conf = write_config(tmp_path / "c.conf", sim.url, api={"batch_size": "2"}, cache=cache_section)
    rows = lookup_file(conf, numbers, tmp_path / "answers.csv", run_env)
    assert charged_once(sim)["447700000029"] == 1
    assert set(charged_once(sim)) == {
        "447700000029",
        "447700000036",
        "447788450450",
        *(f"4474001{i:05d}" for i in range(3)),
    }
    assert [r["number"] for r in rows] == numbers
    assert [r["error"] for r in rows] == ["ERR29", "ERR36", "", "", "", "ERR29", "ERR36", "", "ERR29"]
    assert rows[5] == rows[0] == rows[8] and rows[6] == rows[1]
    assert rows[0]["error_name"] == "Absent subscriber"


def test_a_second_run_asks_again_what_was_not_cached(tmp_path, sim, run_env):
    """The memory is the run's, not a cache: the next run pays again for an absent subscriber."""
    conf = write_config(tmp_path / "c.conf", sim.url, api={"batch_size": "1"})
    lookup_file(conf, [ABSENT, PORTED, ABSENT], tmp_path / "first.csv", run_env)
    lookup_file(conf, [ABSENT, PORTED, ABSENT], tmp_path / "second.csv", run_env)
    assert sim.stats()["charged"] == ["447700000029", "447788450450", "447700000029"]


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)], ids=["SIGINT", "SIGTERM"]
)
def test_the_runs_memory_is_on_disk_and_removed_when_the_run_is_stopped(tmp_path, run_env, sig, status):
    """While the run goes on its memory is a file in $TMPDIR (flat memory); stopped, it is gone."""
    tmp = Path(run_env["TMPDIR"])
    with Simulator("127.0.0.1", 0, hang_seconds=120) as hanging:
        conf = write_config(tmp_path / "c.conf", hanging.url, api={"batch_size": "1"})
        proc = subprocess.Popen(
            [*LOOKUP, "--config", str(conf), "--timeout", "100", "--file", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=run_env,
        )
        try:
            assert proc.stdin and proc.stdout
            proc.stdin.write(f"{PORTED}\n{HANGING}\n")
            proc.stdin.flush()
            assert proc.stdout.readline().startswith("447788450450 23415 ")  # the first batch is answered
            (memory,) = tmp.iterdir()
            assert memory.name.startswith("npl-agi-run-")
            assert any(f.is_file() and f.stat().st_size > 0 for f in memory.iterdir())
            proc.send_signal(sig)  # while the second request hangs
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == status
    assert list(tmp.iterdir()) == []


def test_a_run_that_fails_removes_its_memory(tmp_path, run_env):
    """A request that fails as a whole stops the run (exit 1); the memory goes with it."""
    with Simulator("127.0.0.1", 0, hang_seconds=30) as hanging:
        conf = write_config(tmp_path / "c.conf", hanging.url, api={"batch_size": "1"})
        source = tmp_path / "numbers.txt"
        source.write_text(f"{PORTED}\n{HANGING}\n")
        done = subprocess.run(
            [*LOOKUP, "--config", str(conf), "--timeout", "1", "--file", str(source)],
            capture_output=True,
            text=True,
            env=run_env,
            timeout=120,
        )
    assert done.returncode == 1, done.stderr
    assert "TIMEOUT" in done.stderr
    assert list(Path(run_env["TMPDIR"]).iterdir()) == []


# -- the memory itself --


def test_memory_gives_back_what_it_was_given(tmp_path) -> None:
    from npl_agi.chain.runmemory import RunMemory

    absent = Answer("447700000029", error="ERR29", error_name="Absent subscriber", source="api")
    cut = Answer("447400100001", error="TIMEOUT", error_name="no answer within 1.0 s", source="api")
    good = Answer("447788450450", "23415", "447000000001", "234150000000001", source="api", number="07788450450")
    with RunMemory(str(tmp_path)) as memory:
        assert memory.get_many(["447700000029"]) == {}
        assert list(tmp_path.iterdir()) == []  # nothing on disk until there is something to keep
        memory.put_many([absent, cut, good])
        found = memory.get_many(["447700000029", "447400100001", "447788450450", "447400100002"])
    assert found == {"447700000029": absent, "447400100001": cut, "447788450450": good._replace(number="")}
    assert list(tmp_path.iterdir()) == []


def test_memory_that_cannot_write_is_given_up_without_failing(tmp_path, caplog) -> None:
    """A full or unwritable temporary directory: one warning, and the run goes on asking."""
    from npl_agi.chain.runmemory import RunMemory

    missing = tmp_path / "gone"
    with RunMemory(str(missing)) as memory:
        memory.put_many([Answer("447700000029", error="ERR29", source="api")])
        memory.put_many([Answer("447700000036", error="ERR36", source="api")])
        assert memory.get_many(["447700000029", "447700000036"]) == {}
    assert len([r for r in caplog.records if r.name == "npl_agi"]) == 1


def test_progress_counts_a_remembered_number_once(tmp_path, sim) -> None:
    """The progress line of a chunk with a number asked chunks before ends at the chunk's size."""
    from npl_agi.askers.direct import lookup_here
    from npl_agi.chain.runmemory import RunMemory
    from npl_agi.config import load_config

    conf = write_config(tmp_path / "c.conf", sim.url, cache={"backend": "none"})
    seen: list[tuple[int, int]] = []
    with RunMemory(str(tmp_path)) as memory:
        lookup = lookup_here(load_config(str(conf)), memory=memory)
        lookup.many([ABSENT])
        answers = lookup.many([ABSENT, PORTED], progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]
    assert [a.error for a in answers] == ["ERR29", ""]
    assert sim.stats()["charged"] == ["447700000029", "447788450450"]
