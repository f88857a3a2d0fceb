"""The pure protocol core, driven by recorded answers of the service (spec v2.4 examples)."""

import pytest

from npl_agi import protocol
from npl_agi.errors import (
    TIMEOUT,
    TRUNCATED,
    AuthError,
    CreditError,
    LockedError,
    ProtocolError,
    RequestRejected,
)

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
    got = protocol.parse_response(V24, ASKED)
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
    got = protocol.parse_response(LEGACY, ASKED)
    assert got["447788450450"].mccmnc == "23415"
    assert got["447788450450"].msc == got["447788450450"].imsi == ""
    assert got["447973100100"].error == "ERR1"


def test_crlf_line_ends_and_three_digit_mnc_and_empty_imsi():
    body = "QUERYOK\r\n17044518989 310260,17045550000,\r\nENDBATCH\r\n"
    a = protocol.parse_response(body, ["17044518989"])["17044518989"]
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
    a = protocol.parse_response(body, ["447700000001"])["447700000001"]
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
        protocol.parse_response(line + "\n", ASKED)
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
        ("QUERYOK\n447788450450 hello\nENDBATCH\n", "malformed"),
        ("QUERYOK\n447788450450 23415,1\nENDBATCH\n", "malformed"),
        ("QUERYOK\n447788450450 2341X\nENDBATCH\n", "malformed"),
        ("QUERYOK\n447788450450\nENDBATCH\n", "malformed"),
        ("QUERYOK\nabc 23415\nENDBATCH\n", "malformed"),
        ("QUERYOK\n449999999999 23415\nENDBATCH\n", "not asked"),
        ("QUERYOK\n447788450450 23415\nENDBATCH\n", "did not answer"),
    ],
)
def test_anything_off_contract_is_a_protocol_error(body, message):
    with pytest.raises(ProtocolError, match=message):
        protocol.parse_response(body, ASKED)


def test_error_messages_quote_foreign_text_bounded_and_printable():
    with pytest.raises(ProtocolError) as info:
        protocol.parse_response("Z" * 5000 + "\x07\n", ASKED)
    assert len(str(info.value)) < 200
    assert "\x07" not in str(info.value)


def test_truncated_body_keeps_complete_lines_and_marks_the_rest():
    body = "QUERYOK\n447788450450 23415,447785014185,234158341040126\n447810701702 2341"
    got = protocol.parse_response(body, ASKED)
    assert got["447788450450"].mccmnc == "23415"
    assert got["447810701702"].error == TRUNCATED  # the partial line is not trusted
    assert got["447973100100"].error == TRUNCATED


def test_cut_by_our_deadline_marks_missing_numbers_timeout():
    got = protocol.parse_response("QUERYOK\n447788450450 23415\n", ASKED, cut_short=TIMEOUT)
    assert got["447788450450"].ok
    assert [got[n].error for n in ASKED[1:]] == [TIMEOUT, TIMEOUT]


def test_queryok_alone_is_truncated():
    got = protocol.parse_response("QUERYOK", ASKED)
    assert {a.error for a in got.values()} == {TRUNCATED}


def test_endbatch_without_final_newline_is_complete():
    body = V24.rstrip("\n")
    assert protocol.parse_response(body, ASKED)["447973100100"].error == "ERR1"


def test_answers_matched_by_digits_not_form():
    body = "QUERYOK\n+447788450450 23415\nENDBATCH\n"
    assert protocol.parse_response(body, ["447788450450"])["447788450450"].mccmnc == "23415"


def test_request_form_and_formatting_round_trip():
    form = protocol.request_form("bob", "123", "2.4", ["447788450450", "447810701702"])
    assert form == {"user": "bob", "pass": "123", "apiver": "2.4", "msisdn": "447788450450,447810701702"}
    lines = [
        protocol.format_answer("447788450450", "23415", "447785014185", "234158341040126"),
        protocol.format_answer("447810701702", "23415", apiver=""),
        protocol.format_error("447973100100", 1),
    ]
    body = "\n".join([protocol.QUERYOK, *lines, protocol.ENDBATCH]) + "\n"
    got = protocol.parse_response(body, ASKED)
    assert got["447788450450"].imsi == "234158341040126"
    assert got["447810701702"].mccmnc == "23415" and got["447810701702"].msc == ""
    assert got["447973100100"].error == "ERR1"


@pytest.mark.parametrize(
    ("apiver", "legacy"), [("", True), ("2.3", True), ("2.4", False), ("2.10", False), ("x", True)]
)
def test_legacy_versions(apiver, legacy):
    assert protocol.is_legacy(apiver) is legacy


def test_answer_dict_has_the_documented_keys():
    d = protocol.Answer("447788450450", mccmnc="23415").as_dict()
    assert {"msisdn", "mccmnc", "mcc", "mnc", "msc", "imsi", "error", "error_name"} <= d.keys()
    assert (d["mcc"], d["mnc"]) == ("234", "15")
