"""The benchmark suite runs end to end (``python -m bench --quick``). No timing is asserted:
speed lives in the figures the suite prints, not in tests."""

import json
import subprocess
import sys

from asterisk_fixture import find_asterisk
from conftest import ROOT
from sip_fixture import find_sip

SECTIONS = {
    "process": [
        "cache hit: wall time",
        "cache miss (lookup at the simulator): peak memory",
        "baseline script",
        "bare AGI script",
        "cache hit / bare python3 -c pass, pair by pair",
        "the AGI emulator's own cost",
        "imports on a hit (-X importtime): pyst2's asterisk.agi",
    ],
    "burst": [
        "10 calls, npl-agi: answered",
        "10 calls, npl-agi serve: answered",
        "10 calls, npl-agi serve: worst NPL_LOOKUP_MS",
        "10 calls, baseline: TIMEOUT",
        "max connections per account",
    ],
    "fastagi": [
        "cache hits, 1 connection, npl-agi serve: calls/s",
        "cache hits, 10 connections, npl-agi serve: per call",
        "cache hits, 100 connections, minimal server (constants): calls/s",
        "misses, 100 connections: calls/s",
        "40 misses at once, npl-agi serve: requests sent",
        "40 misses at once, npl-agi serve: max connections per account",
        "40 misses at once, process AGIs (10 at a time): time to the last answer",
    ],
    "asterisk": [
        "npl-agi, process AGI: call setup",
        "npl-agi serve, FastAGI: call setup",
        "npl-agi serve, FastAGI: added by the lookup",
        "npl-agi, process AGI: calls on their route",
        "calls/s",
    ],
    "bulk": ["simulator-limited rate", "20,000 numbers: throughput", "20,000 numbers: requests sent"],
    "credits": ["npl-agi: credits", "floor: distinct numbers per TTL window"],
    "sip": [
        "5/s, hits, no lookup: post-dial delay",
        "5/s, hits, bare Python AGI (floor): post-dial delay",
        "5/s, hits, npl-agi, process script: failed calls",
        "5/s, hits, minimal FastAGI server (floor): post-dial delay",
        "5/s, hits, npl-agi serve, FastAGI: Asterisk CPU per call",
        "5/s, 10 % misses, npl-agi, process script: post-dial delay",
        "5/s, 10 % misses, npl-agi serve, FastAGI: lookup CPU per call",
    ],
    "doors": [
        "10 calls cold, instant service, npl-agi serve: answered",
        "10 calls cold, instant service, process script: worst call",
        "10 calls hot, 0.5 s a request, process script: p50 call",
        "10 calls cold, 0.5 s a request, npl-agi serve: requests sent",
        "10 calls hot, instant service, process script: credits spent",
    ],
    "local": [
        "SQLite, 20,000 numbers, npl-agi: import",
        "SQLite, 20,000 numbers, floor: peak memory",
        "SQLite, 20,000 numbers: calls during --replace answered otherwise",
        "SQLite, 20,000 numbers: local answer, set held / ten held, pair by pair",
        "SQLite, 20,000 numbers, npl-agi: a delta of 1,000 lines",
        "Redis, 10,000 numbers, npl-agi: import",
        "Redis, 10,000 numbers: cache hit, set held / ten held, pair by pair",
        "Redis, 10,000 numbers: calls during --replace answered otherwise",
    ],
}
SIP_TARGETS = [
    "0 failed calls at every rate the no-lookup run sustains",
    "FastAGI cache hits p99 within 5 ms of the minimal FastAGI server's",
    "process script p99 <= 2 x the bare Python AGI's, below its capacity",
    "process script capacity (highest rate with p99 < 500 ms) >= 0.7 x the bare AGI's",
    "process script above its capacity: p99 <= timeout + 1 s = 3 s",
    "10 % misses: p99 <= timeout + 0.1 s = 2.1 s",
]


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
    build = find_asterisk()[0]
    have_sip = build is not None and find_sip(build) is None
    for section, rows in SECTIONS.items():
        if section == "asterisk" and build is None:
            assert "5. Real Asterisk 22" in out and "skipped, no Asterisk found" in out
            continue
        if section == "sip" and not have_sip:
            assert "8. SIP calls at fixed rates" in out and "skipped, " in out
            continue
        for row in rows:
            assert row in out, (section, row, out)
        mine = [f for f in figures["figures"] if f["section"] == section]
        assert mine and all(f["samples"] for f in mine), section
        assert any(f["ratio"] is not None for f in mine), mine  # compared with a reference of the same run
    assert [t["text"] for t in figures["targets"]] == [
        "cache hit <= 3 x bare python3 -c pass",
        "cache miss <= hit + simulator round trip + 15 ms",
        "burst of 10: every npl-agi serve call answered within timeout = 2",
        "FastAGI cache hits >= 1,000 calls/s at 100 connections",
        "FastAGI cache hits p99 < 20 ms at 10 connections",
        "FastAGI cache hits >= 0.5 x the minimal server's calls/s",
        "40 misses at once through npl-agi serve: one connection, every call answered",
        ">= 95 % of the simulator-limited rate",
        "flat memory (peak within 1.2 x from the smallest file to the largest)",
        "credits <= 1.05 x the floor",
        *(SIP_TARGETS if have_sip else []),
        "20,000 numbers imported with SQLite in <= 90 s",
        "SQLite import of 20,000 numbers: peak memory <= 200 MB",
        "10,000 numbers imported with Redis in <= 60 s",
        "--replace of 20,000 numbers (SQLite; 10,000 on Redis), a process-script call every 50 ms (200 ms on "
        "Redis): every call answered locally, by the old set or the new one",
        "a delta of 1,000 lines applied in <= 5 s",
        "a local answer with 20,000 numbers held <= 1.1 x with ten held, pair by pair",
    ]
    fastagi = {f["figure"]: f for f in figures["figures"] if f["section"] == "fastagi"}
    for c in ("1 connection", "10 connections", "100 connections"):  # each against the minimal server of the run
        ours = fastagi[f"cache hits, {c}, npl-agi serve: calls/s"]
        assert ours["reference"] == f"cache hits, {c}, minimal server (constants): calls/s" and ours["ratio"] > 0
    doors = [f for f in figures["figures"] if f["section"] == "doors" and ", process script: " in f["figure"]]
    for f in doors:  # each against the server's figure of the same burst, in the same run
        assert f["reference"] == f["figure"].replace("process script", "npl-agi serve")
    assert doors and figures["machine"]["nproc"]
