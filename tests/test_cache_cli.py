"""``npl-agi cache stats|purge|export`` run as a command, on SQLite and on a real Redis."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import write_config

from npl_agi.askers.direct import lookup_here
from npl_agi.config import load_config
from npl_agi.core.networks import Directory
from npl_agi.doubles.simulator import Simulator

pytest_plugins = ("redis_fixture",)

PORTED = "07788450450"  # 447788450450 -> 23415 Vodafone UK
OTHER = "07400100001"
UNKNOWN = "07400000001"  # ERR1, a permanent error
TTL, ERROR_TTL = 3600.0, 600.0


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path) -> dict[str, str]:
    if request.param == "redis":
        return {"backend": "redis", "redis_url": request.getfixturevalue("redis_server").url}
    return {"backend": "sqlite", "path": str(tmp_path / "cache.sqlite")}


def npl_agi(conf: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "npl_agi.admin.cli", "--config", str(conf), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout


def stats(conf: Path, env: dict) -> dict:
    return json.loads(ok(npl_agi(conf, "cache", "stats", "--json", env=env)))


@pytest.fixture
def filled(tmp_path, sim: Simulator, backend) -> tuple[Path, float, float]:
    """A cache with three entries (two answers, one ERR1), 3 misses then 2 hits."""
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, cache={**backend, "ttl": TTL, "error_ttl": ERROR_TTL})
    before = time.time()
    lookup_here(load_config(str(conf))).many([PORTED, OTHER, UNKNOWN])
    after = time.time()
    lookup_here(load_config(str(conf))).many([PORTED, OTHER])
    return conf, before, after


def test_stats_counts_entries_hits_misses_and_credits_saved(filled, backend, subprocess_env):
    conf, before, after = filled
    s = stats(conf, subprocess_env)
    assert (s["backend"], s["entries"], s["hits"], s["misses"]) == (backend["backend"], 3, 2, 3)
    assert s["hit_ratio"] == pytest.approx(0.4)
    assert s["credits_saved"] == 2
    assert before - 1 <= s["oldest"] <= after + 1
    assert s["since"] <= after + 1

    text = ok(npl_agi(conf, "cache", "stats", env=subprocess_env))
    lines = dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("counting"))
    assert lines["cache"].split()[0] == backend["backend"]
    assert lines["entries"].strip() == "3"
    assert lines["hits / misses"].strip() == "2 / 3 (hit ratio 40.0%)"
    assert lines["credits saved"].strip() == "2"
    assert lines["oldest entry"].strip() == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["oldest"]))


def test_stats_count_the_numbers_and_ranges_of_your_own_and_purge_leaves_them(filled, tmp_path, subprocess_env):
    conf, _, _ = filled
    (tmp_path / "known.csv").write_text("07700900001,23415\n07700900002,23410\n")
    (tmp_path / "ranges.csv").write_text("447700,23410\n")
    ok(npl_agi(conf, "local", "import", str(tmp_path / "known.csv"), env=subprocess_env))
    ok(npl_agi(conf, "ranges", "import", str(tmp_path / "ranges.csv"), env=subprocess_env))
    ok(npl_agi(conf, "cache", "purge", env=subprocess_env))
    s = stats(conf, subprocess_env)
    assert (s["entries"], s["known_numbers"], s["own_ranges"]) == (0, 2, 1)
    text = ok(npl_agi(conf, "cache", "stats", env=subprocess_env))
    assert "yours:         2 numbers you know, 1 ranges (npl-agi local, ranges)" in text.splitlines()


def test_purge_one_number_then_all(filled, sim, subprocess_env):
    conf, _, _ = filled
    assert ok(npl_agi(conf, "cache", "purge", "+44 7788 450450", env=subprocess_env)).strip() == "purged 1 entries"
    assert stats(conf, subprocess_env)["entries"] == 2
    assert ok(npl_agi(conf, "cache", "purge", PORTED, env=subprocess_env)).strip() == "purged 0 entries"

    sim.reset()
    answers = lookup_here(load_config(str(conf))).many([PORTED, OTHER, UNKNOWN])
    assert [a.source for a in answers] == ["api", "cache", "cache"]
    assert sim.stats()["charged"] == ["447788450450"]

    assert ok(npl_agi(conf, "cache", "purge", env=subprocess_env)).strip() == "purged 3 entries"
    assert stats(conf, subprocess_env)["entries"] == 0
    assert ok(npl_agi(conf, "cache", "export", "--json", env=subprocess_env)).strip() == "[]"


EXPORTED = [
    {"msisdn": "447400000001", "mccmnc": "", "error": "ERR1", "error_name": "Unknown subscriber", "ttl": ERROR_TTL},
    {"msisdn": "447400100001", "mccmnc": "<any>", "error": "", "error_name": "", "ttl": TTL},
    {"msisdn": "447788450450", "mccmnc": "23415", "error": "", "error_name": "", "ttl": TTL},
]


def check_export(rows: list[dict], before: float, after: float) -> None:
    assert [r["msisdn"] for r in rows] == ["447400000001", "447400100001", "447788450450"]
    for row, want in zip(rows, EXPORTED, strict=True):
        assert row["error"] == want["error"]
        assert row["error_name"] == want["error_name"]
        assert row["source"] == "cache"
        if want["mccmnc"] != "<any>":
            assert row["mccmnc"] == want["mccmnc"]
        assert (row["mcc"], row["mnc"]) == (row["mccmnc"][:3], row["mccmnc"][3:])
        assert bool(row["msc"]) == bool(row["imsi"]) == (not want["error"])
        if want["error"]:
            assert row["network"] == row["country"] == ""
        else:  # named from the network directory, as a lookup names it
            assert (row["country"], row["network"]) == Directory.load().describe(row["mccmnc"])
            assert row["country"] == "GB" and row["network"]
        stored, expires = utc_seconds(row["stored"]), utc_seconds(row["expires"])
        assert before - 1 <= stored <= after + 1
        assert expires - stored == pytest.approx(want["ttl"], abs=2)


def utc_seconds(text: str) -> float:
    """ISO 8601 in UTC, to the second: 2026-11-25T10:04:05Z."""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text), text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def test_export_csv_and_json(filled, subprocess_env):
    conf, before, after = filled
    rows = list(csv.DictReader(io.StringIO(ok(npl_agi(conf, "cache", "export", env=subprocess_env)))))
    check_export(rows, before, after)
    assert rows[2]["imsi"].startswith("23415")

    as_json = json.loads(ok(npl_agi(conf, "cache", "export", "--json", env=subprocess_env)))
    check_export(as_json, before, after)
    plain = [k for k in rows[0] if k not in ("stored", "expires")]
    assert [{k: str(r[k]) for k in plain} for r in as_json] == [{k: r[k] for k in plain} for r in rows]


def test_purge_and_stats_agree_once_entries_have_expired(tmp_path, sim, backend, subprocess_env):
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, cache={**backend, "ttl": 0.3, "error_ttl": TTL})
    lookup_here(load_config(str(conf))).many([PORTED, UNKNOWN])
    time.sleep(0.5)  # the answer has expired, the ERR1 lives on
    assert stats(conf, subprocess_env)["entries"] == 1
    assert ok(npl_agi(conf, "cache", "purge", PORTED, env=subprocess_env)).strip() == "purged 0 entries"
    assert ok(npl_agi(conf, "cache", "purge", env=subprocess_env)).strip() == "purged 1 entries"


def test_stats_of_a_cache_not_yet_created_does_not_create_it(tmp_path, sim, subprocess_env):
    """An admin's ``cache stats`` as root must not create the file the asterisk user needs to own."""
    path = tmp_path / "spool" / "npl-agi" / "cache.sqlite"
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, cache={"backend": "sqlite", "path": str(path)})
    s = stats(conf, subprocess_env)
    assert (s["entries"], s["hits"], s["misses"], s["oldest"]) == (0, 0, 0, None)
    assert ok(npl_agi(conf, "cache", "export", env=subprocess_env)).splitlines()[1:] == []
    assert ok(npl_agi(conf, "cache", "purge", env=subprocess_env)).strip() == "purged 0 entries"
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize(
    "action",
    [
        ["stats"],
        ["stats", "--json"],
        ["export", "--json"],
        ["export"],
        ["purge"],
        ["purge", PORTED],
    ],
    ids=lambda action: "-".join(action),
)
def test_corrupt_sqlite_file_gives_one_line_and_failure(tmp_path, sim, subprocess_env, action):
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"this is not a database\n" * 200)
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, cache={"backend": "sqlite", "path": str(path)})
    result = npl_agi(conf, "cache", *action, env=subprocess_env)
    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr or "sqlite" in result.stderr
    assert path.read_bytes() == b"this is not a database\n" * 200


