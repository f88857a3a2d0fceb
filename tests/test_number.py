"""Dialled numbers to international numbers: ``normalise`` then ``validate``, and ``number_type``."""

from __future__ import annotations

import pytest

from npl_agi.config import NumberConfig
from npl_agi.core.errors import BadNumber, NotMobile
from npl_agi.core.number import MAX_INPUT, normalise, number_type, validate

# Every number type is allowed here: these tables are about the digits, not the filter.
UK = NumberConfig(country_code="44", national_prefix="0", international_prefix="00", lookup_types=("any",))
NANP = NumberConfig(country_code="1", national_prefix="1", international_prefix="011", lookup_types=("any",))
DE = NumberConfig(country_code="49", national_prefix="0", international_prefix="00", lookup_types=("any",))
FR = NumberConfig(country_code="33", national_prefix="0", international_prefix="00", lookup_types=("any",))
UK_DEFAULT_TYPES = NumberConfig(country_code="44")


def canonical(dialled: str, cfg: NumberConfig) -> str:
    return validate(normalise(dialled, cfg), cfg)


@pytest.mark.parametrize(
    ("dialled", "expected"),
    [
        ("07912 345678", "447912345678"),
        ("07912345678", "447912345678"),
        ("+44 7912 345678", "447912345678"),
        ("0044 7912 345678", "447912345678"),
        ("+44 (0)7912 345678", "447912345678"),
        ("0044 (0) 7912 345678", "447912345678"),
        ("07912-345-678", "447912345678"),
        ("07912.345.678", "447912345678"),
        ("(07912) 345678", "447912345678"),
        ("07912/345678", "447912345678"),
        ("[07912] 345678", "447912345678"),
        ("\t07912 345678 ", "447912345678"),
        ("020 7946 0018", "442079460018"),
        ("0161 496 0000", "441614960000"),
        ("0800 123 4567", "448001234567"),
        ("7912 345678", "447912345678"),  # national number without the trunk 0
        ("447912345678", "447912345678"),  # already international, no prefix
        ("+1 704 451 8989", "17044518989"),
        ("00 1 704 451 8989", "17044518989"),
        ("00 33 6 12 34 56 78", "33612345678"),
        ("4915112345678", "4915112345678"),
    ],
)
def test_uk(dialled: str, expected: str) -> None:
    assert canonical(dialled, UK) == expected


@pytest.mark.parametrize(
    ("dialled", "expected"),
    [
        ("704-451-8989", "17044518989"),
        ("(704) 451-8989", "17044518989"),
        ("704.451.8989", "17044518989"),
        ("7044518989", "17044518989"),
        ("1 (704) 451-8989", "17044518989"),
        ("1-704-451-8989", "17044518989"),
        ("+1 704 451 8989", "17044518989"),
        ("17044518989", "17044518989"),
        ("1 800 555 0199", "18005550199"),
        ("011 44 7912 345678", "447912345678"),
        ("011 49 151 12345678", "4915112345678"),
        ("447912345678", "447912345678"),  # already international, no prefix
        # Canada
        ("(416) 979-1234", "14169791234"),
        ("1-514-861-1234", "15148611234"),
        ("+1 604 451 8989", "16044518989"),
    ],
)
def test_nanp(dialled: str, expected: str) -> None:
    assert canonical(dialled, NANP) == expected


def test_nanp_trunk_prefix_is_one_not_zero() -> None:
    """Country 1 with national prefix 1: the trunk prefix is replaced, not kept as a digit."""
    assert canonical("1 704 451 8989", NANP) == "17044518989"
    with pytest.raises(BadNumber):
        canonical("1704451898", NANP)  # a digit short: neither a national nor an international number


@pytest.mark.parametrize(
    ("dialled", "expected"),
    [
        # Arkansas, Vancouver (Canada), Los Angeles, Oregon: ten digits dialled the usual NANP way
        ("479-451-8989", "14794518989"),
        ("604-451-8989", "16044518989"),
        ("(604) 681-2345", "16046812345"),
        ("323-345-6789", "13233456789"),
        ("458-812-3456", "14588123456"),
    ],
)
def test_nanp_ten_digits_stay_in_nanp(dialled: str, expected: str) -> None:
    """A ten-digit NANP number is a national number of the configured country.

    Its digits can also spell a valid foreign number (479… is +47 Norway, 604… +60 Malaysia,
    323… +32 Belgium, 458… +45 Denmark); that reading must not win over the national one.
    """
    assert canonical(dialled, NANP) == expected


