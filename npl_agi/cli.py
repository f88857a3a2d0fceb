"""The ``npl-agi`` command: lookups, a credential check, the cache, the simulator and the demo.

A thin door onto ``Lookup``: it parses arguments, prints, and turns errors into one line on
stderr and an exit status (0 done, 1 the service or the network failed, 2 bad usage or config).
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
import time

from . import __version__
from .config import DEFAULT_PATH, ENV_VAR, load_config
from .errors import CacheError, ConfigError, CreditError, NplError

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
)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"npl-agi: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NplError as e:
        print(f"npl-agi: {e.npl_err}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,  # so "npl-agi --config F lookup" and "npl-agi lookup --config F" both work
        help=f"configuration file (default: ${ENV_VAR}, else {DEFAULT_PATH})",
    )
    parser = argparse.ArgumentParser(
        prog="npl-agi",
        description="Mobile number portability lookups for Asterisk.",
        epilog="Exit status: 0 done, 1 the service or the network failed (the reason on stderr), "
        "2 bad usage or configuration.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"npl-agi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("lookup", parents=[common], help="look numbers up and show their network now")
    p.add_argument("numbers", nargs="*", metavar="NUMBER", help="numbers, dialled or international")
    p.add_argument("--file", metavar="F", help="read numbers from F, one per line ('-' for stdin)")
    p.add_argument("--output", metavar="F", help="write the answers to F as CSV")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
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
    p.add_argument("action", choices=("stats", "purge", "export"))
    p.add_argument("numbers", nargs="*", metavar="NUMBER", help="with purge: only these numbers")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cache)

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


def _lookup_for(args):
    from .lookup import Lookup

    return Lookup(load_config(args.config))


def cmd_lookup(args) -> int:
    numbers = list(args.numbers)
    if args.file:
        numbers += read_numbers(args.file)
    if not numbers:
        raise ConfigError("no numbers given (NUMBER arguments or --file)")
    lookup = _lookup_for(args)
    timeout = args.timeout
    if timeout is None:
        timeout = lookup.config.api.bulk_timeout if args.file else lookup.config.api.timeout
    try:  # opened before any credit is spent
        output = open(args.output, "w", newline="", encoding="utf-8") if args.output else None  # noqa: SIM115
    except OSError as e:
        raise ConfigError(f"{args.output}: cannot write: {e.strerror}") from None
    progress = Progress(sys.stderr) if args.file and sys.stderr.isatty() else None
    try:
        answers = lookup.many(numbers, timeout, progress)
        failure = None
    except NplError as e:
        if not hasattr(e, "answers"):
            raise
        answers, failure = e.answers, e
    finally:
        if progress:
            progress.done()
    if output:
        with output:
            write_csv(output, answers)
    show_answers(args, answers)
    if failure is not None:
        raise failure
    return EXIT_OK


def show_answers(args, answers) -> None:
    """Print the answers on stdout: lines, or JSON with ``--json`` (none with only ``--output``)."""
    if args.json:
        json.dump([answer_dict(a) for a in answers], sys.stdout, indent=1)
        print()
    elif not args.output:
        for a in answers:
            print(format_line(a))


def read_numbers(path: str) -> list[str]:
    try:
        f = sys.stdin if path == "-" else open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        return [s for line in f if (s := line.strip()) and not s.startswith("#")]


def answer_dict(a) -> dict[str, str]:
    """The documented keys of one answer, in a stable order (``--json``, CSV rows)."""
    d = a.as_dict()
    return {k: d[k] for k in CSV_FIELDS}


def write_csv(f, answers) -> None:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    w.writeheader()
    for a in answers:
        w.writerow(answer_dict(a))


def format_line(a) -> str:
    """``<msisdn> <mccmnc> <msc> <imsi>  <network> (<country>)`` or ``<msisdn> ERR1 <name>``."""
    who = a.msisdn or repr(a.number)
    if a.error:
        return f"{who} {a.error} {a.error_name}"
    name = f"  {a.network} ({a.country})" if a.network or a.country else ""
    cached = " [cache]" if a.source == "cache" else ""
    return f"{who} {a.mccmnc} {a.msc or '-'} {a.imsi or '-'}{name}{cached}"


class Progress:
    """A one-line progress counter on a terminal."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        bar = "#" * (pct // 5)
        self.stream.write(f"\r[{bar:<20}] {done}/{total} numbers, {time.monotonic() - self.started:.0f} s")
        self.stream.flush()

    def done(self) -> None:
        self.stream.write("\n")


def cmd_check(args) -> int:
    lookup = _lookup_for(args)
    api = lookup.config.api
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
    from .number import normalise, validate

    config = load_config(args.config)
    cache = open_cache(config)
    try:
        if args.action == "purge":
            anything = config.number._replace(lookup_types=("any",))
            msisdns = [validate(normalise(n, anything), anything) for n in args.numbers] if args.numbers else None
            print(f"purged {cache.purge(msisdns)} entries")
        elif args.action == "stats":
            stats = cache.stats()
            print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
        elif args.json:
            print(json.dumps(list(cache.export()), indent=1))
        else:
            rows = cache.export()  # fails here, before the header, if the cache is broken
            w = csv.DictWriter(sys.stdout, fieldnames=[*CSV_FIELDS[1:], "stored", "expires"], extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    except NplError:
        raise
    except Exception as e:
        raise CacheError(f"cache {args.action} failed ({cache.name}): {e.__class__.__name__}: {e}") from None
    return EXIT_OK


def format_stats(s: dict) -> str:
    def when(t):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"

    if s["backend"] == "none":
        return "cache: none (backend = none)"
    return "\n".join(
        [
            f"cache:         {s['backend']} ({s['location']})",
            f"entries:       {s['entries']}",
            f"oldest entry:  {when(s['oldest'])}",
            f"counting since {when(s['since'])}",
            f"hits / misses: {s['hits']} / {s['misses']} (hit ratio {s['hit_ratio']:.1%})",
            f"credits saved: {s['credits_saved']}",
        ]
    )


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
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_OK))  # stop as cleanly as on Ctrl-C
    try:
        sim.serve_forever()
    finally:
        sim.server.server_close()
    return EXIT_OK


def cmd_serve(args) -> int:
    from .server import serve

    return serve(args.config, args.listen)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo()


if __name__ == "__main__":
    sys.exit(main())
