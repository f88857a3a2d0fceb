"""Both clients, one truth: every hostile answer and every simulator fault, through ``Client``
(requests) and ``AsyncClient`` (httpx), ends in the same ``NPL_ERR``, the same answers kept and
the same message."""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import parse_qsl

import hostile_server as hostile
import pytest
from conftest import write_config

from npl_agi.backends.locks import FileLock
from npl_agi.config import ApiConfig, load_config
from npl_agi.core import protocol
from npl_agi.core.codes import TIMEOUT, TRUNCATED
from npl_agi.core.errors import NplError, npl_err
from npl_agi.doubles.simulator import FAULTS, Account, Simulator
from npl_agi.transports.aio import AsyncClient
from npl_agi.transports.sync import Client

NUMBERS = ["447788450450", "447810701702", "447973100100"]
DEADLINE = 1.5  # seconds: room for a loaded machine; the hanging cases wait for it once each


def outcome(got: dict[str, protocol.Answer] | NplError) -> tuple:
    """What a caller sees: the error and its message, or every answer with its reason."""
    if isinstance(got, NplError):
        return ("raised", npl_err(got), str(got))
    return ("answered", {m: (a.mccmnc, a.msc, a.imsi, a.error, a.error_name) for m, a in sorted(got.items())})


def api_for(url: str, tmp_path, user: str, password: str) -> ApiConfig:
    return ApiConfig(url=url, user=user, password=password, lock_dir=str(tmp_path), timeout=DEADLINE)


def ask_sync(api: ApiConfig, numbers: list[str]) -> tuple:
    try:
        return outcome(
            Client(api, FileLock.for_account(api.lock_dir, api.url, api.user)).request(
                numbers, time.monotonic() + DEADLINE
            )
        )
    except NplError as e:
        return outcome(e)


def ask_async(api: ApiConfig, numbers: list[str]) -> tuple:
    """As the broker asks: one reader, the exchange, the reader's verdict."""

    async def ask() -> dict[str, protocol.Answer]:
        client = AsyncClient(api, FileLock.for_account(api.lock_dir, api.url, api.user))
        try:
            deadline = time.monotonic() + DEADLINE
            reader = protocol.AnswerReader(numbers, api.password)
            cut = await client.stream(numbers, deadline - api.request_floor, deadline, reader, None)
            return reader.finish(TIMEOUT if cut else TRUNCATED)
        finally:
            await client.aclose()

    try:
        return outcome(asyncio.run(ask()))
    except NplError as e:
        return outcome(e)


def both(api: ApiConfig, numbers: list[str]) -> tuple:
    sync, asynchronous = ask_sync(api, numbers), ask_async(api, numbers)
    assert sync == asynchronous
    return sync


# Passwords that collide with the data: masking must touch messages only, never an answer.
PASSWORDS = ["123", "QUERYOK", NUMBERS[0], "23415"]
BEHAVIOURS = ["reset_mid_body", "short_body", "bad_chunk", "one_bad_line", "echo_in_reason", "echo_in_body"]


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("behaviour", [*BEHAVIOURS, "echo_numbers"])
def test_every_hostile_answer_is_read_alike_by_both_clients(tmp_path, behaviour, password):
    with hostile.HostileServer(getattr(hostile, behaviour)) as server:
        got = both(api_for(server.url, tmp_path, "bob", password), NUMBERS)
    if got[0] == "raised":
        assert password not in got[2].replace("***", "") or behaviour == "echo_numbers"
    else:  # answers are data: a password that equals a value never masks it
        kept = [m for m, a in got[1].items() if a[0]]
        assert NUMBERS[0] in kept


@pytest.mark.parametrize("password", ["123", "QUERYOK"])
@pytest.mark.parametrize("fault", FAULTS)
def test_every_simulator_fault_is_read_alike_by_both_clients(tmp_path, fault, password):
    accounts = {"bob": Account(password)}
    with Simulator("127.0.0.1", 0, accounts=accounts, fault=fault, slow_delay=DEADLINE / 3, hang_seconds=10) as sim:
        both(api_for(sim.url, tmp_path, "bob", password), NUMBERS)


@pytest.mark.parametrize("password", ["123", "QUERYOK", "nope"])
def test_the_account_s_answers_and_refusals_are_read_alike_by_both_clients(tmp_path, password):
    accounts = {"bob": Account("123"), "poor": Account("123", credit=0), "locked": Account("123", locked=True)}
    with Simulator("127.0.0.1", 0, accounts=accounts) as sim:
        for user in accounts:
            both(api_for(sim.url, tmp_path, user, password), NUMBERS)


