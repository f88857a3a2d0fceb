"""Real SIP calls: a SIPp caller through chan_pjsip and the shipped dialplan to SIPp trunks.

One Asterisk with chan_pjsip serves the module. Its pjsip.conf is the shipped trunk sample with
every trunk's contact at a SIPp UAS of its own (one per route of npl-routes.conf, and the
fallback's), and its extensions.conf includes npl-lookup.conf, npl-outbound.conf and
npl-routes.conf as shipped: the caller's context only includes npl-outbound, as the README tells
admins to do. The process script runs against the simulator; the FastAGI door too, through a
running ``npl-agi serve``. The Vodafone trunk refuses a block of numbers (404 Not Found), as a
network refuses a number that has left it: the outbound context's retry.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asterisk_fixture import DIALPLAN, ROOT, Asterisk, extensions_conf, find_asterisk, wait_for
from conftest import AGI_SCRIPT, write_config
from sip_fixture import (
    CALL_SCENARIO,
    CANCEL_SCENARIO,
    PJSIP_SAMPLE,
    Trunk,
    call,
    find_sip,
    free_udp_port,
    pjsip_conf,
    scenario_file,
    sipp,
    trunk_names,
    write_numbers,
)
from sip_fixture import wait_dialled as dialled_at
from test_asterisk import numbers_on
from test_server import start_process

from npl_agi.admin import cli
from npl_agi.backends import SqliteCache
from npl_agi.config import load_config
from npl_agi.core.protocol import Answer
from npl_agi.doubles.simulator import Simulator

ROUTES = DIALPLAN / "npl-routes.conf"
CONTEXTS = """\
[from-sipp]
include => npl-outbound

#include {dialplan}/npl-lookup.conf
#include {dialplan}/npl-outbound.conf
#include {dialplan}/npl-routes.conf
"""
SLOW = "07400999902"  # the simulator holds this query (hang_seconds): the lookup runs to its deadline
HANGING = "07401999902"  # held like SLOW (the same fault suffix), for a test of its own
HANG = 12  # seconds the simulator holds SLOW, longer than the calls' 8 s deadline
REFUSING = "trunk-vodafone"  # refuses the numbers 07788459NNN: 404 Not Found, hangup cause 1
REFUSED = "07788459[0-9]{3}"
REFUSED_FROM = 9000  # numbers_on(..., start=REFUSED_FROM) are in that block
ROUTED = dict(re.findall(r"^exten => (\d+),1,Dial\(PJSIP/\$\{NPL_DIAL\}@([\w-]+)", ROUTES.read_text(), re.M))


@dataclass
class SipPbx:
    asterisk: Asterisk
    sim: Simulator
    trunks: dict[str, Trunk]
    directory: Path
    port: int  # Asterisk's SIP port
    config: Path
    env: dict[str, str]

    def call(self, number: str, scenario: str | None = None) -> None:
        done = call(self.directory, self.port, number, *([scenario] if scenario else []))
        assert done.returncode == 0, f"{done.stdout[-1500:]}\n{done.stderr[-1500:]}\n{self.asterisk.console_tail()}"

    def call_at(self, rate: int, numbers: list[str]) -> None:
        """One call for each of ``numbers``, in order, ``rate`` calls a second from one caller;
        SIPp exits 0 when every call was answered and ended."""
        script = scenario_file(self.directory, CALL_SCENARIO)
        calls = write_numbers(self.directory / f"caller-{numbers[0]}-{len(numbers)}.csv", numbers)
        command = sipp("-sf", script, "-inf", calls, "-p", str(free_udp_port()), f"127.0.0.1:{self.port}")
        command += ["-r", str(rate), "-m", str(len(numbers)), "-l", str(len(numbers)), "-timeout", "60"]
        done = subprocess.run([*command, "-timeout_error"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{done.stdout[-1500:]}\n{done.stderr[-1500:]}\n{self.asterisk.console_tail()}"

    def dialled(self, number: str) -> list[tuple[str, str]]:
        """The trunks that got a call for ``number`` (waits for the first)."""
        return dialled_at(self.trunks.values(), number)

    def cdr(self, number: str) -> dict[str, str]:
        """The one CDR of the caller's SIP channel for a call to ``number``."""
        (row,) = self.cdrs(number, 1)
        return row

    def cdrs(self, number: str, count: int) -> list[dict[str, str]]:
        """The ``count`` CDRs of the caller's SIP channel for a call to ``number`` (one per Dial)."""

        def written() -> list[dict[str, str]]:
            rows = [r for r in self.asterisk.cdr_rows(number, field="dst") if r["channel"].startswith("PJSIP/sipp-")]
            return rows if len(rows) >= count else []

        rows = wait_for(written, 30, f"{count} CDRs of the call to {number}")
        assert len(rows) == count, rows
        return rows

    def cache(self, dialled: str, mccmnc: str) -> str:
        """Cache ``dialled`` on ``mccmnc``, as an earlier call's lookup would have; its msisdn."""
        msisdn = "44" + dialled[1:]
        SqliteCache(load_config(str(self.config)).cache).put_many([Answer(msisdn, mccmnc=mccmnc, source="api")])
        return msisdn

    def charged(self, msisdn: str) -> int:
        return self.sim.stats()["charged"].count(msisdn)

    @contextlib.contextmanager
    def globals(self, **values: str) -> Iterator[None]:
        """Globals of extensions.conf set for the calls inside, empty (unset) again after."""
        try:
            for name, value in values.items():
                self.asterisk.cli(f"dialplan set global {name} {value}")
            yield
        finally:
            for name in values:
                self.asterisk.cli(f'dialplan set global {name} ""')

    def active_channels(self) -> int:
        shown = self.asterisk.cli("core show channels")
        found = re.search(r"(\d+) active channels?", shown)
        assert found, shown
        return int(found.group(1))

    def agi_processes(self) -> dict[int, str]:
        return {pid: cmd for pid, cmd in self.asterisk.descendants().items() if "npl-lookup.agi" in cmd}

    def set_fastagi(self, url: str) -> None:
        out = self.asterisk.cli(f'dialplan set global NPL_FASTAGI "{url}"')
        assert "NPL_FASTAGI" in out or not out.strip(), out