def test_stats_with_redis_down_gives_one_line_and_failure(tmp_path, sim, subprocess_env):
    from redis_fixture import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, cache={"backend": "redis", "redis_url": url})
    result = npl_agi(conf, "cache", "stats", env=subprocess_env)
    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "redis" in result.stderr.lower() and "Traceback" not in result.stderr


def test_stats_never_shows_the_redis_password(tmp_path, sim, subprocess_env):
    from redis_fixture import RedisServer

    server = RedisServer(tmp_path / "redis", password="s3cret-Pa55").start()
    try:
        conf = write_config(tmp_path / "npl-agi.conf", sim.url, cache={"backend": "redis", "redis_url": server.url})
        lookup_here(load_config(str(conf))).one(PORTED)
        text = ok(npl_agi(conf, "cache", "stats", env=subprocess_env))
        as_json = ok(npl_agi(conf, "cache", "stats", "--json", env=subprocess_env))
        assert json.loads(as_json)["entries"] == 1
        server.stop()
        failed = npl_agi(conf, "cache", "stats", env=subprocess_env)
    finally:
        server.stop()
    assert "127.0.0.1" in text and "127.0.0.1" in as_json
    assert failed.returncode != 0
    for output in (text, as_json, failed.stdout, failed.stderr):
        assert "s3cret-Pa55" not in output


