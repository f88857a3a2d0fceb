"""The real AGI script as a subprocess over pipes, behind the AGI channel emulator."""

import os
import signal
import socket
import sys
import time

import pytest
from conftest import AGI_SCRIPT, write_config

from npl_agi.backends import SqliteCache
from npl_agi.config import load_config
from npl_agi.core.agiwire import parse_args as parse_agi_args
from npl_agi.core.agiwire import quote as agi_quote
from npl_agi.core.protocol import Answer
from npl_agi.doors.process import VARIABLES
from npl_agi.doubles.emulator import DEAD, OK, AgiEmulator, hung_up_after

COMMANDS = len(VARIABLES) + 1  # every variable, then one VERBOSE line


@pytest.fixture
def agi(config_file, subprocess_env):
    return AgiEmulator(str(AGI_SCRIPT), env={**subprocess_env, "NPL_AGI_CONFIG": str(config_file)})


def agi_with(tmp_path, subprocess_env, url, **sections):
    config = write_config(tmp_path / "custom.conf", url, **sections)
    return AgiEmulator(str(AGI_SCRIPT), env={**subprocess_env, "NPL_AGI_CONFIG": str(config)})


def assert_clean(run):
    """Exit 0, no traceback, only well-formed SET VARIABLE/VERBOSE commands."""
    assert run.returncode == 0
    assert run.stderr == ""
    assert run.unbalanced == []
    for argv in run.commands:
        assert (argv[:2] == ["SET", "VARIABLE"] and argv[2] in VARIABLES and len(argv) == 4) or argv[0] == "VERBOSE"


def test_success_sets_every_variable_then_a_second_call_is_served_from_the_cache(agi, sim):
    run = agi.run(["07788450450"])
    assert_clean(run)
    assert len(run.commands) == COMMANDS
    v = run.variables
    assert list(v) == list(VARIABLES)
    assert (v["NPL_NUMBER"], v["NPL_MCCMNC"], v["NPL_MCC"], v["NPL_MNC"]) == ("447788450450", "23415", "234", "15")
    assert v["NPL_MSC"].isdigit() and v["NPL_IMSI"].startswith("23415")
    assert (v["NPL_NETWORK"], v["NPL_COUNTRY"], v["NPL_ERR"], v["NPL_SOURCE"]) == ("Vodafone UK", "GB", "", "api")
    assert v["NPL_LOOKUP_MS"].isdigit()
    again = agi.run(["07788450450"]).variables
    assert again["NPL_SOURCE"] == "cache" and again["NPL_MCCMNC"] == "23415"
    assert sim.stats()["charged"] == ["447788450450"]


def test_a_fresh_call_asks_for_a_cached_number_and_stores_the_answer(agi, sim, config_file):
    """A number cached on the wrong network (the simulator says 23415): ``fresh`` after the
    number, wherever it stands, asks the service for it; the next call reads the new answer."""
    SqliteCache(load_config(str(config_file)).cache).put_many([Answer("447788450450", mccmnc="23410", source="api")])
    t = f"t={time.time():.3f}"
    calls = [["07788450450", t], ["07788450450", "fresh", t], ["07788450450", t], ["07788450450", t, "fresh"]]
    seen = [agi.run(args).variables for args in calls]
    assert [(v["NPL_ERR"], v["NPL_SOURCE"], v["NPL_MCCMNC"]) for v in seen] == [
        ("", "cache", "23410"),
        ("", "api", "23415"),
        ("", "cache", "23415"),
        ("", "api", "23415"),
    ]
    assert sim.stats()["charged"] == ["447788450450"] * 2


def test_a_fresh_call_for_a_number_refused_by_its_form_asks_nothing(agi, sim):
    run = agi.run(["0123", "fresh"])
    assert_clean(run)
    assert run.variables["NPL_ERR"] == "BADNUMBER"
    assert sim.stats()["requests"] == []


@pytest.mark.parametrize(
    ("number", "npl_err"),
    [
        ("07973100100", "ERR1"),
        ("07400000029", "ERR29"),
        ("07400000077", "ERR77"),
        ("hello", "BADNUMBER"),
        ("020 7946 0018", "NOTMOBILE"),
        ("07400999903", "PROTOCOL"),  # the answer was cut short before our number's line
        ("07400999905", "PROTOCOL"),
        ("07400999906", "PROTOCOL"),
    ],
)
def test_per_number_and_service_errors(agi, number, npl_err):
    run = agi.run([number])
    assert_clean(run)
    assert run.variables["NPL_ERR"] == npl_err
    assert run.variables["NPL_MCCMNC"] == ""
    assert any(npl_err in line for line in run.verbose)


