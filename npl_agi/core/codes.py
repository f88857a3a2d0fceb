"""Every ``NPL_ERR`` value npl-agi sets, and the groups the chain, the breaker and the cache
decide by: the one table of outcome codes. Other modules name a code from here, never spell it.

``""`` is success. The service's own per-number codes (``ERR1``, ``ERR11``, ...) pass through
as they come; only those worth keeping are named here. ``BUSY`` and ``AGIFAIL`` are set by the
shipped dialplan, not by Python, and are listed for completeness.
"""

from __future__ import annotations

OK = ""
# A number's own outcome, decided without a credit.
BADNUMBER = "BADNUMBER"
NOTMOBILE = "NOTMOBILE"
# The service failed.
TIMEOUT = "TIMEOUT"
TRUNCATED = "TRUNCATED"  # an answer cut short; reaches the dialplan as PROTOCOL
PROTOCOL = "PROTOCOL"
UNREACHABLE = "UNREACHABLE"
UNAVAILABLE = "UNAVAILABLE"  # the breaker is open
# The service refused the account.
AUTH = "AUTH"
CREDIT = "CREDIT"
LOCKED = "LOCKED"
# Our side kept us from asking.
CONFIG = "CONFIG"
CACHE = "CACHE"
DISABLED = "DISABLED"
NOLOCK = "NOLOCK"
# Set by the dialplan.
BUSY = "BUSY"
AGIFAIL = "AGIFAIL"

# The service's per-number errors that are the number's for good (cached for ``error_ttl``).
PERMANENT_ERRORS = frozenset({"ERR1", "ERR11", "ERR13", "ERR21"})

# What validation refuses, without a credit.
LOCAL_REFUSALS = frozenset({BADNUMBER, NOTMOBILE})

# Per-number outcomes that mean the service failed (not the number, not the account): a stale
# cache entry may stand in, and the breaker counts them.
SERVICE_FAILURES = frozenset({UNAVAILABLE, TIMEOUT, TRUNCATED, UNREACHABLE, PROTOCOL})

# A request's outcomes that show the service works: the breaker closes on them.
SERVICE_WORKS = frozenset({OK, AUTH, CREDIT, LOCKED})

# A request cut off before its end (its asker reports the first such answer to the breaker).
CUT_OFF = (TIMEOUT, TRUNCATED)

# NPL_ERR values that are our side's failure to get an answer (the CLI's exit status 3).
TRANSPORT_FAILURES = (TIMEOUT, UNREACHABLE, PROTOCOL)

# What ``[number] range_fallback`` answers from the range holder: ``yes``, a service that failed;
# ``always`` also the refusals of the account and what keeps us from asking (the kill switch, the
# configuration, the account lock). Never a number's own outcome (BADNUMBER, NOTMOBILE, ERR<n>).
RANGE_FALLBACK = {
    "no": frozenset(),
    "yes": SERVICE_FAILURES,
    "always": SERVICE_FAILURES | {AUTH, CREDIT, LOCKED, CONFIG, DISABLED, NOLOCK},
}

# Human names of the per-number outcomes npl-agi itself assigns.
LOCAL_ERROR_NAMES = {
    BADNUMBER: "Not a valid international number",
    NOTMOBILE: "Not a mobile number (skipped, no credit spent)",
    TIMEOUT: "No answer before the deadline",
    TRUNCATED: "Answer cut short (no ENDBATCH)",
    PROTOCOL: "No valid answer line for this number",
    UNAVAILABLE: "Service failing; not asked for a while",
}

# The NPL_ERR value of each per-number outcome that is not set as it is.
NPL_ERR_OF = {TRUNCATED: PROTOCOL}
