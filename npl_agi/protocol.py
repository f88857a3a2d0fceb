"""The Number Portability Lookup protocol, v2.4 and legacy 2.3: pure parsing and formatting.

No I/O here. The client feeds it the bytes it read, the simulator uses it to write answers,
and the tests drive it with recorded answers.
"""

from __future__ import annotations

import re
from collections import namedtuple

from .errors import (
    TRUNCATED,
    AuthError,
    CreditError,
    LockedError,
    ProtocolError,
    RequestRejected,
    local_error_name,
)

QUERYOK = "QUERYOK"
ENDBATCH = "ENDBATCH"
FAIL_PASSWORD = "FAIL Invalid password"  # noqa: S105 - the service's words, not a secret
FAIL_CREDIT = "FAIL Insufficient credit"
FAIL_NO_NUMBERS = "FAIL No numbers specified"
FAIL_TOO_LONG = "FAIL Request too long"
ACCOUNT_LOCKED = "ERR ACCOUNT LOCKED - Please arrange payment"

DEFAULT_APIVER = "2.4"
MAX_NUMBERS = 1000

ERROR_NAMES = {
    1: "Unknown subscriber",
    11: "Teleservice not provisioned",
    13: "Call barred",
    21: "Facility not supported",
    29: "Absent subscriber",
    36: "System failure",
}

_ERR_RE = re.compile(r"ERR(\d{1,4})")
_MCCMNC_RE = re.compile(r"\d{5,6}")
_DIGITS_RE = re.compile(r"\d{0,20}")
_MSISDN_RE = re.compile(r"\+?(\d{1,20})")
_SHOWN = 80  # characters of a bad line quoted in an error message


class Answer(
    namedtuple(
        "Answer",
        "msisdn mccmnc msc imsi error error_name source number network country",
        defaults=("",) * 9,
    )
):
    """What is known about one number: its network now, or why there is no answer.

    ``msisdn`` is the number asked (international, no ``+``); ``mccmnc``, ``msc``, ``imsi`` the
    service's answer; ``error``/``error_name`` a per-number failure (``ERR1``, ``TIMEOUT``…);
    ``source`` ``api`` or ``cache``; ``number`` as dialled; ``network``/``country`` from the
    network directory.
    """

    __slots__ = ()

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def mcc(self) -> str:
        return self.mccmnc[:3]

    @property
    def mnc(self) -> str:
        return self.mccmnc[3:]

    def as_dict(self) -> dict[str, str]:
        """The stable machine-readable form (``npl-agi lookup --json``, cache records)."""
        d = self._asdict()
        d["mcc"], d["mnc"] = self.mcc, self.mnc
        return d


def error_name(code: str) -> str:
    """Name of a per-number code: the service's ``ERR<n>`` or one of npl-agi's own."""
    m = _ERR_RE.fullmatch(code)
    if m:
        n = int(m.group(1))
        return ERROR_NAMES.get(n, f"unknown error {n}")
    return local_error_name(code)


def failed(msisdn: str, code: str, *, number: str = "", source: str = "", reason: str = "") -> Answer:
    """An answer that carries a per-number error code and its name (or a specific reason)."""
    return Answer(msisdn, error=code, error_name=reason or error_name(code), number=number, source=source)


def shown(text: str) -> str:
    """A bounded, printable rendering of foreign text for error messages and logs."""
    text = "".join(c if c.isprintable() else "?" for c in text[:_SHOWN])
    return repr(text)


def request_form(user: str, password: str, apiver: str, msisdns: list[str]) -> dict[str, str]:
    """The form fields of one query (POSTed, so the password stays out of URLs)."""
    return {"user": user, "pass": password, "apiver": apiver, "msisdn": ",".join(msisdns)}


