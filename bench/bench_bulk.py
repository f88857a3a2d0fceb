"""Peak memory and time of a bulk lookup, run by hand: ``python bench/bench_bulk.py [NUMBERS]``.

Writes NUMBERS UK mobile numbers (default 1,000,000) to a file and runs the real
``npl-agi lookup --file F --output /dev/null`` as a child process against the bundled simulator,
then prints its wall time and peak resident memory. The file is streamed ``batch_size`` lines
at a time, so the peak stays flat however long the file is.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from npl_agi.simulator import Simulator  # noqa: E402


def main(count: int = 1_000_000) -> None:
    with tempfile.TemporaryDirectory() as tmp, Simulator() as sim:
        tmp_path = Path(tmp)
        numbers = tmp_path / "numbers.txt"
        with numbers.open("w") as f:
            f.writelines(f"07400{n:06d}\n" for n in range(count))
        config = tmp_path / "npl-agi.conf"
        config.write_text(
            f"[api]\nurl = {sim.url}\nuser = demo\npassword = demo\nlock_dir = {tmp}\n"
            f"[number]\ncountry_code = 44\n[cache]\nbackend = sqlite\npath = {tmp}/cache.sqlite\n"
        )
        config.chmod(0o600)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "npl_agi.cli", "lookup", "--config", str(config)]
        started = time.monotonic()
        done = subprocess.run([*command, "--file", str(numbers), "--output", "/dev/null"], env=env, check=False)
        took = time.monotonic() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        charged = len(sim.stats()["charged"])
    print(f"npl-agi lookup --file of {count:,} numbers: exit {done.returncode}, {took:.1f} s,")
    print(f"  peak memory {peak:.0f} MiB, {charged:,} numbers charged")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
