"""Run a command and write its peak resident memory (KiB) to a file: ``peak_rss.py OUT CMD...``.

Run it with ``python -S -I`` in front of the command whose memory is measured. A child's
``ru_maxrss`` also counts what its parent held when it forked, so the parent must be this small
process, not the benchmark itself (a child of a 300 MiB parent reports 300 MiB). stdin and stdout
pass through untouched, so the command can still speak AGI.
"""

import os
import sys

out, command = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execv(command[0], command)  # noqa: S606 - the command as given, no shell
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write(f"{usage.ru_maxrss}\n")
sys.exit(os.waitstatus_to_exitcode(status))
