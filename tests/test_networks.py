"""The network directory: the bundled MCCMNC table, the admin's overrides, and the lookup's use of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import load_tool, write_config

from npl_agi.askers.direct import lookup_here
from npl_agi.config import load_config
from npl_agi.core.networks import TABLE, Directory
from npl_agi.doubles.simulator import HOME_NETWORKS, PORTED

ROOT = Path(__file__).resolve().parent.parent
TABLE_PATH = Path(TABLE)

INTERNATIONAL = {"901", "902", "991", "999"}


@pytest.fixture(scope="module")
def bundled() -> Directory:
    return Directory.load()


def table_rows() -> list[list[str]]:
    with open(TABLE, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]


@pytest.mark.parametrize(
    ("mccmnc", "country", "network"),
    [
        ("23415", "GB", "Vodafone UK"),
        ("23410", "GB", "O2 (UK)"),
        ("26201", "DE", "Telekom"),
        ("20801", "FR", "Orange"),
        ("310260", "US", "T-Mobile"),
        ("31059", "BM", "Cellular One"),  # an MNC of the US MCC 310 that is in Bermuda
    ],
)
def test_bundled_table_names_networks(bundled, mccmnc, country, network):
    assert bundled.describe(mccmnc) == (country, network)


@pytest.mark.parametrize(("mccmnc", "country"), [("23499", "GB"), ("262999", "DE"), ("310999", "US")])
def test_unknown_mnc_of_a_known_mcc_gets_the_country(bundled, mccmnc, country):
    assert bundled.describe(mccmnc) == (country, "")


@pytest.mark.parametrize("mccmnc", ["00101", "99988", "123456"])
def test_unknown_mcc_gets_nothing(bundled, mccmnc):
    assert bundled.describe(mccmnc) == ("", "")


def test_international_codes_have_a_name_and_no_country(bundled):
    assert bundled.describe("90128") == ("", "Vodafone")


def test_every_simulated_home_network_is_in_the_table(bundled):
    for code in {c for codes in HOME_NETWORKS.values() for c in codes} | set(PORTED.values()):
        country, name = bundled.describe(code)
        assert re.fullmatch(r"[A-Z]{2}", country) and name, code


def test_table_is_well_formed():
    with open(TABLE, encoding="utf-8") as f:
        header = [line for line in f if line.startswith("#")]
    assert any("Source:" in line for line in header)
    assert any(re.search(r"\b20\d\d-\d\d-\d\d\b", line) for line in header)  # the date it was extracted
    rows = table_rows()
    codes = [r[0] for r in rows]
    assert len(codes) == len(set(codes)), "duplicate codes"
    mcc_rows = {r[0] for r in rows if len(r[0]) == 3}
    for row in rows:
        assert len(row) == 3, row
        code, country, name = row
        assert re.fullmatch(r"\d{3}|\d{5,6}", code), row
        assert name == name.strip() and "\r" not in name, row
        if code[:3] in INTERNATIONAL:  # satellite, maritime, shared and test codes: no country
            assert country == "" and (name or len(code) == 3), row
        else:
            assert re.fullmatch(r"[A-Z]{2}", country), row
            assert len(code) == 3 or (name and code[:3] in mcc_rows), row


@pytest.mark.parametrize(
    ("overrides", "mccmnc", "expected"),
    [
        ({"23415": "GB, Vodafone Test"}, "23415", ("GB", "Vodafone Test")),
        ({"23415": "gb ,  Vodafone Test "}, "23415", ("GB", "Vodafone Test")),
        ({"23499": "GB, Example Mobile"}, "23499", ("GB", "Example Mobile")),
        ({"90170": "Example Mobile"}, "90170", ("", "Example Mobile")),
        ({"23499": "Example Mobile"}, "23499", ("GB", "Example Mobile")),  # country from the MCC row
        ({"23415": "Vodafone Test"}, "23415", ("GB", "Vodafone Test")),  # country kept from the table
        ({"31059": "Example Bermuda"}, "31059", ("BM", "Example Bermuda")),  # the code's own country, not its MCC's
        ({"90164": "Syniverse Technologies, LLC"}, "90164", ("", "Syniverse Technologies, LLC")),
        ({"23499": "Acme Mobile, Inc."}, "23499", ("GB", "Acme Mobile, Inc.")),
        ({"23499": "GB, Acme Mobile, Inc."}, "23499", ("GB", "Acme Mobile, Inc.")),
        ({"23415": "GB, Vodafone Test"}, "23410", ("GB", "O2 (UK)")),  # other codes untouched
    ],
    ids=[
        "country-and-name",
        "spaces-and-case",
        "new-code",
        "name-only-international",
        "name-only-country-from-mcc",
        "name-only-country-from-table",
        "name-only-code-in-another-country",
        "name-with-comma",
        "name-with-comma-country-from-mcc",
        "country-and-name-with-comma",
        "other-codes-untouched",
    ],
)
def test_overrides(overrides, mccmnc, expected):
    assert Directory.load(overrides).describe(mccmnc) == expected


def test_lookup_through_the_simulator_fills_network_and_country(tmp_path, sim):
    conf = write_config(tmp_path / "npl-agi.conf", sim.url, networks={"23410": "O2 Test", "23420": "GB, Three Test"})
    numbers = ["07788450450", "07400100005", "07400100004", "07400000001"]  # 23415, 23410, 23420, ERR1
    for source in ("api", "cache"):
        answers = lookup_here(load_config(str(conf))).many(numbers)
        assert [a.source for a in answers] == [source] * 4
        assert [(a.mccmnc, a.country, a.network) for a in answers] == [
            ("23415", "GB", "Vodafone UK"),
            ("23410", "GB", "O2 Test"),
            ("23420", "GB", "Three Test"),
            ("", "", ""),
        ]


# -- the script that rebuilds the table from its source --


def load_builder():
    return load_tool("build_mccmnc")


def mnc(mcc: str, code: str, countries: list[str], brand: str, operator: str = "") -> dict:
    return {"mcc": mcc, "mnc": code, "codes_alpha_2": countries, "brand": brand, "operator": operator}


def test_builder_rules_on_a_small_source(tmp_path) -> None:
    """Home country wins a code listed twice; brand, else operator; fixed territory codes; order."""
    entries = [
        mnc("234", "18", ["IM"], "Cloud 9 Mobile"),  # listed under the Isle of Man first...
        mnc("234", "18", ["GB"], "Cloud9"),  # ...and under the UK, the MCC's home
        mnc("234", "15", ["GB"], "", "Vodafone  Limited"),
        mnc("310", "590", ["US"], "Verizon"),
        mnc("310", "59", ["BM"], "Cellular One"),
        mnc("310", "014", ["US"], "", ""),  # no name: left out
        mnc("289", "67", [], "Aquafon"),  # no country of its own: the MCC's
        mnc("001", "01", [], "TEST"),  # test codes are not networks
        mnc("901", "70", [], "Example Mobile"),
    ]
    mccs = [{"mcc": "289", "code_alpha_2": "GE-AB"}]
    builder = load_builder()
    assert builder.build(entries, mccs) == [
        ("234", "GB", ""),
        ("23415", "GB", "Vodafone Limited"),
        ("23418", "GB", "Cloud9"),
        ("289", "AB", ""),
        ("28967", "AB", "Aquafon"),
        ("310", "US", ""),
        ("31059", "BM", "Cellular One"),
        ("310590", "US", "Verizon"),
        ("90170", "", "Example Mobile"),
    ]


def test_shipped_table_header_is_the_builder_s() -> None:
    builder = load_builder()
    header = TABLE_PATH.read_text(encoding="utf-8").split("\n")[:6]
    expected = builder.HEADER.format(
        package=builder.PACKAGE, version=builder.VERSION, released=builder.RELEASED, today=header[2][-11:-1]
    )
    assert "\n".join(header) + "\n" == expected
