"""``npl-agi local import`` at national scale: a file streamed through a staging file, checked
whole before anything is stored (bad lines, a number given twice with two networks, blocks
that overlap), handed to the backend a chunk at a time; deltas; blocks; numbers in
international form checked without a phonenumbers parse per line, exactly as a call checks them.

The command runs as a process of its own, on real files, against the real backends (SQLite, a
real redis-server) and against ``FakeLocal``: the backends' contract for the admin's data
(``load_local``, ``local_size``) kept as simply as it can be, checking what it is handed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import phonenumbers
import pytest
from conftest import CLI_REPORTING_PEAK, write_config

from npl_agi.admin.localdata import CHUNK, MAX_BAD_SHOWN, MAX_LINE, known_key, row_of, staged
from npl_agi.admin.usage import UsageError
from npl_agi.backends.base import Cache, _stats
from npl_agi.config import NumberConfig, load_config
from npl_agi.core.errors import ConfigError, NplError
from npl_agi.core.number import canonical, normalise, quick, validate

pytest_plugins = ("redis_fixture",)

TESTS = Path(__file__).resolve().parent
URL = "http://127.0.0.1:9/"  # never asked: importing numbers costs no lookup
STAGING = ".npl-agi-import-"  # how a staging file's name starts


# -- the backends' contract, kept simply ----------------------------------------------------


class FakeLocal(Cache):
    """``load_local`` and ``local_size`` as ``backends.base`` describes them, in one SQLite table
    beside the cache path, all or nothing in one transaction. It checks what it is handed:
    lists of at most ``CHUNK`` (key, mccmnc, note) rows, keys each given once and in order, a
    removal only in a delta; it records each chunk's size. ``FAKE_FAIL_AFTER=n`` fails after
    n chunks; ``FAKE_PAUSE=s`` touches ``<path>.loading`` and sleeps ``s`` after the first."""

    name = "fake"
    keeps_data = True

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.cfg.path + ".fake", isolation_level=None)
        db.executescript(
            "CREATE TABLE IF NOT EXISTS local (kind TEXT, key TEXT, mccmnc TEXT, note TEXT, PRIMARY KEY (kind, key));"
            "CREATE TABLE IF NOT EXISTS chunks (size INTEGER);"
        )
        return db

    def load_local(self, kind, chunks, *, mode="add") -> int:
        assert mode in ("add", "replace", "delta")
        db, applied, last = self._db(), 0, ""
        try:
            db.execute("BEGIN")
            db.execute("DELETE FROM chunks")
            if mode == "replace":
                db.execute("DELETE FROM local WHERE kind = ?", (kind,))
            for n, chunk in enumerate(chunks, 1):
                assert type(chunk) is list and 0 < len(chunk) <= CHUNK
                for key, mccmnc, note in chunk:
                    assert key > last, (key, last)  # sorted, each key once
                    last = key
                    first, dash, end = key.partition("-")
                    assert first.isdigit() and (not dash or (end.isdigit() and len(end) == len(first) <= 15))
                    if mccmnc == "-":
                        assert mode == "delta" and note == ""
                        db.execute("DELETE FROM local WHERE kind = ? AND key = ?", (kind, key))
                    else:
                        assert mccmnc.isdigit() and len(mccmnc) in (5, 6)
                        db.execute("INSERT OR REPLACE INTO local VALUES (?, ?, ?, ?)", (kind, key, mccmnc, note))
                applied += len(chunk)
                db.execute("INSERT INTO chunks VALUES (?)", (len(chunk),))
                if os.environ.get("FAKE_FAIL_AFTER") == str(n):
                    raise OSError(28, "No space left on device")
                if n == 1 and os.environ.get("FAKE_PAUSE"):
                    Path(self.cfg.path + ".loading").touch()
                    time.sleep(float(os.environ["FAKE_PAUSE"]))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()
        return applied

    def local_size(self, kind) -> dict[str, int]:
        with self._db() as db:
            keys = [k for (k,) in db.execute("SELECT key FROM local WHERE kind = ?", (kind,))]
        blocks = sum("-" in k for k in keys)
        return {"entries": len(keys) - blocks, "blocks": blocks, "bytes": 40 * len(keys)}

    def local_items(self, kind):
        with self._db() as db:
            return iter(
                db.execute("SELECT key, mccmnc, note FROM local WHERE kind = ? ORDER BY key", (kind,)).fetchall()
            )

    def delete_local(self, kind, keys=None) -> int:
        with self._db() as db:
            if keys is None:
                return db.execute("DELETE FROM local WHERE kind = ?", (kind,)).rowcount
            return sum(db.execute("DELETE FROM local WHERE kind = ? AND key = ?", (kind, k)).rowcount for k in keys)

    def stats(self) -> dict:
        return _stats(self.name, self.cfg.path, 0, None, {})

    def chunk_sizes(self) -> list[int]:
        with self._db() as db:
            return [n for (n,) in db.execute("SELECT size FROM chunks")]


def install_fake() -> None:
    """Every backend opened from now on is ``FakeLocal`` (in a child: see ``RUNNER``)."""
    import npl_agi.backends

    npl_agi.backends.open_cache = lambda config, **tuning: FakeLocal(config.cache, **tuning)


# The command in a child process, with FakeLocal as its backend or not, reporting its peak memory.
RUNNER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
if sys.argv.pop(1) == "fake":
    from test_local_import import install_fake
    install_fake()
{CLI_REPORTING_PEAK}"""


