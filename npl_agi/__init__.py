"""npl-agi: mobile number portability lookups for Asterisk.

Kept free of imports on purpose: the AGI script runs on every call setup, and whatever
this package imports at start-up is added to the time a caller waits.
"""

__version__ = "0.1.0"
