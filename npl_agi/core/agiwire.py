"""Asterisk's AGI wire format, both ways, in one place: quoting an argument, a command line,
a reply, the environment block and the arguments in it.

Every door speaks it: the FastAGI server over TCP (``doors.fastagi``), the process script through
pyst2 (which quotes through ``quote``), agi-bin's fallback when the package is broken, and the
emulator that plays Asterisk in tests. The parsing follows res_agi.c: a command ends at a
newline, arguments are split at blanks outside double quotes, ``\\`` escapes the next character.
"""

from __future__ import annotations

OK = "200 result=1"  # Asterisk's reply to a command that ran
HANGUP = "HANGUP"  # what FastAGI sends inline when the caller hangs up
MAX_VERBOSE = 300  # characters of one VERBOSE message: a console line, not a log dump
MAX_LINE = 8192  # bytes of one environment line or reply; Asterisk's own buffer is 2048
MAX_ENV_LINES = 200  # Asterisk sends about 20, plus one per AGI argument
MAX_ENV_CHARS = 16 * 1024  # of the whole block; Asterisk's is about 1 KiB
# Control characters (C0, DEL, C1) and the Unicode line separators, each made a space: a table
# for str.translate, which every call uses, is cheaper to build than the regular expression.
_UNSAFE = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029], " ")


def quote(value: object) -> str:
    """One AGI argument, safe whatever it holds.

    Asterisk's AGI parser ends a command at a newline and treats ``"`` and ``\\`` specially;
    pyst2's own quoting escapes neither. Control characters become spaces, ``\\`` and ``"`` are
    backslash-escaped, so a hostile dialled number can never add a command or unbalance quotes.
    """
    text = str(value).translate(_UNSAFE)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def set_variable(name: str, value: object) -> str:
    """The command that sets a channel variable."""
    return f"SET VARIABLE {name} {quote(value)}"


def verbose(message: str, level: int = 1) -> str:
    """The command that writes a line to Asterisk's console and log."""
    return f"VERBOSE {quote(message[:MAX_VERBOSE])} {level}"


def env_entry(line: str) -> tuple[str, str] | None:
    """One ``agi_*: value`` line of the environment block as its key and value; None for a line
    that is not one (Asterisk writes arguments as they are, so a newline in a dialled number
    splits its line)."""
    key, sep, value = line.partition(":")
    if sep and key.startswith("agi_"):
        return key, value.removeprefix(" ")
    return None


def args_of(env: dict[str, str]) -> list[str]:
    """The AGI arguments (``agi_arg_1``, ``agi_arg_2``, …)."""
    args = []
    while (value := env.get(f"agi_arg_{len(args) + 1}")) is not None:
        args.append(value)
    return args


def script_of(env: dict[str, str]) -> str:
    """The script part of ``agi://host:port/SCRIPT?...``, as Asterisk relays it over FastAGI."""
    return env.get("agi_network_script", "").split("?", 1)[0].strip("/")


def header(env: dict[str, str]) -> bytes:
    """The environment block as Asterisk writes it: ``key: value`` lines, then a blank line."""
    return ("".join(f"{k}: {v}\n" for k, v in env.items()) + "\n").encode("utf-8", "surrogateescape")


def is_success(reply: str) -> bool:
    """Did Asterisk run the command (a ``200`` reply)?"""
    return reply.startswith("200")


def parse_args(line: str) -> tuple[list[str], bool]:
    """Split one command line as res_agi.c's ``parse_args`` does; also say if a quote is left open."""
    args: list[str] = []
    cur: list[str] | None = None
    quoted = escaped = False
    for ch in line:
        if ch == '"' and not escaped:
            quoted = not quoted
            if quoted and cur is None:
                cur = []
                args.append("")
            continue
        if ch in " \t" and not quoted and not escaped:
            if cur is not None:
                args[-1] = "".join(cur)
            cur = None
            continue
        if ch == "\\" and not escaped:
            escaped = True
            continue
        if cur is None:
            cur = []
            args.append("")
        cur.append(ch)
        escaped = False
    if cur is not None:
        args[-1] = "".join(cur)
    return args, quoted


def say_plainly(stdin, stdout, commands: list[str]) -> None:
    """Skip the environment block, then send each command and read its reply: the least an AGI
    can do without any library (agi-bin's fallback when the package cannot be imported)."""
    while stdin.readline().strip():
        continue
    for command in commands:
        stdout.write(command + "\n")
        stdout.flush()
        stdin.readline()
