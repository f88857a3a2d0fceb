"""Where a circuit breaker's state lives (``chain.breaker``): in memory (the FastAGI server), in
a small file beside the account lock (the process scripts of one machine), or in a Redis key
(every PBX of a cluster). Each change is one atomic read-modify-write, so only one process
becomes the probe. A store that cannot be read or written is a closed breaker: it never fails a
call. The backend hands out its store (``Cache.breaker_store``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
STORE_WAIT = 0.05  # seconds a change waits for another process's change, then gives up: closed

State = dict  # {"state", "failed", "opened_at", "line_at"}
Change = Callable[[State], tuple[State, bool]]


def closed_state() -> State:
    return {"state": CLOSED, "failed": 0, "opened_at": 0.0, "line_at": 0.0}


class MemoryStore:
    """The state of one process's breaker (the FastAGI server)."""

    def __init__(self) -> None:
        self.state = closed_state()

    def load(self) -> State:
        return dict(self.state)

    def update(self, change: Change) -> bool:
        self.state, result = change(dict(self.state))
        return result


class FileStore:
    """The state as JSON in a file, changed under its ``flock``: shared by the machine's processes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> State:
        try:
            with open(self.path, encoding="utf-8") as f:
                return parsed(f.read())
        except (OSError, ValueError):
            return closed_state()

    def update(self, change: Change) -> bool:
        import fcntl

        from npl_agi.backends.locks import wait_for
        from npl_agi.backends.permissions import open_shared

        try:
            fd = open_shared(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return change(closed_state())[1]
        try:

            def take() -> bool:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    return False

            wait_for(take, time.monotonic() + STORE_WAIT, "breaker state")
            old = parsed(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            new, result = change(dict(old))
            if new != old:
                data = json.dumps(new).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
            return result
        except Exception:  # busy, full, unwritable: a closed breaker, this time
            return change(closed_state())[1]
        finally:
            os.close(fd)  # closing drops the flock


class RedisStore:
    """The state in one Redis key, changed in a WATCH/MULTI transaction: shared by a cluster.
    Like redis-py's ``Lock``, it needs only the client (``client()``: the backend's, with its
    timeouts)."""

    def __init__(self, client: Callable[[], object], key: str) -> None:
        self.client, self.key = client, key

    def load(self) -> State:
        try:
            return parsed(self.client().get(self.key) or "")
        except Exception:
            return closed_state()

    def update(self, change: Change) -> bool:
        import redis

        for _ in range(5):  # another process changed it meanwhile: read it again
            try:
                with self.client().pipeline() as pipe:
                    pipe.watch(self.key)
                    old = parsed(pipe.get(self.key) or "")
                    new, result = change(dict(old))
                    pipe.multi()
                    if new != old:
                        pipe.set(self.key, json.dumps(new))
                    pipe.execute()
                    return result
            except redis.WatchError:
                continue
            except Exception:  # down, slow, garbled: a closed breaker, this time
                break
        return change(closed_state())[1]


def parsed(text: str) -> State:
    """The state a store holds, read back: anything unreadable is a closed breaker."""
    state = closed_state()
    if text.strip():
        got = json.loads(text)
        if isinstance(got, dict) and got.get("state") in (CLOSED, OPEN, HALF_OPEN):
            state.update({k: got[k] for k in state if isinstance(got.get(k), (int, float, str))})
    return state
