"""The benchmark suite runs end to end (``python -m bench --quick``). No timing is asserted:
speed lives in the figures the suite prints, not in tests."""

import json
import subprocess
import sys

from asterisk_fixture import find_asterisk
from conftest import ROOT

SECTIONS = {
    "process": ["cache hit: wall time", "cache miss (lookup at the simulator): peak memory", "baseline script"],
    "burst": ["10 calls, npl-agi: answered", "10 calls, baseline: TIMEOUT", "max connections per account"],
    "bulk": ["simulator-limited rate", "20,000 numbers: throughput", "20,000 numbers: requests sent"],
    "credits": ["npl-agi: credits", "floor: distinct numbers per TTL window"],
    "asterisk": ["npl-agi, process AGI: call setup", "added by the lookup", "calls/s"],
}


def test_quick_run_prints_every_sections_rows(tmp_path):
    raw = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(raw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    figures = json.loads(raw.read_text())
    have_asterisk = find_asterisk()[0] is not None
    for section, rows in SECTIONS.items():
        if section == "asterisk" and not have_asterisk:
            assert "6. Real Asterisk 22" in out and "skipped, no Asterisk found" in out
            continue
        for row in rows:
            assert row in out, (section, row, out)
        mine = [f for f in figures["figures"] if f["section"] == section]
        assert mine and all(f["samples"] for f in mine), section
        assert any(f["ratio"] is not None for f in mine), mine  # compared with a reference of the same run
    assert [t["text"] for t in figures["targets"]] == [
        "cache hit <= 3 x bare python3 -c pass",
        "cache miss <= hit + simulator round trip + 15 ms",
        ">= 95 % of the simulator-limited rate",
        "flat memory (peak within 1.2 x from the smallest file to the largest)",
        "credits <= 1.05 x the floor",
    ]
    assert figures["machine"]["nproc"]
