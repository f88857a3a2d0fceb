"""Range holders: the table's lookup, the admin's CSV, and the script that builds the bundled table."""

from __future__ import annotations

import datetime
import os
import random
import subprocess
import sys
from pathlib import Path

import phonenumbers
import pytest
from conftest import ROOT, load_tool
from phonenumbers.carrierdata import CARRIER_DATA

from npl_agi.admin.localdata import prefix_key, row_of, staged
from npl_agi.core.errors import ConfigError
from npl_agi.core.ranges import TABLE, RangeTable, holder, prefixes

TOOL = ROOT / "tools" / "build_ranges.py"
BUNDLED = Path(TABLE).read_text(encoding="utf-8")

# Blocks inside blocks: 12 is carved out of 1, 123 out of 12 (its holder unknown), 1234 out of 123.
SMALL = "# a small table\n# for tests\n1\t00101\n12\t00102\n123\t\n1234\t00104\n2\t00201\n99\t99999\n"


@pytest.fixture(scope="module")
def builder():
    return load_tool("build_ranges")


def naive(text: str) -> dict[str, str]:
    return dict(line.split("\t") for line in text.splitlines() if not line.startswith("#"))


def naive_longest(rows: dict[str, str], msisdn: str) -> tuple[str, str] | None:
    return next(((p, rows[p]) for p in prefixes(msisdn) if p in rows), None)


def bundled_sources(builder):
    """The directory and the aliases the bundled table is built from."""
    directory = builder.read_directory(Path(builder.DIRECTORY).read_text(encoding="utf-8"))
    text = Path(builder.ALIASES).read_text(encoding="utf-8")
    return directory, builder.read_aliases(text, "range_aliases.tsv", directory, CARRIER_DATA)


# -- the lookup --


def test_prefixes_longest_first():
    assert prefixes("4477") == ["4477", "447", "44", "4"]
    assert prefixes("") == []


@pytest.mark.parametrize(
    ("msisdn", "expected"),
    [
        ("1999", ("1", "00101")),
        ("12999", ("12", "00102")),
        ("1239", ("123", "")),  # a block carved out, its holder unknown: not 12's
        ("12345", ("1234", "00104")),
        ("1234", ("1234", "00104")),
        ("1", ("1", "00101")),
        ("2", ("2", "00201")),
        ("99", ("99", "99999")),  # the last line
        ("999999999999999", ("99", "99999")),
        ("3", None),
        ("98", None),
        ("9", None),
        ("", None),
    ],
)
def test_longest_prefix_wins(msisdn, expected):
    assert RangeTable(SMALL).longest(msisdn) == expected


def test_source_and_length():
    table = RangeTable(SMALL)
    assert table.source == "# a small table\n# for tests\n"
    assert len(table) == 6


@pytest.mark.parametrize("text", ["", "# only a header\n", "1\t00101", "# header\n1\t00101"])
def test_tables_at_their_edges(text):
    """Empty, header only, no final newline: the search stays in the lines."""
    table = RangeTable(text)
    expected = ("1", "00101") if "1\t" in text else None
    assert table.longest("1234") == expected
    assert len(table) == (1 if expected else 0)


def test_binary_search_matches_a_dict_on_tables_of_every_small_size():
    """Every row found, first and last lines included, nested prefixes, and nothing else."""
    rng = random.Random(7)
    for size in range(40):
        rows = {"".join(rng.choices("123", k=rng.randint(1, 4))): f"{rng.randint(0, 99999):05d}" for _ in range(size)}
        table = RangeTable("# h\n" + "".join(f"{p}\t{rows[p]}\n" for p in sorted(rows)))
        for msisdn in [*rows, *("".join(rng.choices("0123", k=rng.randint(1, 6))) for _ in range(50))]:
            assert table.longest(msisdn) == naive_longest(rows, msisdn), (size, msisdn)