class Command:
    """``npl-agi`` with one configuration, run as a child process on one backend."""

    def __init__(self, tmp_path: Path, backend: str, env: dict, redis_url: str = "") -> None:
        cache = {"backend": "redis", "redis_url": redis_url} if backend == "redis" else {}
        self.conf = write_config(tmp_path / "npl-agi.conf", URL, cache=cache)
        self.backend, self.dir = backend, tmp_path
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir()
        self.env = {**env, "TMPDIR": str(self.tmpdir)}
        self.peak_kib = 0

    def popen(self, *args: str, **env: str) -> subprocess.Popen:
        command = [
            sys.executable,
            "-c",
            RUNNER,
            "fake" if self.backend == "fake" else "real",
            "--config",
            str(self.conf),
        ]
        return subprocess.Popen(
            [*command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**self.env, **env},
        )

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        proc = self.popen(*args, **env)
        out, err = proc.communicate(timeout=600)
        *rest, last = err.splitlines() or [""]
        assert last.startswith("maxrss "), err
        self.peak_kib = int(last.split()[1])
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(f"{r}\n" for r in rest))

    def ok(self, *args: str, **env: str) -> str:
        done = self(*args, **env)
        assert (done.returncode, done.stderr) == (0, ""), done
        return done.stdout

    def file(self, text: str, name: str = "numbers.csv") -> str:
        path = self.dir / name
        path.write_text(text)
        return str(path)

    def listed(self) -> list[list[str]]:
        """The rows ``local list`` writes, sorted (the order is the backend's)."""
        return sorted(csv.reader(io.StringIO(self.ok("local", "list"))))[:-1]  # the header sorts last

    def staging_left(self) -> list[str]:
        return [p.name for d in (self.dir, self.tmpdir) for p in d.iterdir() if p.name.startswith(STAGING)]


@pytest.fixture(params=["fake", "sqlite", "redis"])
def npl_agi(request, tmp_path, subprocess_env) -> Command:
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else ""
    return Command(tmp_path, request.param, subprocess_env, url)


@pytest.fixture
def fake(tmp_path, subprocess_env) -> Command:
    return Command(tmp_path, "fake", subprocess_env)


# -- the command ------------------------------------------------------------------------------


def test_an_import_reads_every_form_a_call_could_dial_and_blocks(npl_agi):
    text = (
        "\ufeffnumber,mccmnc,note\n"
        "# a header, a byte order mark, comments and blank lines are skipped\n"
        "\n"
        "07700 900123,23415,Sales desk\n"
        "+44 7700 900124,23415\n"
        '0049 151 12345678,26201,"test SIM, Berlin office"\n'
        "447700900123,23415,given twice alike: counted once with its first note\n"
        "+44 7700-900125,23410\n"  # a hyphen in a number: still a number
        "447700900000-447700900099,23415,a block\n"
        "+44 7700 900200 - 07700900299,23430\n"
    )
    assert npl_agi.ok("local", "import", npl_agi.file(text)) == "imported 6 numbers\n"
    assert npl_agi.listed() == [
        ["447700900000-447700900099", "23415", "a block"],
        ["447700900123", "23415", "Sales desk"],
        ["447700900124", "23415", ""],
        ["447700900125", "23410", ""],
        ["447700900200-447700900299", "23430", ""],
        ["4915112345678", "26201", "test SIM, Berlin office"],
    ]
    assert npl_agi.staging_left() == []
    # what list writes, import reads: a backup restored as it was
    backup = npl_agi.file(npl_agi.ok("local", "list"), "backup.csv")
    npl_agi.ok("local", "clear")
    assert npl_agi.ok("local", "import", "--replace", backup) == "imported 6 numbers\n"
    assert len(npl_agi.listed()) == 6


