"""The API client against the simulator, a real HTTP server on 127.0.0.1."""

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from npl_agi.backends.locks import FileLock
from npl_agi.config import ApiConfig
from npl_agi.core.codes import TIMEOUT, TRUNCATED
from npl_agi.core.errors import (
    AuthError,
    ConfigError,
    CreditError,
    LockedError,
    LookupTimeout,
    ProtocolError,
    RequestRejected,
    Unreachable,
)
from npl_agi.doubles.simulator import Account, Simulator
from npl_agi.transports import sync as client_module
from npl_agi.transports.sync import Client

UK = ["447788450450", "447810701702", "447973100100"]
SECRET = "s3cr3t Pa55&word"


def client_for(url, tmp_path, **api):
    values = {"url": url, "user": "demo", "password": "demo", "lock_dir": str(tmp_path), **api}
    api = ApiConfig(**values)
    return Client(api, FileLock.for_account(api.lock_dir, api.url, api.user))


def test_answers_in_the_2_4_form(sim, tmp_path):
    got = client_for(sim.url, tmp_path).lookup(UK)
    assert got["447788450450"].mccmnc == "23415"
    assert got["447788450450"].msc and got["447788450450"].imsi.startswith("23415")
    assert got["447973100100"].error == "ERR1"
    assert sim.stats()["requests"][0]["apiver"] == "2.4"


@pytest.mark.parametrize("apiver", ["", "2.3"])
def test_legacy_answers_parsed(sim, tmp_path, apiver):
    got = client_for(sim.url, tmp_path, apiver=apiver).lookup(UK)
    assert got["447788450450"].mccmnc == "23415"
    assert got["447788450450"].msc == got["447788450450"].imsi == ""
    assert got["447973100100"].error == "ERR1"


def test_wrong_password(sim, tmp_path):
    with pytest.raises(AuthError, match="Invalid password"):
        client_for(sim.url, tmp_path, password="nope").lookup(UK)


def test_no_credit(sim, tmp_path):
    with pytest.raises(CreditError, match="Insufficient credit"):
        client_for(sim.url, tmp_path, user="nocredit", password="nocredit").lookup(UK)


def test_locked_account(sim, tmp_path):
    with pytest.raises(LockedError, match="ACCOUNT LOCKED"):
        client_for(sim.url, tmp_path, user="locked", password="locked").lookup(UK)


def test_request_too_long_when_the_service_takes_fewer_numbers(tmp_path):
    with Simulator(max_numbers=2) as small:
        with pytest.raises(RequestRejected, match="Request too long"):
            client_for(small.url, tmp_path).lookup(UK)
        got = client_for(small.url, tmp_path, batch_size=2).lookup(UK)
        assert [len(r["numbers"]) for r in small.stats()["requests"][1:]] == [2, 1]
        assert got["447973100100"].error == "ERR1"


def test_check_spends_no_credit(sim, tmp_path):
    assert client_for(sim.url, tmp_path).check() == "FAIL No numbers specified"
    with pytest.raises(AuthError):
        client_for(sim.url, tmp_path, password="nope").check()
    assert sim.stats()["charged"] == []


def test_more_than_1000_numbers_split_in_order(sim, tmp_path):
    numbers = [f"4474001{i:05d}" for i in range(2500)]
    got = client_for(sim.url, tmp_path).lookup(numbers, timeout=30)
    sizes = [len(r["numbers"]) for r in sim.stats()["requests"]]
    assert sizes == [1000, 1000, 500]
    assert [n for r in sim.stats()["requests"] for n in r["numbers"]] == numbers
    assert list(got) == numbers
    assert all(a.ok for a in got.values())


def test_duplicates_asked_once(sim, tmp_path):
    got = client_for(sim.url, tmp_path).lookup(["447788450450", "447788450450", "447973100100", "447788450450"])
    assert sim.stats()["charged"] == ["447788450450", "447973100100"]
    assert got["447788450450"].mccmnc == "23415"


def test_truncated_body_keeps_what_arrived(sim, tmp_path):
    numbers = ["447400999903", "447788450450", "447810701702", "447973100100"]
    got = client_for(sim.url, tmp_path).lookup(numbers)
    assert got["447400999903"].ok and got["447788450450"].ok
    assert got["447810701702"].error == TRUNCATED and got["447973100100"].error == TRUNCATED


@pytest.mark.parametrize(
    ("number", "message"),
    [
        ("447400999904", "unexpected first line"),
        ("447400999905", "HTTP 500"),
        ("447400999906", "HTML"),
        ("447400999907", "empty"),
    ],
)
def test_bad_answers_are_protocol_errors(sim, tmp_path, number, message):
    with pytest.raises(ProtocolError, match=message):
        client_for(sim.url, tmp_path).lookup([number])


