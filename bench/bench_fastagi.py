"""The FastAGI server's figures, run by hand: ``python bench/bench_fastagi.py [--quick]``.

Prints, and ``measure()`` returns as a dict:

- cache hits: calls/s and p50/p99 per call at 1, 10 and 100 concurrent connections, for
  ``npl-agi serve`` and for a minimal asyncio FastAGI server that sets the same eleven variables
  to constants (the reference), both as their own process, measured with the same client;
- the burst of the issue: 20 simultaneous misses against a simulator at 0.3 s per request plus
  10 ms per number: how many calls got their network;
- 500 simultaneous distinct misses against a simulator at 5 ms per number: requests sent, the
  most connections the simulator saw at once, the time to the last answer; the same numbers
  as process AGIs (``agi-bin/npl-lookup.agi`` behind the emulator), ``--agi-at-once`` at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from npl_agi.agi import VARIABLES  # noqa: E402
from npl_agi.emulator import AgiEmulator, fastagi_call  # noqa: E402
from npl_agi.simulator import Simulator  # noqa: E402


async def reference_server(port: int) -> None:
    """The least a FastAGI server can do: read the environment, set constant variables, close."""
    commands = [f'SET VARIABLE {name} "1"\n'.encode() for name in VARIABLES]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (await reader.readline()).strip():
                pass
            for command in commands:
                writer.write(command)
                await reader.readline()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{command} did not listen")


async def load(port: int, concurrency: int, calls: int, number: str) -> dict:
    """``calls`` calls over ``concurrency`` connections at a time; calls/s and latency in ms."""
    latencies: list[float] = []
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            run = await fastagi_call("127.0.0.1", port, [number])
            latencies.append(run.seconds * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "calls_per_s": round(calls / elapsed),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
    }


def config_text(tmp: str, url: str, name: str, **api) -> str:
    path = Path(tmp) / f"{name}.conf"
    extra = "".join(f"{k} = {v}\n" for k, v in api.items())
    path.write_text(
        f"[api]\nurl = {url}\nuser = demo\npassword = demo\nlock_dir = {tmp}\n{extra}"
        f"[number]\ncountry_code = 44\n[cache]\npath = {tmp}/{name}.sqlite\n[fastagi]\nmetrics_listen =\n"
    )
    return str(path)


def serve(config: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, "-m", "npl_agi.cli", "serve", "--config", config, "--listen", f"127.0.0.1:{port}"]
    return start(command, port), port


def cache_hits(tmp: str, calls: int) -> dict:
    out: dict = {}
    with Simulator() as sim:
        server, port = serve(config_text(tmp, sim.url, "hits"))
        ref_port = free_port()
        reference = start([sys.executable, __file__, "--reference-server", str(ref_port)], ref_port)
        try:
            asyncio.run(fastagi_call("127.0.0.1", port, ["07788450450"]))  # now cached
            for concurrency in (1, 10, 100):
                ours = asyncio.run(load(port, concurrency, calls, "07788450450"))
                ref = asyncio.run(load(ref_port, concurrency, calls, "07788450450"))
                ours["ratio_to_reference"] = round(ours["calls_per_s"] / ref["calls_per_s"], 2)
                out[concurrency] = {"npl-agi serve": ours, "reference": ref}
        finally:
            server.terminate()
            reference.terminate()
            server.wait()
            reference.wait()
    return out


def misses(tmp: str, name: str, count: int, sim: Simulator, timeout: float) -> dict:
    """``count`` distinct misses at once through the server: outcomes, requests, connections."""
    server, port = serve(config_text(tmp, sim.url, name, timeout=timeout))
    numbers = [f"07400{200000 + i:06d}" for i in range(count)]
    try:
        sim.reset()

        async def burst():
            started = time.perf_counter()
            runs = await asyncio.gather(*(fastagi_call("127.0.0.1", port, [n], timeout=60) for n in numbers))
            return runs, time.perf_counter() - started

        runs, elapsed = asyncio.run(burst())
    finally:
        server.terminate()
        server.wait()
    stats = sim.stats()
    return {
        "answered": sum(r.variables.get("NPL_ERR") == "" for r in runs),
        "calls": count,
        "requests": len(stats["requests"]),
        "max_connections": max(stats["max_concurrent"].values(), default=0),
        "last_answer_s": round(elapsed, 2),
        "max_lookup_ms": max(int(r.variables.get("NPL_LOOKUP_MS") or 0) for r in runs),
    }


def process_agis(tmp: str, count: int, sim: Simulator, at_once: int, timeout: float) -> dict:
    agi = AgiEmulator(
        str(ROOT / "agi-bin" / "npl-lookup.agi"),
        env={"PYTHONPATH": str(ROOT), "NPL_AGI_CONFIG": config_text(tmp, sim.url, "agis", timeout=timeout)},
    )
    numbers = [f"07400{300000 + i:06d}" for i in range(count)]
    sim.reset()
    started = time.perf_counter()
    with ThreadPoolExecutor(at_once) as pool:
        runs = list(pool.map(lambda n: agi.run([n], timeout=60), numbers))
    elapsed = time.perf_counter() - started
    stats = sim.stats()
    return {
        "answered": sum(r.variables.get("NPL_ERR") == "" for r in runs),
        "calls": count,
        "at_once": at_once,
        "requests": len(stats["requests"]),
        "max_connections": max(stats["max_concurrent"].values(), default=0),
        "last_answer_s": round(elapsed, 2),
    }


def measure(calls: int = 2000, agi_at_once: int = 100) -> dict:
    """Every figure, as a dict (for a benchmark suite); ``main`` prints them."""
    with tempfile.TemporaryDirectory() as tmp:
        figures = {"cache_hits": cache_hits(tmp, calls)}
        with Simulator(request_delay=0.3, line_delay=0.01) as sim:
            figures["burst_20"] = misses(tmp, "burst", 20, sim, timeout=2)
        with Simulator(line_delay=0.005) as sim:
            figures["misses_500"] = misses(tmp, "many", 500, sim, timeout=10)
            figures["misses_500_process_agis"] = process_agis(tmp, 500, sim, agi_at_once, timeout=10)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per figure")
    parser.add_argument("--agi-at-once", type=int, default=100, help="process AGIs running at once (default 100)")
    parser.add_argument("--reference-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_server:
        asyncio.run(reference_server(args.reference_server))
        return
    import os

    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    figures = measure(calls=300 if args.quick else 2000, agi_at_once=args.agi_at_once)
    print(f"{'cache hits':<24} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ref calls/s':>12} {'ratio':>6}")
    for concurrency, pair in figures["cache_hits"].items():
        ours, ref = pair["npl-agi serve"], pair["reference"]
        print(
            f"{concurrency:>3} connections{'':<8} {ours['calls_per_s']:>8} {ours['p50_ms']:>8} {ours['p99_ms']:>8}"
            f" {ref['calls_per_s']:>12} {ours['ratio_to_reference']:>6}"
        )
    for name in ("burst_20", "misses_500", "misses_500_process_agis"):
        print(f"{name}: {figures[name]}")


if __name__ == "__main__":
    main()