def test_a_bad_file_imports_nothing_and_names_each_bad_line_in_order(npl_agi):
    npl_agi.ok("local", "import", npl_agi.file("447700900001,23415\n"))
    lines = ["447700900100,23415"] * 3 + [""] * 2  # lines 1-5
    lines[1] = "447700900101,2341X"  # line 2
    lines += ["447700900100,23410"]  # line 6: given on line 1 with another network
    lines += ["447700900300-447700900399,23415", "447700900350-447700900449,23415"]  # lines 7, 8
    lines += ["447700900500-+49 30 123456,23415", "447700900600-447700900599,23415"]  # lines 9, 10
    lines += ["447700900700,-"]  # line 11: a removal outside a delta
    lines += ["x" * (MAX_LINE + 10)]  # line 12
    done = npl_agi("local", "import", npl_agi.file("\n".join(lines) + "\n"))
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [
        f"npl-agi: {npl_agi.dir / 'numbers.csv'}: 7 bad line(s), nothing imported:",
        "  line 2: mccmnc '2341X' is not 5 or 6 digits",
        "  line 6: 447700900100 is 23415 on line 1 and 23410 here",
        "  line 8: block 447700900350-447700900449 overlaps block 447700900300-447700900399 on line 7",
        "  line 9: block '447700900500-+49 30 123456': 447700900500 and 4930123456 are not of the same length",
        "  line 10: block '447700900600-447700900599': 447700900600 is above 447700900599",
        "  line 11: mccmnc '-' is not 5 or 6 digits",
        f"  line 12: longer than {MAX_LINE} characters",
    ]
    assert npl_agi.listed() == [["447700900001", "23415", ""]]
    assert npl_agi.staging_left() == []


def test_bad_lines_past_the_shown_limit_are_counted_and_found_across_chunks(fake):
    """Clashes found in key order are shown by line number among the other bad lines."""
    n = CHUNK * 2 + 5
    lines = [f"4477{i:08d},23415" for i in range(n)]
    lines[-1] = "447700000003,23410"  # the same number as line 4, two chunks later
    lines[CHUNK] = "447700000001,-"
    for i in range(30):
        lines[100 + i * 10] = f"4477{100 + i * 10:08d},2341"
    done = fake("local", "import", fake.file("\n".join(lines) + "\n"))
    assert done.returncode == 2
    err = done.stderr.splitlines()
    assert err[0].endswith(": 32 bad line(s), nothing imported:")
    assert err[1 : MAX_BAD_SHOWN + 1] == [
        f"  line {101 + i * 10}: mccmnc '2341' is not 5 or 6 digits" for i in range(20)
    ]
    assert err[-1] == f"  … and {32 - MAX_BAD_SHOWN} more"
    last = fake("local", "import", fake.file(f"447700000003,23415\n{lines[-1]}\n"))
    assert last.stderr.splitlines()[1] == "  line 2: 447700000003 is 23415 on line 1 and 23410 here"
    assert fake.listed() == []


def test_a_delta_adds_changes_and_removes_all_or_nothing(npl_agi):
    npl_agi.ok("local", "import", npl_agi.file("447700900001,23415\n447700900002,23415\n447700900003,23415,x\n"))
    delta = npl_agi.file("447700900002,23410,moved\n447700900003,-\n447700900004,23430\n", "delta.csv")
    out = npl_agi.ok("local", "import", "--delta", delta)
    assert out.startswith("applied ") and "(1 removals in the file)" in out
    assert npl_agi.listed() == [
        ["447700900001", "23415", ""],
        ["447700900002", "23410", "moved"],
        ["447700900004", "23430", ""],
    ]
    clash = npl_agi.file("447700900001,-\n447700900005,23415\n07700 900001,23410\n", "clash.csv")
    done = npl_agi("local", "import", "--delta", clash)
    assert done.returncode == 2
    assert "line 3: 447700900001 is - on line 1 and 23410 here" in done.stderr
    assert len(npl_agi.listed()) == 3
    both = npl_agi("local", "import", "--delta", "--replace", delta)
    assert both.returncode == 2
    assert both.stderr.startswith("npl-agi: argument --replace: not allowed with argument --delta")
    assert len(npl_agi.listed()) == 3


def test_replace_makes_the_file_the_whole_set(npl_agi):
    npl_agi.ok("local", "import", npl_agi.file("447700900001,23415\n447700900002,23415\n"))
    npl_agi.ok("local", "import", "--replace", npl_agi.file("447700900003,23410\n"))
    assert npl_agi.listed() == [["447700900003", "23410", ""]]