def test_hanging_server_hits_the_deadline(sim, tmp_path):
    started = time.monotonic()
    with pytest.raises(LookupTimeout):
        client_for(sim.url, tmp_path).lookup(["447400999902"], timeout=1.0)
    assert time.monotonic() - started < 1.0 + 0.5


def test_slow_lines_keep_answers_that_arrived_before_the_deadline(tmp_path):
    with Simulator(line_delay=0.4) as slow:
        started = time.monotonic()
        got = client_for(slow.url, tmp_path).lookup([f"4474001{i:05d}" for i in range(10)], timeout=1.0)
        elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 0.5
    errors = [a.error for a in got.values()]
    assert errors[:2] == ["", ""] and errors[-1] == TIMEOUT


class _StarvedWatchdog(client_module._Watchdog):
    """A watchdog whose timer never runs in time, as on a machine too busy to schedule its thread:
    the socket's own read timeout is the first to notice the deadline."""

    def __enter__(self):
        client_module._local.watchdog = self
        return self


@pytest.mark.parametrize("watchdog", ["on time", "starved"])
def test_a_read_cut_by_our_deadline_is_a_timeout_whichever_timer_noticed(tmp_path, monkeypatch, watchdog):
    if watchdog == "starved":
        monkeypatch.setattr(client_module, "_Watchdog", _StarvedWatchdog)
    with Simulator(line_delay=0.4) as slow:
        got = client_for(slow.url, tmp_path).lookup([f"4474001{i:05d}" for i in range(10)], timeout=1.0)
    errors = [a.error for a in got.values()]
    assert errors[0] == "" and errors[-1] == TIMEOUT
    assert TRUNCATED not in errors


@pytest.mark.parametrize("watchdog", ["on time", "starved"])
def test_a_stall_after_the_first_line_is_a_timeout_whichever_timer_noticed(tmp_path, monkeypatch, watchdog):
    if watchdog == "starved":
        monkeypatch.setattr(client_module, "_Watchdog", _StarvedWatchdog)
    with Simulator(slow_delay=5.0) as slow:  # QUERYOK, then nothing for 5 s
        got = client_for(slow.url, tmp_path).lookup(["447400999901", "447788450450"], timeout=1.0)
    assert {a.error for a in got.values()} == {TIMEOUT}


@pytest.mark.parametrize("watchdog", ["on time", "starved"])
def test_no_line_by_our_deadline_is_a_timeout_whichever_timer_noticed(sim, tmp_path, monkeypatch, watchdog):
    if watchdog == "starved":
        monkeypatch.setattr(client_module, "_Watchdog", _StarvedWatchdog)
    with pytest.raises(LookupTimeout):
        client_for(sim.url, tmp_path).lookup(["447400999902"], timeout=1.0)


