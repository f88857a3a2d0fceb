"""Promises of the documentation that no other test holds the product to.

- The FastAGI server shows no run of 7 or 8 digits in full, in its log or in the VERBOSE lines it
  sends Asterisk: national numbers of several countries are that short, and so are whole
  international numbers of a few (docs/fastagi.md, docs/configuration.md ``log_numbers``).
- A routed trunk that ends the call with hangup cause 3 (no route to destination) gets the
  fresh retry when ``NPL_RETRY_CAUSES`` is unset: its default is ``1,3``
  (dialplan/npl-outbound.conf, docs/dialplan.md).
- A number you know is answered ``local`` whatever its type, so a fixed line that an admin
  imported never gets ``NOTMOBILE`` (docs/local-data.md).

Real parts only: ``npl-agi serve`` and ``npl-agi local import`` as processes of their own, the
simulator (or a hostile server) on 127.0.0.1, the process script behind an emulated channel, and
a real Asterisk running the shipped dialplan.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hostile_server as hostile
import phonenumbers
import pytest
from asterisk_fixture import DIALPLAN, ROOT, Asterisk, extensions_conf, find_asterisk, local_routes, wait_for
from conftest import AGI_SCRIPT, Simulator, write_config
from doors import but_time, door_configs, fastagi_call, through_both_doors

from npl_agi.doubles.emulator import AgiEmulator

NPL_AGI = Path(sys.executable).parent / "npl-agi"  # the command an admin runs, installed beside the interpreter


def npl_agi(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert NPL_AGI.exists(), f"{NPL_AGI}: the package is not installed in this environment (pip install -e .)"
    return subprocess.run([str(NPL_AGI), *args], env=env, capture_output=True, text=True, timeout=120)


def import_known(conf: Path, text: str, env: dict[str, str]) -> None:
    """Numbers you know into the cache file of ``conf``, through ``npl-agi local import``."""
    path = conf.with_suffix(".known.csv")
    path.write_text(text)
    done = npl_agi("--config", str(conf), "local", "import", str(path), env=env)
    assert done.returncode == 0, done.stdout + done.stderr


# -- 1. no run of 7 or 8 digits in full in the FastAGI server's log or VERBOSE lines --


@contextlib.contextmanager
def npl_agi_serve(conf: Path, env: dict[str, str], log_path: Path) -> Iterator[tuple[int, Path]]:
    """``npl-agi serve`` on a free loopback port with its stderr (its log) in ``log_path``;
    stopped with SIGTERM on the way out, so the log is whole once the block has ended."""
    command = [str(NPL_AGI), "serve", "--config", str(conf), "--listen", "127.0.0.1:0"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:

        def listening() -> re.Match[str] | None:
            assert proc.poll() is None, log_path.read_text()
            return re.search(r"FastAGI server on 127\.0\.0\.1:(\d+)", log_path.read_text())

        yield int(wait_for(listening, 30, "npl-agi serve to listen").group(1)), log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def call_id(i: int) -> str:
    """A channel's unique id as Asterisk makes it (seconds, a dot, a counter)."""
    return f"1764000000.{i}"


async def call(port: int, i: int, dialled: str):
    return await fastagi_call("127.0.0.1", port, [dialled], {"agi_uniqueid": call_id(i)})


def shown_in_full(lines: list[str], ids: list[str]) -> list[str]:
    """Every run of 7 or more digits in ``lines``, the channels' unique ids (which are kept as
    they are, in brackets) left out."""
    found = []
    for line in lines:
        for i in ids:
            line = line.replace(f"[{i}]", "[]")
        found += re.findall(r"\d{7,}", line)
    return found


# With [number] country_code = 354 (Iceland), whose numbers are 7 digits long: dialled numbers
# with runs of 7 or 8 digits, and how each lookup ends (NPL_ERR, NPL_SOURCE).
ICELAND = {"country_code": "354"}
KNOWN = "6111235"  # imported as a number you know
SHORT_RUNS = [
    ("6111234", ("ERR1", "api")),  # a mobile number the service does not know
    ("5551234", ("NOTMOBILE", "")),  # a fixed line: refused without a request
    ("87654321", ("BADNUMBER", "")),  # 8 digits: no number of Iceland
    ("+45 87654321", ("ERR1", "api")),  # Denmark: 8 national digits
    ("+44 778 8450450", ("", "api")),  # answered by the service: Vodafone UK
    ("0044 77 88450450", ("", "cache")),  # the same number again, from the cache
    (KNOWN, ("", "local")),
    ("6999904", ("PROTOCOL", "")),  # the service answers garbage
    ("6999905", ("PROTOCOL", "")),  # the service answers HTTP 500
]


