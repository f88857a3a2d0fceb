"""A hostile HTTP server on 127.0.0.1: answers the way broken servers and middleboxes do.

Each behaviour is a function that gets the client's socket and the decoded form of its query,
and writes whatever bytes it likes (or resets the connection). It speaks raw TCP, so it can
break HTTP in ways a well-behaved server library never would.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs, quote_plus

from npl_agi.doubles.simulator import simulated_answer

Behaviour = Callable[[socket.socket, dict[str, str]], None]


def answer_lines(form: dict[str, str]) -> list[bytes]:
    """The simulator's lines for the numbers asked, so good lines look exactly like the real ones."""
    numbers = [n for n in form.get("msisdn", "").split(",") if n]
    return [simulated_answer(n, "2.4").encode() + b"\n" for n in numbers]


def head(status: str = "200 OK", *headers: str) -> bytes:
    return ("HTTP/1.1 " + status + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def reset_mid_body(sock, form) -> None:
    """The status line and the first number's line, then a reset."""
    body = b"QUERYOK\n" + answer_lines(form)[0]
    sock.sendall(head("200 OK", "Content-Length: 4000") + body)
    time.sleep(0.05)
    reset(sock)


def short_body(sock, form) -> None:
    """Fewer bytes than ``Content-Length`` promised, then a clean close."""
    body = b"QUERYOK\n" + answer_lines(form)[0]
    sock.sendall(head("200 OK", f"Content-Length: {len(body) + 500}") + body)


def bad_chunk(sock, form) -> None:
    """A good chunk with the first line, then a chunk size that is not hexadecimal."""
    body = b"QUERYOK\n" + answer_lines(form)[0]
    sock.sendall(head("200 OK", "Transfer-Encoding: chunked") + b"%x\r\n%s\r\nzz-not-a-size\r\n" % (len(body), body))


def one_bad_line(sock, form) -> None:
    """Every number answered, but the second line (the only one, if only one) is malformed."""
    lines = answer_lines(form)
    bad = min(1, len(lines) - 1)
    lines[bad] = lines[bad].split(b" ")[0] + b" 2341X,,\n"
    body = b"QUERYOK\n" + b"".join(lines) + b"ENDBATCH\n"
    sock.sendall(head("200 OK", f"Content-Length: {len(body)}", "Connection: close") + body)


def echo_in_reason(sock, form) -> None:
    """An error whose reason phrase echoes the query back, password and all, padded past 80."""
    reason = "Bad " + "x" * 70 + " pass=" + form.get("pass", "") + " user=" + form.get("user", "")
    sock.sendall(head("503 " + reason, "Content-Length: 0", "Connection: close"))


def echo_in_body(sock, form) -> None:
    """A status line that quotes the password back, raw and URL-encoded."""
    secret = form.get("pass", "")
    body = ("FAIL bad query pass=" + secret + " &pass=" + quote_plus(secret) + "\n").encode()
    sock.sendall(head("200 OK", f"Content-Length: {len(body)}", "Connection: close") + body)


def echo_numbers(sock, form) -> None:
    """A status line that quotes the query's numbers back (every caller's in the batch)."""
    body = ("FAIL bad query msisdn=" + form.get("msisdn", "") + "\n").encode()
    sock.sendall(head("200 OK", f"Content-Length: {len(body)}", "Connection: close") + body)


def quotes_others(sock, form) -> None:
    """A status line that quotes the query and two numbers no caller of this PBX dialled (7 and
    8 digits), as a service quoting another account's batch would."""
    body = ("FAIL bad query msisdn=" + form.get("msisdn", "") + " near 6907290,50051234\n").encode()
    sock.sendall(head("200 OK", f"Content-Length: {len(body)}", "Connection: close") + body)


class HostileServer:
    """Serves one behaviour to every query until stopped; records the forms it was sent, and
    each request as it came (its head and its body), to see what went where."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.forms: list[dict[str, str]] = []
        self.raw: list[tuple[bytes, bytes]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/npl"

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            headers, _, body = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in headers.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            while len(body) < length:
                body += conn.recv(65536)
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            self.forms.append(form)
            self.raw.append((headers, body))
            self.behaviour(conn, form)
        except OSError:
            pass
        finally:
            conn.close()