class Drip(BaseHTTPRequestHandler):
    """Sends its answer a byte at a time, each byte well before a per-read timeout would fire."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()
        try:
            self.wfile.write(self.server.at_once)
            for ch in self.server.dripped:
                self.wfile.write(bytes([ch]))
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("at_once", "dripped", "outcome"),
    [
        (b"QUERYOK\n", b"447788450450 23415\n" * 3, TIMEOUT),  # numbers left without a line
        (b"", b"QUERYOK\n447788450450 23415\n", LookupTimeout),  # not even the first line
    ],
)
def test_a_server_dripping_bytes_cannot_stretch_the_deadline(tmp_path, at_once, dripped, outcome):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.at_once, server.dripped = at_once, dripped
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = client_for(f"http://127.0.0.1:{server.server_address[1]}/npl", tmp_path)
    try:
        started = time.monotonic()
        if outcome is LookupTimeout:
            with pytest.raises(LookupTimeout):
                client.lookup(UK, timeout=1.0)
        else:
            assert {a.error for a in client.lookup(UK, timeout=1.0).values()} == {outcome}
        assert time.monotonic() - started < 1.0 + 0.5
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    with pytest.raises(Unreachable, match="cannot connect"):
        client_for(f"http://127.0.0.1:{port}/npl", tmp_path).lookup(UK)


def test_waiting_for_the_account_lock_counts_against_the_deadline(sim, tmp_path):
    api = ApiConfig(url=sim.url, user="demo", password="demo", lock_dir=str(tmp_path))
    holder = FileLock.for_account(api.lock_dir, api.url, api.user)
    holder.acquire(time.monotonic() + 1)
    try:
        started = time.monotonic()
        with pytest.raises(LookupTimeout, match="account lock"):
            Client(api, FileLock.for_account(api.lock_dir, api.url, api.user)).lookup(UK, timeout=0.5)
        assert time.monotonic() - started < 0.5 + 0.5
    finally:
        holder.release()
    assert sim.stats()["requests"] == []


LOOKUP_IN_CHILD = """
import sys
from npl_agi.backends.locks import FileLock
from npl_agi.transports.sync import Client
from npl_agi.config import ApiConfig
api = ApiConfig(url=sys.argv[1], user="demo", password="demo", lock_dir=sys.argv[2])
client = Client(api, FileLock.for_account(api.lock_dir, api.url, api.user))
got = client.lookup([f"4474002{int(sys.argv[3]):02d}{i:03d}" for i in range(3)], timeout=60)
assert all(a.ok for a in got.values()), got
"""


def test_twenty_processes_never_open_two_connections(tmp_path, subprocess_env):
    with Simulator(line_delay=0.01) as sim:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", LOOKUP_IN_CHILD, sim.url, str(tmp_path), str(i)], env=subprocess_env
            )
            for i in range(20)
        ]
        assert [p.wait(timeout=120) for p in procs] == [0] * 20
        stats = sim.stats()
    assert len(stats["requests"]) == 20
    assert stats["max_concurrent"] == {"demo": 1}


def test_without_the_lock_the_simulator_would_see_overlap(tmp_path, subprocess_env):
    """Control for the test above: separate lock dirs let connections overlap, and it shows."""
    with Simulator(line_delay=0.05) as sim:
        procs = []
        for i in range(6):
            lock_dir = tmp_path / str(i)
            lock_dir.mkdir()
            cmd = [sys.executable, "-c", LOOKUP_IN_CHILD, sim.url, str(lock_dir), str(i)]
            procs.append(subprocess.Popen(cmd, env=subprocess_env))
        assert [p.wait(timeout=60) for p in procs] == [0] * 6
        assert sim.stats()["max_concurrent"]["demo"] > 1


class Echo(BaseHTTPRequestHandler):
    """A broken server that echoes the request body back as its answer."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body + b"\n")

    def log_message(self, *args):
        pass


def test_password_never_in_errors_logs_or_repr(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    accounts = {"demo": Account(SECRET)}
    raised = []
    try:
        with Simulator(accounts=accounts) as sim:
            for url, number, password in [
                (sim.url, "447400999902", SECRET),  # timeout
                (sim.url, "447400999905", SECRET),  # HTTP 500
                (sim.url, "447788450450", SECRET + "x"),  # wrong password
                (f"http://127.0.0.1:{server.server_address[1]}/npl", "447788450450", SECRET),  # echoed
                ("http://127.0.0.1:9/npl", "447788450450", SECRET),  # unreachable
            ]:
                client = client_for(url, tmp_path, password=password)
                assert SECRET not in repr(client) and SECRET not in repr(client.api)
                with pytest.raises(Exception) as info:
                    client.lookup([number], timeout=0.5)
                raised.append(info.value)
    finally:
        server.shutdown()
        server.server_close()
    assert any("pass=" in str(e) for e in raised), "the echo server's answer should be quoted"
    for e in raised:
        text = f"{e} {e!r} {e.__cause__!r} {e.__context__!r}"
        assert "s3cr3t" not in text
    assert "s3cr3t" not in caplog.text


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def test_https_certificates_are_checked_by_default(tmp_path, certificate):
    with Simulator(tls=certificate) as secure:
        assert secure.url.startswith("https://")
        with pytest.raises(Unreachable, match="TLS"):
            client_for(secure.url, tmp_path).lookup(UK)
        assert secure.stats()["requests"] == []
        got = client_for(secure.url, tmp_path, ca_file=certificate[0]).lookup(UK)
        assert got["447788450450"].mccmnc == "23415"


def test_scrubbing_the_password_does_not_mangle_our_own_words(sim, tmp_path):
    """The locked account's password is 'locked': only the server's text is scrubbed."""
    with pytest.raises(LockedError) as info:
        client_for(sim.url, tmp_path, user="locked", password="locked").lookup(UK)
    assert str(info.value).startswith("account locked: ")


def test_a_lock_dir_that_cannot_be_used_is_a_config_error(sim, tmp_path):
    with pytest.raises(ConfigError, match="lock_dir"):
        client_for(sim.url, tmp_path, lock_dir=str(tmp_path / "missing")).lookup(UK)
    assert sim.stats()["requests"] == []


def test_the_lock_file_is_shared_whatever_the_umask(sim, tmp_path):
    old = os.umask(0o077)
    try:
        client_for(sim.url, tmp_path).lookup(UK)
    finally:
        os.umask(old)
    (lock,) = tmp_path.glob("npl-agi-*.lock")
    assert lock.stat().st_mode & 0o777 == 0o666
