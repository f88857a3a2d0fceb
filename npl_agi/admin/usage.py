"""What every ``npl-agi`` command shares: its exit statuses and the error of a bad command line."""

from __future__ import annotations

import signal

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a Unix tool killed by SIGPIPE ends with


class UsageError(Exception):
    """The command line asks for something that cannot be done (exit 2). Not an ``NplError``:
    it is no outcome of a lookup and has no ``NPL_ERR``."""


class OutputError(UsageError):
    """The ``--output`` file could not be written (a full disk): exit 2, the answers on stdout."""