def test_the_fastagi_server_shows_no_run_of_7_or_8_digits_in_full(tmp_path, sim, subprocess_env):
    """Lookups that succeed (from the service, the cache, the numbers you know) and that fail
    (the service's error for the number, a bad number, a fixed line, a broken service), each
    dialled with a run of 7 or 8 digits: the server's line for each call shows the number by
    its last 4 digits, and no line logged or sent to Asterisk's console shows any run of 7 or
    more digits but the channel's unique id."""
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, number=ICELAND, fastagi={"metrics_listen": ""})
    import_known(conf, f"{KNOWN},27401\n", subprocess_env)
    with npl_agi_serve(conf, subprocess_env, tmp_path / "serve.log") as (port, log_path):
        # One at a time: a broken service's number spoils the whole request it is in.
        served = [asyncio.run(call(port, i, dialled)) for i, (dialled, _) in enumerate(SHORT_RUNS)]
    log = log_path.read_text().splitlines()
    verbose = [line for run in served for line in run.verbose]
    ids = [call_id(i) for i in range(len(SHORT_RUNS))]
    for i, ((dialled, outcome), run) in enumerate(zip(SHORT_RUNS, served, strict=True)):
        assert (run.variables["NPL_ERR"], run.variables["NPL_SOURCE"]) == outcome, (dialled, run.variables)
        (line,) = [line for line in log if line.startswith(f"[{ids[i]}] ")]
        assert re.search(rf"'\*+{dialled[-4:]}' ", line), line  # the number, by its last 4 digits
        said = f"NPL_ERR={outcome[0]} " if outcome[0] else f"({outcome[1]}, "
        assert said in line, line
    assert [line for line in verbose if "NPL_ERR=" in line], verbose  # failures are on the console too
    assert shown_in_full(log + verbose, ids) == [], "\n".join(log + verbose)


def test_numbers_of_7_or_8_digits_that_the_service_quotes_back_are_not_shown_in_full(tmp_path, subprocess_env):
    """A service that quotes the query back (every caller's number in it) in its refusal: the
    numbers it quotes are as short as 7 and 8 digits (Tokelau, the Falklands, a national number
    of Iceland with its country code), and none is shown in full in the log or on the console."""
    dialled = ["+6907290", "+50051234", "6111234"]
    with hostile.HostileServer(hostile.echo_numbers) as service:
        conf = write_config(tmp_path / "npl-agi.conf", service.url, number=ICELAND, fastagi={"metrics_listen": ""})
        with npl_agi_serve(conf, subprocess_env, tmp_path / "serve.log") as (port, log_path):

            async def all_at_once():
                return await asyncio.gather(*(call(port, i, d) for i, d in enumerate(dialled)))

            served = asyncio.run(all_at_once())
        asked = {n for form in service.forms for n in form.get("msisdn", "").split(",")}
    assert asked == {"6907290", "50051234", "3546111234"}  # what the service had to quote back
    log = log_path.read_text().splitlines()
    verbose = [line for run in served for line in run.verbose]
    assert [run.variables["NPL_ERR"] for run in served] == ["PROTOCOL"] * 3
    quoted = [line for line in log + verbose if "msisdn=" in line]
    assert len(quoted) >= 6, "\n".join(log + verbose)  # each call's log line and its VERBOSE line
    assert shown_in_full(log + verbose, [call_id(i) for i in range(len(dialled))]) == [], "\n".join(log + verbose)


def test_the_process_script_shows_only_the_caller_s_own_number_in_full(tmp_path, subprocess_env):
    """The process script's console line names the caller's own number as dialled (Asterisk's
    own lines for the call show it too) and its canonical form; any other number in it (a reason
    that quotes numbers of other calls) is masked, as short as 7 and 8 digits too."""
    with hostile.HostileServer(hostile.quotes_others) as service:
        conf = write_config(tmp_path / "npl-agi.conf", service.url, number=ICELAND)
        agi = AgiEmulator(str(AGI_SCRIPT), env={**subprocess_env, "NPL_AGI_CONFIG": str(conf)})
        run = agi.run(["6111234"])
    assert run.variables["NPL_ERR"] == "PROTOCOL"
    assert any("near" in line for line in run.verbose), run.verbose  # the reason is shown
    own = {"6111234", run.variables["NPL_NUMBER"]}
    assert [n for n in shown_in_full(run.verbose, []) if n not in own] == [], run.verbose


