"""The admin's own data in Redis, and how it is loaded at national scale while every PBX of the
cluster goes on reading it.

A kind is a hash, key -> ``mccmnc,note`` (``npl-agi:local:number``, ``npl-agi:local:range``).
Numbers you know have a sorted set of blocks beside their hash (``…:blocks``): a member
``FROM-TO,mccmnc,note`` scored by FROM (up to 15 digits, exact as a double). Blocks do not
overlap, so the one block that may hold a number is the last one scored at or below it.

A load is staged first, into keys of its own (``…:staged``), a pipeline a part
(``local_load.STAGE_ROWS`` rows, in commands of ``FIELDS`` fields): never one huge command,
since Redis serves every call of every PBX meanwhile. Then:

- ``replace``: one MULTI/EXEC renames the live keys aside, the staged keys over them, and
  UNLINKs the old ones (freed in the background: a RENAME over a big key would free it in the
  foreground). A call sees the whole old set or the whole new one (its read is one MULTI/EXEC).
- ``add``, ``delta``: the staged rows are applied a part at a time (HSET and HDEL; a changed
  block's old member and its new one swapped in one MULTI/EXEC). Meanwhile a call sees each
  number as it was or as the load leaves it, and no number loses its network to the load. If
  Redis fails part-way through this step, part is applied: loading the same rows again
  finishes it (every row says what its key becomes).

A failure while staging leaves the live keys as they were; staged keys a crash left are
dropped by the next load. One load of a kind at a time.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator

from npl_agi.backends.local_load import (
    REMOVE,
    REPLACE,
    STAGE_ROWS,
    Block,
    Row,
    block_key,
    block_of,
    check_blocks,
    check_mode,
    parts,
    split,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import redis

FIELDS = 1000  # fields (or members) of one command: a millisecond or so of Redis's one thread
MEMORY_SAMPLES = 10_000  # entries MEMORY USAGE reads: exact up to there, a close estimate past it
STAGED, OLD = ":staged", ":old"  # suffixes of a load's keys: the new rows; the live ones swapped out
SWAP_TRIES = 10  # MULTI/EXEC attempts when the live keys change between WATCH and EXEC

# One page of the staged hash applied to the live one, in Redis: the rows never travel to the
# client and back. KEYS: staged, live; ARGV: HSCAN cursor, page size, the mark of a removal.
# Returns the next cursor. Older Redis (3.2, 4) needs the effects replicated after a scan.
_APPLY_PAGE = """
if redis.replicate_commands then redis.replicate_commands() end
local page = redis.call('hscan', KEYS[1], ARGV[1], 'count', ARGV[2])
local rows, removal = page[2], ARGV[3] .. ','
for i = 1, #rows, 2 do
    if string.sub(rows[i + 1], 1, #removal) == removal then
        redis.call('hdel', KEYS[2], rows[i])
    else
        redis.call('hset', KEYS[2], rows[i], rows[i + 1])
    end
end
return page[1]
"""


def member(first: int, last: int, mccmnc: str, note: str) -> str:
    """A block as a member of the sorted set."""
    return f"{first}-{last},{mccmnc},{note}"


def block_of_member(text: str) -> Block | None:
    """A member read back, or None for one this version did not write (another writer's)."""
    key, _, rest = text.partition(",")
    mccmnc, comma, note = rest.partition(",")
    try:
        span = block_of(key)
    except ValueError:
        return None
    return (*span, mccmnc, note) if span and comma else None


def holder(text: str, number: str) -> str | None:
    """The MCCMNC of the block ``text`` (a member) if it holds ``number``: a number of its length
    from FROM to TO (digits of one length compare as text as they do as integers)."""
    first, _, rest = text.partition("-")
    last, _, rest = rest.partition(",")
    if len(first) == len(number) == len(last) and first <= number <= last:
        return rest.partition(",")[0]
    return None


class LocalKeys:
    """The admin's data of one kind in one Redis (see the module's docstring)."""

    def __init__(self, client: redis.Redis, hash_key: str, blocks_key: str | None) -> None:
        """``blocks_key``: the sorted set of blocks, for a kind that has them."""
        self._r = client
        self._hash = hash_key
        self._blocks = blocks_key
        self._keys = [hash_key] if blocks_key is None else [hash_key, blocks_key]

    def load(self, chunks: Iterable[list[Row]], mode: str) -> int:
        """``Cache.load_local``: staged, checked, then applied (see the module's docstring)."""
        check_mode(mode)
        staged = [key + STAGED for key in self._keys]
        self._r.unlink(*staged, *(key + OLD for key in self._keys))  # what a crashed load left
        try:
            for part in parts(chunks):
                keys, blocks = split(part, mode, blocks=self._blocks is not None)
                pipe = self._r.pipeline(transaction=False)
                for some in _slices(keys):
                    pipe.hset(self._hash + STAGED, mapping={key: f"{mccmnc},{note}" for key, mccmnc, note in some})
                for some in _slices(blocks):
                    pipe.zadd(f"{self._blocks}{STAGED}", {member(*block): block[0] for block in some})
                pipe.execute()
            count = self._check_blocks(mode) if self._blocks else 0
            count += self._r.hlen(self._hash + STAGED)
            if mode == REPLACE:
                self._swap()
            else:
                self._apply()
        except BaseException:
            with contextlib.suppress(Exception):  # else the next load drops them
                self._r.unlink(*staged)
            raise
        self._r.unlink(*staged)
        return count

    def _check_blocks(self, mode: str) -> int:
        """No two blocks overlap once applied (``local_load.check_blocks``); a block staged twice
        under one key (two notes) is kept once. The number of blocks staged."""
        staged = f"{self._blocks}{STAGED}"
        live = () if mode == REPLACE else itertools.chain.from_iterable(self._pages(self._blocks))
        repeated = check_blocks(itertools.chain.from_iterable(self._pages(staged)), live)
        for some in _slices(repeated):
            self._r.zrem(staged, *(member(*block) for block in some))
        return self._r.zcard(staged)

    def _pages(self, key: str) -> Iterator[list[Block]]:
        """The blocks of a sorted set in order (by FROM, then TO), ``STAGE_ROWS`` a command; a
        member this version did not write is skipped."""
        for start in itertools.count(0, STAGE_ROWS):
            members = self._r.zrange(key, start, start + STAGE_ROWS - 1)
            yield [block for text in members if (block := block_of_member(text))]
            if len(members) < STAGE_ROWS:
                return

    def _swap(self) -> None:
        """The staged keys become the live ones in one MULTI/EXEC; WATCH makes sure the keys that
        exist (a set may have no blocks, or be empty) are the ones renamed."""
        from redis.exceptions import WatchError

        trio = [(key + STAGED, key, key + OLD) for key in self._keys]
        with self._r.pipeline(transaction=True) as pipe:
            for attempt in range(SWAP_TRIES):
                try:
                    pipe.watch(*(key for staged, live, _ in trio for key in (staged, live)))
                    there = {key for staged, live, _ in trio for key in (staged, live) if pipe.exists(key)}
                    pipe.multi()
                    for staged, live, old in trio:
                        if live in there:
                            pipe.rename(live, old)
                        if staged in there:
                            pipe.rename(staged, live)
                    pipe.unlink(*(old for *_, old in trio))
                    pipe.execute()
                    return
                except WatchError:
                    if attempt == SWAP_TRIES - 1:
                        raise

    def _apply(self) -> None:
        """An add or a delta, a part at a time (see the module's docstring): ``FIELDS`` rows a
        script for numbers, a MULTI/EXEC a part for blocks."""
        apply_page = self._r.register_script(_APPLY_PAGE)
        cursor = apply_page(keys=[self._hash + STAGED, self._hash], args=[0, FIELDS, REMOVE])
        while str(cursor) != "0":
            cursor = apply_page(keys=[self._hash + STAGED, self._hash], args=[cursor, FIELDS, REMOVE])
        if self._blocks is None:
            return
        for blocks in self._pages(f"{self._blocks}{STAGED}"):
            for some in _slices(blocks):
                held = self._r.pipeline(transaction=False)
                for first, *_ in some:
                    held.zrangebyscore(self._blocks, first, first)
                prefixes = [f"{block_key(first, last)}," for first, last, *_ in some]
                found = zip(prefixes, held.execute(), strict=True)
                gone = [text for prefix, members in found for text in members if text.startswith(prefix)]
                pipe = self._r.pipeline(transaction=True)  # a changed block is never missing
                if gone:
                    pipe.zrem(self._blocks, *gone)
                added = {member(*block): block[0] for block in some if block[2] != REMOVE}
                if added:
                    pipe.zadd(self._blocks, added)
                pipe.execute()

    def items(self) -> Iterator[Row]:
        """``Cache.local_items``: read a part at a time (HSCAN, ZRANGE), so Redis is never held
        by one reply of the whole set; sorted here."""
        rows: dict[str, Row] = {}
        for key, value in self._r.hscan_iter(self._hash, count=STAGE_ROWS):
            mccmnc, _, note = value.partition(",")
            rows[key] = (key, mccmnc, note)
        if self._blocks is not None:
            for blocks in self._pages(self._blocks):
                for first, last, mccmnc, note in blocks:
                    key = block_key(first, last)
                    rows[key] = (key, mccmnc, note)
        return iter([rows[key] for key in sorted(rows)])

    def delete(self, keys: list[str] | None) -> int:
        """``Cache.delete_local``. A key that is none of this kind's is held nowhere: 0."""
        if keys is None:  # UNLINK: a national set is freed in the background
            pipe = self._r.pipeline(transaction=True)
            pipe.hlen(self._hash)
            if self._blocks is not None:
                pipe.zcard(self._blocks)
            pipe.unlink(*self._keys)
            return sum(pipe.execute()[:-1])
        singles, spans = [], []
        for key in keys:
            span = None
            if self._blocks is not None:
                with contextlib.suppress(ValueError):  # a malformed block is held nowhere
                    span = block_of(key)
            if span is None:
                singles.append(key)
            else:
                spans.append(span)
        deleted = self._r.hdel(self._hash, *singles) if singles else 0
        for first, last in spans:
            prefix = f"{block_key(first, last)},"
            found = [text for text in self._r.zrangebyscore(self._blocks, first, first) if text.startswith(prefix)]
            if found and self._r.zrem(self._blocks, *found):
                deleted += 1
        return deleted

    def size(self) -> dict[str, int]:
        """``Cache.local_size``: HLEN, ZCARD and MEMORY USAGE (``MEMORY_SAMPLES``: SAMPLES 0 reads
        every entry, which for a national set holds Redis for a second)."""
        pipe = self._r.pipeline(transaction=False)
        for key in self._keys:
            pipe.memory_usage(key, samples=MEMORY_SAMPLES)
        pipe.hlen(self._hash)
        if self._blocks is not None:
            pipe.zcard(self._blocks)
        done = pipe.execute()
        used, (entries, *blocks) = done[: len(self._keys)], done[len(self._keys) :]
        return {"entries": entries, "blocks": sum(blocks), "bytes": sum(n or 0 for n in used)}


def _slices(rows: list) -> Iterator[list]:
    return (rows[start : start + FIELDS] for start in range(0, len(rows), FIELDS))
