"""One call through both doors, the FastAGI server and the process script, for tests that
compare them or show that both do the same."""

from __future__ import annotations

import asyncio
import time

from conftest import AGI_SCRIPT, write_config

from npl_agi.config import load_config
from npl_agi.doors.server import Server
from npl_agi.doubles.emulator import AgiEmulator, fastagi_call

DOORS = ("server", "process")


async def serving(config, clock=time.monotonic) -> Server:
    server = Server(config, listen="127.0.0.1:0", clock=clock)
    await server.start()
    return server


async def calls(server: Server, numbers: list[str], **kwargs):
    host, port = server.address
    return await asyncio.gather(*(fastagi_call(host, port, [n], **kwargs) for n in numbers))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def door_configs(tmp_path, sim, **sections) -> dict:
    """One configuration file per door (keyword arguments as ``write_config``'s), each with its
    own cache file and no metrics listener."""
    confs = {}
    for door in DOORS:
        own = {k: dict(v) if isinstance(v, dict) else v for k, v in sections.items()}
        own.setdefault("fastagi", {}).setdefault("metrics_listen", "")
        own.setdefault("cache", {}).setdefault("path", str(tmp_path / f"{door}.sqlite"))
        confs[door] = write_config(tmp_path / f"{door}.conf", sim.url, **own)
    return confs


def through_both_doors(confs: dict, subprocess_env, dialled: str | dict, sim=None) -> dict[str, dict[str, str]]:
    """The variables of one call through each door (``dialled`` may be one number per door).

    With ``sim``, the process script waits for the server's requests to end first (a hung one
    holds the account's one connection)."""
    numbers = dialled if isinstance(dialled, dict) else dict.fromkeys(DOORS, dialled)

    async def main():
        server = await serving(load_config(str(confs["server"])))
        try:
            return (await calls(server, [numbers["server"]]))[0]
        finally:
            await server.drain()

    fast = run(main())
    deadline = time.monotonic() + 30
    while sim is not None and any(sim.active.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    script = AgiEmulator(str(AGI_SCRIPT), env={**subprocess_env, "NPL_AGI_CONFIG": str(confs["process"])})
    return {"server": fast.variables, "process": script.run([numbers["process"]]).variables}


def but_time(variables: dict[str, str]) -> dict[str, str]:
    """The variables without NPL_LOOKUP_MS, which two doors never share."""
    return {**variables, "NPL_LOOKUP_MS": ""}