def test_stats_show_numbers_blocks_and_bytes_per_number(npl_agi):
    npl_agi.ok(
        "local", "import", npl_agi.file("447700900001,23415\n447700900002,23415\n447700901000-447700901999,23410\n")
    )
    s = json.loads(npl_agi.ok("cache", "stats", "--json"))
    assert (s["known_numbers"], s["known_blocks"], s["own_ranges"]) == (2, 1, 0)
    assert s["known_bytes"] > 0
    assert s["bytes_per_number"] == pytest.approx(s["known_bytes"] / 3, abs=0.1)
    text = npl_agi.ok("cache", "stats").splitlines()
    assert "yours:         2 numbers you know, 0 ranges (npl-agi local, ranges)" in text
    per = f"{s['bytes_per_number']:.0f} bytes per number or block"
    assert f"known blocks:  1; numbers you know take {s['known_bytes']} bytes, {per}" in text


def test_blocks_are_deleted_by_their_key_in_any_form(npl_agi):
    npl_agi.ok("local", "import", npl_agi.file("447700901000-447700901999,23410\n447700900001,23415\n"))
    assert npl_agi.ok("local", "delete", "07700 901000-07700 901999") == "deleted 1 numbers\n"
    assert npl_agi.listed() == [["447700900001", "23415", ""]]


def test_the_rows_reach_the_backend_in_chunks_in_key_order(fake):
    numbers = random.Random(26).sample(range(7_000_000_000, 8_000_000_000), CHUNK * 2 + 7)
    fake.ok("local", "import", fake.file("".join(f"44{n},23415\n" for n in numbers)))
    assert FakeLocal(load_config(str(fake.conf)).cache).chunk_sizes() == [CHUNK, CHUNK, 7]


def test_a_backend_failing_part_way_leaves_the_set_and_no_staging_file(fake):
    fake.ok("local", "import", fake.file("447700900001,23415\n"))
    done = fake(
        "local",
        "import",
        "--replace",
        fake.file("".join(f"4477{i:08d},23410\n" for i in range(CHUNK + 1))),
        FAKE_FAIL_AFTER="1",
    )
    assert done.returncode == 1
    assert done.stderr == "npl-agi: CACHE: local import failed (fake): OSError: [Errno 28] No space left on device\n"
    assert fake.listed() == [["447700900001", "23415", ""]]
    assert fake.staging_left() == []


def test_a_terminated_import_stores_nothing_and_removes_its_staging_file(fake):
    """The staging file lies beside the cache file while the rows are handed over; SIGTERM
    ends the command through every ``finally``."""
    proc = fake.popen(
        "local", "import", fake.file("".join(f"4477{i:08d},23410\n" for i in range(CHUNK + 1))), FAKE_PAUSE="30"
    )
    loading = Path(str(fake.dir / "cache.sqlite") + ".loading")
    deadline = time.monotonic() + 60
    while not loading.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [p.name for p in fake.dir.iterdir() if p.name.startswith(STAGING)] != []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 130
    assert fake.staging_left() == []
    assert fake.listed() == []


def test_memory_does_not_grow_with_the_file(npl_agi):
    """300,000 lines take about what 30,000 take: nothing of the file is held whole, not even
    its keys (a dict of 300,000 rows alone is tens of megabytes)."""
    rng = random.Random(3)
    peaks = []
    for n in (30_000, 300_000):
        numbers = rng.sample(range(7_000_000_000, 8_000_000_000), n)
        path = npl_agi.file("".join(f"44{x},23415,subscriber {i}\n" for i, x in enumerate(numbers)), f"{n}.csv")
        del numbers
        assert npl_agi.ok("local", "import", "--replace", path) == f"imported {n} numbers\n"
        peaks.append(npl_agi.peak_kib)
    assert peaks[1] - peaks[0] < 20 * 1024, peaks
    assert peaks[1] < 150 * 1024, peaks


# -- the pipeline in this process -------------------------------------------------------------


def test_staging_keeps_the_first_note_of_a_number_given_twice_and_cleans_up(tmp_path):
    row = row_of(known_key(NumberConfig(country_code="44")))
    with staged(
        ["07700900002,23415,first\n", "07700900001,23415\n", "+447700900002,23415,second\n"], row, "f", str(tmp_path)
    ) as rows:
        assert (rows.keys, rows.removed) == (2, 0)
        assert list(rows.chunks()) == [[("447700900001", "23415", ""), ("447700900002", "23415", "first")]]
        assert [p.name[: len(STAGING)] for p in tmp_path.iterdir()] == [STAGING]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError), staged(["07700900001,2341\n"], row, "f", str(tmp_path)):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_staging_directory_that_cannot_be_written_is_a_usage_error(tmp_path):
    row = row_of(known_key(NumberConfig(country_code="44")))
    with (
        pytest.raises(UsageError, match="cannot stage the checked rows in"),
        staged([], row, "f", str(tmp_path / "no")),
    ):
        pass