def test_bundled_table_matches_a_dict_lookup():
    rows = naive(BUNDLED)
    table = RangeTable.load()
    assert len(table) == len(rows) > 1000
    assert table.source == "".join(line + "\n" for line in BUNDLED.splitlines() if line.startswith("#"))
    rng = random.Random(11)
    listed = sorted(rows)
    numbers = [listed[0], listed[-1], listed[0] + "0", listed[-1] + "9"]
    numbers += [p + "".join(rng.choices("0123456789", k=rng.randint(0, 6))) for p in rng.sample(listed, 3000)]
    numbers += ["".join(rng.choices("0123456789", k=rng.randint(1, 15))) for _ in range(3000)]
    for msisdn in numbers:
        assert table.longest(msisdn) == naive_longest(rows, msisdn), msisdn


def test_load_is_cached_per_process():
    assert RangeTable.load() is RangeTable.load()


@pytest.mark.parametrize(
    ("msisdn", "admin", "expected"),
    [
        ("12999", None, "00102"),
        ("12999", {}, "00102"),
        ("12999", {"12": "23499"}, "23499"),  # a tie: the admin's entry wins
        ("12999", {"1": "23499"}, "00102"),  # a longer bundled block beats a shorter admin one
        ("12999", {"129": "23499"}, "23499"),  # a longer admin block beats a shorter bundled one
        ("12399", {"12": "23499"}, ""),  # the bundled table knows 123 is not 12's holder
        ("12399", {"123": "23499"}, "23499"),
        ("3999", {"39": "23499"}, "23499"),  # only the admin knows it
        ("3999", {"4": "23499", "3991": "23498"}, ""),  # entries that are not the number's prefixes
        ("3999", None, ""),
        ("", None, ""),
    ],
)
def test_holder(msisdn, admin, expected):
    assert holder(msisdn, RangeTable(SMALL), admin) == expected


# -- facts of the bundled table: carriers whose name is one network in the directory, or aliased --


def source_carrier(msisdn: str) -> str:
    """phonenumbers' carrier of the number's longest prefix in its data."""
    return next(CARRIER_DATA[p] for p in prefixes(msisdn) if p in CARRIER_DATA)["en"]


@pytest.mark.parametrize(
    ("msisdn", "carrier", "mccmnc"),
    [
        ("447404123456", "Lycamobile", "23426"),  # Lycamobile UK
        ("447408012345", "Truphone", "23425"),  # Truphone UK
        ("34602412345", "Yoigo", "21404"),  # Yoigo, Spain
    ],
)
def test_bundled_holders(msisdn, carrier, mccmnc):
    assert holder(msisdn, RangeTable.load()) == mccmnc
    assert source_carrier(msisdn) == carrier


@pytest.mark.parametrize(
    ("msisdn", "carrier", "mccmnc"),
    [
        ("447788450450", "Vodafone", "23415"),  # 44778: GB or Guernsey, the alias is GB's
        ("447803123456", "O2", "23410"),
        ("447412345678", "Three", "23420"),
        ("447951234567", "EE", "23430"),  # one of EE's eight codes, by the alias
        ("447973123456", "Orange", "23433"),  # Orange UK's code, now EE's
        ("447797123456", "JT", "23450"),  # Jersey, filed under GB in the directory
        ("447781123456", "Sure", "23455"),  # Guernsey's block inside Vodafone's 44778
        ("4915112345678", "T-Mobile", "26201"),
        ("4917612345678", "O2", "26207"),
        ("33612345678", "SFR", "20810"),  # one of SFR's five codes
    ],
)
def test_bundled_holders_by_alias(builder, msisdn, carrier, mccmnc):
    assert holder(msisdn, RangeTable.load()) == mccmnc
    assert source_carrier(msisdn) == carrier
    aliases = bundled_sources(builder)[1]
    assert mccmnc in {a.mccmnc for (_, name), a in aliases.by_name.items() if name == carrier}


def test_a_name_with_several_networks_and_no_alias_is_left_unmapped(builder):
    """41762 is Sunrise's, and Switzerland has three Sunrise codes."""
    assert CARRIER_DATA["41762"]["en"] == "Sunrise"
    assert ("CH", "Sunrise") not in bundled_sources(builder)[1].by_name
    assert holder("41762123456", RangeTable.load()) == ""


def test_every_bundled_alias_maps_a_prefix(builder):
    directory, aliases = bundled_sources(builder)
    result = builder.build(CARRIER_DATA, directory, aliases)
    assert [a for a in aliases.by_name.values() if not result.by_alias[a]] == []


# -- the admin's CSV --


