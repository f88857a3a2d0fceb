"""The Number Portability Lookup protocol, v2.4 and legacy 2.3: pure parsing and formatting.

No I/O here. The client feeds it the bytes it read, the simulator uses it to write answers,
and the tests drive it with recorded answers.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Iterable

from npl_agi.core.codes import PROTOCOL, TRUNCATED
from npl_agi.core.errors import AuthError, CreditError, LockedError, ProtocolError, RequestRejected, local_error_name

QUERYOK = "QUERYOK"
ENDBATCH = "ENDBATCH"
FAIL_PASSWORD = "FAIL Invalid password"  # noqa: S105 - the service's words, not a secret
FAIL_CREDIT = "FAIL Insufficient credit"
FAIL_NO_NUMBERS = "FAIL No numbers specified"
FAIL_TOO_LONG = "FAIL Request too long"
ACCOUNT_LOCKED = "ERR ACCOUNT LOCKED - Please arrange payment"

DEFAULT_APIVER = "2.4"
# The fields of a query that npl-agi fills itself: no configured extra field may replace one.
OWN_FIELDS = ("user", "pass", "apiver", "msisdn")
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
        "msisdn mccmnc msc imsi error error_name source number network country range_mccmnc",
        defaults=("",) * 10,
    )
):
    """What is known about one number: its network now, or why there is no answer.

    ``msisdn`` is the number asked (international, no ``+``); ``mccmnc``, ``msc``, ``imsi`` the
    service's answer; ``error``/``error_name`` a per-number failure (``ERR1``, ``TIMEOUT``…);
    ``source`` where the answer came from (``local``, ``cache``, ``api``, ``stale``, ``range``);
    ``number`` as dialled; ``network``/``country`` from the network directory;
    ``range_mccmnc`` the network the number's range was allocated to (see ``ranges``).
    """

    __slots__ = ()

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def ported(self) -> str:
        """``1`` when the number's network is not its range holder, ``0`` when it is, ``""``
        when either is unknown (``NPL_PORTED``), as it is when the range holder is the answer."""
        if not (self.mccmnc and self.range_mccmnc) or self.source == "range":
            return ""
        return "0" if self.mccmnc == self.range_mccmnc else "1"

    @property
    def mcc(self) -> str:
        return self.mccmnc[:3]

    @property
    def mnc(self) -> str:
        return self.mccmnc[3:]

    def as_dict(self) -> dict[str, str]:
        """The stable machine-readable form (``npl-agi lookup --json``, cache records)."""
        d = self._asdict()
        d["mcc"], d["mnc"], d["ported"] = self.mcc, self.mnc, self.ported
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


def shown(text: str, secret: str = "") -> str:
    """A bounded, printable rendering of foreign text for error messages and logs.

    ``secret`` (the account password) is masked in the text first, in every form a server
    might echo it, before anything is cut or escaped: a cut or escape must never leave part
    of it readable. Only messages are redacted; data is never rewritten.
    """
    text = redact(text, secret)
    text = "".join(c if c.isprintable() else "?" for c in text[:_SHOWN])
    return repr(text)


def redact(text: str, secret: str) -> str:
    """``text`` with ``secret`` masked as ``***``, raw and URL-encoded (for messages only)."""
    if not secret:
        return text
    from urllib.parse import quote, quote_plus

    for form in sorted({secret, quote(secret, safe=""), quote_plus(secret)}, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def own_field(name: str) -> bool:
    """Is ``name`` one of the fields npl-agi fills itself (``OWN_FIELDS``), in any case or padding?
    A server may read names loosely, so a look-alike must never reach it beside the real one."""
    return name.strip().casefold() in OWN_FIELDS


def request_form(
    user: str, password: str, apiver: str, msisdns: list[str], extra: Iterable[tuple[str, str]] = ()
) -> dict[str, str]:
    """The form fields of one query (POSTed, so the password stays out of URLs), then the
    ``extra`` pairs, which may add fields but never replace one of ``OWN_FIELDS``."""
    form = {"user": user, "pass": password, "apiver": apiver, "msisdn": ",".join(msisdns)}
    for name, value in extra:
        if own_field(name) or name in form:
            raise ValueError(f"extra form field {name!r} would replace a field already in the form")
        form[name] = value
    return form


def check_status(line: str, secret: str = "") -> None:
    """Raise the typed error a first line stands for; return quietly for ``QUERYOK``.

    The error keeps the service's line (``.line``) with ``secret`` masked: a server that
    echoes the request must not put the password into a message.
    """
    line = line.strip()
    if line == QUERYOK:
        return
    line = redact(line, secret)
    if line.startswith("FAIL"):
        reason = line[4:].strip()
        kind = {
            "invalid password": AuthError,
            "insufficient credit": CreditError,
        }.get(reason.lower(), RequestRejected)
        raise kind(f"service refused the query: {shown(line)}", line[:_SHOWN])
    if line.upper().startswith("ERR ACCOUNT LOCKED"):
        raise LockedError(f"account locked: {shown(line)}", line[:_SHOWN])
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


class AnswerReader:
    """Reads one answer line by line, so each number's answer is usable the moment it arrives.

    A malformed line, or a line for a number that was not asked, is set aside (its text is kept
    for the message) and never sinks the well-formed lines around it: each of those answers was
    paid for. ``finish`` then gives every asked number its answer or a per-number failure.
    """

    def __init__(self, asked: Iterable[str], secret: str = "") -> None:
        self.asked = list(dict.fromkeys(asked))
        self.secret = secret
        self.found: dict[str, Answer] = {}
        self.started = False  # the first line was QUERYOK
        self.ended = False  # ENDBATCH arrived
        self.problem = ""  # the first line that was off the contract, for the message
        self._wanted = set(self.asked)

    def feed(self, line: str) -> Answer | None:
        """One line without its newline: the answer it carries, or None.

        The first line is the query's status: anything but ``QUERYOK`` raises the typed error
        it stands for (``ServiceRefused`` subclasses, ``ProtocolError``).
        """
        line = line.strip()
        if not self.started:
            check_status(line, self.secret)
            self.started = True
            return None
        if not line or self.ended:
            return None
        if line == ENDBATCH:
            self.ended = True
            return None
        try:
            answer = parse_answer_line(line)
        except ProtocolError as e:
            self._off_contract(str(e))
            return None
        if answer.msisdn not in self._wanted:
            self._off_contract(f"answer for a number that was not asked: {shown(answer.msisdn)}")
            return None
        if answer.msisdn in self.found:
            return None
        self.found[answer.msisdn] = answer
        return answer

    def _off_contract(self, message: str) -> None:
        if not self.problem:
            self.problem = redact(message, self.secret)

    def finish(self, cut_short: str = TRUNCATED) -> dict[str, Answer]:
        """Every asked number: its answer, or why there is none.

        Without ``ENDBATCH`` the answer was cut short: numbers without a line get ``cut_short``
        (``TRUNCATED``, or ``TIMEOUT`` when our own deadline ended the read). With it, a number
        without a line gets ``PROTOCOL``, named after the first line that was off the contract.
        """
        if not self.started:
            raise ProtocolError("the service sent an empty answer")
        if self.ended:
            why = self.problem or "the service did not answer this number"
            return {n: self.found.get(n) or failed(n, PROTOCOL, reason=why) for n in self.asked}
        return {n: self.found.get(n) or failed(n, cut_short) for n in self.asked}


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