# -- 2. hangup cause 3 retries with NPL_RETRY_CAUSES unset --


CONTEXTS = """\
; The originating half of every test call: it stays up until the other half ends the call.
[caller]
exten => s,1,Wait(30)
 same => n,Hangup()

; Vodafone's trunk ends every call before answering, with cause 3: no route to destination.
[trunk-vodafone]
exten => _[+0-9].,1,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)=${{NPL_TEST_TOKEN}}|trunk|trunk-vodafone|${{EXTEN}})
 same => n,Hangup(3)

[trunk-default]
exten => _[+0-9].,1,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)=${{NPL_TEST_TOKEN}}|trunk|trunk-default|${{EXTEN}})
 same => n,Answer(,i)
 same => n,Hangup()

; One lookup, as an earlier call's would have made it: the answer is cached.
[earlier-call]
exten => _X.,1,Gosub(npl-lookup,s,1(${{EXTEN}}))
 same => n,Set(SEEN=${{NPL_SOURCE}}|${{NPL_MCCMNC}}|${{NPL_ERR}})
 same => n,Set(FILE(${{NPL_TEST_RESULTS}},,,al,u)=${{NPL_TEST_TOKEN}}|lookup|${{SEEN}})
 same => n,Hangup()

#include {dialplan}/npl-lookup.conf
#include {dialplan}/npl-outbound.conf
#include {routes}
"""


@dataclass
class RetryPbx:
    asterisk: Asterisk
    sim: Simulator
    results: Path
    calls: int = 0

    def token(self) -> str:
        self.calls += 1
        return f"promise{self.calls}"

    def records(self, token: str, kind: str) -> list[list[str]]:
        rows = [line.split("|") for line in self.results.read_text().splitlines()]
        return [row[2:] for row in rows if row[:2] == [token, kind]]

    def look_up(self, dialled: str) -> list[str]:
        """The number looked up once through the shipped Gosub: its source, network and NPL_ERR."""
        token = self.token()
        self.asterisk.originate(f"Local/{dialled}@earlier-call", token, wait=5)
        found = wait_for(lambda: self.records(token, "lookup"), 20, lambda: self.asterisk.console_tail())
        return found[0]

    def call(self, dialled: str) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
        """An outbound call through npl-outbound: the trunks it reached, and its CDRs in order."""
        token = self.token()
        self.asterisk.originate(f"Local/{dialled}@npl-outbound", token, wait=20)

        def ended() -> list[dict[str, str]]:
            rows = self.asterisk.cdr_rows(token)
            ends = {r["channel"][-2:] for r in rows if "@npl-outbound-" in r["channel"]}
            return rows if {";1", ";2"} <= ends else []

        rows = wait_for(ended, 40, lambda: f"the CDRs of {dialled}\n{self.asterisk.console_tail()}")
        outbound = [r for r in rows if r["channel"].endswith(";2") and r["dcontext"] == "npl-outbound"]
        return [(t[0], t[1]) for t in self.records(token, "trunk")], outbound

    def charged(self, msisdn: str) -> int:
        return self.sim.stats()["charged"].count(msisdn)


@pytest.fixture(scope="module")
def retry_pbx(tmp_path_factory) -> Iterator[RetryPbx]:
    """A real Asterisk with the shipped lookup and outbound contexts, the shipped routes on Local
    channels, NPL_RETRY_CAUSES unset and NPL_RETRY_DIALSTATUS=none, and the process script
    against the simulator with the default configuration."""
    build, looked = find_asterisk()
    if build is None:
        pytest.skip(f"no Asterisk found (looked at {looked})")
    root = tmp_path_factory.mktemp("retry")
    agi_dir = root / "agi-bin"
    agi_dir.mkdir()
    script = agi_dir / "npl-lookup.agi"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{AGI_SCRIPT}" "$@"\n')
    script.chmod(0o755)
    with Simulator("127.0.0.1", 0) as sim:
        config = write_config(root / "npl-agi.conf", sim.url)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NPL_AGI_CONFIG": str(config)}
        asterisk = Asterisk(build, root / "asterisk", agi_dir, env)
        results = root / "results.txt"
        results.touch()
        routes = asterisk.write_config("npl-routes-test.conf", local_routes((DIALPLAN / "npl-routes.conf").read_text()))
        contexts = CONTEXTS.format(dialplan=DIALPLAN, routes=routes)
        asterisk.write_config(
            "extensions.conf",
            extensions_conf(contexts, NPL_RETRY_DIALSTATUS="none", NPL_TEST_RESULTS=str(results)),
        )
        asterisk.cdr_custom(DIALPLAN / "npl-cdr-custom.conf")
        try:
            asterisk.start()
            yield RetryPbx(asterisk, sim, results)
        finally:
            asterisk.stop()


