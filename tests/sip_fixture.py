"""SIP calls for the Asterisk fixture: SIPp as the caller and as the trunks, chan_pjsip between.

The trunks are SIPp UASs on ports of their own that answer every INVITE at once (or refuse the
numbers they are told to with 404 Not Found) and log its Request-URI user (the number Asterisk
dialled), one line per call, flushed as it arrives. The
caller is a SIPp UAC that takes its numbers from a CSV file. The pjsip.conf is the shipped
trunk sample (dialplan/npl-pjsip.conf.sample) with each trunk's contact pointed at its UAS,
plus a transport and an endpoint for the caller.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path

from asterisk_fixture import DIALPLAN, AsteriskBuild, wait_for

PJSIP_SAMPLE = DIALPLAN / "npl-pjsip.conf.sample"
CALLER = "sipp"  # SIPp's From user: the caller's endpoint is found by it

_TRUNK_SCENARIO = """\
<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="{name}">
  <recv request="INVITE">
    <action>
      <ereg regexp="^INVITE sip:([^@ ]*)@" search_in="msg" check_it="true" assign_to="line,number"/>
      <log message="[$number] [$line]"/>{refuse_test}
    </action>
  </recv>{refuse_jump}
  <send>
    <![CDATA[
      SIP/2.0 180 Ringing
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Length: 0
    ]]>
  </send>
  <send retrans="500">
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
    ]]>
  </send>
  <recv request="ACK" optional="true"/>
  <recv request="BYE"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>{refuse_branch}
  <timewait milliseconds="2000"/>
