"""The ``npl-agi`` command: lookups, a credential check, the cache, the simulator and the demo.

A thin door onto ``Lookup``: it parses arguments, prints, and turns errors into one line on
stderr and an exit status (0 done, 1 the service or the network failed, 2 bad usage or config).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from npl_agi import __version__
from npl_agi.admin.cache_cmd import cmd_cache, cmd_local_data
from npl_agi.admin.lookup_cmd import cmd_lookup, lookup_for
from npl_agi.admin.usage import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from npl_agi.config import DEFAULT_PATH, ENV_VAR, locate_config
from npl_agi.core.errors import ConfigError, CreditError, NplError


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
        lines = (
            "number,mccmnc[,note] lines (a number, or a block FROM-TO)"
            if command == "local"
            else "prefix,mccmnc[,note] lines"
        )
        a = actions.add_parser("import", parents=[common], help=f"add a CSV file of {lines} (all or nothing)")
        a.add_argument("file", metavar="FILE", help="the CSV file ('-' for stdin)")
        how = a.add_mutually_exclusive_group()
        how.add_argument("--replace", action="store_true", help="the file becomes the whole list")
        one = key.lower()
        how.add_argument(
            "--delta",
            action="store_true",
            help=f"the file is a day's changes: {one},mccmnc[,note] adds or changes a {one}, {one},- removes it",
        )
        actions.add_parser("list", parents=[common], help="write them as CSV, as import reads it")
        a = actions.add_parser(
            "delete",
            parents=[common],
            help=f"delete the {key.lower()}s given" + (" (or blocks FROM-TO)" if command == "local" else ""),
        )
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


def cmd_check(args) -> int:
    path, chosen_by = locate_config(args.config)
    lookup = lookup_for(args)
    api = lookup.config.api
    print(f"configuration: {path} ({chosen_by})", flush=True)
    from npl_agi.core.endpoints import beyond_limits

    for said in beyond_limits(api.url, api.batch_size, api.connections):  # whatever the service says next
        print(f"note: {said}", flush=True)
    try:  # the lookup path's client: same credentials check, same account lock
        line = lookup.asker.client.check(args.timeout)
    except CreditError as e:
        print(
            f"npl-agi: CREDIT: credentials accepted by {api.url}, but the account has no credit: {e.line}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"OK: {api.url} accepted user {api.user!r} (answer to an empty query: {line!r}; no credit spent)")
    return EXIT_OK


def cmd_simulate(args) -> int:
    from npl_agi.doubles.simulator import FAULTS, Simulator, default_accounts

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
    from npl_agi.doors.server import serve

    return serve(args.config, args.listen)


def cmd_demo(args) -> int:
    from npl_agi.doubles.demo import run_demo

    return run_demo()


if __name__ == "__main__":
    sys.exit(main())
