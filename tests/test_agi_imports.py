"""What the AGI script imports on a cache hit: only what a hit uses, since every call setup pays
for each module it loads. Read from the script's own ``python -X importtime`` report."""

import re
import sys

from conftest import AGI_SCRIPT

from npl_agi.doubles.emulator import AgiEmulator

# A hit reads the cache and sets the variables: no HTTP stack, no numbering plan, no locks
# (only a request takes the account lock), no threads, no logging, no Redis, no asker (made by
# the first miss), no dataclasses (pyst2's pprint asks it nothing on a hit).
NOT_ON_A_HIT = {
    "requests",
    "urllib3",
    "http.client",
    "socket",
    "ssl",
    "phonenumbers",
    "hashlib",
    "fcntl",
    "threading",
    "typing",
    "logging",
    "redis",
    "asyncio",
    "json",
    "npl_agi.transports.sync",
    "npl_agi.askers.handoff",
    "npl_agi.backends.locks",
    "npl_agi.backends.redis",
    "npl_agi.askers.queued",
    "npl_agi.askers.direct",
    "dataclasses",
    "inspect",
}


def imported(stderr: str) -> set[str]:
    return set(re.findall(r"^import time:.*\| +(\S+)$", stderr, re.MULTILINE))


def test_a_cache_hit_imports_nothing_it_does_not_use(config_file, subprocess_env):
    env = {**subprocess_env, "NPL_AGI_CONFIG": str(config_file)}
    agi = AgiEmulator(str(AGI_SCRIPT), python=[sys.executable, "-X", "importtime"], env=env)
    assert agi.run(["07788450450"]).variables["NPL_SOURCE"] == "api"  # the miss fills the cache
    hit = agi.run(["07788450450"])
    assert hit.variables["NPL_SOURCE"] == "cache"
    modules = imported(hit.stderr)
    assert {"asterisk.agi", "npl_agi.backends", "sqlite3"} <= modules  # the report was read
    assert modules & NOT_ON_A_HIT == set()
