"""npl-agi serve against hostile clients: what a flood may cost (memory, descriptors) and what
its log may show. Real ``npl-agi serve`` processes on 127.0.0.1, memory and descriptors read
from ``/proc``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import resource
import subprocess
import sys

from conftest import write_config
from test_server import Clock, config_for, run, serving, start_process

from npl_agi import log
from npl_agi.doubles.emulator import fastagi_call
from tests import hostile_server as hostile


def env_line(i: int) -> bytes:
    """An environment line of 8 KB (under the line limit), each of its own key."""
    return b"agi_arg_%d: " % i + b"y" * 8000 + b"\n"


def status_kb(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` figure of a process, in KiB, from ``/proc``."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def wait_for(condition, seconds: float = 30.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.05)


async def flood_env(host: str, port: int, lines: int = 199) -> None:
    """A client that sends environment lines of 8 KB, never the blank line that ends them, and
    hangs up."""
    _, writer = await asyncio.open_connection(host, port)
    try:
        for i in range(1, lines + 1):
            writer.write(env_line(i))
            await writer.drain()
    except ConnectionError:  # the server closed on it: what the flood is for
        return
    finally:
        writer.close()


class Silent:
    """A client that connects and says nothing; ``heard`` is what the server said until it closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.heard = asyncio.ensure_future(reader.read())

    @property
    def closed(self) -> bool:
        return self.heard.done()

    def hang_up(self) -> None:
        self.writer.close()


async def silent(host: str, port: int) -> Silent:
    return Silent(*await asyncio.open_connection(host, port))


@contextlib.contextmanager
def server_process(config_path, subprocess_env, log_path, **popen):
    """``npl-agi serve`` with its stderr in ``log_path``; stopped (SIGTERM) on the way out."""
    with open(log_path, "w") as log:
        proc, port = start_process(config_path, subprocess_env, stderr=log, **popen)
        try:
            yield proc, port
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()


def test_a_flood_of_endless_environments_leaves_the_rss_within_twice_the_idle_size(tmp_path, sim, subprocess_env):
    """300 connections each sending 199 lines of 8 KB without the blank line: a session holds at
    most its bounded environment, so the flood costs a few MB and leaves nothing behind."""
    api = {"timeout": "60"}  # the whole flood arrives within its deadline
    path = write_config(tmp_path / "npl-agi.conf", sim.url, api=api, fastagi={"metrics_listen": ""})
    with server_process(path, subprocess_env, tmp_path / "stderr.log") as (proc, port):
        warm = asyncio.run(fastagi_call("127.0.0.1", port, ["07788450450"]))
        assert warm.variables["NPL_MCCMNC"] == "23415"
        idle_fds = open_fds(proc.pid)
        idle = status_kb(proc.pid, "VmRSS")

        async def main():
            await asyncio.gather(*(flood_env("127.0.0.1", port) for _ in range(300)))
            await wait_for(lambda: open_fds(proc.pid) <= idle_fds + 5, 60)  # every session has ended
            return await fastagi_call("127.0.0.1", port, ["07810701702"])

        after_call = asyncio.run(main())
        peak = status_kb(proc.pid, "VmHWM")
        after = status_kb(proc.pid, "VmRSS")
    err = (tmp_path / "stderr.log").read_text()
    print(f"idle {idle} KiB, peak {peak} KiB, after {after} KiB")
    assert after_call.variables["NPL_ERR"] == ""
    assert peak <= 2 * idle, (idle, peak)
    assert after <= 2 * idle, (idle, after)
    assert "Traceback" not in err


def test_sessions_reading_their_environment_are_bounded_past_it_new_ones_are_closed_at_once(tmp_path, sim):
    """Silent connections wait for their deadline (30 s here); past ``max_reading`` of them a
    new connection is closed at once, so the dialplan falls back to the AGI script."""
    config = config_for(tmp_path, sim, api={"timeout": "30"})

    async def main():
        server = await serving(config)
        host, port = server.address
        try:
            server.max_reading = 100  # of 1024: room for the test's own descriptors under any limit
            waiting = [await silent(host, port) for _ in range(100)]
            refused = [await silent(host, port) for _ in range(20)]
            await wait_for(lambda: all(r.closed for r in refused), 20)
            still_open = [r for r in waiting if not r.closed]
            told = {r.heard.result() for r in refused}
            for r in waiting:  # hang up: their sessions end, the next call is served
                r.hang_up()
            await wait_for(lambda: not server._calls)
            served = await fastagi_call(host, port, ["07788450450"])
            return len(still_open), told, served
        finally:
            await server.drain()

    still_open, told, served = run(main())
    assert still_open == 100
    assert told == {b"FAILURE\n"}  # Asterisk's AGISTATUS=FAILURE: the dialplan runs the script
    assert served.variables["NPL_MCCMNC"] == "23415"


