"""The pure protocol core, driven by recorded answers of the service (spec v2.4 examples)."""

import pytest
from conftest import parse_response

from npl_agi.core import protocol
from npl_agi.core.codes import TIMEOUT, TRUNCATED
from npl_agi.core.errors import AuthError, CreditError, LockedError, ProtocolError, RequestRejected

ASKED = ["447788450450", "447810701702", "447973100100"]
V24 = """QUERYOK
447788450450 23415,447785014185,234158341040126
447810701702 23415,447785014185,234159002945116
447973100100 ERR1
ENDBATCH
"""
LEGACY = """QUERYOK
447788450450 23415
447810701702 23415
447973100100 ERR1
ENDBATCH
"""


def test_spec_example_v24():
    got = parse_response(V24, ASKED)
    a = got["447788450450"]
    assert (a.mccmnc, a.mcc, a.mnc, a.msc, a.imsi, a.error) == (
        "23415",
        "234",
        "15",
        "447785014185",
        "234158341040126",
        "",
    )
    assert got["447810701702"].imsi == "234159002945116"
    e = got["447973100100"]
    assert (e.error, e.error_name, e.mccmnc) == ("ERR1", "Unknown subscriber", "")


def test_spec_example_legacy():
    got = parse_response(LEGACY, ASKED)
    assert got["447788450450"].mccmnc == "23415"
    assert got["447788450450"].msc == got["447788450450"].imsi == ""
    assert got["447973100100"].error == "ERR1"


def test_crlf_line_ends_and_three_digit_mnc_and_empty_imsi():
    body = "QUERYOK\r\n17044518989 310260,17045550000,\r\nENDBATCH\r\n"
    a = parse_response(body, ["17044518989"])["17044518989"]
    assert (a.mcc, a.mnc, a.imsi) == ("310", "260", "")


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (1, "Unknown subscriber"),
        (11, "Teleservice not provisioned"),
        (13, "Call barred"),
        (21, "Facility not supported"),
        (29, "Absent subscriber"),
        (36, "System failure"),
        (77, "unknown error 77"),
    ],
)
def test_per_number_error_codes_kept_with_names(code, name):
    body = f"QUERYOK\n447700000001 ERR{code}\nENDBATCH\n"
    a = parse_response(body, ["447700000001"])["447700000001"]
    assert (a.error, a.error_name, a.ok) == (f"ERR{code}", name, False)


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("FAIL Invalid password", AuthError),
        ("FAIL Insufficient credit", CreditError),
        ("FAIL No numbers specified", RequestRejected),
        ("FAIL Request too long", RequestRejected),
        ("FAIL Something new", RequestRejected),
        ("ERR ACCOUNT LOCKED - Please arrange payment", LockedError),
    ],
)
def test_first_lines_become_typed_errors_with_the_service_text(line, kind):
    with pytest.raises(kind) as info:
        parse_response(line + "\n", ASKED)
    assert info.value.line == line
    assert line in str(info.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "empty"),
        ("\n", "empty"),
        ("<!DOCTYPE html>\n<html><body>Login</body></html>\n", "HTML"),
        ("<html><head><title>502 Bad Gateway</title></head></html>", "HTML"),
        ("\x00\x1b[31mgarbage\n", "unexpected first line"),
    ],
)
def test_a_body_that_is_not_the_contract_at_all_is_a_protocol_error(body, message):
    with pytest.raises(ProtocolError, match=message):
        parse_response(body, ASKED)


GOOD = "447810701702 23415,447785014185,234159002945116\n447973100100 ERR1\n"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("447788450450 hello", "malformed"),
        ("447788450450 23415,1", "malformed"),
        ("447788450450 2341X", "malformed"),
        ("447788450450 2341X,,", "malformed"),
        ("447788450450", "malformed"),
        ("abc 23415", "malformed"),
        ("449999999999 23415", "not asked"),
        ("", "did not answer"),
    ],
)
def test_an_off_contract_line_fails_only_the_number_left_without_an_answer(line, message):
    got = parse_response(f"QUERYOK\n{line}\n{GOOD}ENDBATCH\n", ASKED)
    bad = got["447788450450"]
    assert (bad.error, bad.ok) == ("PROTOCOL", False)
    assert message in bad.error_name
    assert got["447810701702"].mccmnc == "23415" and got["447973100100"].error == "ERR1"


def test_one_malformed_line_in_a_thousand_keeps_the_other_999():
    asked = [f"4477009{i:05d}" for i in range(1000)]
    lines = [f"{n} 23415,447785014185," for n in asked]
    lines[500] = f"{asked[500]} 2341X,,"
    got = parse_response("QUERYOK\n" + "\n".join(lines) + "\nENDBATCH\n", asked)
    assert [n for n, a in got.items() if not a.ok] == [asked[500]]
    assert sum(a.mccmnc == "23415" for a in got.values()) == 999


def test_the_reader_hands_each_answer_over_as_its_line_arrives():
    reader = protocol.AnswerReader(ASKED)
    assert reader.feed("QUERYOK") is None
    first = reader.feed("447788450450 23415,447785014185,234158341040126")
    assert first.msisdn == "447788450450" and first.mccmnc == "23415"
    assert reader.feed("447788450450 23410,1,2") is None  # a repeat does not replace the first
    assert reader.feed("not a line") is None
    assert not reader.ended
    got = reader.finish(TIMEOUT)
    assert got["447788450450"].mccmnc == "23415"
    assert [got[n].error for n in ASKED[1:]] == [TIMEOUT, TIMEOUT]


