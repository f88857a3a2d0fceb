"""``npl-agi lookup``: numbers from the command line or a file, looked up in batches, written
as text, CSV or JSON as they come (what was paid for is written even when a batch fails)."""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator

from npl_agi.admin.usage import EXIT_FAILED, EXIT_OK, OutputError, UsageError
from npl_agi.config import load_config
from npl_agi.core.codes import TRANSPORT_FAILURES
from npl_agi.core.errors import NplError, npl_err

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
MAX_LINE = 256  # characters of one line of --file; a longer line is a bad number, never held whole


def lookup_for(args, memory=None):
    from npl_agi.askers.direct import lookup_here

    return lookup_here(load_config(args.config), memory=memory)


def cmd_lookup(args) -> int:
    """Numbers from the arguments, then from ``--file``, looked up ``batch_size`` at a time.

    Each chunk's answers are written out before the next chunk is read, so a file of any size
    runs in little memory. Every answer is also kept for the run on disk (``RunMemory``), so a
    number repeated chunks later is not asked again, whatever the cache keeps. The first request
    that fails as a whole stops the run.
    """
    if not args.numbers and not args.file:
        raise UsageError("no numbers given (NUMBER arguments or --file)")
    from npl_agi.chain.runmemory import RunMemory

    # Stopped like on Ctrl-C, so the run's memory is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with RunMemory() as memory:
        return look_up_all(args, lookup_for(args, memory))


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
                out.write(list(e.answers))
                raise
            out.write(answers)
            total += len(answers)
            failed.update(err for a in answers if (err := npl_err(a.error)) in TRANSPORT_FAILURES)
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
