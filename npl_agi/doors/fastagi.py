"""Asterisk's FastAGI protocol over ``asyncio`` streams: the server's side of one call.

The same conversation as a process AGI, over TCP: Asterisk sends the environment block
(``agi_*: value`` lines, then a blank line), then each command gets one reply line. On hangup
Asterisk sends ``HANGUP`` inline (instead of SIGHUP) and still answers dead-safe commands such
as ``SET VARIABLE``. Whatever the peer sends (nothing, garbage, a megabyte without a newline)
ends only its own session: every read has a line-length limit and runs within a deadline, and
the environment block a bound on its whole size, so a session never holds more than that.
"""

from __future__ import annotations

import asyncio

from npl_agi.core import agiwire
from npl_agi.core.agiwire import MAX_ENV_CHARS, MAX_ENV_LINES, MAX_LINE

__all__ = ["MAX_LINE", "Session", "SessionEnded"]


class SessionEnded(Exception):
    """The peer hung up, broke the protocol or refused a command: stop talking to it."""


class Session:
    """One FastAGI connection. Make the stream with ``limit=MAX_LINE``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.env: dict[str, str] = {}
        self.hung_up = False

    @property
    def script(self) -> str:
        return agiwire.script_of(self.env)

    @property
    def args(self) -> list[str]:
        return agiwire.args_of(self.env)

    async def read_env(self) -> dict[str, str]:
        """The environment block, up to its blank line.

        Lines that are not ``agi_*: value`` are skipped (``agiwire.env_entry``). ``SessionEnded`` past
        ``MAX_ENV_LINES`` lines or ``MAX_ENV_CHARS`` characters.
        """
        size = 0
        for _ in range(MAX_ENV_LINES):
            line = await self._line()
            if not line:
                return self.env
            size += len(line) + 1
            if size > MAX_ENV_CHARS:
                break
            entry = agiwire.env_entry(line)
            if entry is not None:
                self.env[entry[0]] = entry[1]
        raise SessionEnded("not an AGI environment block")

    async def command(self, line: str) -> str:
        """Send one command, return its ``200`` reply; ``HANGUP`` lines are noted and skipped."""
        self.writer.write(line.encode("utf-8", "replace") + b"\n")
        await self.writer.drain()
        while True:
            reply = await self._line()
            if reply == agiwire.HANGUP:
                self.hung_up = True
                continue
            if agiwire.is_success(reply):
                return reply
            raise SessionEnded(f"command refused: {reply[:60]!r}")

    async def set_variable(self, name: str, value: str) -> None:
        await self.command(agiwire.set_variable(name, value))

    async def verbose(self, message: str, level: int = 1) -> None:
        await self.command(agiwire.verbose(message, level))

    async def _line(self) -> str:
        try:
            raw = await self.reader.readline()
        except (ValueError, OSError) as e:  # ValueError: a line longer than the stream's limit
            raise SessionEnded(e.__class__.__name__) from None
        if not raw.endswith(b"\n"):
            raise SessionEnded("connection closed")
        return raw.decode("utf-8", "replace").rstrip("\r\n")
