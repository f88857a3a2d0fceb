"""The ``npl-agi`` command, run as a real subprocess against the simulator on loopback."""

from __future__ import annotations

import csv
import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLI_REPORTING_PEAK, write_config

from npl_agi.backends.locks import FileLock
from npl_agi.config import ENV_VAR, ApiConfig
from npl_agi.core import protocol
from npl_agi.doubles.simulator import Account, Simulator, simulated_answer
from npl_agi.transports.sync import Client

SECRET = "Zk9-pw-7f3Q-s3cret"  # a password no output has any other reason to contain
PORTED = "07788450450"  # the simulator answers 447788450450 on 23415 (Vodafone UK)
UNKNOWN = "07973100100"  # the spec's ERR1 example
HANGING = "07400999902"  # the simulator's "hang" fault
JSON_KEYS = {"msisdn", "mccmnc", "mcc", "mnc", "msc", "imsi", "error", "error_name"}


def run(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "npl_agi.admin.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def expected(msisdn: str) -> protocol.Answer:
    return protocol.parse_answer_line(simulated_answer(msisdn, "2.4"))


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def secret_sim(sim):
    """The simulator with accounts whose passwords are distinctive: one with some credit, one locked."""
    sim.accounts["alice"] = Account(SECRET, credit=50)
    sim.accounts["carol"] = Account(SECRET[::-1], locked=True)
    return sim


@pytest.fixture
def secret_config(tmp_path, secret_sim) -> Path:
    return write_config(tmp_path / "alice.conf", secret_sim.url, user="alice", password=SECRET)


def one_stderr_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


# -- lookup: output formats --


def test_lookup_lines(config_file, subprocess_env, sim) -> None:
    done = run(["lookup", "--config", str(config_file), PORTED, UNKNOWN, "07700 000013"], subprocess_env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    good = expected("447788450450")
    assert lines[0].split()[:4] == ["447788450450", good.mccmnc, good.msc, good.imsi]
    assert good.mccmnc == "23415"
    assert "(GB)" in lines[0]
    assert lines[1] == "447973100100 ERR1 Unknown subscriber"
    assert lines[2] == "447700000013 ERR13 Call barred"
    assert sim.stats()["charged"] == ["447788450450", "447973100100", "447700000013"]


def test_lookup_line_marks_a_cached_answer(config_file, subprocess_env, sim) -> None:
    first = run(["lookup", "--config", str(config_file), PORTED], subprocess_env)
    second = run(["lookup", "--config", str(config_file), PORTED], subprocess_env)
    assert first.returncode == second.returncode == 0
    assert first.stdout.split()[:4] == second.stdout.split()[:4]
    assert "[cache]" in second.stdout
    assert sim.stats()["charged"] == ["447788450450"]


def test_lookup_fresh_asks_whatever_the_cache_holds_and_caches_the_answer(config_file, subprocess_env, sim) -> None:
    lookup = ["lookup", "--config", str(config_file), "--json"]
    sources = []
    for extra in ([], ["--fresh"], [], ["--fresh", PORTED]):  # a number twice in a run: asked once
        done = run([*lookup, *extra, PORTED], subprocess_env)
        assert done.returncode == 0, done.stderr
        sources.append([a["source"] for a in json.loads(done.stdout)])
    assert sources == [["api"], ["api"], ["cache"], ["api", "api"]]
    assert sim.stats()["charged"] == ["447788450450"] * 3


def test_lookup_line_for_numbers_that_cost_nothing(config_file, subprocess_env, sim) -> None:
    done = run(["lookup", "--config", str(config_file), "07912;345678", "020 7946 0018"], subprocess_env)
    assert done.returncode == 0, done.stderr
    bad, landline = done.stdout.splitlines()
    assert bad.startswith("'07912;345678' BADNUMBER ")
    assert landline.startswith("'020 7946 0018' NOTMOBILE ")
    assert sim.stats()["charged"] == []


def test_lookup_json(config_file, subprocess_env) -> None:
    done = run(["lookup", "--json", "--config", str(config_file), PORTED, UNKNOWN, "not a number"], subprocess_env)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert isinstance(answers, list) and len(answers) == 3
    for a in answers:
        assert set(a) >= JSON_KEYS
        assert all(isinstance(v, str) for v in a.values())
    good = expected("447788450450")
    assert answers[0]["number"] == PORTED
    assert answers[0]["msisdn"] == "447788450450"
    assert (answers[0]["mccmnc"], answers[0]["mcc"], answers[0]["mnc"]) == ("23415", "234", "15")
    assert (answers[0]["msc"], answers[0]["imsi"]) == (good.msc, good.imsi)
    assert (answers[0]["error"], answers[0]["error_name"]) == ("", "")
    assert answers[1]["msisdn"] == "447973100100"
    assert (answers[1]["error"], answers[1]["error_name"]) == ("ERR1", "Unknown subscriber")
    assert answers[1]["mccmnc"] == answers[1]["mcc"] == answers[1]["mnc"] == ""
    assert answers[2]["number"] == "not a number"
    assert answers[2]["error"] == "BADNUMBER"


NUMBERS_FILE = f"""# numbers to check
{PORTED}

{UNKNOWN}
+44 7912 345678
not-a-number
{PORTED}
07700 000036
"""
INPUT_NUMBERS = [PORTED, UNKNOWN, "+44 7912 345678", "not-a-number", PORTED, "07700 000036"]


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_lookup_file_to_csv(tmp_path, config_file, subprocess_env, sim, source: str) -> None:
    out = tmp_path / "answers.csv"
    if source == "file":
        numbers = tmp_path / "numbers.txt"
        numbers.write_text(NUMBERS_FILE)
        done = run(
            ["lookup", "--config", str(config_file), "--file", str(numbers), "--output", str(out)], subprocess_env
        )
    else:
        done = run(
            ["lookup", "--config", str(config_file), "--file", "-", "--output", str(out)],
            subprocess_env,
            stdin=NUMBERS_FILE,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    with out.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames
    assert header is not None
    assert header[0] == "number"
    assert set(header) >= JSON_KEYS
    assert [r["number"] for r in rows] == INPUT_NUMBERS
    assert [r["msisdn"] for r in rows] == [
        "447788450450",
        "447973100100",
        "447912345678",
        "",
        "447788450450",
        "447700000036",
    ]
    assert [r["error"] for r in rows] == ["", "ERR1", "", "BADNUMBER", "", "ERR36"]
    assert rows[0]["mccmnc"] == rows[4]["mccmnc"] == "23415"
    assert (rows[0]["mcc"], rows[0]["mnc"]) == ("234", "15")
    assert rows[1]["error_name"] == "Unknown subscriber"
    # each distinct number paid for once
    assert sorted(sim.stats()["charged"]) == sorted(["447788450450", "447973100100", "447912345678", "447700000036"])


def test_lookup_file_with_json_and_output(tmp_path, config_file, subprocess_env) -> None:
    out = tmp_path / "answers.csv"
    done = run(
        ["lookup", "--config", str(config_file), "--json", "--output", str(out), "--file", "-"],
        subprocess_env,
        stdin=f"{PORTED}\n{UNKNOWN}\n",
    )
    assert done.returncode == 0, done.stderr
    assert [a["msisdn"] for a in json.loads(done.stdout)] == ["447788450450", "447973100100"]
    assert len(out.read_text().splitlines()) == 3


# -- lookup: failures --


def test_lookup_wrong_password(tmp_path, sim, subprocess_env) -> None:
    cfg = write_config(tmp_path / "c.conf", sim.url, user="demo", password="not-the-password")
    done = run(["lookup", "--config", str(cfg), PORTED], subprocess_env)
    assert done.returncode == 1
    assert "AUTH" in one_stderr_line(done)
    assert "not-the-password" not in done.stdout + done.stderr


@pytest.mark.parametrize(("account", "reason"), [("nocredit", "CREDIT"), ("locked", "LOCKED")])
def test_lookup_refused_account(tmp_path, sim, subprocess_env, account: str, reason: str) -> None:
    cfg = write_config(tmp_path / "c.conf", sim.url, user=account, password=account)
    done = run(["lookup", "--config", str(cfg), PORTED], subprocess_env)
    assert done.returncode == 1
    assert reason in one_stderr_line(done)
    assert sim.stats()["charged"] == []


def test_lookup_unreachable(tmp_path, subprocess_env) -> None:
    cfg = write_config(tmp_path / "c.conf", f"http://127.0.0.1:{closed_port()}/npl")
    done = run(["lookup", "--config", str(cfg), PORTED], subprocess_env)
    assert done.returncode == 1
    assert "UNREACHABLE" in one_stderr_line(done)


def test_lookup_timeout(config_file, subprocess_env) -> None:
    done = run(["lookup", "--config", str(config_file), "--timeout", "1", HANGING], subprocess_env)
    assert done.returncode == 1
    assert "TIMEOUT" in one_stderr_line(done)
    assert done.stdout.startswith("447400999902 TIMEOUT")


def test_lookup_failure_still_shows_what_was_answered(config_file, subprocess_env) -> None:
    done = run(["lookup", "--json", "--config", str(config_file), "--timeout", "1", "x", HANGING], subprocess_env)
    assert done.returncode == 1
    assert "TIMEOUT" in one_stderr_line(done)
    assert [a["error"] for a in json.loads(done.stdout)] == ["BADNUMBER", "TIMEOUT"]


def test_lookup_missing_config(tmp_path, subprocess_env) -> None:
    missing = tmp_path / "missing.conf"
    done = run(["lookup", "--config", str(missing), PORTED], subprocess_env)
    assert done.returncode == 2
    assert str(missing) in one_stderr_line(done)
    assert done.stdout == ""


def test_lookup_missing_config_from_environment(tmp_path, subprocess_env) -> None:
    missing = tmp_path / "from-env.conf"
    done = run(["lookup", PORTED], {**subprocess_env, ENV_VAR: str(missing)})
    assert done.returncode == 2
    assert str(missing) in one_stderr_line(done)


def test_lookup_without_numbers(config_file, subprocess_env) -> None:
    done = run(["lookup", "--config", str(config_file)], subprocess_env)
    assert done.returncode == 2
    assert "no numbers" in one_stderr_line(done)


def test_lookup_missing_numbers_file(tmp_path, config_file, subprocess_env) -> None:
    missing = tmp_path / "numbers.txt"
    done = run(["lookup", "--config", str(config_file), "--file", str(missing)], subprocess_env)
    assert done.returncode == 2
    assert str(missing) in one_stderr_line(done)


def test_lookup_unwritable_output(tmp_path, config_file, subprocess_env, sim) -> None:
    """An output file that cannot be written is one line, exit 2, before any credit is spent."""
    out = tmp_path / "no-such-dir" / "answers.csv"
    done = run(["lookup", "--config", str(config_file), "--output", str(out), PORTED], subprocess_env)
    assert done.returncode == 2, done.stderr
    assert str(out) in one_stderr_line(done)
    assert sim.stats()["charged"] == []


@pytest.mark.parametrize("timeout", ["nan", "inf", "-1", "0"])
def test_lookup_bad_timeout_is_a_usage_error(config_file, subprocess_env, sim, timeout: str) -> None:
    done = run(["lookup", "--config", str(config_file), f"--timeout={timeout}", PORTED], subprocess_env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "--timeout" in done.stderr.splitlines()[-1]
    assert sim.stats()["charged"] == []


@pytest.mark.parametrize(
    "where",
    ["after", "before", "environment"],
)
def test_config_option_anywhere(config_file, subprocess_env, where: str) -> None:
    env = dict(subprocess_env)
    if where == "after":
        args = ["lookup", "--config", str(config_file), PORTED]
    elif where == "before":
        args = ["--config", str(config_file), "lookup", PORTED]
    else:
        args = ["lookup", PORTED]
        env[ENV_VAR] = str(config_file)
    done = run(args, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("447788450450 23415 ")


def test_config_option_wins_over_environment(tmp_path, config_file, subprocess_env) -> None:
    env = {**subprocess_env, ENV_VAR: str(tmp_path / "missing.conf")}
    done = run(["lookup", "--config", str(config_file), PORTED], env)
    assert done.returncode == 0, done.stderr


# -- check --


def test_check_ok_spends_no_credit(secret_config, secret_sim, subprocess_env) -> None:
    done = run(["check", "--config", str(secret_config)], subprocess_env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0] == f"configuration: {secret_config} (--config)"
    assert lines[1].startswith("OK")
    assert "alice" in lines[1]
    stats = secret_sim.stats()
    assert stats["charged"] == []
    assert stats["credit"]["alice"] == 50
    assert [r["numbers"] for r in stats["requests"]] == [[]]
    assert SECRET not in done.stdout + done.stderr


def test_check_and_lookup_send_extra_form(tmp_path, secret_sim, subprocess_env) -> None:
    """``check`` asks through the lookups' client: the same form, ``[api] extra_form`` included."""
    extra = {"api": {"apiver": "2.5", "extra_form": "economy=1 & tag=pbx%201"}}
    cfg = write_config(tmp_path / "extra.conf", secret_sim.url, user="alice", password=SECRET, **extra)
    checked = run(["check", "--config", str(cfg)], subprocess_env)
    assert checked.returncode == 0, checked.stderr
    looked_up = run(["lookup", "--config", str(cfg), PORTED], subprocess_env)
    assert looked_up.returncode == 0, looked_up.stderr
    requests = secret_sim.stats()["requests"]
    assert [(r["numbers"], r["apiver"], r["extra"]) for r in requests] == [
        ([], "2.5", {"economy": "1", "tag": "pbx 1"}),
        (["447788450450"], "2.5", {"economy": "1", "tag": "pbx 1"}),
    ]
    assert secret_sim.stats()["charged"] == ["447788450450"]  # the password was taken as it is


@pytest.mark.parametrize(
    ("user", "password", "reason"),
    [("alice", "wrong-" + SECRET[::-1], "AUTH"), ("nobody", SECRET, "AUTH"), ("carol", SECRET[::-1], "LOCKED")],
)
def test_check_refused(tmp_path, secret_sim, subprocess_env, user: str, password: str, reason: str) -> None:
    cfg = write_config(tmp_path / "c.conf", secret_sim.url, user=user, password=password)
    done = run(["check", "--config", str(cfg)], subprocess_env)
    assert done.returncode == 1
    assert reason in one_stderr_line(done)
    assert done.stdout == f"configuration: {cfg} (--config)\n"
    assert password not in done.stdout + done.stderr
    assert secret_sim.stats()["charged"] == []


def test_check_account_without_credit(tmp_path, sim, subprocess_env) -> None:
    """What the README's table says: CREDIT, exit 1 (the simulator refuses even an empty query)."""
    cfg = write_config(tmp_path / "c.conf", sim.url, user="nocredit", password="nocredit")
    done = run(["check", "--config", str(cfg)], subprocess_env)
    assert done.returncode == 1
    assert one_stderr_line(done) == (
        f"npl-agi: CREDIT: credentials accepted by {sim.url}, but the account has no credit: FAIL Insufficient credit"
    )
    assert sim.stats()["charged"] == []


def test_check_names_the_configuration_it_read(tmp_path, secret_config, subprocess_env) -> None:
    done = run(["check"], {**subprocess_env, ENV_VAR: str(secret_config)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"configuration: {secret_config} (${ENV_VAR})"


def test_check_unreachable(tmp_path, subprocess_env) -> None:
    cfg = write_config(tmp_path / "c.conf", f"http://127.0.0.1:{closed_port()}/npl", user="alice", password=SECRET)
    done = run(["check", "--config", str(cfg)], subprocess_env)
    assert done.returncode == 1
    assert "UNREACHABLE" in one_stderr_line(done)
    assert SECRET not in done.stdout + done.stderr


def test_check_timeout(tmp_path, subprocess_env) -> None:
    """A server that takes the connection and never answers (a listening socket nobody serves)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/npl"
        cfg = write_config(tmp_path / "c.conf", url, user="alice", password=SECRET)
        done = run(["check", "--config", str(cfg), "--timeout", "1"], subprocess_env)
    assert done.returncode == 1
    assert "TIMEOUT" in one_stderr_line(done)
    assert SECRET not in done.stdout + done.stderr


def test_check_without_credentials(tmp_path, sim, subprocess_env) -> None:
    cfg = write_config(tmp_path / "c.conf", sim.url, user="", password="")
    done = run(["check", "--config", str(cfg)], subprocess_env)
    assert done.returncode == 2
    line = one_stderr_line(done)
    assert str(cfg) in line and "[api] user" in line
    assert sim.stats()["requests"] == []


# -- the password never shows --

SECRET_COMMANDS = [
    ["lookup", PORTED],
    ["lookup", "--json", PORTED, UNKNOWN, "bad"],
    ["lookup", "--timeout", "1", HANGING],
    ["check"],
    ["cache", "stats"],
    ["cache", "stats", "--json"],
    ["cache", "export"],
    ["cache", "export", "--json"],
    ["cache", "purge"],
]


@pytest.mark.parametrize("args", SECRET_COMMANDS, ids=[" ".join(a) for a in SECRET_COMMANDS])
def test_password_never_printed(secret_config, subprocess_env, args: list[str]) -> None:
    run(["lookup", "--config", str(secret_config), PORTED], subprocess_env)  # something in the cache
    done = run([*args, "--config", str(secret_config)], subprocess_env)
    assert "Traceback" not in done.stderr
    assert SECRET not in done.stdout
    assert SECRET not in done.stderr


def test_password_never_printed_in_csv(tmp_path, secret_config, subprocess_env) -> None:
    out = tmp_path / "out.csv"
    done = run(["lookup", "--config", str(secret_config), "--output", str(out), PORTED, UNKNOWN], subprocess_env)
    assert done.returncode == 0, done.stderr
    assert SECRET not in out.read_text() + done.stdout + done.stderr


@pytest.mark.parametrize("wrong", ["url", "password", "locked"])
def test_password_never_printed_on_failure(tmp_path, secret_sim, subprocess_env, wrong: str) -> None:
    url = f"http://127.0.0.1:{closed_port()}/npl" if wrong == "url" else secret_sim.url
    if wrong == "locked":
        secret_sim.accounts["alice"].locked = True
    if wrong == "password":
        secret_sim.accounts["alice"].password = "something-else"
    cfg = write_config(tmp_path / "c.conf", url, user="alice", password=SECRET)
    for args in (["lookup", PORTED], ["lookup", "--json", PORTED], ["check"]):
        done = run([*args, "--config", str(cfg)], subprocess_env)
        assert done.returncode == 1
        assert SECRET not in done.stdout + done.stderr


# -- help --


@pytest.mark.parametrize("command", [[], ["lookup"], ["check"], ["cache"], ["simulate"], ["demo"]])
def test_help(subprocess_env, command: list[str]) -> None:
    done = run([*command, "--help"], subprocess_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {' '.join(['npl-agi', *command])} ")
    assert done.stderr == ""


def test_version(subprocess_env) -> None:
    from npl_agi import __version__

    done = run(["--version"], {k: v for k, v in subprocess_env.items() if k != ENV_VAR})
    assert done.returncode == 0
    version, configuration = done.stdout.splitlines()
    assert version == f"npl-agi {__version__}"
    assert configuration == "configuration: /etc/asterisk/npl-agi.conf (the default)"
    for args, env, how in [
        (["--config", "/x/given.conf", "--version"], {}, "--config"),
        (["--version"], {ENV_VAR: "/x/env.conf"}, f"${ENV_VAR}"),
    ]:
        done = run(args, {**subprocess_env, **env})
        assert done.returncode == 0, done.stderr
        path = "/x/given.conf" if how == "--config" else "/x/env.conf"
        assert done.stdout.splitlines()[1] == f"configuration: {path} ({how})"


def test_no_command_is_a_usage_error(subprocess_env) -> None:
    done = run([], subprocess_env)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


# -- simulate --


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_simulate_serves_until_signalled(tmp_path, subprocess_env, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "npl_agi.admin.cli", "simulate", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env,
    )
    try:
        banner = proc.stdout.readline() if proc.stdout else ""
        m = re.search(r"http://127\.0\.0\.1:(\d+)/npl", banner)
        assert m, banner
        url, port = m.group(0), int(m.group(1))
        assert port != 0
        api = ApiConfig(url=url, user="demo", password="demo", lock_dir=str(tmp_path))
        client = Client(api, FileLock.for_account(api.lock_dir, api.url, api.user))
        answers = client.lookup(["447788450450", "447973100100"], timeout=30)
        assert answers["447788450450"].mccmnc == "23415"
        assert answers["447973100100"].error == "ERR1"
        assert client.check(timeout=30) == protocol.FAIL_NO_NUMBERS
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode is not None
    assert "Traceback" not in err
    if sig == signal.SIGINT:
        assert proc.returncode == 130
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def test_simulate_rejects_unknown_fault(subprocess_env) -> None:
    done = run(["simulate", "--port", "0", "--fault", "sometimes"], subprocess_env)
    assert done.returncode == 2
    assert "--fault" in one_stderr_line(done)


# -- lookup --file: streamed, bounded, honest about failures --


def run_measured(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, int]:
    """The command in a child that reports its own peak memory (KiB) on its last stderr line."""
    probe = "import sys\n" + CLI_REPORTING_PEAK
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, timeout=300)
    *rest, last = done.stderr.splitlines() or [""]
    assert last.startswith("maxrss "), done.stderr
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout, "".join(f"{r}\n" for r in rest)), int(
        last.split()[1]
    )


def test_lookup_file_with_a_200_mb_line_neither_echoes_nor_holds_it(tmp_path, config_file, subprocess_env, sim):
    numbers = tmp_path / "numbers.txt"
    with numbers.open("wb") as f:
        f.write(f"{PORTED}\n{UNKNOWN}\n07".encode())
        block = b"7" * (1 << 20)
        for _ in range(200):
            f.write(block)  # 200 MB of one line, and no newline at the end
    done, peak_kib = run_measured(["lookup", "--config", str(config_file), "--file", str(numbers)], subprocess_env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["447788450450", "447973100100"]
    assert len(lines) == 3
    assert lines[2].startswith("'0777777777777777777777") and " BADNUMBER " in lines[2]
    assert len(done.stdout) < 1000
    assert peak_kib < 100 * 1024  # far below the line's 200 MB
    assert sim.stats()["charged"] == ["447788450450", "447973100100"]


def test_lookup_file_is_answered_one_batch_at_a_time(tmp_path, sim, subprocess_env):
    """With batch_size 2 the answers of the first two lines come out while stdin is still open."""
    cfg = write_config(tmp_path / "c.conf", sim.url, api={"batch_size": "2"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "npl_agi.admin.cli", "lookup", "--config", str(cfg), "--file", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env,
    )
    try:
        assert proc.stdin and proc.stdout
        proc.stdin.write(f"{PORTED}\n{UNKNOWN}\n")
        proc.stdin.flush()
        first = [proc.stdout.readline(), proc.stdout.readline()]  # before any further input
        assert [line.split()[0] for line in first] == ["447788450450", "447973100100"]
        out, err = proc.communicate("07700 000013\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == "447700000013 ERR13 Call barred\n"
    assert [r["numbers"] for r in sim.stats()["requests"]] == [["447788450450", "447973100100"], ["447700000013"]]


def test_lookup_exits_1_when_a_number_failed_for_a_transport_reason(config_file, subprocess_env):
    """A cut-short answer: the good line is kept and shown, the cut number is PROTOCOL, exit 1."""
    done = run(
        ["lookup", "--config", str(config_file), "--file", "-"], subprocess_env, stdin=f"{PORTED}\n07400999903\n"
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith("447788450450 23415 ")
    assert done.stdout.splitlines()[1].startswith("447400999903 TRUNCATED ")
    assert one_stderr_line(done) == "npl-agi: 1 of 2 numbers failed (PROTOCOL 1)"


def test_lookup_exits_1_when_a_dripping_service_runs_out_of_time(tmp_path, subprocess_env):
    with Simulator("127.0.0.1", 0, line_delay=0.5) as drip:
        cfg = write_config(tmp_path / "c.conf", drip.url)
        done = run(
            ["lookup", "--config", str(cfg), "--timeout", "1", PORTED, "07400100001", "07400100002"], subprocess_env
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "TIMEOUT" in one_stderr_line(done)
    assert "447400100002 TIMEOUT" in done.stdout


HOSTILE_CELLS = ["=cmd|' /C calc'!A0", "@SUM(1+1)", "+1+cmd|' /C calc'!A0", "-2+3+cmd|' /C calc'!A0", "=1+2"]


def test_csv_cells_a_spreadsheet_would_run_are_neutralised(tmp_path, config_file, subprocess_env) -> None:
    out = tmp_path / "answers.csv"
    plain = ["+44 7788 450450", "07973100100"]
    done = run(
        ["lookup", "--config", str(config_file), "--file", "-", "--output", str(out)],
        subprocess_env,
        stdin="\n".join(HOSTILE_CELLS + plain) + "\n",
    )
    assert done.returncode == 0, done.stderr
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["number"] for r in rows] == ["'" + c for c in HOSTILE_CELLS] + plain  # phone numbers stay as they are
    for row in rows:
        assert all(not v or v[0] not in "=+-@\t\r" or v in plain for v in row.values()), row


def test_csv_cell_rules() -> None:
    from npl_agi.admin.lookup_cmd import csv_cell

    for cell in ("=A1", "@A1", "\t=A1", "\r=A1", "+A1", "-A1", "+44 (0)7788", "-2+3"):
        assert csv_cell(cell) == "'" + cell
    for cell in ("+447788450450", "+44 7788 450450", "-1", "447788450450", "Vodafone UK", "", "a=b"):
        assert csv_cell(cell) == cell


def test_lookup_output_to_a_full_disk(config_file, subprocess_env, sim) -> None:
    """--output /dev/full: the answers are printed instead and cached, one line on stderr, exit 2."""
    done = run(["lookup", "--config", str(config_file), "--output", "/dev/full", PORTED, UNKNOWN], subprocess_env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "/dev/full" in one_stderr_line(done) and "No space left" in done.stderr
    assert [line.split()[:2] for line in done.stdout.splitlines()] == [
        ["447788450450", "23415"],
        ["447973100100", "ERR1"],
    ]
    again = run(["lookup", "--config", str(config_file), PORTED, UNKNOWN], subprocess_env)
    assert again.returncode == 0
    assert sim.stats()["charged"] == ["447788450450", "447973100100"]  # paid once: the answers were cached


# -- usage errors: one line, exit 2 --

USAGE_ERRORS = [
    [],
    ["frobnicate"],
    ["lookup", "--bogus", PORTED],
    ["lookup", "--timeout"],
    ["cache"],
    ["cache", "nonsense"],
    ["cache", "stats", "extra"],
    ["simulate", "--port", "eighty"],
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=[" ".join(a) or "nothing" for a in USAGE_ERRORS])
def test_usage_error_is_one_line(subprocess_env, args: list[str]) -> None:
    done = run(args, subprocess_env)
    assert done.returncode == 2
    line = one_stderr_line(done)
    assert line.startswith("npl-agi: ") and "--help" in line
    assert done.stdout == ""


def test_cache_without_an_action_names_only_the_action(subprocess_env) -> None:
    line = one_stderr_line(run(["cache"], subprocess_env))
    assert "ACTION" in line and "NUMBER" not in line