def prefix_rows(lines):
    """The (prefix, mccmnc) rows ``npl-agi ranges import`` hands to the backend, in key order."""
    with staged(lines, row_of(prefix_key), "ranges.csv") as rows:
        return [(prefix, mccmnc) for chunk in rows.chunks() for prefix, mccmnc, _ in chunk]


def test_parse_ranges_csv():
    lines = [
        "\ufeffprefix, mccmnc\r\n",
        "# the UK's blocks we know better\n",
        "\n",
        "  447700 , 23410 \n",
        "+4477001,23415\n",
        "4477,23415\n",
        "447700,23410\n",  # the same again: kept once
        "1,310260\n",
    ]
    assert prefix_rows(lines) == sorted([("447700", "23410"), ("4477001", "23415"), ("4477", "23415"), ("1", "310260")])


def test_parse_ranges_csv_without_header_or_rows():
    assert prefix_rows(["4477,23415"]) == [("4477", "23415")]
    assert prefix_rows(["prefix,mccmnc", "# nothing yet", ""]) == []
    assert prefix_rows([]) == []


def test_parse_ranges_csv_names_every_bad_line():
    lines = [
        "prefix,mccmnc",
        "4477,23415",
        "44x,23415",
        "4478,2341",
        "",
        "4479",
        "1234567890123456,23415",
        ",23415",
        "4480,1234567",
        "4477,23410",
        "prefix,mccmnc",
        "٤٤,23415",  # Arabic-Indic digits are digits to str.isdigit, not here
        "++44,23415",
        "4481,23415,x\x07",
        "4482,23415",
    ]
    with pytest.raises(ConfigError) as caught:
        prefix_rows(lines)
    assert str(caught.value) == (
        "ranges.csv: 11 bad line(s), nothing imported:\n"
        "  line 3: prefix '44x' is not 1 to 15 digits\n"
        "  line 4: mccmnc '2341' is not 5 or 6 digits\n"
        "  line 6: 1 field(s); expected 2 or 3: key,mccmnc[,note]\n"
        "  line 7: prefix '1234567890123456' is not 1 to 15 digits\n"
        "  line 8: prefix '' is not 1 to 15 digits\n"
        "  line 9: mccmnc '1234567' is not 5 or 6 digits\n"
        "  line 10: 4477 is 23415 on line 2 and 23410 here\n"
        "  line 11: prefix 'prefix' is not 1 to 15 digits\n"
        "  line 12: prefix '٤٤' is not 1 to 15 digits\n"
        "  line 13: prefix '++44' is not 1 to 15 digits\n"
        "  line 14: the note has control characters"
    )
    assert caught.value.npl_err == "CONFIG"


def test_parse_ranges_csv_cuts_a_long_bad_value_short():
    with pytest.raises(ConfigError, match=r"line 1: prefix '4{40}' is not 1 to 15 digits$"):
        prefix_rows(["4" * 1000 + ",23415"])


# -- the script that builds the bundled table --


def recorded(builder, pattern_name: str) -> str:
    found = getattr(builder, pattern_name).search(BUNDLED)
    assert found, f"no {pattern_name} in the header of {TABLE}"
    return found.group(1)


def require_recorded_phonenumbers(builder) -> None:
    version = recorded(builder, "VERSION")
    assert phonenumbers.__version__ == version, (
        f"ranges.tsv was built from phonenumbers {version}, but {phonenumbers.__version__} is installed: "
        f"install the version pinned in pyproject.toml's test extra, or rebuild the table with "
        f"tools/build_ranges.py and pin the new version"
    )


