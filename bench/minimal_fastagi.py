"""The least a FastAGI server can do, the reference for ``npl-agi serve``'s own cost: read the
environment block, set the same variables to constants, one command and its reply at a time, and
close. ``python bench/minimal_fastagi.py [PORT]`` (a free port by default) writes the port it
listens on to stderr and serves until SIGTERM."""

import asyncio
import signal
import sys

from npl_agi.doors.process import VARIABLES

COMMANDS = [f'SET VARIABLE {name} "1"\n'.encode() for name in VARIABLES]


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (await reader.readline()).strip():
            pass
        for command in COMMANDS:
            writer.write(command)
            await reader.readline()
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"minimal FastAGI server on 127.0.0.1:{server.sockets[0].getsockname()[1]}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
