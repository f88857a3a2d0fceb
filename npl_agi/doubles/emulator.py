"""Asterisk's side of a process AGI: for the demo and the tests, with no Asterisk installed.

It starts the AGI script as Asterisk does (environment block on stdin, one reply per command),
parses each command with the rules of Asterisk's own AGI argument parser, and records what the
script set, so a test can see exactly what Asterisk would have seen.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from npl_agi.core import agiwire

OK = agiwire.OK
DEAD = "511 Command Not Permitted on a dead channel or intercept routine"
# Commands Asterisk still runs on a hung-up channel (res_agi marks them dead-safe).
DEAD_SAFE = frozenset({"SET VARIABLE", "GET VARIABLE", "GET FULL VARIABLE", "VERBOSE", "EXEC", "NOOP"})
Responder = Callable[[int, list[str]], "str | None"]


def command_name(argv: list[str]) -> str:
    """The command's words (``SET VARIABLE``), matched the way Asterisk matches them."""
    for n in (3, 2, 1):
        name = " ".join(argv[:n]).upper()
        if name in DEAD_SAFE or n == 1:
            return name
    return ""


@dataclass
class AgiRun:
    lines: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    unbalanced: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)
    verbose: list[str] = field(default_factory=list)
    returncode: int | None = None
    stderr: str = ""
    seconds: float = 0.0


def answer_all(n: int, argv: list[str]) -> str:
    return OK


def hung_up_after(k: int) -> Responder:
    """Asterisk after a hangup at command ``k``: dead-safe commands still work, others get 511."""

    def respond(n: int, argv: list[str]) -> str:
        return OK if n < k or command_name(argv) in DEAD_SAFE else DEAD

    return respond