def run_tool(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_installed_phonenumbers_is_the_one_the_table_was_built_from(builder):
    require_recorded_phonenumbers(builder)


def test_tool_rebuilds_the_bundled_table_byte_for_byte(builder, tmp_path):
    require_recorded_phonenumbers(builder)
    day = datetime.date.fromisoformat(recorded(builder, "BUILT"))
    epoch = int(datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp())
    out = tmp_path / "ranges.tsv"
    done = run_tool("--output", str(out), SOURCE_DATE_EPOCH=str(epoch))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == Path(TABLE).read_bytes()
    assert "carrier names mapped: " in done.stderr.splitlines()[-1]


def test_tool_check(builder, tmp_path):
    require_recorded_phonenumbers(builder)
    done = run_tool("--check")
    assert (done.returncode, done.stderr) == (0, "")
    changed = tmp_path / "ranges.tsv"
    changed.write_text(BUNDLED.replace("\t23426\n", "\t23427\n", 1), encoding="utf-8")
    done = run_tool("--check", "--output", str(changed))
    assert done.returncode == 1
    assert "is not what tools/build_ranges.py builds" in done.stderr
    assert "phonenumbers" not in done.stderr  # the same version: not the reason
    line = 1 + BUNDLED.splitlines().index(next(x for x in BUNDLED.splitlines() if x.endswith("\t23426")))
    assert f"first difference at line {line} " in done.stderr


def test_the_table_gives_every_source_prefix_its_own_mapping(builder):
    """Rows dropped as redundant and rows kept as unknown leave every number its source answer.

    A number's answer depends only on its longest source prefix, and every row is a source prefix,
    so checking each source prefix as a number checks every number.
    """
    directory, aliases = bundled_sources(builder)
    table = RangeTable.load()
    for prefix, names in CARRIER_DATA.items():
        expected = builder.map_prefix(prefix, names.get("en"), directory, aliases).mccmnc
        assert holder(prefix, table) == expected, prefix


def test_the_header_records_the_aliases(builder):
    aliases = bundled_sources(builder)[1]
    lines = [x for x in Path(builder.ALIASES).read_text(encoding="utf-8").splitlines() if x and x[0] != "#"]
    assert len(aliases.by_name) == len(lines)
    assert f"# Aliases: {len(lines)} of tools/range_aliases.tsv, each " in BUNDLED


# A directory and carriers for the small builds: two EE codes, Jersey's JT and Guernsey's Sure
# filed under GB as the real directory files them.
SMALL_DIRECTORY = (
    "# Source: a test. Extracted 2026-01-01.\n"
    "234\tGB\t\n23410\tGB\tO2 (UK)\n23415\tGB\tVodafone UK\n23426\tGB\tLycamobile\n23430\tGB\tEE\n"
    "23433\tGB\tEE\n23450\tGB\tJT\n23455\tGB\tSure Mobile\n20801\tFR\tOrange\n"
)
SMALL_CARRIERS = {
    "447404": {"en": "Lycamobile"},
    "4474041": {"en": "EE"},  # two EE codes: the alias decides
    "447405": {"en": "Vodafone"},
    "4474051": {"en": "VODAFONE"},  # not the alias's exact name, nor the directory's
    "44770": {"en": "O2"},  # GB or JE: the alias is GB's only
    "447797": {"en": "JT"},  # Jersey's own block, JT filed under GB
    "447781": {"en": "Sure"},  # Guernsey's own block
}


def small_aliases(builder, text: str):
    directory = builder.read_directory(SMALL_DIRECTORY)
    return directory, builder.read_aliases(text, "aliases.tsv", directory, SMALL_CARRIERS)


def test_build_with_aliases_on_a_small_source(builder):
    directory, aliases = small_aliases(
        builder,
        "# a comment\n\n"
        "GB\tEE\t23430\tEE's main code\n"
        "GB\tVodafone\t23415\tVodafone UK\n"
        "GB\tO2\t23410\tO2 UK\n"
        "JE\tJT\t23450\tfiled under GB, Jersey's network\n"
        "GG\tSure\t23455\tfiled under GB, Guernsey's network\n",
    )
    result = builder.build(SMALL_CARRIERS, directory, aliases)
    assert result.rows == [
        ("447404", "23426"),
        ("4474041", "23430"),
        ("447405", "23415"),
        ("4474051", ""),
        ("44770", "23410"),
        ("447781", "23455"),
        ("447797", "23450"),
    ]
    report = list(builder.report(result, aliases))
    assert report[:7] == [
        "aliases.tsv:",
        "  GB EE -> 23430 (EE): 1 prefix",
        "  GB Vodafone -> 23415 (Vodafone UK): 1 prefix",
        "  GB O2 -> 23410 (O2 (UK)): 1 prefix",
        "  JE JT -> 23450 (JT): 1 prefix",
        "  GG Sure -> 23455 (Sure Mobile): 1 prefix",
        "aliases: 5; prefixes mapped by them: 5",
    ]
    assert "  VODAFONE (1 prefix): no network of that name" in report
    assert report[-1] == "carrier names mapped: 6, unmapped: 1; prefixes mapped: 6, unmapped: 1; rows written: 7"
    header = builder.render(result, directory, aliases, "2026-01-02")
    assert "# Aliases: 5 of aliases.tsv, each a carrier's exact name in its region declared one\n" in header
    assert "Built 2026-01-02 by tools/build_ranges.py." in header


def test_aliases_of_one_name_in_two_candidate_regions_leave_the_prefix_unmapped(builder):
    """44770 may be GB's or Jersey's: two aliases that disagree decide nothing."""
    directory, aliases = small_aliases(builder, "GB\tO2\t23410\tO2 UK\nJE\tO2\t23450\ta test\n")
    mapping = builder.map_prefix("44770", "O2", directory, aliases)
    assert mapping == ("", "GB/JE", "aliases of that name: GB 23410 JE 23450", None)


def test_bad_alias_lines_are_all_named(builder):
    text = (
        "# region, carrier, mccmnc, note\n"
        "GB\tEE\t23430\tEE's main code\n"
        "XX\tEE\t23430\tno such region\n"
        "GB\tVodafone\t23499\tno such code\n"
        "GB\tVodafone UK\t23415\tthe directory's name, not phonenumbers'\n"
        "GG\tEE\t23430\tphonenumbers has no EE in Guernsey\n"
        "GB\tO2\t20801\tanother country's code\n"
        "GB\tO2\t234\tan MCC, not a network\n"
        "GB\tEE\t23433\tthe same name again\n"
        "GB\tVodafone\t23415\n"
        "GB\tVodafone\t23415\t \n"
        "001\tEE\t23430\tnot a region\n"
    )
    with pytest.raises(SystemExit) as caught:
        small_aliases(builder, text)
    version = phonenumbers.__version__
    assert str(caught.value) == (
        "aliases.tsv: 10 bad line(s):\n"
        "  line 3: region 'XX' is not a region of phonenumbers\n"
        "  line 4: MCCMNC '23499' is not a network of the directory\n"
        f"  line 5: phonenumbers {version} names no carrier 'Vodafone UK' in GB\n"
        f"  line 6: phonenumbers {version} names no carrier 'EE' in GG\n"
        "  line 7: MCCMNC 20801 is Orange of FR in the directory, not a network of GB\n"
        "  line 8: MCCMNC '234' is not a network of the directory\n"
        "  line 9: GB 'EE' is on line 2 already\n"
        "  line 10: 3 field(s); expected 4: region<TAB>carrier<TAB>mccmnc<TAB>note\n"
        "  line 11: no note: say why this is the network's code\n"
        "  line 12: region '001' is not a region of phonenumbers"
    )


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("GB\tVodafone\t23499\tno such code", "MCCMNC '23499' is not a network of the directory"),
        ("XX\tVodafone\t23415\tno such region", "region 'XX' is not a region of phonenumbers"),
        (
            "GB\tVodafone UK\t23415\tnot phonenumbers' name",
            f"phonenumbers {phonenumbers.__version__} names no carrier 'Vodafone UK' in GB",
        ),
    ],
)
def test_a_bad_alias_fails_the_build_with_its_line_named(tmp_path, line, named):
    aliases = tmp_path / "aliases.tsv"
    aliases.write_text(f"# aliases\nGB\tO2\t23410\tO2 UK\n{line}\n", encoding="utf-8")
    out = tmp_path / "ranges.tsv"
    for args in (["--output", str(out)], ["--check"]):
        done = run_tool("--aliases", str(aliases), *args)
        assert done.returncode == 1, done.stderr
        assert done.stderr == f"aliases.tsv: 1 bad line(s):\n  line 3: {named}\n"
    assert not out.exists()


