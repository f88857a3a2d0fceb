"""The bundled npl-lookup.conf on a real Asterisk with NPL_FASTAGI set: calls go through
``npl-agi serve`` over agi://, and through the process script when the server is stopped."""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import sys
from pathlib import Path

import pytest
from asterisk_fixture import DIALPLAN, ROOT, Asterisk, find_asterisk, wait_for
from conftest import AGI_SCRIPT, write_config
from test_server import start_process

from npl_agi.doubles.simulator import Simulator

EXTENSIONS = """\
[general]
static = yes
writeprotect = yes

[globals]
NPL_FASTAGI=agi://127.0.0.1:{port}
NPL_TEST_RESULTS={results}

[caller]
exten => s,1,Wait(30)
 same => n,Hangup()

[test-gosub]
exten => _X.,1,Gosub(npl-lookup,s,1(${{EXTEN}}))
 same => n,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)={record})
 same => n,Hangup()

#include {dialplan}/npl-lookup.conf
"""
RECORDED = ("NPL_TEST_TOKEN", "AGISTATUS", "NPL_ERR", "NPL_MCCMNC", "NPL_SOURCE", "NPL_NUMBER")
RECORD = "|".join(f"${{{v}}}" for v in RECORDED)


def lookup(asterisk: Asterisk, results: Path, exten: str, token: str) -> list[str]:
    asterisk.originate(f"Local/{exten}@test-gosub", token, wait=5)

    def record() -> list[str] | None:
        for line in results.read_text().splitlines():
            fields = line.split("|")
            if fields[0] == token:
                return fields[1:]
        return None

    return wait_for(record, 20, lambda: f"the lookup of {exten}\n{asterisk.console_tail()}")


def pbx(tmp_path: Path, env: dict[str, str], port: int) -> tuple[Asterisk, Path]:
    """An Asterisk (not started) whose dialplan uses the server on ``port``, with the process
    script as its fallback; and the file its calls record their variables in."""
    build, looked = find_asterisk()
    if build is None:
        pytest.skip(f"no Asterisk found (looked at {looked})")
    agi_dir = tmp_path / "agi-bin"
    agi_dir.mkdir()
    script = agi_dir / "npl-lookup.agi"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{AGI_SCRIPT}" "$@"\n')
    script.chmod(0o755)
    results = tmp_path / "results.txt"
    results.touch()
    asterisk = Asterisk(build, tmp_path / "asterisk", agi_dir, env)
    extensions = EXTENSIONS.format(port=port, results=results, dialplan=DIALPLAN, record=RECORD)
    asterisk.write_config("extensions.conf", extensions)
    return asterisk, results


def test_calls_go_through_the_server_and_through_the_process_script_when_it_is_stopped(tmp_path) -> None:
    if find_asterisk()[0] is None:
        pytest.skip("no Asterisk found")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with Simulator() as sim:
        config = write_config(tmp_path / "npl-agi.conf", sim.url, fastagi={"metrics_listen": ""})
        env["NPL_AGI_CONFIG"] = str(config)
        server, port = start_process(config, env)
        asterisk, results = pbx(tmp_path, env, port)
        try:
            asterisk.start()
            served = lookup(asterisk, results, "07788450450", "served")
            server.send_signal(signal.SIGTERM)
            assert server.wait(15) == 0
            fallback = lookup(asterisk, results, "07810701702", "fallback")
        finally:
            asterisk.stop()
            if server.poll() is None:
                server.kill()
            _, log = server.communicate()
    assert served == ["SUCCESS", "", "23415", "api", "447788450450"]
    assert "'*******0450' -> 23415" in log  # the server's one line for this lookup
    # The server is gone: agi:// fails (AGISTATUS FAILURE) and the process script answers.
    assert fallback == ["SUCCESS", "", "23415", "api", "447810701702"]
    assert "0701702" not in log and "*******1702" not in log
    assert sim.stats()["charged"] == ["447788450450", "447810701702"]
    assert "HTTP Request" not in log


def hold_the_one_session(port: int) -> socket.socket:
    """A connection holding the server's only session: of two made in turn, the second is the
    one refused (told FAILURE) once the first has it."""
    while True:
        first, second = (socket.create_connection(("127.0.0.1", port)) for _ in range(2))
        told, _, _ = select.select([first, second], [], [], 30)
        if told == [second]:
            second.close()
            return first
        first.close()
        second.close()


def test_a_call_the_server_refuses_at_its_limit_goes_through_the_process_script(tmp_path) -> None:
    """With 65 descriptors the server holds one session (64 are its reserve); a connection kept
    open takes it, so the call's connection is told FAILURE and the dialplan runs the script."""
    if find_asterisk()[0] is None:
        pytest.skip("no Asterisk found")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with Simulator() as sim:
        config = write_config(tmp_path / "npl-agi.conf", sim.url, api={"timeout": "60"}, fastagi={"metrics_listen": ""})
        env["NPL_AGI_CONFIG"] = str(config)
        limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (65, 65))  # noqa: E731
        server, port = start_process(config, env, preexec_fn=limit)
        held = hold_the_one_session(port)
        asterisk, results = pbx(tmp_path, env, port)
        try:
            asterisk.start()
            refused = lookup(asterisk, results, "07810701702", "refused")
        finally:
            asterisk.stop()
            held.close()
            server.terminate()
            server.wait(30)
            _, log = server.communicate()
    assert refused == ["SUCCESS", "", "23415", "api", "447810701702"]  # the process script's answer
    assert "FastAGI connection(s) refused (1 sessions, at most 1" in log
    assert "*******1702" not in log  # not looked up by the server