@pytest.fixture(scope="module")
def pbx(tmp_path_factory) -> Iterator[SipPbx]:
    build, looked = find_asterisk()
    if build is None:
        pytest.skip(f"no Asterisk found (looked at {looked})")
    missing = find_sip(build)
    if missing:
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("sip")
    agi_dir = root / "agi-bin"
    agi_dir.mkdir()
    script = agi_dir / "npl-lookup.agi"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{AGI_SCRIPT}" "$@"\n')
    script.chmod(0o755)
    # Calls get 8 s: the interpreter of a call's script starts on a machine that may be busy. A
    # hanging number still times out (the simulator hangs HANG seconds).
    with Simulator("127.0.0.1", 0, hang_seconds=HANG) as sim, contextlib.ExitStack() as stack:
        config = write_config(root / "npl-agi.conf", sim.url, api={"timeout": 8}, fastagi={"metrics_listen": ""})
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NPL_AGI_CONFIG": str(config)}
        trunks = {
            name: Trunk(name, root, refuse=REFUSED if name == REFUSING else None).start()
            for name in trunk_names(PJSIP_SAMPLE.read_text())
        }
        for trunk in trunks.values():
            stack.callback(trunk.stop)
        port = free_udp_port()
        asterisk = Asterisk(build, root / "asterisk", agi_dir, env)
        asterisk.write_config("pjsip.conf", pjsip_conf(port, "from-sipp", {n: t.port for n, t in trunks.items()}))
        contexts = CONTEXTS.format(dialplan=DIALPLAN)
        asterisk.write_config("extensions.conf", extensions_conf(contexts, NPL_ONNET_MCCMNC="23415", NPL_FASTAGI=""))
        asterisk.cdr_custom(DIALPLAN / "npl-cdr-custom.conf")
        stack.callback(asterisk.stop)
        asterisk.start()
        pbx = SipPbx(asterisk, sim, trunks, root, port, config, env)
        yield pbx
        if pbx.sim is not sim:  # restarted by a test
            pbx.sim.stop()


def test_the_trunk_sample_has_a_trunk_for_every_route() -> None:
    dialled = set(re.findall(r"Dial\(PJSIP/\$\{NPL_DIAL\}@([\w-]+)", ROUTES.read_text()))
    assert dialled == set(trunk_names(PJSIP_SAMPLE.read_text()))


def import_ranges(pbx: SipPbx, text: str) -> None:
    """Ranges of the admin's own into the PBX's cache file, through the command an admin runs."""
    path = pbx.directory / "ranges.csv"
    path.write_text(text)
    assert cli.main(["--config", str(pbx.config), "ranges", "import", str(path)]) == 0