def short_echo_in_reason(sock, form) -> None:
    """An error whose short reason phrase echoes the password (shown whole, unlike the padded one)."""
    sock.sendall(hostile.head("503 Busy pass=" + form.get("pass", ""), "Content-Length: 0", "Connection: close"))


def test_an_error_reason_echoing_the_password_is_masked_by_both_clients(tmp_path):
    with hostile.HostileServer(short_echo_in_reason) as server:
        got = both(api_for(server.url, tmp_path, "bob", "123"), NUMBERS)
    assert got == ("raised", "PROTOCOL", "the service answered HTTP 503 Busy pass=***")


def test_nobody_listening_is_read_alike_by_both_clients(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/npl"
    got = both(api_for(url, tmp_path, "bob", "123"), NUMBERS)
    assert got[1] == "UNREACHABLE"


# -- [api] extra_form: the same fields from both clients, beside the account's own --

EXTRA_FORM = "economy=1 & tag=a%20b%26c+d"
EXTRA_SENT = [("economy", "1"), ("tag", "a b&c+d")]
# Passwords that look like form data: each must reach the service exactly as written.
FORM_LIKE_PASSWORDS = ["123", "economy=1", "economy=1&apiver=2.3", "x&msisdn=447400000001", "%65conomy=1", "a+b c ;#"]


def api_from_file(tmp_path, url: str, user: str, password: str, **api: str) -> ApiConfig:
    """The [api] section as the doors read it, from a configuration file."""
    path = write_config(tmp_path / "npl-agi.conf", url, user=user, password=password, api={"timeout": DEADLINE, **api})
    return load_config(str(path)).api


@pytest.mark.parametrize("password", FORM_LIKE_PASSWORDS)
def test_both_clients_send_extra_form_beside_the_account_s_own_fields(tmp_path, password):
    with Simulator("127.0.0.1", 0, accounts={"bob": Account(password)}) as sim:
        api = api_from_file(tmp_path, sim.url, "bob", password, apiver="2.5", extra_form=EXTRA_FORM)
        assert (api.password, api.extra_form) == (password, tuple(EXTRA_SENT))
        got = both(api, NUMBERS)
        records = sim.stats()["requests"]
    assert got[0] == "answered"
    assert {m: a[3] for m, a in got[1].items()} == {NUMBERS[0]: "", NUMBERS[1]: "", NUMBERS[2]: "ERR1"}
    # Charged: the simulator took the password as the account's, so it arrived unchanged.
    sent = {"user": "bob", "apiver": "2.5", "method": "POST", "numbers": NUMBERS, "charged": NUMBERS}
    assert records == [{**sent, "extra": dict(EXTRA_SENT)}] * 2  # the sync client, then the async one


def test_a_query_without_extra_form_sends_the_four_fields_only(tmp_path):
    with Simulator("127.0.0.1", 0, accounts={"bob": Account("123")}) as sim:
        both(api_from_file(tmp_path, sim.url, "bob", "123"), NUMBERS)
        assert [r["extra"] for r in sim.stats()["requests"]] == [{}, {}]


def whole_answer(sock, form) -> None:
    body = b"QUERYOK\n" + b"".join(hostile.answer_lines(form)) + b"ENDBATCH\n"
    sock.sendall(hostile.head("200 OK", f"Content-Length: {len(body)}", "Connection: close") + body)


@pytest.mark.parametrize("password", ["economy=1", "a+b c ;#"])
def test_both_clients_post_one_encoded_body_and_put_nothing_in_the_url(tmp_path, password):
    """On the wire: the request line holds the path alone; the body, encoded by the HTTP
    library, decodes to the four fields then the extra ones, each once, in order."""
    with hostile.HostileServer(whole_answer) as server:
        both(api_from_file(tmp_path, server.url, "bob", password, extra_form=EXTRA_FORM), NUMBERS)
        raw = list(server.raw)
    assert len(raw) == 2
    for head, body in raw:
        assert head.split(b"\r\n")[0] == b"POST /npl HTTP/1.1"
        assert b"application/x-www-form-urlencoded" in head.lower()
        assert parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True) == [
            ("user", "bob"),
            ("pass", password),
            ("apiver", "2.4"),
            ("msisdn", ",".join(NUMBERS)),
            *EXTRA_SENT,
        ]
        assert b"economy" not in head and password.encode() not in head
