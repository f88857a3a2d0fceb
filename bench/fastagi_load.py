"""A FastAGI load client in a process of its own, so that the server is measured, not the client.

``python -m bench.fastagi_load HOST PORT CONNECTIONS`` reads one JSON line from stdin, the numbers
to call (one call each), prints ``ready``, starts when the next line arrives (so that several
clients start together) and prints one JSON line: each call's seconds (connect to
close), the seconds from the first call's start to the last call's end, and how many calls ended
with each ``NPL_ERR`` and each ``NPL_MCCMNC``. ``CONNECTIONS`` calls run at a time, each on a new
connection, as Asterisk opens one per ``AGI(agi://…)``.

It plays Asterisk's side as leanly as it can: an asyncio protocol that sends the environment
block and answers every command line with ``200 result=1``, reading only the two variables it
reports. The greetings are built before the start.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter

from npl_agi.doubles.emulator import OK, fastagi_greeting

REPLY = OK.encode() + b"\n"
WATCHED = {b"NPL_ERR": "npl_err", b"NPL_MCCMNC": "mccmnc"}


class _Call(asyncio.Protocol):
    def __init__(self, greeting: bytes, done: asyncio.Future) -> None:
        self.greeting = greeting
        self.done = done
        self.pending = b""
        self.found: dict[str, str] = {}

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.max_size = 4096  # not asyncio's 256 KiB, mapped and unmapped on every read
        transport.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            if line.startswith(b"SET VARIABLE "):
                name, _, value = line[13:].partition(b" ")
                if name in WATCHED:
                    self.found[WATCHED[name]] = value.strip(b'"').decode()
        if lines:
            self.transport.write(REPLY * len(lines))

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(self.found)


async def load(host: str, port: int, connections: int, greetings: list[bytes]) -> dict:
    loop = asyncio.get_running_loop()
    seconds: list[float] = []
    outcomes = {name: Counter() for name in WATCHED.values()}
    todo = iter(greetings)

    async def worker() -> None:
        for greeting in todo:
            started = time.perf_counter()
            done = loop.create_future()
            try:
                async with asyncio.timeout(60):
                    await loop.create_connection(lambda g=greeting, d=done: _Call(g, d), host, port)
                    found = await done
            except (OSError, TimeoutError) as e:
                found = {"npl_err": f"client: {e.__class__.__name__}"}
            seconds.append(time.perf_counter() - started)
            for name in outcomes:
                outcomes[name][found.get(name, "(not set)")] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return {"seconds": seconds, "elapsed": time.perf_counter() - started, **outcomes}


def main() -> None:
    host, port, connections = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    numbers = json.loads(sys.stdin.readline())
    greetings = [fastagi_greeting(host, port, "npl-lookup", [n]) for n in numbers]
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(asyncio.run(load(host, port, connections, greetings))), flush=True)


if __name__ == "__main__":
    main()