def test_build_on_a_small_source(builder):
    directory = builder.read_directory(
        "# Source: a test. Extracted 2026-01-01.\n"
        "234\tGB\t\n23415\tGB\tVodafone UK\n23426\tGB\tLycamobile\n23430\tGB\tEE\n23433\tGB\tEE\n"
        "23450\tJE\tJT\n23455\tGG\tSure\n23436\tIM\tSure\n"
    )
    carriers = {
        "447404": {"en": "Lycamobile"},
        "4474041": {"en": "EE"},  # two EE codes: unknown, inside a mapped block
        "44740412": {"en": "LYCAMOBILE"},  # mapped again, as its parent's parent
        "4474042": {"en": "Lyca Mobile"},  # spaces do not count: the same as its parent, dropped
        "447405": {"en": "Vodafone"},  # the directory says "Vodafone UK": not the same name
        "447700": {"en": "JT"},  # GB or JE (+44 is shared): the name is in one of them only
        "447797": {"en": "JT"},  # Jersey's own block
        "447781": {"en": "Sure"},  # Guernsey's own block: the Isle of Man's Sure is not looked at
        "4478": {"ru": "only in Russian"},
        "882": {"en": "Lycamobile"},  # a non-geographic calling code
    }
    result = builder.build(carriers, directory)
    assert result.rows == [
        ("447404", "23426"),
        ("4474041", ""),
        ("44740412", "23426"),
        ("447700", "23450"),
        ("447781", "23455"),
        ("447797", "23450"),
    ]
    report = list(builder.report(result))
    assert report[-1] == ("carrier names mapped: 6, unmapped: 4; prefixes mapped: 6, unmapped: 4; rows written: 6")
    assert "  EE (1 prefix): 2 networks of that name: 23430 23433" in report
    assert "  Vodafone (1 prefix): no network of that name" in report