@pytest.mark.parametrize(
    ("dialled", "expected"),
    [
        ("0151 12345678", "4915112345678"),
        ("0171 1234567", "491711234567"),
        ("+49 30 1234567", "49301234567"),
        ("030 1234567", "49301234567"),
        ("089 12345678", "498912345678"),
        ("0049 151 12345678", "4915112345678"),
        ("+49 (0)151 12345678", "4915112345678"),
        ("00 44 7912 345678", "447912345678"),
        ("4915112345678", "4915112345678"),
    ],
)
def test_germany(dialled: str, expected: str) -> None:
    assert canonical(dialled, DE) == expected


@pytest.mark.parametrize(
    ("dialled", "expected"),
    [
        ("06 12 34 56 78", "33612345678"),
        ("06.12.34.56.78", "33612345678"),
        ("+33 6 12 34 56 78", "33612345678"),
        ("0033 6 12 34 56 78", "33612345678"),
        ("+33 1 23 45 67 89", "33123456789"),
        ("01 23 45 67 89", "33123456789"),
        ("+33 (0)1 23 45 67 89", "33123456789"),
        ("00 1 704 451 8989", "17044518989"),
        ("33612345678", "33612345678"),
    ],
)
def test_france(dialled: str, expected: str) -> None:
    assert canonical(dialled, FR) == expected


def test_trunk_zero_after_country_code_is_dropped() -> None:
    assert normalise("+44 (0)7912 345678", UK) == ("4407912345678",)
    assert validate(("4407912345678",), UK) == "447912345678"


def test_no_prefix_gives_both_readings() -> None:
    assert set(normalise("447912345678", UK)) == {"447912345678", "44447912345678"}
    assert set(normalise("7044518989", NANP)) == {"7044518989", "17044518989"}


def test_prefixed_numbers_have_one_reading() -> None:
    assert normalise("07912 345678", UK) == ("447912345678",)
    assert normalise("+44 7912 345678", UK) == ("447912345678",)
    assert normalise("0044 7912 345678", UK) == ("447912345678",)
    assert normalise("011 44 7912 345678", NANP) == ("447912345678",)


HOSTILE = [
    "",
    "   ",
    "+",
    "00",
    "07912'345678",
    "'07912345678'",
    '"07912345678"',
    "07912\\345678",
    "07912\n345678",
    "07912345678\r\nHANGUP",
    "07912345678\nSET VARIABLE NPL_MCCMNC 23415",
    "07912345678;",
    "07912;345678",
    "0791234567a",
    "O7912345678",  # letter O
    "tel:+447912345678",
    "sip:07912345678@pbx",
    "*07912345678",
    "07912345678#",
    "07912\x00345678",
    "07912\u00a0345678",  # no-break space
    "07912\u200b345678",  # zero-width space
    "++447912345678",
    "00+447912345678",
    "\u0660\u0667\u0669\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668",  # Arabic-Indic 07912345678
    "\u06f0\u06f7\u06f9\u06f1\u06f2\u06f3\u06f4\u06f5\u06f6\u06f7\u06f8",  # Extended Arabic-Indic
    "\uff10\uff17\uff19\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18",  # fullwidth 07912345678
    "+\uff14\uff14\uff17\uff19\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18",  # +44… fullwidth
    "0791\u00b2345678",  # superscript two
    "\uff0b447912345678",  # fullwidth plus
    "0" * 1024,
    "1" * 1024,
    "07912345678" + " " * 1024,
    "x" * 1024,
    "0" * (MAX_INPUT + 1),
]