# -- numbers in international form, checked without a parse -----------------------------------

CONFIGS = {
    "none": NumberConfig(lookup_types=("any",)),
    "uk": NumberConfig(country_code="44", lookup_types=("any",)),
    "nanp": NumberConfig(country_code="1", national_prefix="1", international_prefix="011", lookup_types=("any",)),
    "it": NumberConfig(country_code="39", lookup_types=("any",)),
    "ar": NumberConfig(country_code="54", lookup_types=("any",)),
    "uk mobiles": NumberConfig(country_code="44"),
}


def outcome(work, *args):
    try:
        return "ok", work(*args)
    except NplError as e:
        return type(e).__name__, str(e)


def slow(text: str, cfg: NumberConfig) -> str:
    return validate(normalise(text, cfg), cfg)


def numbers_of_tests() -> list[str]:
    """Every dialled form of the tests of ``core.number``."""
    import test_number

    found = list(test_number.HOSTILE)
    for test in vars(test_number).values():
        for mark in getattr(test, "pytestmark", []):
            if mark.name == "parametrize":
                found += [
                    v
                    for case in mark.args[1]
                    for v in (case if isinstance(case, tuple) else (case,))
                    if isinstance(v, str)
                ]
    return found


def random_numbers() -> list[str]:
    """For every country calling code: random digits of every length a number may have."""
    rng = random.Random(26)
    found = []
    for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
        for length in range(7, 16):
            for _ in range(3):
                rest = length - len(str(code))
                found.append(f"{code}{rng.randrange(10**rest):0{rest}d}")
    return found


def example_numbers() -> list[str]:
    """phonenumbers' example number of every type of every region and non-geographic code."""
    examples = [
        phonenumbers.example_number_for_type(region, kind)
        for region in phonenumbers.SUPPORTED_REGIONS
        for kind in phonenumbers.PhoneNumberType.values()
    ]
    examples += map(phonenumbers.example_number_for_non_geo_entity, phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS)
    numbers = {phonenumbers.format_number(e, phonenumbers.PhoneNumberFormat.E164)[1:] for e in examples if e}
    return sorted(n for n in numbers if 7 <= len(n) <= 15)  # an international number's lengths


def test_the_quick_check_gives_exactly_what_the_full_one_gives_across_every_country():
    numbers = random_numbers() + example_numbers()
    texts = numbers_of_tests() + numbers + [f"+{n}" for n in numbers] + [f"00{n}" for n in numbers[::7]]
    decided = 0
    for name, cfg in CONFIGS.items():
        for text in texts if "any" in cfg.lookup_types else numbers_of_tests():
            expected = outcome(slow, text, cfg)
            readings = outcome(normalise, text, cfg)
            sure = quick(readings[1], cfg) if readings[0] == "ok" else None
            if sure is not None:
                decided += 1
                assert ("ok", sure) == expected, (name, text)
    for name, cfg in CONFIGS.items():
        for text in numbers_of_tests():
            assert outcome(canonical, text, cfg) == outcome(slow, text, cfg), (name, text)
    # Random digits are often no number at all (the full check gives the reason); the rest, and
    # nearly every example number, are decided without a parse (see the next test).
    assert decided > 0.3 * len(texts) * (len(CONFIGS) - 1), decided


def test_numbers_of_examples_in_international_form_take_no_parse(monkeypatch):
    """Every region's example numbers, written +CC..., are decided without phonenumbers.parse
    but for those the national prefix rule or a leading zero leaves unsure."""
    examples = example_numbers()
    cfg = CONFIGS["none"]
    sure = [n for n in examples if quick(normalise(f"+{n}", cfg), cfg) is not None]
    assert len(sure) > 0.85 * len(examples)

    def parse(*args, **kwargs):
        raise AssertionError("parsed")

    monkeypatch.setattr(phonenumbers, "parse", parse)
    assert [canonical(f"+{n}", cfg) for n in sure] == sure
    assert canonical("447912345678", CONFIGS["uk"]) == "447912345678"  # two readings: the first valid
    assert canonical("+1 704 451 8989", CONFIGS["nanp"]) == "17044518989"
    with pytest.raises(AssertionError, match="parsed"):
        canonical("+44 (0)7912 345678", cfg)  # a trunk 0 after the country code: the full check