@pytest.mark.parametrize(
    ("prefix", "regions"),
    [
        ("447781", ("GG",)),  # by the number patterns (Guernsey has no leading digits)
        ("447624", ("IM",)),  # by the Isle of Man's leading digits
        ("447797", ("JE",)),
        ("4420", ("GB",)),
        ("44770", ("GB", "JE")),  # 447700 is Jersey's, 447701 is not
        ("7701", ("KZ",)),
        ("7916", ("RU",)),
        ("1242", ("BS",)),
        ("1", phonenumbers.region_codes_for_country_code(1)),
        ("3465", ("ES",)),
        ("882", ("001",)),
    ],
)
def test_regions(builder, prefix, regions):
    assert builder.regions(prefix) == regions


@pytest.mark.parametrize(
    ("pattern", "digits", "whole", "expected"),
    [
        (r"7(?:781|839)\d{6}", "778", True, True),
        (r"7(?:781|839)\d{6}", "7782", True, False),
        (r"7(?:781|839)\d{6}", "7781123456", True, True),
        (r"7(?:781|839)\d{6}", "77811234567", True, False),  # too long
        (r"[1-357-9]\d{9}|[18]\d{8}", "6", True, False),
        (r"[1-357-9]\d{9}|[18]\d{8}", "", True, True),
        (r"8\d{5}(?:\d{2,4})?", "812345678", True, True),
        (r"74576|(?:16|7[56])24", "7", False, True),
        (r"74576|(?:16|7[56])24", "7624999", False, True),  # as re.match: the rest does not count
        (r"74576|(?:16|7[56])24", "7724", False, False),
        (r"3[0-8]\d{7,}", "3912", True, False),
        (r"3[0-8]\d{7,}", "3812345678901", True, True),
    ],
)
def test_partial_match(builder, pattern, digits, whole, expected):
    assert builder._partial(pattern, digits, whole=whole) is expected


@pytest.mark.parametrize("pattern", [r"[^1]", "(1)", "1*", "a", r"\s"])
def test_partial_match_refuses_what_it_does_not_know(builder, pattern):
    with pytest.raises(ValueError, match="unsupported"):
        builder._parse(pattern)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("Talk Talk", "TalkTalk", True),
        ("T-Mobile", "t mobile", True),
        ("O2 (UK)", "O2 UK", True),
        ("Cable & Wireless", "Cable and Wireless", False),
        ("Vodafone", "Vodafone UK", False),
        ("Movistar", "Movístar", False),
        ("Movi\u0301star", "Movístar", True),  # composed and decomposed accents are one letter
    ],
)
def test_name_key(builder, a, b, same):
    assert (builder.name_key(a) == builder.name_key(b)) is same
