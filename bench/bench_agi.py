"""Call-setup cost of the AGI script, run by hand: ``python bench/bench_agi.py [RUNS]``.

Runs the real ``agi-bin/npl-lookup.agi`` behind the AGI channel emulator against the bundled
simulator and prints the median wall time per call and the peak memory of one run, for a cache
hit, a lookup that goes to the service, the kill switch, and a bare interpreter for reference.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from npl_agi.emulator import AgiEmulator  # noqa: E402
from npl_agi.simulator import Simulator  # noqa: E402


def peak_rss_mb(fn) -> float:
    """Peak resident memory of the largest child process started by ``fn``, in MB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(before, after) / 1024


def main(runs: int = 30) -> None:
    env = {"PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp, Simulator() as sim:

        def config(enabled: str) -> str:
            path = Path(tmp) / f"{enabled}.conf"
            path.write_text(
                f"[api]\nurl = {sim.url}\nuser = demo\npassword = demo\nenabled = {enabled}\nlock_dir = {tmp}\n"
                f"[number]\ncountry_code = 44\n[cache]\npath = {tmp}/cache.sqlite\n"
            )
            return str(path)

        on = AgiEmulator(str(ROOT / "agi-bin" / "npl-lookup.agi"), env={**env, "NPL_AGI_CONFIG": config("yes")})
        off = AgiEmulator(str(ROOT / "agi-bin" / "npl-lookup.agi"), env={**env, "NPL_AGI_CONFIG": config("no")})
        on.run(["07788450450"])  # warm the cache and the page cache
        cases = {
            "bare python3 -c pass": lambda i: subprocess.run([sys.executable, "-c", "pass"], check=True),
            "AGI, kill switch (enabled = no)": lambda i: off.run(["07788450450"]),
            "AGI, cache hit": lambda i: on.run(["07788450450"]),
            "AGI, service lookup (cache miss)": lambda i: on.run([f"07400{100000 + i:06d}"]),
        }
        print(f"{runs} runs each, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
        print(f"{'case':<36} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
        for name, case in cases.items():
            times = []
            for i in range(runs):
                started = time.perf_counter()
                case(i)
                times.append((time.perf_counter() - started) * 1000)
            print(f"{name:<36} {statistics.median(times):>10.1f} {min(times):>8.1f} {max(times):>8.1f}")
        print(f"peak memory of one AGI run: {peak_rss_mb(lambda: on.run(['07400999999'])):.1f} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
