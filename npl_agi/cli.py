"""The ``npl-agi`` command: lookups, a credential check, the cache, the simulator and the demo.

A thin door onto ``Lookup``: it parses arguments, prints, and turns errors into one line on
stderr and an exit status (0 done, 1 the service or the network failed, 2 bad usage or config).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator

from . import __version__
from .config import DEFAULT_PATH, ENV_VAR, load_config, locate_config
from .errors import CacheError, ConfigError, CreditError, NplError, npl_err

CSV_FIELDS = (
    "number",
    "msisdn",
    "mccmnc",
    "mcc",
    "mnc",
    "msc",
    "imsi",
    "network",
    "country",
    "error",
    "error_name",
    "source",
    "range_mccmnc",
    "ported",
)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a Unix tool killed by SIGPIPE ends with
MAX_LINE = 256  # characters of one line of --file; a longer line is a bad number, never held whole
TRANSPORT_ERRORS = ("TIMEOUT", "UNREACHABLE", "PROTOCOL")  # NPL_ERR values that are our side's failure


class UsageError(NplError):
    """The command line asks for something that cannot be done (exit 2)."""


class OutputError(UsageError):
    """The ``--output`` file could not be written (a full disk): exit 2, the answers on stdout."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, like every other error of the command."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"npl-agi: {message} (see {self.prog} --help)\n")


