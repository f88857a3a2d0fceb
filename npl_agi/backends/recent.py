"""The FastAGI server's first-level cache: the answers it saw last, in its own memory.

It sits in front of the cache backend, so that a backend that fails (Redis frozen or
restarted, an SQLite file gone) does not make every call for a popular number pay again while
the backend is skipped. An entry expires when its backend entry does (never later), and at most
``size`` entries are kept, the least recently used going first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from npl_agi.core.protocol import Answer


class Recent:
    """Answers by msisdn with their expiry (``clock`` seconds); shared by the loop and the worker thread."""

    def __init__(self, size: int, clock: Callable[[], float] = time.time) -> None:
        self.size = size
        self.clock = clock
        self._entries: OrderedDict[str, tuple[Answer, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, msisdns: list[str]) -> dict[str, Answer]:
        """The live answers among ``msisdns``; expired ones are dropped."""
        now = self.clock()
        found = {}
        with self._lock:
            for m in msisdns:
                entry = self._entries.get(m)
                if entry is None:
                    continue
                if entry[1] <= now:
                    del self._entries[m]
                    continue
                self._entries.move_to_end(m)
                found[m] = entry[0]
        return found

    def put_many(self, entries: Iterable[tuple[Answer, float]]) -> None:
        """Keep each answer (as the cache gives it) until its expiry."""
        with self._lock:
            for answer, expires in entries:
                self._entries[answer.msisdn] = (answer, expires)
                self._entries.move_to_end(answer.msisdn)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