@pytest.mark.parametrize(
    ("api", "npl_err"),
    [
        ({"password": "wrong"}, "AUTH"),
        ({"user": "nocredit", "password": "nocredit"}, "CREDIT"),
        ({"user": "locked", "password": "locked"}, "LOCKED"),
        ({"password": ""}, "CONFIG"),
        ({"timeout": "often"}, "CONFIG"),
        ({"enabled": "no"}, "DISABLED"),
    ],
)
def test_account_and_config_errors(tmp_path, subprocess_env, sim, api, npl_err):
    run = agi_with(tmp_path, subprocess_env, sim.url, api=api).run(["07788450450"])
    assert_clean(run)
    assert run.variables["NPL_ERR"] == npl_err
    if npl_err in ("DISABLED", "CONFIG"):
        assert sim.stats()["requests"] == []


def test_missing_config_file(tmp_path, subprocess_env):
    env = {**subprocess_env, "NPL_AGI_CONFIG": str(tmp_path / "nowhere.conf")}
    run = AgiEmulator(str(AGI_SCRIPT), env=env).run(["07788450450"])
    assert_clean(run)
    assert run.variables["NPL_ERR"] == "CONFIG"
    assert any("nowhere.conf" in line for line in run.verbose)


def test_unreachable(tmp_path, subprocess_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/npl"
    run = agi_with(tmp_path, subprocess_env, url).run(["07788450450"])
    assert_clean(run)
    assert run.variables["NPL_ERR"] == "UNREACHABLE"
    assert run.variables["NPL_NUMBER"] == "447788450450"


def test_timeout_within_the_configured_deadline(tmp_path, subprocess_env, sim):
    run = agi_with(tmp_path, subprocess_env, sim.url, api={"timeout": "1"}).run(["07400999902"])
    assert_clean(run)
    assert run.variables["NPL_ERR"] == "TIMEOUT"
    assert 900 <= int(run.variables["NPL_LOOKUP_MS"]) <= 1100
    assert run.seconds < 1 + 1.5


HOSTILE = [
    '"',
    "\\",
    '\\"',
    'x" "y',
    "0;Dial(SIP/evil)",
    '07788450450"\nEXEC Dial "SIP/evil',
    "\r\nHANGUP\r\n",
    "x" * 1024,
    "é漢字٠١٢",
    "＋４４７７８８４５０４５０",
    "\x1b[2J\x07\x7f\x85\u2028",
    "",
]


@pytest.mark.parametrize("dialled", HOSTILE)
def test_hostile_numbers_in_the_extension_never_add_commands(agi, sim, dialled):
    run = agi.run([], {"agi_extension": dialled, "agi_dnid": "unknown"})
    assert_clean(run)
    assert sim.stats()["requests"] == []
    if "\n" in dialled:
        # A line break ends the environment block early, as it would from Asterisk: the rest
        # of the block then reads as replies, and the script stops at the first bad one.
        assert len(run.commands) <= COMMANDS
    else:
        assert len(run.commands) == COMMANDS
        assert run.variables["NPL_ERR"] == "BADNUMBER"


@pytest.mark.parametrize("dialled", [h for h in HOSTILE if h and "\n" not in h and "\r" not in h])
def test_hostile_numbers_as_the_argument_never_add_commands(agi, sim, dialled):
    run = agi.run([dialled])
    assert_clean(run)
    assert len(run.commands) == COMMANDS
    assert run.variables["NPL_ERR"] == "BADNUMBER"


@pytest.mark.parametrize(
    "value",
    ['a"b', "a\\b", "a\nb", "a\rb", '\\"', "x" * 5000, "tab\there", "\x00", "ü"],
)
def test_quoting_survives_asterisks_parser(value):
    argv, unbalanced = parse_agi_args(f"SET VARIABLE NPL_X {agi_quote(value)}")
    assert not unbalanced
    assert len(argv) == 4
    assert "\n" not in argv[3] and "\r" not in argv[3]
    assert argv[3] == "".join(" " if c in "\n\r\t\x00" else c for c in value)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["07788450450"], {"agi_extension": "07973100100"}, "447788450450"),  # the argument wins
        ([], {"agi_extension": "07788450450"}, "447788450450"),
        ([], {"agi_extension": "s", "agi_dnid": "07810701702"}, "447810701702"),  # Gosub: ext is s
        ([" "], {"agi_extension": "07788450450"}, "447788450450"),
    ],
)
def test_where_the_number_comes_from(agi, args, env, expected):
    assert agi.run(args, env).variables["NPL_NUMBER"] == expected


