"""A real ``redis-server`` for the tests: its own process, on 127.0.0.1, a free port, a temp dir.

No system service is used or touched. The executable is ``$NPL_REDIS_SERVER`` if set, else
``redis-server`` on ``PATH`` (or in ``/usr/bin``, ``/usr/sbin``, ``/usr/local/bin``). Without
it the Redis tests fail with one line saying what to install: a skipped Redis test would let
the cluster backend go unproven. Test modules load the fixtures with
``pytest_plugins = ("redis_fixture",)``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

ENV_VAR = "NPL_REDIS_SERVER"
_FALLBACK_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin")
START_TIMEOUT = 10.0


def find_redis_server() -> str:
    """Path of the ``redis-server`` executable, or a failure naming what to install."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        pytest.fail(f"${ENV_VAR}={explicit} is not an executable redis-server", pytrace=False)
    found = shutil.which("redis-server") or shutil.which("redis-server", path=os.pathsep.join(_FALLBACK_DIRS))
    if not found:
        pytest.fail(
            f"redis-server not found (apt-get install redis-server, or set ${ENV_VAR}); the Redis tests need it",
            pytrace=False,
        )
    return found


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process, without persistence, that the test can stop or kill."""

    def __init__(self, workdir: Path, password: str = "") -> None:
        self.workdir = workdir
        self.password = password
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password or None, socket_timeout=2, decode_responses=True
        )

    def start(self) -> RedisServer:
        exe = find_redis_server()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # another process may take the free port before the server binds it
            self.port = free_port()
            options = {
                "port": str(self.port),
                "bind": "127.0.0.1",
                "dir": str(self.workdir),
                "save": "",  # no persistence: each test starts from an empty server
                "appendonly": "no",
                "daemonize": "no",
                "logfile": str(self.workdir / f"redis-{self.port}.log"),
                "enable-debug-command": "local",  # DEBUG SLEEP freezes it for the hung-Redis test
            }
            if self.password:
                options["requirepass"] = self.password
            command = [exe, *(arg for key, value in options.items() for arg in (f"--{key}", value))]
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"redis-server did not start; see {self.workdir}")

    def _wait_ready(self) -> bool:
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                if self.client().ping():
                    return True
            except redis.RedisError:
                time.sleep(0.02)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); after this its port refuses connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        """Kill the server at once, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture(scope="session")
def redis_shared(tmp_path_factory) -> Iterator[RedisServer]:
    """One server for the test session; ``redis_server`` empties it before each test."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(redis_shared) -> RedisServer:
    """The module's server, empty. Tests that stop or kill a server use ``redis_own``."""
    if not redis_shared.alive():
        redis_shared.start()
    redis_shared.client().flushall()
    return redis_shared


@pytest.fixture
def redis_own(tmp_path) -> Iterator[RedisServer]:
    """A server of this test's own, free to be stopped or killed."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hung_redis() -> Iterator[str]:
    """A Redis URL whose server accepts connections and never answers (a hung or frozen Redis)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)  # the kernel completes connections into the backlog; nobody reads them
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        listener.close()


@pytest.fixture
def dead_redis() -> str:
    """A Redis URL on a loopback port where nothing listens."""
    return f"redis://127.0.0.1:{free_port()}/0"
