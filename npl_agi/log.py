"""The library's warnings (a cache that failed, a lock that fell back), without importing
``logging`` on the call path.

A door points a call's warnings at the call's console or log line (``call_sink``, set by
``call.Call``); the detached child at its parent with ``set_sink``; everywhere else they go to
the standard ``logging`` logger ``npl_agi``. ``mask_numbers`` is what the FastAGI server passes
every log line through.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextvars import ContextVar

_sink: Callable[[str], None] | None = None
# A sink of the task at hand (one FastAGI call): its warnings belong to it, not to the process.
call_sink: ContextVar[Callable[[str], None] | None] = ContextVar("npl_agi_call_sink", default=None)


def set_sink(sink: Callable[[str], None] | None) -> None:
    """Send warnings to ``sink`` instead of ``logging`` (None restores ``logging``)."""
    global _sink
    _sink = sink


def warning(message: str, *args: object) -> None:
    sink = call_sink.get() or _sink
    if sink is not None:
        sink(message % args)
        return
    import logging

    logging.getLogger("npl_agi").warning(message, *args)


def short(e: BaseException) -> str:
    """An exception as one short line for a warning: its class and the start of its message."""
    return f"{e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}".rstrip(": ")


# Long enough to be a phone number (or an IMSI); ports, counts and ms are shorter. Compiled by re
# (and kept in its cache) when a message is first masked: a call may mask none.
_NUMBER = r"\d{7,}"


def masked(number: str) -> str:
    """``number`` with all but its last 4 characters as ``*``."""
    return number if len(number) <= 4 else "*" * (len(number) - 4) + number[-4:]


def mask_numbers(text: str, keep: str | tuple[str, ...] = "") -> str:
    """``text`` with every run of 7 or more digits ``masked``: what any message may quote (a
    service's answer line, a reason phrase, a query echoed back) shows no number in full.

    ``keep`` (a call's unique id, whose seconds are 10 digits; the process script's caller's own
    number) is left as it is where it occurs; several may be given, the longest kept first.
    """
    kept = sorted(filter(None, (keep,) if isinstance(keep, str) else keep), key=len, reverse=True)
    if kept and kept[0] in text:
        return kept[0].join(mask_numbers(part, tuple(kept[1:])) for part in text.split(kept[0]))
    if len(kept) > 1:
        return mask_numbers(text, tuple(kept[1:]))
    return re.sub(_NUMBER, lambda m: masked(m.group()), text)
