#!/usr/bin/env python3
"""The AGI script an admin would write from the service's sample: the benchmarks' baseline.

Naive on purpose, as such scripts are: pyst2 and requests imported at the top, a GET with the
password in the URL, no cache, the dialled number sent as it is, and ``timeout=2`` per socket
read rather than for the whole answer. A reference to measure npl-agi against, not product code.
The service and the account come from the environment, so the benchmarks can point it at the
simulator.
"""

import os
import sys

import requests
from asterisk.agi import AGI

URL = os.environ.get("NPL_URL", "https://secure.comcetera.com/npl")
USER = os.environ.get("NPL_USER", "bob")
PASSWORD = os.environ.get("NPL_PASSWORD", "123")

agi = AGI()
number = sys.argv[1] if len(sys.argv) > 1 else agi.env["agi_extension"]
try:
    r = requests.get(f"{URL}?user={USER}&pass={PASSWORD}&msisdn={number}", timeout=2)
    lines = r.text.splitlines()
    if len(lines) > 1 and lines[0] == "QUERYOK":
        answer = lines[1].split()[1]
        agi.set_variable("NPL_ERR" if answer.startswith("ERR") else "NPL_MCCMNC", answer)
    else:
        agi.set_variable("NPL_ERR", "FAILED")
except requests.exceptions.Timeout:
    agi.set_variable("NPL_ERR", "TIMEOUT")
except Exception:
    agi.set_variable("NPL_ERR", "FAILED")
