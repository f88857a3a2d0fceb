"""The one exception hierarchy, and the one place that maps failures to ``NPL_ERR`` values.

Every exception carries the ``NPL_ERR`` value the dialplan routes on, so no door (AGI, CLI,
FastAGI) needs its own table.
"""

from __future__ import annotations


class NplError(Exception):
    """Base of every error npl-agi raises on purpose."""

    npl_err = "PROTOCOL"


class ConfigError(NplError):
    """The configuration file is missing, unreadable or has a bad value."""

    npl_err = "CONFIG"


class CacheError(NplError):
    """An admin's cache command failed (calls never see this: a failing cache is skipped)."""

    npl_err = "CACHE"


class Disabled(NplError):
    """The admin switched lookups off with ``enabled = no``."""

    npl_err = "DISABLED"


class BadNumber(NplError):
    """The dialled number cannot be made into a valid international number."""

    npl_err = "BADNUMBER"


class NotMobile(NplError):
    """A valid number whose type is not in ``lookup_types``: no credit is spent on it.

    ``msisdn`` is the number it was found to be: its range holder is still known."""

    npl_err = "NOTMOBILE"

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

    npl_err = "AUTH"


class CreditError(ServiceRefused):
    """``FAIL Insufficient credit``."""

    npl_err = "CREDIT"


class LockedError(ServiceRefused):
    """``ERR ACCOUNT LOCKED``: a post-paid account overdue for payment."""

    npl_err = "LOCKED"


class RequestRejected(ServiceRefused):
    """``FAIL No numbers specified``, ``FAIL Request too long`` or an unknown ``FAIL`` line."""

    npl_err = "PROTOCOL"


class TransportError(NplError):
    """The service could not be asked, or its answer could not be read."""


class LookupTimeout(TransportError):
    """The lookup's total deadline passed (waiting for the account lock counts too)."""

    npl_err = "TIMEOUT"


class NotSent(LookupTimeout):
    """The deadline passed before a request was sent (waiting for the lock, too little time
    left): it says nothing of the service, so the breaker does not count it."""


class Unreachable(TransportError):
    """No connection to the service (refused, DNS, TLS)."""

    npl_err = "UNREACHABLE"


class LockUnavailable(TransportError):
    """The account lock cannot be taken where configured (Redis, or a lock directory that cannot
    be used) and ``lock_fallback = none`` forbids a fallback, or none is left: no request is sent
    rather than risk a second connection."""

    npl_err = "NOLOCK"


class Unavailable(TransportError):
    """The FastAGI server stopped asking a failing service for a while (its circuit breaker)."""

    npl_err = "UNAVAILABLE"


class ProtocolError(TransportError):
    """The answer was not the contract: HTML, empty, bad status, malformed or unasked lines."""

    npl_err = "PROTOCOL"


# Per-number outcomes that are not the service's own ERR<n> codes. They travel in
# ``Answer.error`` so a batch can mix good answers and failures.
BADNUMBER = "BADNUMBER"
NOTMOBILE = "NOTMOBILE"
TIMEOUT = "TIMEOUT"
TRUNCATED = "TRUNCATED"
PROTOCOL = "PROTOCOL"
UNAVAILABLE = "UNAVAILABLE"

# Per-number outcomes that mean the service failed (not the number, not the account): a stale
# cache entry may stand in. Refusals of the account (AUTH, CREDIT, LOCKED) are not among them.
SERVICE_FAILURES = frozenset({UNAVAILABLE, TIMEOUT, TRUNCATED, "UNREACHABLE", PROTOCOL})

# What ``[number] range_fallback`` answers from the range holder: ``yes``, a service that failed;
# ``always`` also the refusals of the account and what keeps us from asking (the kill switch, the
# configuration, the account lock). Never a number's own outcome (BADNUMBER, NOTMOBILE, ERR<n>).
RANGE_FALLBACK = {
    "no": frozenset(),
    "yes": SERVICE_FAILURES,
    "always": SERVICE_FAILURES | {"AUTH", "CREDIT", "LOCKED", "CONFIG", "DISABLED", "NOLOCK"},
}

_LOCAL_ERROR_NAMES = {
    BADNUMBER: "Not a valid international number",
    NOTMOBILE: "Not a mobile number (skipped, no credit spent)",
    TIMEOUT: "No answer before the deadline",
    TRUNCATED: "Answer cut short (no ENDBATCH)",
    PROTOCOL: "No valid answer line for this number",
    UNAVAILABLE: "Service failing; not asked for a while",
}

# NPL_ERR value for each per-number error that is not sent as it is.
_NPL_ERR_OF_CODE = {TRUNCATED: "PROTOCOL"}


def error_for(npl_err_value: str, message: str) -> NplError:
    """The exception an ``NPL_ERR`` value stands for (a failure handed over from another process)."""
    kinds = (ConfigError, AuthError, CreditError, LockedError, LookupTimeout, Unreachable, LockUnavailable)
    kind = next((k for k in kinds if k.npl_err == npl_err_value), ProtocolError)
    return kind(message)


def local_error_name(code: str) -> str:
    """Human name of a per-number error npl-agi itself assigns."""
    return _LOCAL_ERROR_NAMES.get(code, code)


def npl_err(failure: NplError | str | None) -> str:
    """The ``NPL_ERR`` value for an exception or a per-number error code ('' for success)."""
    if failure is None or failure == "":
        return ""
    if isinstance(failure, NplError):
        return failure.npl_err
    return _NPL_ERR_OF_CODE.get(failure, failure)
