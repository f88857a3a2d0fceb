"""The library's warnings (a cache that failed, a lock that fell back), without importing
``logging`` on the call path.

The AGI door points them at the Asterisk console with ``set_sink``; everywhere else they go to
the standard ``logging`` logger ``npl_agi``.
"""

from __future__ import annotations

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