class ShowVersion(argparse.Action):
    """``--version``: the version, and which configuration file a command would read."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        path, chosen_by = locate_config(getattr(namespace, "config", None))
        print(f"npl-agi {__version__}\nconfiguration: {path} ({chosen_by})")
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None)
    try:
        return args.func(args)
    except (ConfigError, UsageError) as e:
        print(f"npl-agi: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NplError as e:
        print(f"npl-agi: {e.npl_err}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as Unix tools do, and keep Python
        # from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,  # so "npl-agi --config F lookup" and "npl-agi lookup --config F" both work
        help=f"configuration file (default: ${ENV_VAR}, else the one install.sh recorded, else {DEFAULT_PATH})",
    )
    parser = Parser(
        prog="npl-agi",
        description="Mobile number portability lookups for Asterisk.",
        epilog="Exit status: 0 done, 1 the service or the network failed (the reason on stderr), "
        "2 bad usage or configuration.",
        parents=[common],
    )
    parser.add_argument("--version", action=ShowVersion, help="show the version and the configuration file read")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("lookup", parents=[common], help="look numbers up and show their network now")
    p.add_argument("numbers", nargs="*", metavar="NUMBER", help="numbers, dialled or international")
    p.add_argument(
        "--file",
        metavar="F",
        help="read numbers from F, one per line ('-' for stdin), batch_size at a time; each number is asked once",
    )
    p.add_argument("--output", metavar="F", help="write the answers to F as CSV")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="ask the service whatever the cache holds (a credit per number; the answers are still cached)",
    )
    p.add_argument(
        "--timeout",
        type=seconds,
        metavar="S",
        help="deadline of each request in seconds (default: bulk_timeout with --file, else timeout)",
    )
    p.set_defaults(func=cmd_lookup)

    p = sub.add_parser("check", parents=[common], help="check the URL and credentials without spending a credit")
    p.add_argument("--timeout", type=seconds, metavar="S", help="deadline in seconds (default: timeout)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("cache", parents=[common], help="show, purge or export the lookup cache")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser(
        "stats", parents=[common], help="entries, hits, misses, credits saved, lock fallbacks, who can write it"
    )
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a = actions.add_parser("purge", parents=[common], help="empty the cache, or drop the numbers given")
    a.add_argument("numbers", nargs="*", metavar="NUMBER", help="only these numbers")
    a = actions.add_parser("export", parents=[common], help="write the live entries as CSV (or JSON)")
    a.add_argument("--json", action="store_true", help="a JSON list instead of CSV")
    p.set_defaults(func=cmd_cache)

    for command, key, what in (("local", "NUMBER", "numbers you know"), ("ranges", "PREFIX", "ranges of your own")):
        p = sub.add_parser(command, parents=[common], help=f"import, list or delete {what} (kept by the cache backend)")
        actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
        a = actions.add_parser(
            "import", parents=[common], help=f"add a CSV file of {key.lower()},mccmnc[,note] lines (all or nothing)"
        )
        a.add_argument("file", metavar="FILE", help="the CSV file ('-' for stdin)")
        a.add_argument("--replace", action="store_true", help="the file becomes the whole list")
        actions.add_parser("list", parents=[common], help="write them as CSV, as import reads it")
        a = actions.add_parser("delete", parents=[common], help=f"delete the {key.lower()}s given")
        a.add_argument("keys", nargs="+", metavar=key)
        actions.add_parser("clear", parents=[common], help="delete them all")
        p.set_defaults(func=cmd_local_data)

    p = sub.add_parser("simulate", help="run the bundled simulator of the lookup service")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    p.add_argument("--line-delay", type=float, default=0.0, metavar="S", help="pause before each answer line")
    p.add_argument("--request-delay", type=float, default=0.0, metavar="S", help="pause before each query's first line")
    p.add_argument("--slow-delay", type=float, default=3.0, metavar="S", help="pause per line of the 'slow' fault")
    p.add_argument("--fault", help="misbehave on every query: slow, hang, truncate, garbage, http500, html, empty")
    p.add_argument("--max-numbers", type=int, default=1000, metavar="N", help="numbers allowed per query")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (needs --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "serve", parents=[common], help="run the FastAGI server: AGI(agi://127.0.0.1:4573/npl-lookup,NUMBER)"
    )
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default: [fastagi] listen)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the whole path on the bundled simulator: no account, no Asterisk needed")
    p.set_defaults(func=cmd_demo)
    return parser


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds greater than 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds greater than 0, got {text!r}")
    return value


def _lookup_for(args, memory=None):
    from .lookup import Lookup

    return Lookup(load_config(args.config), memory=memory)


def cmd_lookup(args) -> int:
    """Numbers from the arguments, then from ``--file``, looked up ``batch_size`` at a time.

    Each chunk's answers are written out before the next chunk is read, so a file of any size
    runs in little memory. Every answer is also kept for the run on disk (``RunMemory``), so a
    number repeated chunks later is not asked again, whatever the cache keeps. The first request
    that fails as a whole stops the run.
    """
    if not args.numbers and not args.file:
        raise UsageError("no numbers given (NUMBER arguments or --file)")
    from .runmemory import RunMemory

    # Stopped like on Ctrl-C, so the run's memory is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with RunMemory() as memory:
        return look_up_all(args, _lookup_for(args, memory))


def look_up_all(args, lookup) -> int:
    """``cmd_lookup`` with its ``Lookup``: read, look up and write out chunk by chunk."""
    api = lookup.config.api
    timeout = args.timeout or (api.bulk_timeout if args.file else api.timeout)
    source = open_numbers(args.file) if args.file else None
    try:  # opened before any credit is spent
        output = open(args.output, "w", newline="", encoding="utf-8") if args.output else None  # noqa: SIM115
    except OSError as e:
        raise UsageError(f"{args.output}: cannot write: {e.strerror}") from None
    out = AnswerWriter(sys.stdout, output, args.output, as_json=args.json)
    progress = Progress(sys.stderr) if args.file and sys.stderr.isatty() else None
    failed: Counter[str] = Counter()
    total = 0
    try:
        numbers = itertools.chain(args.numbers, read_numbers(source) if source else ())
        for chunk in chunked(numbers, api.batch_size):
            try:
                answers = lookup.many(chunk, timeout, progress and progress.at(total), fresh=args.fresh)
            except NplError as e:
                if not hasattr(e, "answers"):
                    raise
                out.write(e.answers)
                raise
            out.write(answers)
            total += len(answers)
            failed.update(err for a in answers if (err := npl_err(a.error)) in TRANSPORT_ERRORS)
    finally:
        if progress:
            progress.done()
        if source is not None:
            source.close()
        out.close()
    if failed:
        counts = ", ".join(f"{name} {n}" for name, n in sorted(failed.items()))
        print(f"npl-agi: {failed.total()} of {total} numbers failed ({counts})", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def open_numbers(path: str):
    """The ``--file`` as text, read as it is used; undecodable bytes become U+FFFD."""
    import io

    try:
        if path == "-":
            return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
        return open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None


def read_numbers(f) -> Iterator[str]:
    """One number per line; blank lines and ``#`` comments skipped.

    A line longer than ``MAX_LINE`` is skipped in pieces, never held whole, and stands as its
    first characters and ``…`` (a bad number: it is reported, not echoed back).
    """
    while line := f.readline(MAX_LINE + 1):
        if len(line) > MAX_LINE and not line.endswith("\n"):
            while (rest := f.readline(65536)) and not rest.endswith("\n"):
                pass
            yield line[:24].strip() + "…"
        elif (s := line.strip()) and not s.startswith("#"):
            yield s


class AnswerWriter:
    """Answers as they come: lines or a JSON list on stdout, and the ``--output`` CSV file.

    The CSV file is flushed after every chunk; when it fails (a full disk) that chunk's
    answers are printed on stdout instead, so nothing paid for is lost, and the run stops.
    """

    def __init__(self, stdout, output, output_name: str | None, *, as_json: bool) -> None:
        self.stdout = stdout
        self.output = output
        self.output_name = output_name
        self.as_json = as_json
        self.csv = csv.DictWriter(output, fieldnames=CSV_FIELDS) if output else None
        self.json_items = 0
        if self.csv:
            self.csv.writeheader()

    def write(self, answers) -> None:
        lost = None
        if self.csv:
            try:
                self.csv.writerows(csv_row(answer_dict(a)) for a in answers)
                self.output.flush()
            except OSError as e:
                lost = e
                self.csv = None
        if self.as_json:
            for a in answers:
                item = json.dumps(answer_dict(a), indent=1).replace("\n", "\n ")
                self.stdout.write(("[\n " if not self.json_items else ",\n ") + item)
                self.json_items += 1
        elif not self.output or lost:
            for a in answers:
                self.stdout.write(format_line(a) + "\n")
        self.stdout.flush()  # a reader of a pipe sees each request's answers as they come
        if lost:
            raise OutputError(
                f"{self.output_name}: cannot write: {lost.strerror}; the answers of the last request are "
                "printed instead, and every answer received is cached"
            )

    def close(self) -> None:
        if self.as_json:
            self.stdout.write("\n]\n" if self.json_items else "[]\n")
        if self.output:
            with contextlib.suppress(OSError):  # what could not be written was reported by write()
                self.output.close()


def answer_dict(a) -> dict[str, str]:
    """The documented keys of one answer, in a stable order (``--json``, CSV rows)."""
    d = a.as_dict()
    return {k: d[k] for k in CSV_FIELDS}


_PLAIN_NUMBER = re.compile(r"[+-]?[0-9][0-9 ]*")


def csv_cell(value):
    """A cell a spreadsheet will not run as a formula (OWASP's CSV injection advice).

    A text starting with ``=``, ``+``, ``-``, ``@``, tab or CR gets a leading ``'``, unless
    it is a plain phone number such as ``+44 7788 450450``. Only the CSV cell changes.
    """
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_row(row: dict) -> dict:
    return {k: csv_cell(v) for k, v in row.items()}


def format_line(a) -> str:
    """``<msisdn> <mccmnc> <msc> <imsi>  <network> (<country>)`` or ``<msisdn> ERR1 <name>``."""
    who = a.msisdn or repr(a.number)
    if a.error:
        return f"{who} {a.error} {a.error_name}"
    name = f"  {a.network} ({a.country})" if a.network or a.country else ""
    cached = " [cache]" if a.source == "cache" else ""
    return f"{who} {a.mccmnc} {a.msc or '-'} {a.imsi or '-'}{name}{cached}"


class Progress:
    """A one-line progress counter on a terminal (a streamed file has no known total)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.started = time.monotonic()

    def at(self, before: int):
        """The progress callback of one chunk, which starts after ``before`` numbers."""

        def show(done: int, total: int) -> None:
            self.stream.write(f"\r{before + done} numbers, {time.monotonic() - self.started:.0f} s")
            self.stream.flush()

        return show

    def done(self) -> None:
        self.stream.write("\n")


def cmd_check(args) -> int:
    path, chosen_by = locate_config(args.config)
    lookup = _lookup_for(args)
    api = lookup.config.api
    print(f"configuration: {path} ({chosen_by})", flush=True)
    from .endpoints import beyond_limits

    for said in beyond_limits(api.url, api.batch_size, api.connections):  # whatever the service says next
        print(f"note: {said}", flush=True)
    try:  # the lookup path's client: same credentials check, same account lock
        line = lookup.client.check(args.timeout)
    except CreditError as e:
        print(
            f"npl-agi: CREDIT: credentials accepted by {api.url}, but the account has no credit: {e.line}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"OK: {api.url} accepted user {api.user!r} (answer to an empty query: {line!r}; no credit spent)")
    return EXIT_OK


def cmd_cache(args) -> int:
    from .cache import open_cache

    config = load_config(args.config)
    cache = open_cache(config)
    try:
        if args.action == "purge":
            print(f"purged {cache.purge(purge_msisdns(args.numbers, config))} entries")
        elif args.action == "stats":
            from .locks import lock_dir_fallbacks

            stats = cache.stats()
            if cache.name == "redis":
                from .locks import FallbackRecord, lock_directory

                count, last = FallbackRecord(lock_directory(config.api, config.cache)).read()
                stats.update(lock_fallbacks=count, last_lock_fallback=last)
            count, last = lock_dir_fallbacks().read()
            stats.update(lock_dir_fallbacks=count, last_lock_dir_fallback=last)
            if cache.name != "none":
                from .cache.base import KNOWN_NUMBERS, RANGES

                stats.update(
                    known_numbers=sum(1 for _ in cache.local_items(KNOWN_NUMBERS)),
                    own_ranges=sum(1 for _ in cache.local_items(RANGES)),
                )
            print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
        else:
            export(cache, config, as_json=args.json)
    except (NplError, BrokenPipeError):
        raise
    except Exception as e:
        raise CacheError(f"cache {args.action} failed ({cache.name}): {e.__class__.__name__}: {e}") from None
    return EXIT_OK


def cmd_local_data(args) -> int:
    """``npl-agi local`` and ``npl-agi ranges``: the admin's own data beside the cache."""
    from .cache import open_cache
    from .cache.base import KNOWN_NUMBERS, RANGES
    from .localdata import number_key, prefix_key, read_rows, row_of

    config = load_config(args.config)
    cache = open_cache(config)
    kind, what = (KNOWN_NUMBERS, "numbers") if args.command == "local" else (RANGES, "ranges")
    key = number_key(config.number) if kind == KNOWN_NUMBERS else prefix_key
    if args.action == "import":
        with open_numbers(args.file) as f:
            rows = read_rows(f, row_of(key), args.file)
    elif args.action == "delete":
        keys = []
        for text in args.keys:
            try:
                keys.append(key(text))
            except ValueError as e:
                raise UsageError(f"{args.command} delete: {e}") from None
    try:
        if args.action == "import":
            print(f"imported {cache.put_local(kind, rows, replace=args.replace)} {what}")
        elif args.action == "delete":
            print(f"deleted {cache.delete_local(kind, keys)} {what}")
        elif args.action == "clear":
            print(f"deleted {cache.delete_local(kind)} {what}")
        else:
            w = csv.writer(sys.stdout, lineterminator="\n")
            w.writerow(("number" if kind == KNOWN_NUMBERS else "prefix", "mccmnc", "note"))
            w.writerows((key, mccmnc, csv_cell(note)) for key, mccmnc, note in cache.local_items(kind))
    except (NplError, BrokenPipeError):
        raise
    except Exception as e:
        raise CacheError(f"{args.command} {args.action} failed ({cache.name}): {e.__class__.__name__}: {e}") from None
    return EXIT_OK


def purge_msisdns(numbers: list[str], config) -> list[str] | None:
    """The international numbers to purge (None: all); a number that is none is a usage error."""
    from .number import normalise, validate

    if not numbers:
        return None
    anything = config.number._replace(lookup_types=("any",))
    msisdns = []
    for n in numbers:
        try:
            msisdns.append(validate(normalise(n, anything), anything))
        except NplError as e:
            raise UsageError(f"cache purge: {n!r} is not a number: {e}") from None
    return msisdns


def export(cache, config, *, as_json: bool) -> None:
    """The live entries with their network names, times in ISO 8601 UTC."""
    from .networks import Directory

    rows = cache.export()  # fails here, before the header, if the cache is broken
    directory = Directory.load(config.networks)

    def described(row: dict) -> dict:
        if row["mccmnc"]:
            row["country"], row["network"] = directory.describe(row["mccmnc"])
        return {**row, "stored": iso_utc(row["stored"]), "expires": iso_utc(row["expires"])}

    if as_json:
        print(json.dumps([described(r) for r in rows], indent=1))
        return
    fields = [f for f in CSV_FIELDS[1:] if f not in ("range_mccmnc", "ported")]  # the cache keeps neither
    w = csv.DictWriter(sys.stdout, fieldnames=[*fields, "stored", "expires"], extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow(csv_row(described(row)))


def iso_utc(t: float) -> str:
    """``2026-11-25T10:04:05Z``"""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def format_stats(s: dict) -> str:
    def when(t):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"

    lock_dir = []
    if "lock_dir_fallbacks" in s:
        lock_dir.append(
            f"lock dir fallbacks: {s['lock_dir_fallbacks']} (lock directory unusable: the temp dir's lock "
            f"file was used; last {when(s['last_lock_dir_fallback'])})"
        )
    if s["backend"] == "none":
        return "\n".join(["cache: none (backend = none)", *lock_dir])
    lines = [
        f"cache:         {s['backend']} ({s['location']})",
        f"entries:       {s['entries']}",
        f"oldest entry:  {when(s['oldest'])}",
        f"counting since {when(s['since'])}",
        f"hits / misses: {s['hits']} / {s['misses']} (hit ratio {s['hit_ratio']:.1%})",
        f"credits saved: {s['credits_saved']}",
    ]
    if "known_numbers" in s:
        lines.append(
            f"yours:         {s['known_numbers']} numbers you know, {s['own_ranges']} ranges (npl-agi local, ranges)"
        )
    if "lock_fallbacks" in s:
        lines.append(
            f"lock fallbacks: {s['lock_fallbacks']} (Redis unreachable: the local file lock was used; "
            f"last {when(s['last_lock_fallback'])})"
        )
    lines += lock_dir
    if s.get("unwritable"):
        lines.append(f"NOT WRITABLE by {s['shared_with']}: {', '.join(s['unwritable'])}")
        lines.append("  (Asterisk's lookups then go uncached: fix the owner, group or mode)")
    elif "shared_with" in s:
        lines.append(f"writable by:   {s['shared_with']}")
    return "\n".join(lines)


def cmd_simulate(args) -> int:
    from .simulator import FAULTS, Simulator, default_accounts

    if args.fault and args.fault not in FAULTS:
        raise ConfigError(f"--fault: one of {', '.join(FAULTS)}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    sim = Simulator(
        args.host,
        args.port,
        max_numbers=args.max_numbers,
        line_delay=args.line_delay,
        request_delay=args.request_delay,
        slow_delay=args.slow_delay,
        fault=args.fault,
        tls=(args.tls_cert, args.tls_key) if args.tls_cert else None,
    )
    accounts = ", ".join(f"{u}/{a.password}" for u, a in default_accounts().items())
    print(f"npl-agi simulator at {sim.url} (accounts: {accounts}); Ctrl-C stops it", flush=True)
    import threading

    signals: list[int] = []

    def stop(signum, frame) -> None:
        # From a thread of its own: an exception raised here could land where Python ignores it
        # (a weakref callback during garbage collection), and the simulator would serve on.
        signals.append(signum)
        threading.Thread(target=sim.interrupt, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        sim.serve_forever()
    finally:
        sim.server.server_close()
    return 130 if signals[:1] == [signal.SIGINT] else EXIT_OK


def cmd_serve(args) -> int:
    from .server import serve

    return serve(args.config, args.listen)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo()


if __name__ == "__main__":
    sys.exit(main())