</scenario>
"""
# A number the trunk refuses: 404 Not Found, which chan_pjsip makes hangup cause 1 (unallocated
# number), as a carrier refuses a number that is not its subscriber; then the ACK.
_REFUSE_TEST = """
      <ereg regexp="^INVITE sip:{refuse}@" search_in="msg" check_it="false" assign_to="refused"/>"""
_REFUSE_JUMP = """
  <nop next="refuse" test="refused"/>"""
_REFUSE_BRANCH = """
  <nop next="done"/>
  <label id="refuse"/>
  <send>
    <![CDATA[
      SIP/2.0 404 Not Found
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
  <recv request="ACK"/>
  <label id="done"/>"""


def trunk_scenario(refuse: str | None = None) -> str:
    """The trunks' scenario: every INVITE answered, but those whose Request-URI user matches
    the regular expression ``refuse`` are refused (404 Not Found)."""
    if refuse is None:
        return _TRUNK_SCENARIO.format(name="trunk", refuse_test="", refuse_jump="", refuse_branch="")
    name = "trunk-refusing-" + re.sub(r"\W", "", refuse)  # one file per pattern: trunks run side by side
    return _TRUNK_SCENARIO.format(
        name=name,
        refuse_test=_REFUSE_TEST.format(refuse=refuse),
        refuse_jump=_REFUSE_JUMP,
        refuse_branch=_REFUSE_BRANCH,
    )


TRUNK_SCENARIO = trunk_scenario()

_INVITE = """\
  <send retrans="500"{timer}>
    <![CDATA[
      INVITE sip:[field0]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[field0]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
    ]]>
  </send>
"""

_IN_DIALOG = """\
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[field0]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
"""

# A call answered: post-dial delay is the time from the INVITE to the first of 180 or 200 (rtd 1).
CALL_SCENARIO = f"""\
<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="caller">
{_INVITE.format(timer=' start_rtd="1"')}\
  <recv response="100" optional="true"/>
  <recv response="180" optional="true" rtd="1"/>
  <recv response="183" optional="true" rtd="1"/>
  <recv response="200" rtd="1"/>
  <send>
    <![CDATA[
      ACK sip:[field0]@[remote_ip]:[remote_port] SIP/2.0
{_IN_DIALOG}\
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <send retrans="500">
    <![CDATA[
      BYE sip:[field0]@[remote_ip]:[remote_port] SIP/2.0
{_IN_DIALOG}\
      CSeq: 2 BYE
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200"/>
</scenario>
"""

# A caller who gives up after a second, before any answer: CANCEL, then the INVITE's 487.
CANCEL_SCENARIO = f"""\
<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="caller-gives-up">
{_INVITE.format(timer="")}\
  <recv response="100"/>
  <pause milliseconds="1000"/>
  <send>
    <![CDATA[
      CANCEL sip:[field0]@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[field0]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 CANCEL
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200"/>
  <recv response="487"/>
  <send>
    <![CDATA[
      ACK sip:[field0]@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[field0]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
</scenario>
"""


def find_sip(build: AsteriskBuild) -> str | None:
    """None when SIP calls can be made, else what is missing (a reason to skip)."""
    missing = []
    if not (build.moddir / "chan_pjsip.so").exists():
        missing.append(f"no chan_pjsip.so in {build.moddir} (build it: build-asterisk.sh --pjsip)")
    if shutil.which("sipp") is None:
        missing.append("no sipp on PATH (the Debian package sip-tester)")
    return "; ".join(missing) or None


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trunk_names(sample: str) -> list[str]:
    """The endpoints of the trunk sample, in order (each has an aor of the same name)."""
    sections = re.findall(r"^\[([\w-]+)\]\s*\ntype\s*=\s*endpoint", sample, flags=re.MULTILINE)
    return list(dict.fromkeys(sections))


def pjsip_conf(port: int, caller_context: str, trunks: dict[str, int], sample: str | None = None) -> str:
    """A pjsip.conf on 127.0.0.1:``port``: the caller's endpoint and the trunk sample with each
    trunk's ``contact`` at its SIPp port (``trunks``: name -> port). Every trunk of the sample
    must be given a port, so a trunk a route dials is never left pointing at the example host."""
    text = PJSIP_SAMPLE.read_text() if sample is None else sample
    if set(trunks) != set(trunk_names(text)):
        raise ValueError(f"ports for {sorted(trunks)}, the sample has {trunk_names(text)}")
    for name, trunk_port in trunks.items():
        aor = re.compile(rf"(^\[{re.escape(name)}\]\s*\ntype\s*=\s*aor\s*\n(?:[^\[]*?\n)?contact\s*=\s*)\S+", re.M)
        text, found = aor.subn(rf"\g<1>sip:127.0.0.1:{trunk_port}", text)
        if found != 1:
            raise ValueError(f"{name}: no aor with a contact line in the sample")
    return (
        f"[transport-udp]\ntype = transport\nprotocol = udp\nbind = 127.0.0.1:{port}\n\n"
        f"[{CALLER}]\ntype = endpoint\ncontext = {caller_context}\ndisallow = all\nallow = ulaw\n"
        f"direct_media = no\n\n{text}"
    )


def sipp(*args: str | Path) -> list[str]:
    """A SIPp command line on 127.0.0.1 that reads no keyboard."""
    return ["sipp", "-nostdin", "-i", "127.0.0.1", *map(str, args)]


class Trunk:
    """A SIPp UAS on its own port: answers every INVITE at once (refuses the numbers that match
    ``refuse``: see ``trunk_scenario``), logs who was dialled."""

    def __init__(self, name: str, directory: Path, refuse: str | None = None) -> None:
        self.name = name
        self.port = free_udp_port()
        self.log = directory / f"{name}.log"
        self.errors = directory / f"{name}.err"
        self.scenario = scenario_file(directory, trunk_scenario(refuse))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Trunk:
        """Start it and wait until it listens (or fail with what SIPp said)."""
        command = sipp("-sf", self.scenario, "-p", str(self.port), "-trace_logs", "-log_file", self.log)
        with self.errors.open("w") as errors:
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"SIPp trunk {self.name} exited: {self.errors.read_text()[-500:]}")
            return port_taken(self.port)

        wait_for(listening, 20, f"SIPp trunk {self.name} to listen on {self.port}")
        return self

    def dialled(self) -> list[str]:
        """Each INVITE's Request-URI user, in order of arrival."""
        if not self.log.exists():
            return []
        return [line.split(" ", 1)[0] for line in self.log.read_text().splitlines() if " INVITE sip:" in line]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def write_numbers(path: Path, numbers: Iterable[str]) -> Path:
    """An injection file for the caller: one number a call, in order."""
    path.write_text("SEQUENTIAL\n" + "".join(f"{n};\n" for n in numbers))
    return path


def scenario_file(directory: Path, scenario: str) -> Path:
    """The scenario written to ``directory``, named by its ``<scenario name=...>``; replaced whole,
    never rewritten in place, as a running SIPp may be reading it."""
    path = directory / (re.search(r'<scenario name="([\w-]+)"', scenario).group(1) + ".xml")
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(scenario)
    os.replace(staging, path)
    return path


def port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def call(directory: Path, port: int, number: str, scenario: str = CALL_SCENARIO) -> subprocess.CompletedProcess:
    """One SIP call from the caller to Asterisk on ``port``; SIPp exits 0 when the scenario ran to its end."""
    script = scenario_file(directory, scenario)
    numbers = write_numbers(directory / f"caller-{number.strip('+')}.csv", [number])
    command = sipp("-sf", script, "-inf", numbers, "-p", str(free_udp_port()), f"127.0.0.1:{port}")
    command += ["-m", "1", "-timeout", "30", "-timeout_error"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def wait_dialled(trunks: Iterable[Trunk], number: str, timeout: float = 20) -> list[tuple[str, str]]:
    """(trunk, number) for every trunk that was dialled for ``number``, once one was."""

    def seen() -> list[tuple[str, str]]:
        return [(t.name, n) for t in trunks for n in t.dialled() if n == number]

    return wait_for(seen, timeout, f"a trunk to be dialled for {number}")
