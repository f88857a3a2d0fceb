"""The least a process AGI in Python can do, the floor for npl-agi's script: read the environment
block, set the variables to constants, one command and its reply at a time, exit.

It imports nothing the interpreter has not loaded already; the variables' names come from the
benchmark (``$NPL_VARIABLES``, npl_agi.agi.VARIABLES), so that none of npl_agi is loaded either.
"""

import os
import sys

while sys.stdin.readline().strip():
    pass
for name in os.environ["NPL_VARIABLES"].split():
    sys.stdout.write(f'SET VARIABLE {name} "1"\n')
    sys.stdout.flush()
    sys.stdin.readline()
