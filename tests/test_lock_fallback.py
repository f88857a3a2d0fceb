"""A lock directory that cannot be used (missing, not a directory, read-only) never fails a call.

The cache's directory holds the account lock file by default. When it cannot hold it, an
existing lock file is opened read-only (``flock`` needs no write access), else the lookup takes
the per-account lock file in the system's temp dir, counted and warned about; with
``lock_fallback = none`` it sends nothing (``NOLOCK``). Driven through the real AGI script and
the real CLI, against the simulator, with ``TMPDIR`` a directory of the test's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import AGI_SCRIPT, write_config

from npl_agi.backends.locks import LOCK_DIR_FALLBACKS, FallbackRecord, FileLock, lock_name
from npl_agi.config import load_config
from npl_agi.core.errors import LookupTimeout
from npl_agi.doors.server import Server
from npl_agi.doubles.emulator import AgiEmulator, fastagi_call
from npl_agi.doubles.simulator import Simulator

PORTED = "07788450450"  # 447788450450 -> 23415 Vodafone UK
REFUSES_WRITING = "/sys/kernel/notes"  # 0444 in sysfs: an O_RDWR open fails even for root


def unusable_dirs(tmp_path: Path) -> dict[str, Path]:
    """Cache directories no lookup can use, whoever it runs as (tests run as root)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    return {
        "missing-under-proc": Path(f"/proc/npl-no-such-{uuid.uuid4().hex[:8]}"),
        "under-a-file": a_file / "sub",
    }


@pytest.fixture(params=["missing-under-proc", "under-a-file"])
def cache_dir(request, tmp_path) -> Path:
    return unusable_dirs(tmp_path)[request.param]


@pytest.fixture
def env(tmp_path, subprocess_env) -> dict[str, str]:
    """The children's environment, with a temp dir of this test's own."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**subprocess_env, "TMPDIR": str(tmp)}


def conf_in(tmp_path: Path, url: str, cache_dir: Path, **cache: str) -> Path:
    """A config whose cache, and so whose lock file, is in ``cache_dir``."""
    return write_config(
        tmp_path / "npl-agi.conf",
        url,
        api={"lock_dir": "", "timeout": "10"},
        cache={"backend": "sqlite", "path": str(cache_dir / "cache.sqlite"), **cache},
    )


def agi(conf: Path, env: dict[str, str]) -> AgiEmulator:
    return AgiEmulator(str(AGI_SCRIPT), env={**env, "NPL_AGI_CONFIG": str(conf)})


def npl_agi(conf: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "npl_agi.admin.cli", "--config", str(conf), *args],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def stats(conf: Path, env: dict[str, str]) -> dict:
    result = npl_agi(conf, "cache", "stats", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def routed(run) -> None:
    assert run.returncode == 0 and run.stderr == "", run.stderr
    v = run.variables
    assert (v["NPL_ERR"], v["NPL_SOURCE"], v["NPL_MCCMNC"]) == ("", "api", "23415"), (v, run.verbose)


def test_an_agi_call_with_an_unusable_cache_directory_is_routed_and_the_fallback_counted(tmp_path, sim, env, cache_dir):
    conf = conf_in(tmp_path, sim.url, cache_dir)
    first, second = agi(conf, env).run([PORTED]), agi(conf, env).run([PORTED])
    routed(first)
    routed(second)  # no cache to hit: asked again, and it still gets its route
    warned = [line for run in (first, second) for line in run.verbose if "lock directory" in line]
    assert len(warned) == 1, warned  # a warning a minute, not one a call
    assert (tmp_path / "tmp" / lock_name(sim.url, "demo")).exists()
    s = stats(conf, env)
    assert s["lock_dir_fallbacks"] == 2 and s["last_lock_dir_fallback"] is not None
    text = npl_agi(conf, "cache", "stats", env=env)
    assert "lock dir fallbacks: 2" in text.stdout, text


def test_a_cli_lookup_with_an_unusable_cache_directory_gets_its_network(tmp_path, sim, env, cache_dir):
    conf = conf_in(tmp_path, sim.url, cache_dir)
    result = npl_agi(conf, "lookup", "--json", PORTED, env=env)
    assert result.returncode == 0, result.stderr
    [answer] = json.loads(result.stdout)
    assert (answer["mccmnc"], answer["error"], answer["source"]) == ("23415", "", "api")
    assert sim.stats()["charged"] == ["447788450450"]
    assert stats(conf, env)["lock_dir_fallbacks"] == 1


def test_calls_that_fell_back_still_keep_to_one_connection(tmp_path, env, cache_dir):
    """Every process that falls back takes the same lock file in the temp dir."""
    numbers = [f"07400{100000 + n:06d}" for n in range(4)]
    with Simulator("127.0.0.1", 0, line_delay=0.3) as sim:
        conf = conf_in(tmp_path, sim.url, cache_dir)
        script = agi(conf, env)
        with concurrent.futures.ThreadPoolExecutor(len(numbers)) as pool:
            runs = list(pool.map(lambda n: script.run([n], timeout=30), numbers))
        stats = sim.stats()
    for run in runs:
        assert run.returncode == 0 and run.variables["NPL_ERR"] == "", (run.variables, run.verbose)
    assert len(stats["requests"]) == len(numbers)
    assert stats["max_concurrent"] == {"demo": 1}


def test_lock_fallback_none_sends_nothing_without_the_configured_lock(tmp_path, sim, env, cache_dir):
    conf = conf_in(tmp_path, sim.url, cache_dir, lock_fallback="none")
    run = agi(conf, env).run([PORTED])
    assert run.returncode == 0 and run.stderr == ""
    assert run.variables["NPL_ERR"] == "NOLOCK", run.variables
    assert sim.stats()["requests"] == [] and sim.stats()["charged"] == []


def test_a_usable_lock_directory_is_used_and_nothing_is_counted(tmp_path, sim, env):
    conf = conf_in(tmp_path, sim.url, tmp_path / "npl-agi")
    routed(agi(conf, env).run([PORTED]))
    assert (tmp_path / "npl-agi" / lock_name(sim.url, "demo")).exists()
    assert list((tmp_path / "tmp").iterdir()) == []
    s = stats(conf, env)
    assert (s["lock_dir_fallbacks"], s["last_lock_dir_fallback"]) == (0, None)


def refuses_read_write(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as e:
        return e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    return False


@pytest.mark.skipif(not refuses_read_write(REFUSES_WRITING), reason=f"{REFUSES_WRITING} opens read-write here")
def test_a_lock_file_that_cannot_be_opened_for_writing_is_flocked_read_only():
    """What an existing lock file on a file system remounted read-only gets: an O_RDONLY open."""
    holder, other = FileLock(REFUSES_WRITING), FileLock(REFUSES_WRITING)
    holder.acquire(time.monotonic() + 5)
    try:
        with pytest.raises(LookupTimeout):
            other.acquire(time.monotonic() + 0.2)
    finally:
        holder.release()
    other.acquire(time.monotonic() + 5)
    other.release()


def can_mount_read_only() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o ro tmpfs $d && umount $d; rmdir $d"
    return subprocess.run(["unshare", "--mount", "sh", "-c", probe], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_mount_read_only(), reason="needs root and mount namespaces (unshare --mount)")
def test_a_cache_directory_remounted_read_only_keeps_its_existing_lock_file(tmp_path, sim, env):
    """The AGI script in a mount namespace of its own where the cache directory is a read-only
    tmpfs that already holds the lock file: the call is routed on that lock, not the fallback."""
    cache_dir = tmp_path / "npl-agi"
    cache_dir.mkdir()
    conf = conf_in(tmp_path, sim.url, cache_dir)
    lock = cache_dir / lock_name(sim.url, "demo")
    remounted = (
        'mount -t tmpfs tmpfs "$D" && : > "$L" && mount -o remount,ro "$D" && ! touch "$D/probe" 2>/dev/null'
        ' && exec "$NPL_PYTHON" "$@"'
    )
    script = AgiEmulator(
        str(AGI_SCRIPT),
        python=["unshare", "--mount", "sh", "-c", remounted, "sh"],
        env={**env, "NPL_AGI_CONFIG": str(conf), "D": str(cache_dir), "L": str(lock)},
    )
    routed(script.run([PORTED], timeout=30))
    assert stats(conf, env)["lock_dir_fallbacks"] == 0


def test_the_fallback_count_is_writable_by_every_user_of_the_account_whatever_the_umask(tmp_path):
    """Root's lookup may count first, in the temp dir: the asterisk user must still add to it."""
    old = os.umask(0o077)
    try:
        FallbackRecord(str(tmp_path), name=LOCK_DIR_FALLBACKS).add()
    finally:
        os.umask(old)
    assert (tmp_path / LOCK_DIR_FALLBACKS).stat().st_mode & 0o777 == 0o666