@pytest.mark.parametrize("step", range(COMMANDS))
def test_hangup_at_each_step_still_sets_what_a_dead_channel_accepts(agi, step):
    run = agi.run(["07788450450"], respond=hung_up_after(step))
    assert_clean(run)
    assert len(run.commands) == COMMANDS
    assert run.variables["NPL_MCCMNC"] == "23415"


USAGE = (
    "520-Invalid command syntax.  Proper usage follows:\n"
    "Usage: SET VARIABLE <variablename> <value>\n"
    "520 End of proper usage."
)


@pytest.mark.parametrize("reply", [DEAD, "200 result=-1", "HANGUP", USAGE, None])
@pytest.mark.parametrize("step", [0, 5, COMMANDS - 1])
def test_a_refused_command_ends_the_script_quietly(agi, step, reply):
    run = agi.run(["07788450450"], respond=lambda n, argv: OK if n < step else reply)
    assert run.returncode == 0
    assert run.stderr == ""
    assert len(run.commands) == step + 1  # nothing sent after the refusal


def test_sighup_during_a_slow_lookup_ends_within_the_deadline(tmp_path, subprocess_env, sim):
    agi = agi_with(tmp_path, subprocess_env, sim.url, api={"timeout": "1"})
    run = agi.run(["07400999902"], sighup_after=0.3)
    assert_clean(run)
    assert run.seconds < 1 + 1.5
    assert run.variables["NPL_ERR"] == "TIMEOUT"


def test_sighup_while_the_interpreter_starts_is_quiet(agi):
    """Before Python can ignore SIGHUP the signal simply ends the process: no output at all."""
    run = agi.run(["07788450450"], sighup_after=0.0)
    assert run.returncode in (0, -signal.SIGHUP)
    assert run.stderr == ""
    assert run.unbalanced == []


def test_a_broken_install_still_reports_config(tmp_path):
    """Without the npl_agi package importable the script still answers NPL_ERR=CONFIG."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = AgiEmulator(str(AGI_SCRIPT), python=[sys.executable, "-S", "-I"], env=env).run(["07788450450"])
    assert run.returncode == 0
    assert run.stderr == ""
    assert run.variables == {"NPL_ERR": "CONFIG"}
    assert "cannot be imported" in run.verbose[0]


def test_timing_is_reported(agi):
    started = time.monotonic()
    run = agi.run(["07788450450"])
    assert int(run.variables["NPL_LOOKUP_MS"]) <= (time.monotonic() - started) * 1000


def test_emulator_copes_with_a_script_that_never_reads_its_environment():
    """A script that ends before reading the environment block (here larger than a pipe holds)."""
    run = AgiEmulator("/bin/true", python=[]).run([], {"agi_padding": "x" * 200_000})
    assert run.returncode == 0
    assert run.commands == []


def _processes_with(config) -> list[int]:
    """The processes whose environment names ``config``: a test's AGI script and its children."""
    found = []
    wanted = f"NPL_AGI_CONFIG={config}".encode()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if wanted in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def test_the_detached_child_stays_in_the_callers_session_in_a_group_of_its_own(tmp_path, subprocess_env, sim):
    """The child leaves the script's process group (nothing sent to the group reaches it), but
    not its session: a process that makes a session of its own is, with the kernel's automatic
    session groups, scheduled as a new group, and a new group on a machine with every core busy
    was seen to wait seconds for its first time slice, the call's request with it."""
    sim.hang_seconds = 3
    agi = agi_with(tmp_path, subprocess_env, sim.url, api={"timeout": "1"})
    run = agi.run(["07400999902"])
    assert run.variables["NPL_ERR"] == "TIMEOUT"  # the script is gone; its child waits for the service
    children = _processes_with(agi.env["NPL_AGI_CONFIG"])
    assert len(children) == 1, children
    (child,) = children
    assert os.getsid(child) == os.getsid(0)
    assert os.getpgid(child) == child