def test_a_vodafone_number_arrives_at_the_vodafone_trunk(pbx: SipPbx) -> None:
    (number,) = numbers_on("23415", 1, start=100)
    import_ranges(pbx, "447788,23415\n")  # the block's range holder: the number is not ported
    pbx.call(number)
    assert pbx.dialled(number) == [("trunk-vodafone", number)]  # the Request-URI's user
    cdr = pbx.cdr(number)
    assert cdr["disposition"] == "ANSWERED"
    assert cdr["dstchannel"].startswith("PJSIP/trunk-vodafone-")
    assert {k: cdr[k] for k in cdr if k.startswith("npl_")} == {
        "npl_mccmnc": "23415",
        "npl_network": "Vodafone UK",
        "npl_err": "",
        "npl_rate": "onnet",
        "npl_ported": "0",
        "npl_route": "23415",
        "npl_retry": "",
    }


@pytest.mark.parametrize(
    ("number", "error"),
    [("00491701234567", ""), ("0123", "BADNUMBER")],
    ids=["network-without-a-route", "bad-number"],
)
def test_unrouted_and_failed_lookups_arrive_at_the_default_trunk(pbx: SipPbx, number: str, error: str) -> None:
    pbx.call(number)
    assert pbx.dialled(number) == [("trunk-default", number)]
    cdr = pbx.cdr(number)
    assert (cdr["npl_err"], cdr["npl_route"], cdr["disposition"]) == (error, "fallback", "ANSWERED")
    assert cdr["npl_rate"] == ("unknown" if error else "offnet")


def test_with_the_service_down_calls_arrive_at_the_default_trunk(pbx: SipPbx) -> None:
    (number,) = numbers_on("23410", 1, start=100)
    host, port = pbx.sim.server.server_address[:2]
    pbx.sim.stop()
    try:
        pbx.call(number)
    finally:
        pbx.sim = Simulator(host, port, hang_seconds=HANG).start()
    assert pbx.dialled(number) == [("trunk-default", number)]
    assert (pbx.cdr(number)["npl_err"], pbx.cdr(number)["npl_route"]) == ("UNREACHABLE", "fallback")


def test_with_the_service_hanging_a_never_seen_number_is_routed_to_its_range_holders_trunk(pbx: SipPbx) -> None:
    """``range_fallback = yes``: the lookup runs to its deadline, no stale entry exists, and the
    call goes to the EE trunk its range was allocated to, not to the default trunk."""
    import_ranges(pbx, "4474019999,23430\n")
    original = pbx.config.read_text()
    pbx.config.write_text(original.replace("[number]\n", "[number]\nrange_fallback = yes\n"))
    try:
        pbx.call(HANGING)
    finally:
        pbx.config.write_text(original)
    (after,) = numbers_on("23430", 1, start=300)
    try:
        assert pbx.dialled(HANGING) == [("trunk-ee", HANGING)]
        cdr = pbx.cdr(HANGING)
        assert (cdr["npl_err"], cdr["npl_mccmnc"], cdr["npl_route"], cdr["npl_ported"]) == ("", "23430", "23430", "")
    finally:  # the service answers again, and so the shared breaker closes, for the next tests too
        wait_for(lambda: not pbx.sim.stats()["active"], HANG + 15, "the slow request to end")
        pbx.call(after)
    assert pbx.dialled(after) == [("trunk-ee", after)]
    assert (pbx.cdr(after)["npl_err"], pbx.cdr(after)["npl_route"]) == ("", "23430")


def test_caller_hanging_up_during_a_slow_lookup_leaves_no_channel_and_no_script(pbx: SipPbx) -> None:
    pbx.call(SLOW, CANCEL_SCENARIO)  # CANCEL after a second, while the lookup waits for the service
    wait_for(lambda: pbx.active_channels() == 0, 15, "no channel left")
    wait_for(lambda: not pbx.agi_processes(), 15, "no npl-lookup.agi left")
    assert pbx.asterisk.cli("core show channels").count("PJSIP/") == 0
    assert not any(SLOW in t.dialled() for t in pbx.trunks.values())  # nobody waits for it: not routed
    assert (pbx.cdr(SLOW)["lastapp"], pbx.cdr(SLOW)["disposition"]) == ("AGI", "NO ANSWER")
    # The request goes on in the background until the service answers or it gives up; the
    # account lock it holds is free again after that, for the next call's lookup.
    wait_for(lambda: not pbx.sim.stats()["active"], HANG + 15, "the slow request to end")