def test_the_fastagi_server_and_agi_scripts_that_fell_back_share_one_connection(tmp_path, env, cache_dir, monkeypatch):
    """The server takes the lock in a worker thread; it and the scripts take the same temp file."""
    monkeypatch.setattr(tempfile, "tempdir", env["TMPDIR"])  # the server runs in this process
    served, scripted = [f"07400{100000 + n:06d}" for n in range(5)], ["07400200001", "07400200002"]
    with Simulator("127.0.0.1", 0, line_delay=0.3) as sim:
        conf = conf_in(tmp_path, sim.url, cache_dir)
        config = load_config(str(conf))
        config = config._replace(fastagi=config.fastagi._replace(metrics_listen="127.0.0.1:0"))
        script = agi(conf, env)

        async def main():
            server = Server(config, listen="127.0.0.1:0")
            await server.start()
            host, port = server.address
            try:
                loop = asyncio.get_running_loop()
                return await asyncio.gather(
                    *(fastagi_call(host, port, [n]) for n in served),
                    *(loop.run_in_executor(None, lambda n=n: script.run([n], timeout=30)) for n in scripted),
                )
            finally:
                await server.drain()

        runs = asyncio.run(asyncio.wait_for(main(), 60))
        charged, max_concurrent = sim.stats()["charged"], sim.stats()["max_concurrent"]
    for run in runs:
        assert run.variables["NPL_ERR"] == "" and run.variables["NPL_MCCMNC"], (run.variables, run.verbose)
    assert max_concurrent == {"demo": 1}
    assert sorted(charged) == sorted(f"44{n[1:]}" for n in served + scripted)
    assert stats(conf, env)["lock_dir_fallbacks"] >= 2