def test_refused_connections_are_logged_once_a_minute(tmp_path, sim, caplog):
    clock = Clock()
    config = config_for(tmp_path, sim, api={"timeout": "30"})

    async def main():
        server = await serving(config, clock)
        server.max_sessions = 3
        host, port = server.address
        try:
            held = [await silent(host, port) for _ in range(3)]
            first = [await silent(host, port) for _ in range(5)]
            await wait_for(lambda: all(r.closed for r in first))
            clock.now += 61
            second = [await silent(host, port) for _ in range(2)]
            await wait_for(lambda: all(r.closed for r in second))
            assert not any(r.closed for r in held)
            for r in held:
                r.hang_up()
        finally:
            await server.drain()

    with caplog.at_level(logging.INFO, logger="npl_agi"):
        run(main())
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert refusals[0].startswith("npl-agi: 1 FastAGI connection(s) refused (3 sessions"), refusals
    assert refusals[1].startswith("npl-agi: 5 FastAGI connection(s) refused"), refusals  # 4 not logged + 1


def nofile_limit(n: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def test_descriptors_never_run_out_a_call_admitted_before_a_flood_still_gets_its_network(tmp_path, sim, subprocess_env):
    """With 192 descriptors, a call accepted first and speaking after 300 silent connections
    still opens the lock file and reaches the service; the flood past the reserve is refused,
    with one log line and no traceback."""
    path = write_config(tmp_path / "npl-agi.conf", sim.url, api={"timeout": "20"}, fastagi={"metrics_listen": ""})

    async def main(proc, port):
        go = asyncio.Event()
        call = asyncio.ensure_future(fastagi_call("127.0.0.1", port, ["07788450450"], before_env=go.wait()))
        readers = await asyncio.gather(*(silent("127.0.0.1", port) for _ in range(300)))
        # Refused at once (after the fix), or accepted until descriptors ran out (before it).
        await wait_for(lambda: sum(r.closed for r in readers) > 100 or open_fds(proc.pid) >= 185)
        await asyncio.sleep(0.5)  # accepts still to come
        go.set()
        done = await call
        refused = sum(r.closed for r in readers)
        for r in readers:
            r.hang_up()
        return done, refused

    with server_process(path, subprocess_env, tmp_path / "stderr.log", preexec_fn=nofile_limit(192)) as running:
        done, refused = asyncio.run(asyncio.wait_for(main(*running), 60))
    err = (tmp_path / "stderr.log").read_text()
    assert (done.variables["NPL_ERR"], done.variables["NPL_MCCMNC"]) == ("", "23415"), err[-2000:]
    assert refused > 100
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "refused" in line]) == 1, err[-2000:]


def masked_everywhere(text: str, numbers: list[str]) -> bool:
    return not any(n in text or n[1:] in text for n in numbers)


def test_numbers_in_foreign_text_are_masked_in_the_log_and_on_the_console(tmp_path, subprocess_env):
    """The service quotes numbers back (a malformed line, a whole query): with ``log_numbers =
    masked`` no digit run of 7 or more reaches the log or Asterisk's console in full; with
    ``full`` they do. The channel's unique id (10 digits of seconds) is left as it is."""
    dialled = ["07788450450", "07810701702"]
    international = ["44" + d[1:] for d in dialled]

    async def both(port: int):
        return await asyncio.gather(*(fastagi_call("127.0.0.1", port, [d]) for d in dialled))

    for behaviour in (hostile.one_bad_line, hostile.echo_numbers):
        for log_numbers in ("masked", "full"):
            name = f"{behaviour.__name__}-{log_numbers}"
            log_path = tmp_path / f"{name}.log"
            with hostile.HostileServer(behaviour) as service:
                path = write_config(
                    tmp_path / "npl-agi.conf",
                    service.url,
                    cache={"path": str(tmp_path / f"{name}.sqlite")},  # both numbers asked, in one request
                    fastagi={"metrics_listen": "", "batch_window": "0.2", "log_numbers": log_numbers},
                )
                with server_process(path, subprocess_env, log_path) as (_, port):
                    served = asyncio.run(both(port))
            err = log_path.read_text()
            console = "\n".join(v for call in served for v in call.verbose)
            assert "NPL_ERR=PROTOCOL" in err + console, err
            if log_numbers == "masked":
                assert masked_everywhere(err, international + dialled), err
                assert masked_everywhere(console, international + dialled), console
                assert not re.search(r"\d{7}", re.sub(r"\[[^]]*\]", "", err)), err
                assert re.search(r"\*{4,}\d{4}", err) and "[1764000000.1]" in err, err
            else:
                assert any(n in err for n in international), err


def test_mask_numbers_keeps_the_last_4_digits_of_each_long_run_and_the_call_id():
    text = "[1764000000.1] '447810701702 2341X,,' on port 4573, IMSI 234150012345678 (1764000000)"
    assert log.mask_numbers(text, keep="[1764000000.1]") == (
        "[1764000000.1] '********1702 2341X,,' on port 4573, IMSI ***********5678 (******0000)"
    )


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path, sim, subprocess_env):
    """The server's own listening socket fails as asyncio's did: one line, no traceback."""
    path = write_config(tmp_path / "npl-agi.conf", sim.url, fastagi={"metrics_listen": ""})
    with server_process(path, subprocess_env, tmp_path / "first.log") as (_, port):
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "npl_agi.admin.cli",
                "serve",
                "--config",
                str(path),
                "--listen",
                f"127.0.0.1:{port}",
            ],
            env=subprocess_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert second.returncode == 1
    assert f"npl-agi: cannot listen on 127.0.0.1:{port}: Address already in use" in second.stderr
    assert "Traceback" not in second.stderr