def test_through_the_fastagi_server_and_the_process_script_when_it_is_stopped(pbx: SipPbx) -> None:
    served, after = numbers_on("23410", 2, start=200)
    server, port = start_process(pbx.config, pbx.env)
    try:
        pbx.set_fastagi(f"agi://127.0.0.1:{port}")
        pbx.call(served)
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0
        pbx.call(after)  # agi:// fails to connect: the process script answers
    finally:
        pbx.set_fastagi("")
        if server.poll() is None:
            server.kill()
        _, log = server.communicate()
    for number in (served, after):
        assert pbx.dialled(number) == [("trunk-o2", number)]
        assert (pbx.cdr(number)["npl_mccmnc"], pbx.cdr(number)["npl_route"]) == ("23410", "23410")
    assert f"'*******{served[-4:]}' -> 23410" in log  # the server's line for its lookup
    assert after[-4:] not in log


def test_a_burst_of_never_seen_numbers_reaches_their_networks_trunks(pbx: SipPbx) -> None:
    """20 calls at 100 calls/s, each for a number nobody looked up, with the shipped defaults
    (a 2 s deadline, NPL_PROCESS_MAX unset) and the service taking 0.3 s a request: every call
    is answered, and all but a couple reach the trunk of their network. The misses wait in the
    queue of waiting numbers, cheap, while one asker asks for them; the dialplan's limit must not
    shed them."""
    trunk = {n: ROUTED[mccmnc] for mccmnc in ROUTED for n in numbers_on(mccmnc, 5, start=400)}  # 5 a route
    numbers = sorted(trunk)  # 0778845040x, 0778845041x: the networks interleaved
    original = pbx.config.read_text()
    assert "timeout = 8\n" in original
    pbx.config.write_text(original.replace("timeout = 8\n", ""))  # [api] timeout as shipped: 2 s
    pbx.sim.request_delay = 0.3
    try:
        pbx.call_at(100, numbers)
    finally:
        pbx.sim.request_delay = 0.0
        pbx.config.write_text(original)
    routed = [n for n in numbers if pbx.dialled(n) == [(trunk[n], n)]]  # each Request-URI's user
    errors = {n: pbx.cdr(n)["npl_err"] for n in numbers if n not in routed}
    assert len(routed) >= 18, f"{len(routed)} of {len(numbers)} at their network's trunk; the others' NPL_ERR: {errors}"


# -- the retry: a number routed from the cache that its network's trunk refuses --


RETRY_FIELDS = ("npl_mccmnc", "npl_network", "npl_err", "npl_rate", "npl_route", "npl_retry")


def npl_fields(cdr: dict[str, str]) -> dict[str, str]:
    """The CDR fields the lookup and the retry set, by name."""
    return {k: cdr[k] for k in RETRY_FIELDS}


@contextlib.contextmanager
def through(pbx: SipPbx, door: str) -> Iterator[list[str]]:
    """The calls inside looked up through ``door``: the process script, or a running ``npl-agi
    serve`` (then the list holds its log once it has stopped)."""
    log: list[str] = []
    if door == "process":
        yield log
        return
    server, port = start_process(pbx.config, pbx.env)
    try:
        pbx.set_fastagi(f"agi://127.0.0.1:{port}")
        yield log
    finally:
        pbx.set_fastagi("")
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        finally:
            if server.poll() is None:
                server.kill()
            log.append(server.communicate()[1])


@pytest.mark.parametrize(
    ("door", "settings", "index"),
    [("process", {}, 0), ("process", {"NPL_RETRY_DIALSTATUS": "none"}, 1), ("fastagi", {}, 2)],
    ids=["process", "by-hangupcause-only", "fastagi"],
)
def test_a_number_cached_on_a_network_it_left_is_looked_up_fresh_and_reaches_its_new_network(
    pbx: SipPbx, door: str, settings: dict[str, str], index: int
) -> None:
    """Cached on Vodafone, the number is on O2 now: Vodafone's trunk refuses it (404, cause 1),
    one fresh lookup (one credit) finds O2, and O2's trunk gets the call with the number dialled.
    With NPL_RETRY_DIALSTATUS=none the cause alone retries (a 404 is CHANUNAVAIL too)."""
    dialled = numbers_on("23410", 3, start=REFUSED_FROM)[index]
    msisdn = pbx.cache(dialled, "23415")
    with pbx.globals(**settings), through(pbx, door) as log:
        pbx.call(dialled)
    assert pbx.dialled(dialled) == [(REFUSING, dialled), ("trunk-o2", dialled)]  # each Request-URI's user
    assert pbx.charged(msisdn) == 1
    refused, answered = pbx.cdrs(dialled, 2)
    assert (refused["npl_mccmnc"], refused["npl_route"], refused["npl_retry"]) == ("23415", "23415", "")
    assert refused["dstchannel"].startswith(f"PJSIP/{REFUSING}-")
    assert answered["disposition"] == "ANSWERED"
    assert answered["dstchannel"].startswith("PJSIP/trunk-o2-")
    assert npl_fields(answered) == {
        "npl_mccmnc": "23410",
        "npl_network": "O2 (UK)",
        "npl_err": "",
        "npl_rate": "offnet",
        "npl_route": "23410",
        "npl_retry": "changed",
    }
    if door == "fastagi":  # both lookups were the server's: the cache's answer, then the service's
        (text,) = log
        assert f"'*******{dialled[-4:]}' -> 23415 Vodafone UK (cache" in text
        assert f"'*******{dialled[-4:]}' -> 23410 O2 (UK) (api" in text


