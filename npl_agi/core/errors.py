"""The one exception hierarchy, and the one place that maps failures to ``NPL_ERR`` values.

Every exception carries the ``NPL_ERR`` value the dialplan routes on, so no door (AGI, CLI,
FastAGI) needs its own table.
"""

from __future__ import annotations

from npl_agi.core import codes


class NplError(Exception):
    """Base of every error npl-agi raises on purpose.

    ``answers``: the answers of a strict lookup this failure ended (``Lookup.many``), every one
    the run has, so what was paid for before the failure is not lost; empty otherwise."""

    npl_err = codes.PROTOCOL
    answers: tuple = ()

    def carrying(self, answers) -> NplError:
        """This failure, with the answers of the lookup it ended (raised by the chain)."""
        self.answers = tuple(answers)
        return self


class ConfigError(NplError):
    """The configuration file is missing, unreadable or has a bad value."""

    npl_err = codes.CONFIG


class CacheError(NplError):
    """An admin's cache command failed (calls never see this: a failing cache is skipped)."""

    npl_err = codes.CACHE


class Disabled(NplError):
    """The admin switched lookups off with ``enabled = no``."""

    npl_err = codes.DISABLED


class BadNumber(NplError):
    """The dialled number cannot be made into a valid international number."""

    npl_err = codes.BADNUMBER


class NotMobile(NplError):
    """A valid number whose type is not in ``lookup_types``: no credit is spent on it.

    ``msisdn`` is the number it was found to be: its range holder is still known."""

    npl_err = codes.NOTMOBILE

    def __init__(self, message: str, msisdn: str = "") -> None:
        super().__init__(message)
        self.msisdn = msisdn


class ServiceRefused(NplError):
    """The service answered, but refused the whole query (its first line was not QUERYOK)."""

    def __init__(self, message: str, line: str = "") -> None:
        super().__init__(message)
        self.line = line


class AuthError(ServiceRefused):
    """``FAIL Invalid password``."""

    npl_err = codes.AUTH


class CreditError(ServiceRefused):
    """``FAIL Insufficient credit``."""

    npl_err = codes.CREDIT


class LockedError(ServiceRefused):
    """``ERR ACCOUNT LOCKED``: a post-paid account overdue for payment."""

    npl_err = codes.LOCKED


class RequestRejected(ServiceRefused):
    """``FAIL No numbers specified``, ``FAIL Request too long`` or an unknown ``FAIL`` line."""

    npl_err = codes.PROTOCOL


class TransportError(NplError):
    """The service could not be asked, or its answer could not be read."""


class LookupTimeout(TransportError):
    """The lookup's total deadline passed (waiting for the account lock counts too)."""

    npl_err = codes.TIMEOUT


class NotSent(LookupTimeout):
    """The deadline passed before a request was sent (waiting for the lock, too little time
    left): it says nothing of the service, so the breaker does not count it."""


class Unreachable(TransportError):
    """No connection to the service (refused, DNS, TLS)."""

    npl_err = codes.UNREACHABLE


class LockUnavailable(TransportError):
    """The account lock cannot be taken where configured (Redis, or a lock directory that cannot
    be used) and ``lock_fallback = none`` forbids a fallback, or none is left: no request is sent
    rather than risk a second connection."""

    npl_err = codes.NOLOCK


class ProtocolError(TransportError):
    """The answer was not the contract: HTML, empty, bad status, malformed or unasked lines."""

    npl_err = codes.PROTOCOL


def error_for(npl_err_value: str, message: str) -> NplError:
    """The exception an ``NPL_ERR`` value stands for (a failure handed over from another process)."""
    kinds = (ConfigError, AuthError, CreditError, LockedError, LookupTimeout, Unreachable, LockUnavailable)
    kind = next((k for k in kinds if k.npl_err == npl_err_value), ProtocolError)
    return kind(message)


def local_error_name(code: str) -> str:
    """Human name of a per-number error npl-agi itself assigns."""
    return codes.LOCAL_ERROR_NAMES.get(code, code)


def npl_err(failure: NplError | str | None) -> str:
    """The ``NPL_ERR`` value for an exception or a per-number error code ('' for success)."""
    if failure is None or failure == "":
        return ""
    if isinstance(failure, NplError):
        return failure.npl_err
    return codes.NPL_ERR_OF.get(failure, failure)
