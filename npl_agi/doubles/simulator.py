"""A real HTTP server that speaks the lookup contract, for tests, the demo and admins.

It keeps accounts with credit, answers in the 2.4 or legacy form, gives documented test
numbers their per-number errors, and can misbehave on demand (slow lines, a hang, a cut-short
or garbage body, HTTP 500, an HTML page). It records every query (with the fields it does not
know, which it otherwise ignores) and the highest number of concurrent connections per account,
so tests can prove what was sent and charged and that a client never opened a second connection.
"""

from __future__ import annotations

import json
import select
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from npl_agi.core import protocol

API_PATH = "/npl"
FAULTS = ("slow", "hang", "truncate", "garbage", "http500", "html", "empty")
# A number ending in 0000<code> answers ERR<code>; one ending in 9999<nn> triggers FAULTS[nn-1].
ERROR_SUFFIX, FAULT_SUFFIX = "0000", "9999"
SIMULATED_ERRORS = (1, 11, 13, 21, 29, 36, 77)

# Home networks by country calling code: a number gets one of them, chosen by its digits.
HOME_NETWORKS = {
    "44": ("23415", "23410", "23430", "23420"),
    "1": ("310260", "310410", "311480"),
    "49": ("26201", "26202", "26203"),
    "33": ("20801", "20810", "20820", "20815"),
}
# Numbers the simulator reports on a network other than the one its digits would pick.
PORTED = {
    "447788450450": "23415",
    "447810701702": "23415",
    "447700900123": "23420",
}
UNKNOWN_SUBSCRIBER = "447973100100"  # the spec's example of ERR1


@dataclass
class Account:
    password: str
    credit: int | None = None  # None: unlimited
    locked: bool = False


def default_accounts() -> dict[str, Account]:
    return {
        "demo": Account("demo"),
        "nocredit": Account("nocredit", credit=0),
        "locked": Account("locked", locked=True),
    }


def simulated_answer(msisdn: str, apiver: str) -> str:
    """The line the simulator sends for one number (deterministic, so tests can expect it)."""
    tail = msisdn[-6:]
    if msisdn == UNKNOWN_SUBSCRIBER:
        return protocol.format_error(msisdn, 1)
    if tail.startswith(ERROR_SUFFIX) and tail[4:].isdigit() and int(tail[4:]) in SIMULATED_ERRORS:
        return protocol.format_error(msisdn, int(tail[4:]))
    cc = next((cc for cc in HOME_NETWORKS if msisdn.startswith(cc)), "")
    if not cc:
        return protocol.format_error(msisdn, 1)
    seed = zlib.crc32(msisdn.encode())
    mccmnc = PORTED.get(msisdn) or HOME_NETWORKS[cc][seed % len(HOME_NETWORKS[cc])]
    msc = f"{cc}7{seed % 10**9:09d}"[:12]
    imsi = f"{mccmnc}{seed:010d}"[:15]
    return protocol.format_answer(msisdn, mccmnc, msc, imsi, apiver=apiver)


def fault_for(msisdns: list[str]) -> str | None:
    for n in msisdns:
        tail = n[-6:]
        if tail.startswith(FAULT_SUFFIX) and tail[4:].isdigit() and 1 <= int(tail[4:]) <= len(FAULTS):
            return FAULTS[int(tail[4:]) - 1]
    return None


