"""The queue of waiting numbers in Redis: one queue for every PBX of a cluster sharing an account.

The contract is ``queue.SqliteQueue``'s. A row is kept column by column, each column one Redis
key under ``npl-agi:queue:<account>:`` (the account's lock name, so two accounts on one Redis
never mix):

- ``deadline`` (sorted set): every row, by the latest deadline of its calls. A row exists while
  its key is here; a finished row goes ``KEEP_DONE`` seconds after its deadline.
- ``waiting`` (sorted set): the rows nobody claimed, by the time they were queued (oldest first).
- ``flight`` (sorted set): the rows claimed and not answered yet, by the time they were queued,
  so a row given back takes its place in ``waiting`` again.
- ``asker`` (hash): the token of the asker that claimed a row (``slots``).
- ``fresh`` (set): the rows a fresh call waits for.
- ``msisdn`` (hash): the canonical number the asker made of a row, and ``number`` (sorted set
  of ``<msisdn> <key>``, read by lexical range): the rows of one number.
- ``result`` (hash): a finished row's answer (``queue.encode``), and ``reusable`` (set): the
  finished rows whose answer may answer another call (``queue.reusable``), as its writer judged.

Every change is one Lua script over these keys, so two askers on two machines never claim one
row and a number is never asked twice. Every change also renews the keys' expiry (``IDLE``): an
account whose calls stop leaves nothing behind. Times are the callers' wall-clock seconds.
Methods may raise what redis-py raises: the caller (``waiting``) falls back to asking alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from npl_agi.backends.queue import KEEP_DONE, Alive, encode, readings_of, report_malformed, reusable
from npl_agi.core.protocol import Answer

IDLE = 3600.0  # seconds the queue's keys outlive its last change
COLUMNS = ("deadline", "waiting", "flight", "asker", "fresh", "msisdn", "number", "result", "reusable")

# What every script shares: the columns by name, and the changes that keep them consistent.
_PRELUDE = f"""
local DEADLINE, WAITING, FLIGHT, ASKER, FRESH, MSISDN, NUMBER, RESULT, REUSABLE = unpack(KEYS)

local function index(k, m)
    local old = redis.call('hget', MSISDN, k)
    if old then redis.call('zrem', NUMBER, old .. ' ' .. k) end
    if m == '' then
        redis.call('hdel', MSISDN, k)
    else
        redis.call('hset', MSISDN, k, m)
        redis.call('zadd', NUMBER, 0, m .. ' ' .. k)
    end
end

local function drop(k)
    index(k, '')
    for _, z in ipairs({{DEADLINE, WAITING, FLIGHT}}) do redis.call('zrem', z, k) end
    for _, h in ipairs({{ASKER, RESULT}}) do redis.call('hdel', h, k) end
    for _, s in ipairs({{FRESH, REUSABLE}}) do redis.call('srem', s, k) end
end

local function give_back(k)
    local queued = redis.call('zscore', FLIGHT, k)
    redis.call('zrem', FLIGHT, k)
    redis.call('hdel', ASKER, k)
    index(k, '')
    redis.call('zadd', WAITING, queued, k)
end

local function finish(k, result, reusable)
    redis.call('hset', RESULT, k, result)
    redis.call('zrem', WAITING, k)
    redis.call('zrem', FLIGHT, k)
    if reusable == '1' then redis.call('sadd', REUSABLE, k) else redis.call('srem', REUSABLE, k) end
end