@pytest.mark.parametrize("dialled", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_input_is_bad_number(dialled: str) -> None:
    with pytest.raises(BadNumber):
        normalise(dialled, UK)


@pytest.mark.parametrize("dialled", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_input_is_bad_number_with_nanp(dialled: str) -> None:
    with pytest.raises(BadNumber):
        normalise(dialled, NANP)


def test_bad_number_message_is_one_short_line() -> None:
    with pytest.raises(BadNumber) as e:
        normalise("x" * 1024, UK)
    assert "\n" not in str(e.value)
    assert len(str(e.value)) < 120


@pytest.mark.parametrize(
    "dialled",
    [
        "+44 791",  # 5 digits
        "123",  # 3 digits, 5 with the country code
        "+1 234",
        "+44 7912 345678 9012",  # 16 digits
        "0044 7912 3456 7890 12",
        "+4479123456789",  # one digit too many for a UK mobile
        "0" + "7" * 20,
    ],
)
def test_too_short_or_too_long(dialled: str) -> None:
    with pytest.raises(BadNumber):
        canonical(dialled, UK)


@pytest.mark.parametrize(
    ("dialled", "cfg"),
    [
        ("+999 1234 5678", UK),
        ("00 999 12345678", UK),
        ("+28 12345678", UK),
        ("+0 1234567", UK),
        ("011 999 12345678", NANP),
    ],
)
def test_unknown_country_code(dialled: str, cfg: NumberConfig) -> None:
    with pytest.raises(BadNumber, match="calling code"):
        canonical(dialled, cfg)


def test_validate_without_a_country_code_rejects_national_numbers() -> None:
    no_country = NumberConfig(lookup_types=("any",))  # country_code unset
    with pytest.raises(BadNumber):
        canonical("07912 345678", no_country)
    assert canonical("+44 7912 345678", no_country) == "447912345678"


@pytest.mark.parametrize(
    ("dialled", "kind"),
    [
        ("020 7946 0018", "fixed_line"),
        ("0161 496 0000", "fixed_line"),
        ("0800 123 4567", "toll_free"),
        ("0909 879 0000", "premium_rate"),
    ],
)
def test_default_lookup_types_skip_what_is_not_mobile(dialled: str, kind: str) -> None:
    with pytest.raises(NotMobile) as e:
        canonical(dialled, UK_DEFAULT_TYPES)
    assert not isinstance(e.value, BadNumber)
    assert kind in str(e.value)


@pytest.mark.parametrize(
    ("dialled", "expected"),
    [
        ("07912 345678", "447912345678"),
        ("+1 704 451 8989", "17044518989"),  # NANP numbers are fixed_line_or_mobile
        ("+49 151 12345678", "4915112345678"),
    ],
)
def test_default_lookup_types_allow_mobiles(dialled: str, expected: str) -> None:
    assert canonical(dialled, UK_DEFAULT_TYPES) == expected


@pytest.mark.parametrize(
    ("types", "dialled", "allowed"),
    [
        (("any",), "020 7946 0018", True),
        (("any",), "0800 123 4567", True),
        (("any",), "07912 345678", True),
        (("fixed_line",), "020 7946 0018", True),
        (("fixed_line",), "0800 123 4567", False),
        (("fixed_line",), "07912 345678", False),
        (("toll_free",), "0800 123 4567", True),
        (("mobile", "fixed_line"), "020 7946 0018", True),
        (("mobile", "fixed_line"), "07912 345678", True),
        (("mobile",), "+1 704 451 8989", False),
        (("fixed_line_or_mobile",), "+1 704 451 8989", True),
    ],
)
def test_lookup_types_filter(types: tuple[str, ...], dialled: str, allowed: bool) -> None:
    cfg = NumberConfig(country_code="44", lookup_types=types)
    if allowed:
        assert canonical(dialled, cfg).isdigit()
    else:
        with pytest.raises(NotMobile):
            canonical(dialled, cfg)


@pytest.mark.parametrize(
    ("msisdn", "kind"),
    [
        ("447912345678", "mobile"),
        ("442079460018", "fixed_line"),
        ("448001234567", "toll_free"),
        ("449098790000", "premium_rate"),
        ("17044518989", "fixed_line_or_mobile"),
        ("4915112345678", "mobile"),
        ("49301234567", "fixed_line"),
        ("33612345678", "mobile"),
        ("33123456789", "fixed_line"),
    ],
)
def test_number_type(msisdn: str, kind: str) -> None:
    assert number_type(msisdn) == kind


@pytest.mark.parametrize("msisdn", ["99912345678", "012345678", ""])
def test_number_type_of_no_country_is_bad_number(msisdn: str) -> None:
    with pytest.raises(BadNumber):
        number_type(msisdn)