@pytest.mark.parametrize("line", ["FAIL Invalid password", "<html>"])
def test_the_reader_raises_for_a_refused_or_foreign_first_line(line):
    with pytest.raises((AuthError, ProtocolError)):
        protocol.AnswerReader(ASKED).feed(line)


# The spec's own example account is bob/123: its password occurs in ordinary data.
@pytest.mark.parametrize("secret", ["123", "44", "7", "OK", "QUERYOK", "ENDBATCH", "23415", "ERR1"])
def test_the_password_never_rewrites_the_data(secret):
    body = (
        "QUERYOK\n447788450450 23415,447712312345,234151230000123\n447810701702 23415,,\n447973100100 ERR1\nENDBATCH\n"
    )
    got = parse_response(body, ASKED, secret=secret)
    assert got["447788450450"] == protocol.Answer("447788450450", "23415", "447712312345", "234151230000123")
    assert got["447810701702"].mccmnc == "23415" and got["447973100100"].error == "ERR1"


@pytest.mark.parametrize("secret", ["123", 'p\\w"x', "a b&c=d", "s3cr3t-" + "x" * 100])
def test_an_echoed_password_is_masked_in_messages_whatever_its_form(secret):
    from urllib.parse import quote_plus

    for echoed in (secret, quote_plus(secret)):
        with pytest.raises(ProtocolError) as info:
            parse_response(f"user=bob&pass={echoed}&msisdn=1\n", ASKED, secret=secret)
        assert secret not in str(info.value) and secret[:6] not in str(info.value).replace("***", "")
        with pytest.raises(RequestRejected) as refused:
            parse_response(f"FAIL bad pass {echoed}\n", ASKED, secret=secret)
        assert secret not in str(refused.value) and secret not in refused.value.line
        assert repr(secret)[1:-1] not in str(refused.value)


def test_error_messages_quote_foreign_text_bounded_and_printable():
    with pytest.raises(ProtocolError) as info:
        parse_response("Z" * 5000 + "\x07\n", ASKED)
    assert len(str(info.value)) < 200
    assert "\x07" not in str(info.value)


def test_truncated_body_keeps_complete_lines_and_marks_the_rest():
    body = "QUERYOK\n447788450450 23415,447785014185,234158341040126\n447810701702 2341"
    got = parse_response(body, ASKED)
    assert got["447788450450"].mccmnc == "23415"
    assert got["447810701702"].error == TRUNCATED  # the partial line is not trusted
    assert got["447973100100"].error == TRUNCATED


def test_cut_by_our_deadline_marks_missing_numbers_timeout():
    got = parse_response("QUERYOK\n447788450450 23415\n", ASKED, cut_short=TIMEOUT)
    assert got["447788450450"].ok
    assert [got[n].error for n in ASKED[1:]] == [TIMEOUT, TIMEOUT]


def test_queryok_alone_is_truncated():
    got = parse_response("QUERYOK", ASKED)
    assert {a.error for a in got.values()} == {TRUNCATED}


def test_endbatch_without_final_newline_is_complete():
    body = V24.rstrip("\n")
    assert parse_response(body, ASKED)["447973100100"].error == "ERR1"


def test_answers_matched_by_digits_not_form():
    body = "QUERYOK\n+447788450450 23415\nENDBATCH\n"
    assert parse_response(body, ["447788450450"])["447788450450"].mccmnc == "23415"


def test_request_form_and_formatting_round_trip():
    form = protocol.request_form("bob", "123", "2.4", ["447788450450", "447810701702"])
    assert form == {"user": "bob", "pass": "123", "apiver": "2.4", "msisdn": "447788450450,447810701702"}
    lines = [
        protocol.format_answer("447788450450", "23415", "447785014185", "234158341040126"),
        protocol.format_answer("447810701702", "23415", apiver=""),
        protocol.format_error("447973100100", 1),
    ]
    body = "\n".join([protocol.QUERYOK, *lines, protocol.ENDBATCH]) + "\n"
    got = parse_response(body, ASKED)
    assert got["447788450450"].imsi == "234158341040126"
    assert got["447810701702"].mccmnc == "23415" and got["447810701702"].msc == ""
    assert got["447973100100"].error == "ERR1"


def test_extra_fields_follow_the_query_s_own_fields_in_order():
    form = protocol.request_form("bob", "economy=1", "2.5", ["447788450450"], [("economy", "1"), ("tag", "a b")])
    assert list(form.items()) == [
        ("user", "bob"),
        ("pass", "economy=1"),
        ("apiver", "2.5"),
        ("msisdn", "447788450450"),
        ("economy", "1"),
        ("tag", "a b"),
    ]


@pytest.mark.parametrize("name", ["user", "pass", "apiver", "msisdn", "PASS", "Msisdn", " apiver ", "economy"])
def test_extra_fields_never_replace_a_field_already_in_the_form(name):
    """Refused by the configuration first; the form refuses too, whoever built the pairs."""
    with pytest.raises(ValueError, match="would replace"):
        protocol.request_form("bob", "123", "2.4", ["447788450450"], [("economy", "1"), (name, "x")])


@pytest.mark.parametrize(
    ("apiver", "legacy"), [("", True), ("2.3", True), ("2.4", False), ("2.10", False), ("x", True)]
)
def test_legacy_versions(apiver, legacy):
    assert protocol.is_legacy(apiver) is legacy


def test_answer_dict_has_the_documented_keys():
    d = protocol.Answer("447788450450", mccmnc="23415").as_dict()
    assert {"msisdn", "mccmnc", "mcc", "mnc", "msc", "imsi", "error", "error_name"} <= d.keys()
    assert (d["mcc"], d["mnc"]) == ("234", "15")