def test_a_number_whose_fresh_lookup_gives_the_same_network_takes_the_fallback(pbx: SipPbx) -> None:
    (dialled,) = numbers_on("23415", 1, start=REFUSED_FROM)
    msisdn = pbx.cache(dialled, "23415")
    pbx.call(dialled)
    assert pbx.dialled(dialled) == [(REFUSING, dialled), ("trunk-default", dialled)]
    assert pbx.charged(msisdn) == 1
    refused, answered = pbx.cdrs(dialled, 2)
    assert (refused["npl_route"], refused["npl_retry"]) == ("23415", "")
    assert answered["disposition"] == "ANSWERED"
    assert answered["dstchannel"].startswith("PJSIP/trunk-default-")
    assert npl_fields(answered) == {
        "npl_mccmnc": "23415",
        "npl_network": "Vodafone UK",
        "npl_err": "",
        "npl_rate": "onnet",
        "npl_route": "fallback",
        "npl_retry": "same",
    }


@pytest.mark.parametrize(
    ("cached", "settings", "index"),
    [(False, {}, 1), (True, {"NPL_RETRY_DIALSTATUS": "none", "NPL_RETRY_CAUSES": "21,31"}, 2)],
    ids=["answered-by-the-service", "cause-not-in-the-list"],
)
def test_a_refused_number_is_not_retried_when_the_service_answered_or_its_cause_is_not_listed(
    pbx: SipPbx, cached: bool, settings: dict[str, str], index: int
) -> None:
    """The service's own answer is not asked again; and the cause list is matched field by
    field: cause 1 is not in 21,31. Either way the refused call takes the fallback, as a trunk
    that is unavailable does."""
    dialled = numbers_on("23415", 3, start=REFUSED_FROM)[index]
    msisdn = pbx.cache(dialled, "23415") if cached else "44" + dialled[1:]
    with pbx.globals(**settings):
        pbx.call(dialled)
    assert pbx.dialled(dialled) == [(REFUSING, dialled), ("trunk-default", dialled)]
    assert pbx.charged(msisdn) == (0 if cached else 1)
    refused, answered = pbx.cdrs(dialled, 2)
    assert [(c["npl_route"], c["npl_retry"]) for c in (refused, answered)] == [("23415", ""), ("fallback", "")]
    assert answered["disposition"] == "ANSWERED"


def test_a_number_whose_fresh_lookup_fails_takes_the_fallback(pbx: SipPbx) -> None:
    """The service is down when the refused number is looked up again: the call takes the
    fallback, recorded with the fresh lookup's NPL_ERR."""
    (dialled,) = numbers_on("23410", 1, start=REFUSED_FROM + 100)
    pbx.cache(dialled, "23415")
    host, port = pbx.sim.server.server_address[:2]
    pbx.sim.stop()
    try:
        pbx.call(dialled)
    finally:
        pbx.sim = Simulator(host, port, hang_seconds=HANG).start()
    assert pbx.dialled(dialled) == [(REFUSING, dialled), ("trunk-default", dialled)]
    refused, answered = pbx.cdrs(dialled, 2)
    assert (refused["npl_route"], refused["npl_retry"]) == ("23415", "")
    assert answered["disposition"] == "ANSWERED"
    assert npl_fields(answered) == {
        "npl_mccmnc": "",
        "npl_network": "",
        "npl_err": "UNREACHABLE",
        "npl_rate": "unknown",
        "npl_route": "fallback",
        "npl_retry": "failed",
    }