def test_purge_of_something_that_is_not_a_number_is_a_usage_error(filled, subprocess_env):
    conf, _, _ = filled
    result = npl_agi(conf, "cache", "purge", PORTED, "notanumber", env=subprocess_env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "'notanumber'" in result.stderr
    assert stats(conf, subprocess_env)["entries"] == 3  # nothing purged


def test_export_into_a_pipe_closed_early_ends_quietly(tmp_path, sim, backend, subprocess_env):
    """``npl-agi cache export | head -1``: no traceback, the status of a Unix tool stopped by SIGPIPE."""
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, cache=backend)
    lookup_here(load_config(str(conf))).many([f"07400{n:06d}" for n in range(100000, 101000)])  # more than a pipe holds
    proc = subprocess.Popen(
        [sys.executable, "-m", "npl_agi.admin.cli", "--config", str(conf), "cache", "export"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env,
    )
    assert proc.stdout and proc.stderr
    assert proc.stdout.readline().startswith(b"msisdn,")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=30) == 128 + 13  # 13: SIGPIPE
    assert err == b""


def test_stats_reports_a_cache_its_users_could_not_write(tmp_path, sim, subprocess_env):
    """A file left 0640 by hand (or by an old version run as root): stats says so, and what."""
    cache_dir = tmp_path / "npl-agi"
    path = cache_dir / "cache.sqlite"
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, cache={"backend": "sqlite", "path": str(path)})
    lookup_here(load_config(str(conf))).one(PORTED)
    s = stats(conf, subprocess_env)
    assert s["unwritable"] == [] and s["shared_with"]
    assert f"writable by:   {s['shared_with']}" in ok(npl_agi(conf, "cache", "stats", env=subprocess_env))

    path.chmod(0o640)
    s = stats(conf, subprocess_env)
    assert len(s["unwritable"]) == 1 and s["unwritable"][0].startswith(f"{path} (")
    assert s["unwritable"][0].endswith(" 0640)")
    text = ok(npl_agi(conf, "cache", "stats", env=subprocess_env))
    assert f"NOT WRITABLE by {s['shared_with']}: {path} (" in text
    assert os.stat(path).st_mode & 0o777 == 0o640  # reported, not changed