def environment(request: str, args, agi_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment block Asterisk sends an AGI, with the arguments as ``agi_arg_N``."""
    env_block = {
        "agi_request": request,
        "agi_channel": "Local/emulated-00000001;2",
        "agi_language": "en",
        "agi_type": "Local",
        "agi_uniqueid": "1764000000.1",
        "agi_version": "22.10.1",
        "agi_callerid": "unknown",
        "agi_calleridname": "unknown",
        "agi_context": "npl-outbound",
        "agi_extension": "s",
        "agi_priority": "1",
        "agi_enhanced": "0.0",
        "agi_accountcode": "",
        "agi_threadid": "140000000000000",
        **(agi_env or {}),
    }
    for i, a in enumerate(args, 1):
        env_block[f"agi_arg_{i}"] = a
    return env_block


def fastagi_greeting(host: str, port: int, script: str, args, agi_env: dict[str, str] | None = None) -> bytes:
    """What Asterisk sends first on a FastAGI connection: the environment block (with
    ``agi_network_script``) and its blank line."""
    env_block = {
        "agi_network": "yes",
        "agi_network_script": script,
        **environment(f"agi://{host}:{port}/{script}", args, agi_env),
    }
    return agiwire.header(env_block)


def replay(output: str, respond: Responder = answer_all) -> AgiRun:
    """What a script's commands set, read from its output afterwards: for a script that had all
    its replies in advance (stdin from a file, as a benchmark times a whole process)."""
    run = AgiRun()
    for line in output.splitlines():
        AgiEmulator._handle(line, respond, run)
    return run


async def fastagi_call(
    host: str,
    port: int,
    args: list[str] = (),
    agi_env: dict[str, str] | None = None,
    *,
    script: str = "npl-lookup",
    respond: Responder = answer_all,
    hangup_after: float | None = None,
    timeout: float = 15.0,
    before_env=None,
) -> AgiRun:
    """One FastAGI call as Asterisk makes it: connect, send the environment (with
    ``agi_network_script``), answer each command; ``hangup_after`` seconds in, send ``HANGUP``
    inline as Asterisk does when the caller hangs up. Ends when the server closes.

    ``before_env`` (an awaitable) is awaited once connected, before the environment is sent: a
    call that the server accepted early and that speaks late."""
    import asyncio

    started = time.monotonic()
    run = AgiRun()
    reader, writer = await asyncio.open_connection(host, port)
    if before_env is not None:
        await before_env
    writer.write(fastagi_greeting(host, port, script, args, agi_env))

    async def hang_up() -> None:
        await asyncio.sleep(hangup_after)
        writer.write(b"HANGUP\n")

    hangup = asyncio.ensure_future(hang_up()) if hangup_after is not None else None
    try:
        async with asyncio.timeout(timeout):
            while line := await reader.readline():
                reply = AgiEmulator._handle(line.decode("utf-8", "replace").rstrip("\r\n"), respond, run)
                if reply is None:
                    break
                writer.write((reply + "\n").encode())
    except (TimeoutError, ConnectionError):
        pass
    finally:
        if hangup is not None:
            hangup.cancel()
        writer.close()
        run.seconds = time.monotonic() - started
    return run


class AgiEmulator:
    """Runs one AGI script invocation against an emulated channel."""

    def __init__(
        self, script: str, *, python: str | list[str] = sys.executable, env: dict[str, str] | None = None
    ) -> None:
        self.script = script
        self.python = [python] if isinstance(python, str) else list(python)
        self.env = {**os.environ, **(env or {})}

    def run(
        self,
        args: list[str] = (),
        agi_env: dict[str, str] | None = None,
        *,
        respond: Responder = answer_all,
        sighup_after: float | None = None,
        timeout: float = 15.0,
    ) -> AgiRun:
        """Run the script; ``respond`` gives each reply (None closes the pipe), and
        ``sighup_after`` sends SIGHUP that many seconds after the environment block."""
        env_block = environment(os.path.basename(self.script), args, agi_env)
        cmd = [*self.python, self.script, *args]
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env
        )
        run = AgiRun()
        try:
            self._converse(proc, env_block, respond, sighup_after, started + timeout, run)
        finally:
            if proc.poll() is None:
                proc.kill()
            run.returncode = proc.wait()
            run.stderr = proc.stderr.read().decode("utf-8", "replace")
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                with contextlib.suppress(OSError):
                    stream.close()
            run.seconds = time.monotonic() - started
        return run

    def _converse(self, proc, env_block, respond, sighup_after, deadline, run) -> None:
        # A script may end without reading its environment (Asterisk shrugs that off too).
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(agiwire.header(env_block))
            proc.stdin.flush()
        sighup_at = time.monotonic() + sighup_after if sighup_after is not None else None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            wait = deadline - now
            if sighup_at is not None:
                if now >= sighup_at:
                    proc.send_signal(signal.SIGHUP)
                    sighup_at = None
                    continue
                wait = min(wait, sighup_at - now)
            if not sel.select(wait):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return proc.wait(max(0.0, deadline - time.monotonic()))
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                reply = self._handle(raw.decode("utf-8", "replace").rstrip("\r"), respond, run)
                if reply is None:
                    proc.stdin.close()
                    return proc.wait(max(0.0, deadline - time.monotonic()))
                # A script that is gone gets no reply; what it had already written is still read.
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write((reply + "\n").encode())
                    proc.stdin.flush()

    @staticmethod
    def _handle(line: str, respond: Responder, run: AgiRun) -> str | None:
        run.lines.append(line)
        argv, open_quote = agiwire.parse_args(line)
        run.commands.append(argv)
        if open_quote:
            run.unbalanced.append(line)
        reply = respond(len(run.commands) - 1, argv)
        if reply and reply.startswith("200"):
            name = command_name(argv)
            if name == "SET VARIABLE" and len(argv) >= 4:
                run.variables[argv[2]] = argv[3]
            elif name == "VERBOSE" and len(argv) >= 2:
                run.verbose.append(argv[1])
        return reply