local function rows_of(m)
    local keys = {{}}
    for _, member in ipairs(redis.call('zrangebylex', NUMBER, '[' .. m .. ' ', '(' .. m .. '!')) do
        local k = string.sub(member, #m + 2)
        if redis.call('hget', MSISDN, k) == m and redis.call('zscore', DEADLINE, k) then keys[#keys + 1] = k end
    end
    return keys
end

local function asker_of(k)
    return redis.call('hget', ASKER, k) or ''
end

local function touch()
    for _, key in ipairs(KEYS) do redis.call('pexpire', key, {int(IDLE * 1000)}) end
end
"""

# ARGV: the time before which finished rows go, most, then (key, deadline, fresh, queued) per key.
_ENQUEUE = """
for _, k in ipairs(redis.call('zrangebyscore', DEADLINE, '-inf', '(' .. ARGV[1])) do
    if redis.call('hexists', RESULT, k) == 1 or not redis.call('zscore', FLIGHT, k) then drop(k) end
end
local waiting, most, refused = redis.call('zcard', WAITING), tonumber(ARGV[2]), {}
for i = 3, #ARGV, 4 do
    local k, deadline, fresh = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local old = redis.call('zscore', DEADLINE, k)
    local done = redis.call('hexists', RESULT, k) == 1
    local queued = redis.call('zscore', WAITING, k) or redis.call('zscore', FLIGHT, k)
    if old and ((queued and not done) or (done and fresh == '0' and redis.call('sismember', REUSABLE, k) == 1)) then
        if tonumber(deadline) > tonumber(old) then redis.call('zadd', DEADLINE, deadline, k) end
        if fresh == '1' then redis.call('sadd', FRESH, k) end
    elseif waiting >= most then
        refused[#refused + 1] = k
    else
        drop(k)
        redis.call('zadd', DEADLINE, deadline, k)
        redis.call('zadd', WAITING, ARGV[i + 3], k)
        if fresh == '1' then redis.call('sadd', FRESH, k) end
        waiting = waiting + 1
    end
end
touch()
return refused
"""

# ARGV: the keys. Returns (key, asker, msisdn, result) for each key that has a row.
_PEEK = """
local out = {}
for _, k in ipairs(ARGV) do
    if redis.call('zscore', DEADLINE, k) then
        out[#out + 1] = k
        out[#out + 1] = asker_of(k)
        out[#out + 1] = redis.call('hget', MSISDN, k) or ''
        out[#out + 1] = redis.call('hget', RESULT, k) or ''
    end
end
return out
"""

# The distinct askers of the rows in flight ('' for a row that names none).
_ASKERS = """
local seen, out = {}, {}
for _, k in ipairs(redis.call('zrange', FLIGHT, 0, -1)) do
    local a = asker_of(k)
    if not seen[a] then
        seen[a] = true
        out[#out + 1] = a
    end
end
return out
"""

# ARGV: token, most, the deadline under which a waiting row is dropped, then the askers gone.
# Returns the number of malformed rows dropped, then (key, deadline, fresh) per row claimed.
_CLAIM = """
if #ARGV > 3 then
    local gone = {}
    for i = 4, #ARGV do gone[ARGV[i]] = true end
    for _, k in ipairs(redis.call('zrange', FLIGHT, 0, -1)) do
        if gone[asker_of(k)] then give_back(k) end
    end
end
for _, k in ipairs(redis.call('zrangebyscore', DEADLINE, '-inf', '(' .. ARGV[3])) do
    if redis.call('zscore', WAITING, k) then drop(k) end
end
local out, most = {0}, tonumber(ARGV[2])
if most < 1 then return out end
for _, k in ipairs(redis.call('zrange', WAITING, 0, most - 1)) do
    local deadline = redis.call('zscore', DEADLINE, k)
    if not deadline or redis.call('hexists', RESULT, k) == 1 then
        drop(k)
        out[1] = out[1] + 1
    else
        redis.call('zadd', FLIGHT, redis.call('zscore', WAITING, k), k)
        redis.call('zrem', WAITING, k)
        redis.call('hset', ASKER, k, ARGV[1])
        out[#out + 1] = k
        out[#out + 1] = deadline
        out[#out + 1] = redis.call('sismember', FRESH, k)
    end
end
touch()
return out
"""

# ARGV: token, then (key, msisdn, fresh) per key. Returns the numbers to ask.
_ASSIGN = """
local token, ask, asked = ARGV[1], {}, {}
for i = 2, #ARGV, 3 do
    local k, m, fresh = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local result, other = false, false
    for _, o in ipairs(rows_of(m)) do
        if o ~= k and redis.call('hexists', RESULT, o) == 1 then
            if not result and fresh == '0' and redis.call('sismember', REUSABLE, o) == 1 then
                result = redis.call('hget', RESULT, o)
            end
        elseif o ~= k and not other and redis.call('zscore', FLIGHT, o) then
            local a = asker_of(o)
            if a ~= '' and a ~= token then other = a end
        end
    end
    index(k, m)
    if result then
        finish(k, result, '1')
    elseif other then
        redis.call('hset', ASKER, k, other)
    elseif not asked[m] then
        asked[m] = true
        ask[#ask + 1] = m
    end
end
touch()
return ask
"""

# ARGV: n, then (msisdn, result, reusable) n times, then (key, msisdn, result, reusable) per key.
_PUBLISH = """
local n = tonumber(ARGV[1])
for i = 2, 1 + 3 * n, 3 do
    for _, k in ipairs(rows_of(ARGV[i])) do
        if redis.call('hexists', RESULT, k) == 0 then finish(k, ARGV[i + 1], ARGV[i + 2]) end
    end
end
for i = 2 + 3 * n, #ARGV, 4 do
    local k = ARGV[i]
    if redis.call('zscore', DEADLINE, k) then
        index(k, ARGV[i + 1])
        finish(k, ARGV[i + 2], ARGV[i + 3])
    end
end
touch()
return 0
"""

# ARGV: token.
_UNCLAIM = """
for _, k in ipairs(redis.call('zrange', FLIGHT, 0, -1)) do
    if asker_of(k) == ARGV[1] then give_back(k) end
end
touch()
return 0
"""

# ARGV: the keys.
_DROP = """
for _, k in ipairs(ARGV) do drop(k) end
return 0
"""


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _published(answer: Answer) -> tuple[str, str]:
    """An answer as a row's result, and whether it may answer another call."""
    result = encode(answer)
    return result, _flag(reusable(result, False))


class RedisQueue:
    """The queue in Redis (see the module); ``client(wait)`` gives the backend's redis-py client.

    The client is asked for at each operation, never kept: the backend makes a new one after a
    fork (``RedisCache.close``). A finished row's ``asker`` is kept, as the SQLite queue keeps it.
    """

    def __init__(self, client: Callable, prefix: str) -> None:
        """``prefix``: where the account's keys are (``RedisCache.queue``): one queue per account."""
        self.client = client
        self.keys = [f"{prefix}{column}" for column in COLUMNS]
        self._scripts: dict[str, object] = {}

    def key(self, column: str) -> str:
        """The Redis key of one column (``COLUMNS``)."""
        return self.keys[COLUMNS.index(column)]

    def _run(self, body: str, args: Iterable, wait: float):
        """Run one script (the prelude, then ``body``) over the columns, atomically."""
        client = self.client(wait)
        script = self._scripts.get(body)
        if script is None:
            script = self._scripts[body] = client.register_script(_PRELUDE + body)
        return script(keys=self.keys, args=list(args), client=client)

    def enqueue(self, items: dict[str, tuple[float, bool]], most: int, now: float, wait: float) -> set[str]:
        """As ``SqliteQueue.enqueue``: a call's numbers are queued a microsecond apart, to be
        asked in the order given."""
        args = [repr(now - KEEP_DONE), most]
        for n, (key, (deadline, fresh)) in enumerate(items.items()):
            args += [key, repr(deadline), _flag(fresh), repr(now + n * 1e-6)]
        return set(self._run(_ENQUEUE, args, wait))

    def peek(self, keys: list[str], wait: float) -> dict[str, tuple[str, str, str]]:
        """As ``SqliteQueue.peek``."""
        flat = self._run(_PEEK, keys, wait) if keys else []
        return {flat[i]: tuple(flat[i + 1 : i + 4]) for i in range(0, len(flat), 4)}

    def in_flight(self, wait: float) -> bool:
        """As ``SqliteQueue.in_flight``."""
        return self.client(wait).zcard(self.key("flight")) > 0

    def claim(self, token: str, most: int, now: float, floor: float, alive: Alive, wait: float) -> list[tuple]:
        """As ``SqliteQueue.claim``. Whether an asker is alive is asked here, not in Redis: the
        askers gone are then given to the script that claims."""
        gone = [a for a in self._run(_ASKERS, [], wait) if a != token and not alive(a)]
        flat = self._run(_CLAIM, [token, most, repr(now + floor), *gone], wait)
        rows = [(flat[i], float(flat[i + 1]), bool(flat[i + 2])) for i in range(1, len(flat), 3)]
        bad = [key for key, *_ in rows if readings_of(key) is None]
        if bad:  # claimed by this asker alone: dropping them now asks nobody
            self._run(_DROP, bad, wait)
        report_malformed("rows", flat[0] + len(bad))
        return [row for row in rows if row[0] not in bad]

    def assign(self, token: str, msisdn_of: dict[str, str], fresh: dict[str, bool], wait: float) -> list[str]:
        """As ``SqliteQueue.assign``."""
        args = [token]
        for key, msisdn in msisdn_of.items():
            args += [key, msisdn, _flag(fresh.get(key, False))]
        return list(self._run(_ASSIGN, args, wait)) if msisdn_of else []

    def publish(self, by_msisdn: Iterable[Answer], by_key: dict[str, Answer], wait: float) -> None:
        """As ``SqliteQueue.publish``."""
        numbers = [(a.msisdn, *_published(a)) for a in by_msisdn]
        keyed = [(key, a.msisdn, *_published(a)) for key, a in by_key.items()]
        if not numbers and not keyed:
            return
        args = [len(numbers)] + [v for row in numbers + keyed for v in row]
        self._run(_PUBLISH, args, wait)

    def unclaim(self, token: str, wait: float) -> None:
        """As ``SqliteQueue.unclaim``."""
        self._run(_UNCLAIM, [token], wait)