class Simulator:
    """The simulated service on a loopback port. ``start()`` runs it in a background thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        accounts: dict[str, Account] | None = None,
        max_numbers: int = protocol.MAX_NUMBERS,
        line_delay: float = 0.0,
        request_delay: float = 0.0,
        slow_delay: float = 3.0,
        hang_seconds: float = 30.0,
        fault: str | None = None,
        tls: tuple[str, str] | None = None,
    ) -> None:
        self.accounts = accounts if accounts is not None else default_accounts()
        self.max_numbers = max_numbers
        self.line_delay = line_delay
        self.request_delay = request_delay
        self.slow_delay = slow_delay
        self.hang_seconds = hang_seconds
        self.fault = fault
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self.reset()
        self.server = ThreadingHTTPServer((host, port), _Handler)
        self.server.daemon_threads = True
        self.server.simulator = self  # type: ignore[attr-defined]
        self.scheme = "http"
        if tls:  # (certificate file, key file), PEM
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{port}{API_PATH}"

    def reset(self) -> None:
        """Forget the recorded queries and peaks (credit is kept); open queries still count."""
        with self._mutex:
            self.requests: list[dict] = []
            self.active: dict[str, int] = {u: n for u, n in getattr(self, "active", {}).items() if n > 0}
            self.max_concurrent: dict[str, int] = dict(self.active)

    def stats(self) -> dict:
        with self._mutex:
            return {
                "requests": list(self.requests),
                "max_concurrent": dict(self.max_concurrent),
                "active": {u: n for u, n in self.active.items() if n},  # connections open now
                "credit": {u: a.credit for u, a in self.accounts.items()},
                "charged": [n for r in self.requests for n in r["charged"]],
            }

    def start(self) -> Simulator:
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name="npl-simulator", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def stop(self) -> None:
        self.interrupt()
        self.server.server_close()

    def interrupt(self) -> None:
        """End ``serve_forever`` and every held answer; from another thread than the serving one."""
        self._stop.set()
        self.server.shutdown()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- bookkeeping called by the handler --
    def _enter(self, user: str) -> None:
        with self._mutex:
            self.active[user] = self.active.get(user, 0) + 1
            self.max_concurrent[user] = max(self.max_concurrent.get(user, 0), self.active[user])

    def _leave(self, user: str) -> None:
        with self._mutex:
            self.active[user] -= 1

    def _answer(self, form: dict[str, str], method: str) -> tuple[str, list[str], str | None]:
        """Decide the status line, the number lines and the fault its numbers trigger."""
        user, apiver = form.get("user", ""), form.get("apiver", "")
        msisdns = [n.strip() for n in form.get("msisdn", "").split(",") if n.strip()]
        extra = {k: v for k, v in form.items() if k not in protocol.OWN_FIELDS}  # e.g. a v2.5 economy=1
        record = {"user": user, "apiver": apiver, "method": method, "numbers": msisdns, "extra": extra, "charged": []}
        with self._mutex:
            self.requests.append(record)
            account = self.accounts.get(user)
            if account is None or account.password != form.get("pass"):
                return protocol.FAIL_PASSWORD, [], None
            if account.locked:
                return protocol.ACCOUNT_LOCKED, [], None
            # An account with no credit at all is refused before its numbers are looked at,
            # so even an empty query (npl-agi check) learns it.
            if account.credit == 0:
                return protocol.FAIL_CREDIT, [], None
            if not msisdns:
                return protocol.FAIL_NO_NUMBERS, [], None
            if len(msisdns) > self.max_numbers:
                return protocol.FAIL_TOO_LONG, [], None
            if account.credit is not None:
                if account.credit < len(msisdns):
                    return protocol.FAIL_CREDIT, [], None
                account.credit -= len(msisdns)
            record["charged"] = msisdns
        lines = [simulated_answer(n, apiver) for n in msisdns]
        return protocol.QUERYOK, lines, fault_for(msisdns)


class _Handler(BaseHTTPRequestHandler):
    server_version = "npl-simulator"
    sys_version = ""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet; stats() records queries
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/_sim/stats":
            return self._send(200, json.dumps(self.server.simulator.stats()), "application/json")
        self._query(parse_qs(url.query, keep_blank_values=True), url.path, "GET")  # "economy=" is sent too

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 1 << 20)).decode("utf-8", "replace")
        if url.path == "/_sim/reset":
            self.server.simulator.reset()
            return self._send(200, "reset\n")
        if url.path == "/_sim/fault":
            mode = parse_qs(body).get("mode", [None])[0]
            if mode not in (None, "none", *FAULTS):
                return self._send(400, f"unknown fault; one of: none, {', '.join(FAULTS)}\n")
            self.server.simulator.fault = None if mode in (None, "none") else mode
            return self._send(200, "fault set\n")
        self._query(parse_qs(body, keep_blank_values=True), url.path, "POST")

    def _query(self, params: dict[str, list[str]], path: str, method: str) -> None:
        if path != API_PATH:
            return self._send(404, "<html><body><h1>404 Not Found</h1></body></html>\n", "text/html")
        sim = self.server.simulator
        form = {k: v[0] for k, v in params.items()}
        user = form.get("user", "")
        sim._enter(user)
        entered = True
        try:
            status, lines, fault = sim._answer(form, method)
            fault = sim.fault or fault  # a fault set for every query also spoils refusals
            if fault == "hang":
                self._pause(sim.hang_seconds)
                return
            if fault == "http500":
                return self._send(500, "<html><body><h1>500 Internal Server Error</h1></body></html>\n", "text/html")
            if fault == "html":
                return self._send(200, "<!DOCTYPE html>\n<html><head><title>Login</title></head></html>\n", "text/html")
            if fault == "empty":
                return self._send(200, "")
            if fault == "garbage":
                return self._send(200, "\x00\x1b[31mZ#@!% not a lookup answer\nQUERY?\n")
            # Set-up cost of a query (connection, TLS, SS7 dialogue) before any answer.
            if sim.request_delay and not self._pause(sim.request_delay):
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self._write(status + "\n")
            if status != protocol.QUERYOK:
                return
            if fault == "truncate":
                half = lines[: len(lines) // 2]
                self._write("".join(line + "\n" for line in half) + (lines[len(half)][:7] if lines else ""))
                return
            delay = sim.slow_delay if fault == "slow" else sim.line_delay
            for line in lines:
                if delay and not self._pause(delay):
                    return
                self._write(line + "\n")
            sim._leave(user)  # before the last line: the client may reconnect as soon as it has it
            entered = False
            self._write(protocol.ENDBATCH + "\n")
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up (its deadline); nothing to answer
        finally:
            if entered:
                sim._leave(user)

    def _pause(self, seconds: float) -> bool:
        """Wait, unless the client hangs up first (then it no longer holds a connection)."""
        end = time.monotonic() + seconds
        sim = self.server.simulator
        while (left := end - time.monotonic()) > 0 and not sim._stop.is_set():
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable and not self.connection.recv(4096):  # extra bytes are read and dropped
                return False
        return not sim._stop.is_set()

    def _write(self, text: str) -> None:
        self.wfile.write(text.encode())
        self.wfile.flush()

    def _send(self, code: int, body: str, ctype: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
