"""One call, whatever the door: the environment's number, the kill switch, the chain's answer or
the failure that stands for it, and the channel variables.

A door is its transport: the process script talks AGI over its standard streams (pyst2), the
FastAGI server over a socket (``fastagi``); both run each call through ``Call`` and set the same
variables from the same code. Imported on every call setup: nothing heavy here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from npl_agi import log
from npl_agi.core.errors import Disabled, NplError, npl_err

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which a call does not need
if TYPE_CHECKING:
    from npl_agi.core.protocol import Answer

VARIABLES = (
    "NPL_NUMBER",
    "NPL_MCCMNC",
    "NPL_MCC",
    "NPL_MNC",
    "NPL_MSC",
    "NPL_IMSI",
    "NPL_NETWORK",
    "NPL_COUNTRY",
    "NPL_ERR",
    "NPL_SOURCE",
    "NPL_RANGE_MCCMNC",
    "NPL_PORTED",
    "NPL_LOOKUP_MS",
)
SPECIAL_EXTENSIONS = frozenset({"s", "h", "i", "t", "e", "o", "a", "T", "failed"})
FRESH = "fresh"  # the AGI argument that asks the service whatever the cache holds


def dialled_number(args: list[str], env: dict[str, str]) -> str:
    """The number to look up: the AGI's first argument, else the extension, else the DNID.

    The argument is the explicit choice and the only one that works from a Gosub (where the
    extension is ``s``). ``agi_extension`` is what was dialled in a plain outbound context, and
    keeps characters Asterisk strips from arguments. ``agi_dnid`` is the last resort.
    """
    if args and args[0].strip():
        return args[0]
    extension = env.get("agi_extension", "")
    if extension and extension not in SPECIAL_EXTENSIONS:
        return extension
    dnid = env.get("agi_dnid", "")
    return "" if dnid == "unknown" else dnid


def fresh_asked(args: list[str]) -> bool:
    """Whether the dialplan asked for a fresh lookup: a ``fresh`` argument after the number.

    The shipped outbound context asks so once, when a trunk refused a number routed from a
    cached answer: the number may have moved to another network since it was cached.
    """
    return any(a.strip().lower() == FRESH for a in args[1:])


def variables_for(answer=None, failure: NplError | None = None, ms: int = 0) -> dict[str, str]:
    """Every variable a door sets, so stale values from an earlier lookup never linger."""
    values = dict.fromkeys(VARIABLES, "")
    if answer is not None:
        values.update(
            NPL_NUMBER=answer.msisdn,
            NPL_MCCMNC=answer.mccmnc,
            NPL_MCC=answer.mcc,
            NPL_MNC=answer.mnc,
            NPL_MSC=answer.msc,
            NPL_IMSI=answer.imsi,
            NPL_NETWORK=answer.network,
            NPL_COUNTRY=answer.country,
            NPL_ERR=npl_err(answer.error),
            NPL_SOURCE=answer.source,
            NPL_RANGE_MCCMNC=answer.range_mccmnc,
            NPL_PORTED=answer.ported,
        )
    if failure is not None:
        values["NPL_ERR"] = npl_err(failure)
    values["NPL_LOOKUP_MS"] = str(ms)
    return values


def outcome_line(shown: str, values: dict[str, str], answer=None, failure: NplError | None = None) -> tuple[str, int]:
    """The one line that says how a lookup ended, and its VERBOSE level (1 failed, 3 done).

    ``shown`` is how the number may appear; the caller makes it safe for where it goes.
    """
    ms = values["NPL_LOOKUP_MS"]
    if values["NPL_ERR"]:
        reason = str(failure) if failure else (answer.error_name if answer else "")
        return f"npl-agi: {shown} NPL_ERR={values['NPL_ERR']} ({reason}) in {ms} ms", 1
    return f"npl-agi: {shown} -> {values['NPL_MCCMNC']} {values['NPL_NETWORK']} ({values['NPL_SOURCE']}, {ms} ms)", 3


def check_enabled(config) -> None:
    """The kill switch: ``[api] enabled = no`` answers every call ``DISABLED`` at once."""
    if not config.api.enabled:
        raise Disabled("lookups are switched off (enabled = no)")


class Call:
    """One call's outcome: its answer, or the failure that stands for it; never an exception.

    Made first thing in a call: from then on the library's warnings go to ``sink`` (the call's
    own console line or log line; ``log.call_sink`` is a context variable, so concurrent calls
    of the server each keep theirs).
    """

    def __init__(
        self,
        dialled: str,
        sink: Callable[[str], None],
        report: Callable[[BaseException], None] | None = None,
    ) -> None:
        """``report`` is told of an internal error (a bug) before it becomes the call's failure."""
        self.dialled = dialled
        self.answer = None
        self.failure: NplError | None = None
        self.report = report
        log.call_sink.set(sink)

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """Around a door's lookup: an ``NplError`` becomes the call's failure, any other
        exception the internal error, so that no call ever breaks because of us."""
        try:
            yield
        except NplError as e:
            self.failure = e
        except Exception as e:
            if self.report is not None:
                self.report(e)
            self.failure = NplError(f"internal error: {e.__class__.__name__}")

    def fall_back(self, answer_for: Callable[[str, NplError], Answer]) -> None:
        """After a failure of the whole lookup, what ``answer_for`` (``Lookup.failed``) makes of
        it: the failure with the number's range holder, or the range holder's answer."""
        if self.failure is None:
            return
        try:
            answer = answer_for(self.dialled, self.failure)
        except Exception as e:  # the failure stays the call's outcome
            if self.report is not None:
                self.report(e)
            return
        self.answer = answer
        if answer.ok:
            self.failure = None

    def variables(self, started: float) -> dict[str, str]:
        """The variables to set, with the time taken since ``started`` (``time.monotonic()``)."""
        return variables_for(self.answer, self.failure, round((time.monotonic() - started) * 1000))

    def outcome_line(self, shown: str, values: dict[str, str]) -> tuple[str, int]:
        return outcome_line(shown, values, self.answer, self.failure)