def check_status(line: str) -> None:
    """Raise the typed error a first line stands for; return quietly for ``QUERYOK``."""
    line = line.strip()
    if line == QUERYOK:
        return
    if line.startswith("FAIL"):
        reason = line[4:].strip()
        kind = {
            "invalid password": AuthError,
            "insufficient credit": CreditError,
        }.get(reason.lower(), RequestRejected)
        raise kind(f"service refused the query: {shown(line)}", line)
    if line.upper().startswith("ERR ACCOUNT LOCKED"):
        raise LockedError(f"account locked: {shown(line)}", line)
    if line.lower().startswith(("<!doctype", "<html", "<?xml", "<head", "<body")):
        raise ProtocolError("the service sent an HTML page, not a lookup answer")
    if not line:
        raise ProtocolError("the service sent an empty answer")
    raise ProtocolError(f"unexpected first line from the service: {shown(line)}")


def parse_answer_line(line: str) -> Answer:
    """One ``<msisdn> <answer>`` line, in the 2.4 (three fields) or legacy (one field) form."""
    parts = line.split()
    number = _MSISDN_RE.fullmatch(parts[0]) if len(parts) == 2 else None
    if not number:
        raise ProtocolError(f"malformed answer line: {shown(line)}")
    msisdn, rest = number.group(1), parts[1]
    m = _ERR_RE.fullmatch(rest)
    if m:
        return failed(msisdn, f"ERR{int(m.group(1))}")
    fields = rest.split(",")
    if len(fields) == 1:
        fields += ["", ""]
    if (
        len(fields) != 3
        or not _MCCMNC_RE.fullmatch(fields[0])
        or not _DIGITS_RE.fullmatch(fields[1])
        or not _DIGITS_RE.fullmatch(fields[2])
    ):
        raise ProtocolError(f"malformed answer line: {shown(line)}")
    return Answer(msisdn, mccmnc=fields[0], msc=fields[1], imsi=fields[2])


def parse_response(body: str, asked: list[str], *, cut_short: str = TRUNCATED) -> dict[str, Answer]:
    """Answers for every number asked, keyed by msisdn.

    A body without ``ENDBATCH`` was cut short: the complete lines that arrived are kept, a
    trailing partial line is dropped, and every number left without a line gets ``cut_short``
    (``TRUNCATED``, or ``TIMEOUT`` when our own deadline ended the read). Raises a
    ``ServiceRefused`` subclass for a refused query and ``ProtocolError`` for anything that
    is not the contract.
    """
    lines = body.split("\n")
    tail = lines.pop()  # "" after a final newline, else a line that lost its end
    if not lines or tail.strip() == ENDBATCH:
        lines.append(tail)
    check_status(lines[0])
    wanted = set(asked)
    found: dict[str, Answer] = {}
    ended = False
    for raw in lines[1:]:
        line = raw.strip()
        if not line:
            continue
        if line == ENDBATCH:
            ended = True
            break
        answer = parse_answer_line(line)
        if answer.msisdn not in wanted:
            raise ProtocolError(f"answer for a number that was not asked: {shown(answer.msisdn)}")
        found.setdefault(answer.msisdn, answer)
    if ended:
        missing = [n for n in asked if n not in found]
        if missing:
            raise ProtocolError(f"the service did not answer {len(missing)} number(s), e.g. {missing[0]}")
        return found
    return {n: found.get(n) or failed(n, cut_short) for n in asked}


def format_answer(msisdn: str, mccmnc: str, msc: str = "", imsi: str = "", *, apiver: str = DEFAULT_APIVER) -> str:
    """One number line as the service writes it (three fields from 2.4 on, MCCMNC alone before)."""
    if is_legacy(apiver):
        return f"{msisdn} {mccmnc}"
    return f"{msisdn} {mccmnc},{msc},{imsi}"


def format_error(msisdn: str, code: int) -> str:
    return f"{msisdn} ERR{code}"


def is_legacy(apiver: str) -> bool:
    """True when the service answers in the 2.3 form (``apiver`` missing, empty or older)."""
    try:
        return tuple(int(p) for p in apiver.split(".")) < (2, 4)
    except ValueError:
        return True
