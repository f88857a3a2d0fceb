"""Real SIP calls: a SIPp caller through chan_pjsip and the shipped dialplan to SIPp trunks.

One Asterisk with chan_pjsip serves the module. Its pjsip.conf is the shipped trunk sample with
every trunk's contact at a SIPp UAS of its own (one per route of npl-routes.conf, and the
fallback's), and its extensions.conf includes npl-lookup.conf, npl-outbound.conf and
npl-routes.conf as shipped: the caller's context only includes npl-outbound, as the README tells
admins to do. The process script runs against the simulator; the FastAGI door too, through a
running ``npl-agi serve``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asterisk_fixture import DIALPLAN, ROOT, Asterisk, extensions_conf, find_asterisk, wait_for
from conftest import AGI_SCRIPT, write_config
from sip_fixture import CANCEL_SCENARIO, PJSIP_SAMPLE, Trunk, call, find_sip, free_udp_port, pjsip_conf, trunk_names
from sip_fixture import wait_dialled as dialled_at
from test_asterisk import numbers_on
from test_server import start_process

from npl_agi import cli
from npl_agi.simulator import Simulator

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

    def dialled(self, number: str) -> list[tuple[str, str]]:
        """The trunks that got a call for ``number`` (waits for the first)."""
        return dialled_at(self.trunks.values(), number)

    def cdr(self, number: str) -> dict[str, str]:
        """The one CDR of the caller's SIP channel for a call to ``number``."""
        rows = wait_for(
            lambda: [r for r in self.asterisk.cdr_rows(number, field="dst") if r["channel"].startswith("PJSIP/sipp-")],
            20,
            f"the CDR of the call to {number}",
        )
        (row,) = rows
        return row

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
        trunks = {name: Trunk(name, root).start() for name in trunk_names(PJSIP_SAMPLE.read_text())}
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
    assert pbx.dialled(HANGING) == [("trunk-ee", HANGING)]
    cdr = pbx.cdr(HANGING)
    assert (cdr["npl_err"], cdr["npl_mccmnc"], cdr["npl_route"], cdr["npl_ported"]) == ("", "23430", "23430", "")
    wait_for(lambda: not pbx.sim.stats()["active"], HANG + 15, "the slow request to end")
    (after,) = numbers_on("23430", 1, start=300)  # the service answers again: so does the breaker
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