def test_a_cached_number_whose_trunk_ends_with_cause_3_is_looked_up_fresh_by_default(retry_pbx) -> None:
    """``NPL_RETRY_CAUSES`` unset means ``1,3``: a number routed from the cache whose trunk ends
    the call with cause 3 (no route to destination) is looked up once more, fresh (a credit),
    with ``NPL_RETRY_DIALSTATUS=none`` so that only the cause can have asked for it; the same
    network then takes the fallback."""
    dialled, msisdn = "07810701702", "447810701702"  # on Vodafone, whose trunk ends with cause 3
    assert retry_pbx.look_up(dialled) == ["api", "23415", ""]
    trunks, cdrs = retry_pbx.call(dialled)
    assert trunks == [("trunk-vodafone", dialled), ("trunk-default", dialled)]
    assert [(c["npl_mccmnc"], c["npl_route"], c["npl_retry"]) for c in cdrs] == [
        ("23415", "23415", ""),
        ("23415", "fallback", "same"),
    ]
    assert retry_pbx.charged(msisdn) == 2  # the earlier call's lookup, and the fresh one


def test_the_cause_list_decides_a_trunk_ending_with_cause_3_is_not_retried_when_3_is_not_listed(
    retry_pbx,
) -> None:
    """The same trunk with ``NPL_RETRY_CAUSES=1``: no retry, no credit. So the retry above was
    the trunk's cause 3 matched against the default list, nothing else."""
    dialled, msisdn = "07788450450", "447788450450"
    assert retry_pbx.look_up(dialled) == ["api", "23415", ""]
    retry_pbx.asterisk.cli("dialplan set global NPL_RETRY_CAUSES 1")
    try:
        trunks, cdrs = retry_pbx.call(dialled)
    finally:
        retry_pbx.asterisk.cli('dialplan set global NPL_RETRY_CAUSES ""')
    assert trunks[0] == ("trunk-vodafone", dialled)
    assert {c["npl_retry"] for c in cdrs} == {""}
    assert retry_pbx.charged(msisdn) == 1


# -- 3. a fixed line you know is answered local through both doors --


FIXED_LINE = "442079460018"  # London 020: a fixed line, which lookup_types leaves out by default


@pytest.mark.parametrize("dialled", ["020 7946 0018", "+44 (0)20 7946 0018"], ids=["national", "plus-44-0"])
def test_a_fixed_line_number_you_know_is_answered_local_through_both_doors(
    tmp_path, sim, subprocess_env, dialled: str
) -> None:
    """Known numbers are of any type (``lookup_types`` does not apply to them): a fixed line an
    admin imported is answered from the list, ``NPL_SOURCE=local``, without a credit, never
    ``NOTMOBILE``, through the FastAGI server and the process script alike, in any form a call
    may dial it."""
    number = phonenumbers.parse("+" + FIXED_LINE)
    assert phonenumbers.number_type(number) == phonenumbers.PhoneNumberType.FIXED_LINE
    confs = door_configs(tmp_path, sim)
    for conf in confs.values():
        import_known(conf, "number,mccmnc,note\n+44 20 7946 0018,23415,reception\n", subprocess_env)
    doors = through_both_doors(confs, subprocess_env, dialled)
    seen = {
        door: (v["NPL_ERR"], v["NPL_SOURCE"], v["NPL_MCCMNC"], v["NPL_NETWORK"], v["NPL_NUMBER"])
        for door, v in doors.items()
    }
    assert seen == dict.fromkeys(doors, ("", "local", "23415", "Vodafone UK", FIXED_LINE)), doors
    assert but_time(doors["server"]) == but_time(doors["process"])
    assert sim.stats()["requests"] == []  # nothing was sent, nothing charged
