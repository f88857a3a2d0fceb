#!/usr/bin/env python3
"""The least a Python process AGI can do, the floor for npl-agi's process script: read the
environment block, set the same variables to the constants of a Vodafone UK cache hit, one
command and its reply at a time, and exit. Only ``sys`` is imported: what it costs is the
interpreter's start. The names are npl_agi.doors.process.VARIABLES (bench/sip.py checks that they match);
importing them would add npl_agi's own import to the floor."""

import sys

VALUES = {
    "NPL_NUMBER": "447788450450",
    "NPL_MCCMNC": "23415",
    "NPL_MCC": "234",
    "NPL_MNC": "15",
    "NPL_MSC": "",
    "NPL_IMSI": "",
    "NPL_NETWORK": "Vodafone UK",
    "NPL_COUNTRY": "GB",
    "NPL_ERR": "",
    "NPL_SOURCE": "cache",
    "NPL_RANGE_MCCMNC": "23415",
    "NPL_PORTED": "0",
    "NPL_LOOKUP_MS": "0",
}

while sys.stdin.readline().strip():
    pass
for name, value in VALUES.items():
    sys.stdout.write(f'SET VARIABLE {name} "{value}"\n')
    sys.stdout.flush()
    sys.stdin.readline()
