"""The bundled simulator as an HTTP server: spoken to with raw http.client and sockets."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlencode

import pytest
from conftest import parse_response

from npl_agi.core import protocol
from npl_agi.doubles.simulator import FAULTS, SIMULATED_ERRORS, Account, Simulator

THREE_FIELDS = re.compile(r"(\d+) (\d{5,6}),(\d*),(\d*)")
WAIT = 10.0  # generous bound for conditions the tests wait for


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")


def address(sim: Simulator) -> tuple[str, int]:
    host, port = sim.server.server_address[:2]
    return host, port


def request(sim: Simulator, method: str, path: str, form: dict[str, str] | None = None) -> Reply:
    conn = http.client.HTTPConnection(*address(sim), timeout=WAIT)
    try:
        if method == "GET":
            target = path + ("?" + urlencode(form) if form is not None else "")
            conn.request("GET", target)
        else:
            body = urlencode(form or {})
            conn.request("POST", path, body=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def query(sim: Simulator, user: str = "demo", pw: str | None = "demo", **fields: str) -> Reply:
    form = {"user": user, **({"pass": pw} if pw is not None else {}), **fields}
    return request(sim, "POST", "/npl", form)


def open_raw(sim: Simulator, form: dict[str, str]) -> socket.socket:
    """Send a POST on a raw socket and return it without reading the answer."""
    body = urlencode(form)
    sock = socket.create_connection(address(sim), timeout=WAIT)
    sock.sendall(
        (
            "POST /npl HTTP/1.0\r\nHost: sim\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
    )
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def wait_for(condition: Callable[[], bool]) -> None:
    end = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def make_sim() -> Iterator[Callable[..., Simulator]]:
    started: list[Simulator] = []

    def make(**kwargs) -> Simulator:
        s = Simulator("127.0.0.1", 0, **kwargs).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


# -- GET, POST, paths --


def test_get_and_post_give_the_same_answer(sim) -> None:
    form = {"user": "demo", "pass": "demo", "apiver": "2.4", "msisdn": "447788450450,447973100100"}
    got = request(sim, "GET", "/npl", form)
    posted = request(sim, "POST", "/npl", form)
    assert got.status == posted.status == 200
    assert got.headers["Content-Type"].startswith("text/plain")
    assert got.body == posted.body
    lines = got.lines
    assert lines[0] == "QUERYOK"
    assert THREE_FIELDS.fullmatch(lines[1])
    assert lines[1].startswith("447788450450 23415,")
    assert lines[2] == "447973100100 ERR1"
    assert lines[3:] == ["ENDBATCH", ""]
    assert [r["method"] for r in sim.stats()["requests"]] == ["GET", "POST"]


def test_answer_ends_with_endbatch_then_the_server_closes(sim) -> None:
    sock = open_raw(sim, {"user": "demo", "pass": "demo", "apiver": "2.4", "msisdn": "447788450450"})
    with sock:
        data = read_all(sock)  # returns only because the server closed the connection
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.")
    assert b" 200 " in head.split(b"\r\n")[0]
    assert body.endswith(b"\nENDBATCH\n")
    assert body.startswith(b"QUERYOK\n")


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/", "/npl/", "/NPL", "/api/npl", "/npl2", "/_sim/nothing"])
def test_wrong_path_is_404_html(sim, method: str, path: str) -> None:
    reply = request(sim, method, path, {"user": "demo", "pass": "demo", "msisdn": "447788450450"})
    assert reply.status == 404
    assert reply.headers["Content-Type"].startswith("text/html")
    assert reply.text.lstrip().lower().startswith("<html")
    assert sim.stats()["requests"] == []


# -- first lines --

NUMBER = "447788450450"


@pytest.mark.parametrize(
    ("user", "password", "msisdn", "first"),
    [
        ("demo", "demo", NUMBER, protocol.QUERYOK),
        ("demo", "wrong", NUMBER, protocol.FAIL_PASSWORD),
        ("demo", "", NUMBER, protocol.FAIL_PASSWORD),
        ("demo", None, NUMBER, protocol.FAIL_PASSWORD),
        ("nobody", "demo", NUMBER, protocol.FAIL_PASSWORD),
        ("", "", NUMBER, protocol.FAIL_PASSWORD),
        ("nocredit", "nocredit", NUMBER, protocol.FAIL_CREDIT),
        ("demo", "demo", "", protocol.FAIL_NO_NUMBERS),
        ("demo", "demo", None, protocol.FAIL_NO_NUMBERS),
        ("demo", "demo", ",,", protocol.FAIL_NO_NUMBERS),
        ("nocredit", "nocredit", "", protocol.FAIL_CREDIT),  # no credit left: refused before the numbers
        ("locked", "locked", NUMBER, protocol.ACCOUNT_LOCKED),
        ("locked", "locked", "", protocol.ACCOUNT_LOCKED),
        ("locked", "wrong", NUMBER, protocol.FAIL_PASSWORD),
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_first_line(sim, method: str, user: str, password: str | None, msisdn: str | None, first: str) -> None:
    form = {"user": user, "apiver": "2.4"}
    if password is not None:
        form["pass"] = password
    if msisdn is not None:
        form["msisdn"] = msisdn
    reply = request(sim, method, "/npl", form)
    assert reply.status == 200
    assert reply.lines[0] == first
    if first == protocol.QUERYOK:
        assert reply.lines[-2:] == ["ENDBATCH", ""]
    else:
        assert reply.text == first + "\n"  # a refusal is the one line
        assert sim.stats()["charged"] == []


def test_contract_first_lines_are_exact() -> None:
    assert protocol.FAIL_PASSWORD == "FAIL Invalid password"
    assert protocol.FAIL_CREDIT == "FAIL Insufficient credit"
    assert protocol.FAIL_NO_NUMBERS == "FAIL No numbers specified"
    assert protocol.FAIL_TOO_LONG == "FAIL Request too long"
    assert protocol.ACCOUNT_LOCKED == "ERR ACCOUNT LOCKED - Please arrange payment"


def numbers(n: int) -> list[str]:
    return [f"4477009{i:05d}" for i in range(n)]


def test_request_too_long(sim) -> None:
    reply = query(sim, apiver="2.4", msisdn=",".join(numbers(1001)))
    assert reply.text == "FAIL Request too long\n"
    assert sim.stats()["charged"] == []


def test_a_thousand_numbers_are_answered(sim) -> None:
    asked = numbers(1000)
    reply = query(sim, apiver="2.4", msisdn=",".join(asked))
    lines = reply.lines
    assert lines[0] == "QUERYOK"
    assert lines[-2:] == ["ENDBATCH", ""]
    assert [line.split()[0] for line in lines[1:-2]] == asked
    assert sim.stats()["charged"] == asked


def test_max_numbers_is_configurable(make_sim) -> None:
    s = make_sim(max_numbers=3)
    assert query(s, msisdn=",".join(numbers(4))).text == "FAIL Request too long\n"
    assert query(s, msisdn=",".join(numbers(3))).lines[0] == "QUERYOK"


# -- answer forms --


@pytest.mark.parametrize(
    ("apiver", "legacy"),
    [(None, True), ("", True), ("2.3", True), ("2.0", True), ("2.4", False), ("2.5", False), ("3.0", False)],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_apiver(sim, method: str, apiver: str | None, legacy: bool) -> None:
    form = {"user": "demo", "pass": "demo", "msisdn": "447788450450,447810701702,447973100100"}
    if apiver is not None:
        form["apiver"] = apiver
    lines = request(sim, method, "/npl", form).lines
    assert lines[0] == "QUERYOK"
    assert lines[-2:] == ["ENDBATCH", ""]
    answers = lines[1:-2]
    if legacy:
        assert answers == ["447788450450 23415", "447810701702 23415", "447973100100 ERR1"]
    else:
        assert all(THREE_FIELDS.fullmatch(a) for a in answers[:2]), answers
        assert [a.split(",")[0] for a in answers[:2]] == ["447788450450 23415", "447810701702 23415"]
        assert answers[2] == "447973100100 ERR1"
    assert sim.stats()["requests"][0]["apiver"] == (apiver or "")


def test_answers_parse_with_the_client_parser(sim) -> None:
    asked = ["447788450450", "447973100100", "17044518989", "4915112345678", "33612345678"]
    found = parse_response(query(sim, apiver="2.4", msisdn=",".join(asked)).text, asked)
    assert set(found) == set(asked)
    assert found["447973100100"].error == "ERR1"
    for n in ("447788450450", "17044518989", "4915112345678", "33612345678"):
        assert found[n].ok and found[n].mccmnc and found[n].msc and found[n].imsi


def test_answers_are_deterministic(sim) -> None:
    first = query(sim, apiver="2.4", msisdn="447912345678,17044518989").text
    assert query(sim, apiver="2.4", msisdn="447912345678,17044518989").text == first


# -- documented test numbers --


@pytest.mark.parametrize("code", SIMULATED_ERRORS)
@pytest.mark.parametrize("apiver", ["2.4", ""])
def test_error_suffix(sim, code: int, apiver: str) -> None:
    number = f"44770000{code:04d}"
    assert number.endswith(f"0000{code:02d}")
    lines = query(sim, apiver=apiver, msisdn=f"447788450450,{number}").lines
    assert lines[2] == f"{number} ERR{code}"
    assert lines[-2] == "ENDBATCH"


def test_spec_unknown_subscriber_example(sim) -> None:
    assert query(sim, apiver="2.4", msisdn="447973100100").lines[1] == "447973100100 ERR1"


@pytest.mark.parametrize("number", ["447700000002", "447700000099", "447700010001", "447400999900", "447400999908"])
def test_other_suffixes_answer_normally(sim, number: str) -> None:
    lines = query(sim, apiver="2.4", msisdn=number).lines
    assert THREE_FIELDS.fullmatch(lines[1]), lines
    assert lines[-2] == "ENDBATCH"


def fault_number(fault: str) -> str:
    return f"44740099990{FAULTS.index(fault) + 1}"


def test_fault_numbers_are_the_documented_ones() -> None:
    assert [fault_number(f) for f in FAULTS] == [
        "447400999901",
        "447400999902",
        "447400999903",
        "447400999904",
        "447400999905",
        "447400999906",
        "447400999907",
    ]
    assert FAULTS == ("slow", "hang", "truncate", "garbage", "http500", "html", "empty")


def test_fault_slow_still_answers_everything(make_sim) -> None:
    s = make_sim(slow_delay=0.05)
    lines = query(s, apiver="2.4", msisdn=f"{fault_number('slow')},447788450450").lines
    assert lines[0] == "QUERYOK"
    assert len(lines) == 5 and lines[-2:] == ["ENDBATCH", ""]


def test_fault_slow_pauses_between_lines(make_sim) -> None:
    s = make_sim(slow_delay=1.0)
    with open_raw(s, {"user": "demo", "pass": "demo", "apiver": "2.4", "msisdn": fault_number("slow")}) as sock:
        data = b""
        while b"QUERYOK\n" not in data:
            data += sock.recv(65536)
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(65536)  # the number line is not there yet
        sock.settimeout(WAIT)
        data += read_all(sock)
    assert data.endswith(b"\nENDBATCH\n")


def test_fault_hang_sends_nothing(make_sim) -> None:
    s = make_sim(hang_seconds=1.0)
    with open_raw(s, {"user": "demo", "pass": "demo", "apiver": "2.4", "msisdn": fault_number("hang")}) as sock:
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(65536)
        sock.settimeout(WAIT)
        assert read_all(sock) == b""  # then it hangs up without a byte


def test_fault_truncate(sim) -> None:
    asked = ["447788450450", "447810701702", fault_number("truncate"), "447912345678"]
    reply = query(sim, apiver="2.4", msisdn=",".join(asked))
    assert reply.status == 200
    lines = reply.lines
    assert lines[0] == "QUERYOK"
    assert "ENDBATCH" not in reply.text
    assert [line.split()[0] for line in lines[1:3]] == asked[:2]
    assert len(lines) == 4 and lines[3] and asked[2].startswith(lines[3])  # half a line, no newline


def test_fault_garbage(sim) -> None:
    reply = query(sim, apiver="2.4", msisdn=fault_number("garbage"))
    assert reply.status == 200
    assert not reply.text.startswith("QUERYOK")
    assert not reply.text.isprintable()


def test_fault_http500(sim) -> None:
    assert query(sim, apiver="2.4", msisdn=fault_number("http500")).status == 500


def test_fault_html(sim) -> None:
    reply = query(sim, apiver="2.4", msisdn=fault_number("html"))
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/html")
    assert reply.text.startswith("<!DOCTYPE html>")


def test_fault_empty(sim) -> None:
    reply = query(sim, apiver="2.4", msisdn=fault_number("empty"))
    assert (reply.status, reply.body) == (200, b"")


# -- credit --


def test_credit_is_spent_per_number_and_refused_when_short(make_sim) -> None:
    s = make_sim(accounts={"alice": Account("pw", credit=3)})
    first = query(s, "alice", "pw", apiver="2.4", msisdn="447788450450,447973100100")
    assert first.lines[0] == "QUERYOK"
    assert s.stats()["credit"] == {"alice": 1}
    assert s.stats()["charged"] == ["447788450450", "447973100100"]  # an ERR1 answer costs a credit too

    short = query(s, "alice", "pw", apiver="2.4", msisdn="447810701702,447912345678")
    assert short.text == "FAIL Insufficient credit\n"
    assert s.stats()["credit"] == {"alice": 1}

    last = query(s, "alice", "pw", apiver="2.4", msisdn="447810701702")
    assert last.lines[0] == "QUERYOK"
    assert s.stats()["credit"] == {"alice": 0}
    assert query(s, "alice", "pw", apiver="2.4", msisdn="447810701702").text == "FAIL Insufficient credit\n"
    assert s.stats()["charged"] == ["447788450450", "447973100100", "447810701702"]


def test_unlimited_credit_stays_unlimited(sim) -> None:
    query(sim, apiver="2.4", msisdn="447788450450")
    assert sim.stats()["credit"]["demo"] is None


def test_refused_queries_cost_nothing(make_sim) -> None:
    s = make_sim(accounts={"alice": Account("pw", credit=5), "bob": Account("pw", credit=5, locked=True)})
    query(s, "alice", "wrong", msisdn="447788450450")
    query(s, "alice", "pw", msisdn="")
    query(s, "alice", "pw", msisdn=",".join(numbers(1001)))
    query(s, "bob", "pw", msisdn="447788450450")
    assert s.stats()["credit"] == {"alice": 5, "bob": 5}
    assert s.stats()["charged"] == []


# -- stats and control endpoints --


def test_stats_records_queries_without_passwords(make_sim) -> None:
    s = make_sim(accounts={"alice": Account("Pw-s3cret-9", credit=10)})
    request(s, "GET", "/npl", {"user": "alice", "pass": "Pw-s3cret-9", "apiver": "2.4", "msisdn": "447788450450"})
    request(s, "POST", "/npl", {"user": "alice", "pass": "wrong", "msisdn": "447810701702"})
    stats = s.stats()
    first = {"user": "alice", "apiver": "2.4", "method": "GET", "numbers": ["447788450450"], "extra": {}}
    assert stats["requests"] == [
        {**first, "charged": ["447788450450"]},
        {"user": "alice", "apiver": "", "method": "POST", "numbers": ["447810701702"], "extra": {}, "charged": []},
    ]
    assert stats["charged"] == ["447788450450"]
    assert stats["credit"] == {"alice": 9}
    assert stats["max_concurrent"] == {"alice": 1}
    assert "Pw-s3cret-9" not in json.dumps(stats)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_fields_it_does_not_know_are_accepted_and_recorded(make_sim, method: str) -> None:
    s = make_sim(accounts={"alice": Account("Pw-s3cret-9")})
    form = {"user": "alice", "pass": "Pw-s3cret-9", "apiver": "2.5", "msisdn": "447788450450"}
    reply = request(s, method, "/npl", {**form, "economy": "1", "tag": "a b&c", "empty": ""})
    assert reply.lines[0] == "QUERYOK" and reply.lines[-2] == "ENDBATCH"
    (record,) = s.stats()["requests"]
    assert list(record["extra"].items()) == [("economy", "1"), ("tag", "a b&c"), ("empty", "")]  # blank ones too
    assert (record["apiver"], record["charged"]) == ("2.5", ["447788450450"])
    assert "Pw-s3cret-9" not in json.dumps(s.stats())


def test_stats_endpoint(sim) -> None:
    query(sim, apiver="2.4", msisdn="447788450450")
    reply = request(sim, "GET", "/_sim/stats")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert json.loads(reply.body) == sim.stats()
    assert json.loads(reply.body)["charged"] == ["447788450450"]


def test_stats_endpoint_is_not_a_query(sim) -> None:
    request(sim, "GET", "/_sim/stats")
    assert sim.stats()["requests"] == []


def test_reset_endpoint(sim) -> None:
    query(sim, apiver="2.4", msisdn="447788450450")
    reply = request(sim, "POST", "/_sim/reset")
    assert (reply.status, reply.text) == (200, "reset\n")
    stats = sim.stats()
    assert stats["requests"] == [] and stats["charged"] == [] and stats["max_concurrent"] == {}
    query(sim, apiver="2.4", msisdn="447810701702")
    assert sim.stats()["charged"] == ["447810701702"]


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_endpoint_sets_and_clears(make_sim, fault: str) -> None:
    s = make_sim(slow_delay=0.05, hang_seconds=0.5)
    reply = request(s, "POST", "/_sim/fault", {"mode": fault})
    assert (reply.status, reply.text) == (200, "fault set\n")
    assert s.fault == fault
    request(s, "POST", "/_sim/fault", {})
    assert s.fault is None
    assert query(s, apiver="2.4", msisdn="447788450450").lines[0] == "QUERYOK"


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        ("html", lambda r: r.status == 200 and r.text.startswith("<!DOCTYPE html>")),
        ("http500", lambda r: r.status == 500),
        ("empty", lambda r: r.status == 200 and r.body == b""),
        ("garbage", lambda r: r.status == 200 and not r.text.startswith("QUERYOK")),
        ("truncate", lambda r: r.status == 200 and "ENDBATCH" not in r.text),
    ],
)
def test_fault_endpoint_applies_to_every_number(sim, fault: str, check: Callable[[Reply], bool]) -> None:
    request(sim, "POST", "/_sim/fault", {"mode": fault})
    assert check(query(sim, apiver="2.4", msisdn="447788450450,447810701702"))


@pytest.mark.parametrize("fault", ["html", "http500", "empty", "garbage"])
def test_fault_endpoint_applies_to_refused_queries(sim, fault: str) -> None:
    """``--fault`` misbehaves on every query: a broken server is broken for a refusal too."""
    request(sim, "POST", "/_sim/fault", {"mode": fault})
    reply = query(sim, pw="wrong", apiver="2.4", msisdn="447788450450")
    assert reply.body != b"FAIL Invalid password\n"
    empty = query(sim, apiver="2.4", msisdn="")  # what "npl-agi check" sends
    assert empty.body != b"FAIL No numbers specified\n"


def test_fault_endpoint_rejects_an_unknown_mode(sim) -> None:
    reply = request(sim, "POST", "/_sim/fault", {"mode": "sometimes"})
    assert reply.status == 400
    assert sim.fault is None
    assert query(sim, apiver="2.4", msisdn="447788450450").lines[0] == "QUERYOK"


# -- concurrency bookkeeping --


def hold(sim: Simulator, user: str = "demo", pw: str = "demo") -> socket.socket:
    """A query the simulator keeps open (the hang fault) until the client closes it."""
    before = len(sim.stats()["requests"])
    sock = open_raw(sim, {"user": user, "pass": pw, "apiver": "2.4", "msisdn": fault_number("hang")})
    wait_for(lambda: len(sim.stats()["requests"]) > before)  # the handler has entered
    return sock


def test_max_concurrent_counts_overlapping_connections(sim) -> None:
    with hold(sim), hold(sim):
        assert sim.stats()["max_concurrent"] == {"demo": 2}


def test_max_concurrent_of_sequential_queries_is_one(sim) -> None:
    for _ in range(3):
        assert query(sim, apiver="2.4", msisdn="447788450450").lines[-2] == "ENDBATCH"
    assert sim.stats()["max_concurrent"] == {"demo": 1}


def test_max_concurrent_is_per_account(sim) -> None:
    with hold(sim, "demo", "demo"), hold(sim, "locked", "locked"):
        assert sim.stats()["max_concurrent"] == {"demo": 1, "locked": 1}


def test_max_concurrent_is_a_high_water_mark(sim) -> None:
    with hold(sim), hold(sim), hold(sim):
        pass
    wait_for(lambda: not sim.stats()["active"])  # the simulator has seen the three hang up
    assert query(sim, apiver="2.4", msisdn="447788450450").lines[-2] == "ENDBATCH"
    assert sim.stats()["max_concurrent"] == {"demo": 3}


def test_a_closed_connection_is_no_longer_counted(sim) -> None:
    with hold(sim):
        pass
    wait_for(lambda: sim.active.get("demo") == 0)
    with hold(sim):
        assert sim.stats()["max_concurrent"] == {"demo": 1}


def test_reset_during_a_query_keeps_its_answer(make_sim) -> None:
    s = make_sim(slow_delay=0.5)
    asked = [fault_number("slow"), "447788450450"]
    with open_raw(s, {"user": "demo", "pass": "demo", "apiver": "2.4", "msisdn": ",".join(asked)}) as sock:
        data = b""
        while b"QUERYOK\n" not in data:
            data += sock.recv(65536)
        assert request(s, "POST", "/_sim/reset").status == 200
        data += read_all(sock)
    body = data.partition(b"\r\n\r\n")[2].decode()
    assert body.endswith("\nENDBATCH\n"), body
    assert [line.split()[0] for line in body.split("\n")[1:3]] == asked


def test_reset_during_a_query_still_counts_overlap(sim) -> None:
    with hold(sim):
        assert request(sim, "POST", "/_sim/reset").status == 200
        with hold(sim):  # two connections of one account are open now
            assert sim.stats()["max_concurrent"] == {"demo": 2}


def test_request_delay_holds_back_the_whole_answer_then_sends_it(make_sim) -> None:
    s = make_sim(request_delay=1.0)
    form = {"user": "demo", "pass": "demo", "apiver": "2.4", "msisdn": "447788450450"}
    with open_raw(s, form) as sock:
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(65536)  # not even the status line yet
        sock.settimeout(WAIT)
        data = read_all(sock)
    assert b"QUERYOK\n447788450450 23415," in data and data.endswith(b"ENDBATCH\n")
