"""The dashboard cache's Redis layout and encoding, in one module (the job wire format is worker/jobstore.py).

- `salesdash:cache:v1:<query>:<canonical args>`  one payload, JSON: {"query", "args", "generated_at",
  "data_watermark", "data"}; it expires `ttl` after `generated_at` (PX set to what is left of the TTL).
- `salesdash:cache:v1:lock:<query>:<canonical args>`  SET NX PX while one process computes that payload on a
  miss; the value is the holder's random token, so a holder only ever releases its own lock.
- `salesdash:cache:v1:computations`  HASH query name -> payloads computed (by warm_dashboard_cache or a miss).

`v1` versions both the layout and the payloads: bump CACHE_VERSION when either changes, and the old keys
expire on their own. Canonical args are `name=value` pairs sorted by name and joined by `,` (`-` for none).
Decimals travel as JSON strings ("1234.50"), so money keeps every digit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

CACHE_VERSION = 1
PREFIX = f"salesdash:cache:v{CACHE_VERSION}"
COMPUTATIONS_KEY = f"{PREFIX}:computations"
POLL_FIRST_S = 0.005  # a waiter's first look again; it doubles up to POLL_MAX_S
POLL_MAX_S = 0.025  # a waiter costs at most 40 Redis calls a second

P = TypeVar("P", bound=BaseModel)


class CacheEntry(BaseModel, Generic[P]):
    model_config = ConfigDict(frozen=True)

    query: str
    args: str  # canonical args, as in the key
    generated_at: datetime  # when the snapshot the data was read from began
    data_watermark: datetime | None  # the newest order's created_at in that snapshot
    data: P

    def expires_at_ms(self, ttl_s: float) -> int:
        return int(self.generated_at.timestamp() * 1000 + ttl_s * 1000)


class CacheBusyError(RuntimeError):
    """A payload some other process holds the lock on did not appear in time."""


def canonical_args(args: Mapping[str, object]) -> str:
    return ",".join(f"{name}={args[name]}" for name in sorted(args)) or "-"


def entry_key(query: str, args: str) -> str:
    return f"{PREFIX}:{query}:{args}"


def lock_key(query: str, args: str) -> str:
    return f"{PREFIX}:lock:{query}:{args}"


def encode(entry: CacheEntry[Any]) -> bytes:
    return entry.model_dump_json().encode()


def decode(raw: bytes, model: type[P]) -> CacheEntry[P]:
    return CacheEntry[model].model_validate_json(raw)  # type: ignore[valid-type]


def _now_ms() -> int:
    return int(time.time() * 1000)


def utc_now() -> datetime:
    return datetime.now(UTC)


# KEYS: entry, lock. ARGV: token, lock ms. The look and the claim are one step, so a value stored between
# them cannot be missed (which would compute it twice).
_GET_OR_LOCK = """
local value = redis.call('GET', KEYS[1])
if value then return {1, value} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, ''} end
return {0, ''}
"""
_HIT, _LOCKED, _WAIT = 1, 2, 0

# KEYS: entry, lock. ARGV: value, ms left ('' = expired: store nothing), token. Store, then release our lock.
_STORE = """
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: a key. ARGV: the value it must still hold. Compare-and-delete: never drops what someone else wrote.
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_SCRIPTS: dict[str, AsyncScript] = {}


async def _run(redis: Redis, lua: str, keys: Sequence[str], args: Iterable[object]) -> Any:
    script = _SCRIPTS.get(lua)
    if script is None:
        script = _SCRIPTS[lua] = redis.register_script(lua)
    return await script(keys=list(keys), args=[a if isinstance(a, bytes) else str(a) for a in args], client=redis)


def _ms_left(entry: CacheEntry[Any], ttl_s: float) -> str:
    left = entry.expires_at_ms(ttl_s) - _now_ms()
    return str(left) if left > 0 else ""


async def store_all(redis: Redis, entries: Sequence[CacheEntry[Any]], ttl_s: float) -> list[str]:
    """Write entries in one MULTI/EXEC (all or none), each expiring `ttl_s` after its generated_at."""
    written = []
    async with redis.pipeline(transaction=True) as pipe:
        for entry in entries:
            left = _ms_left(entry, ttl_s)
            if left:
                key = entry_key(entry.query, entry.args)
                pipe.set(key, encode(entry), px=int(left))
                written.append(key)
        await pipe.execute()
    return written


async def record_computation(redis: Redis, query: str, count: int = 1) -> None:
    await redis.hincrby(COMPUTATIONS_KEY, query, count)  # type: ignore[misc]


async def computations(redis: Redis) -> dict[str, int]:
    raw: dict[bytes, bytes] = await redis.hgetall(COMPUTATIONS_KEY)  # type: ignore[misc]
    return {k.decode(): int(v) for k, v in raw.items()}


async def read_through(
    redis: Redis,
    query: str,
    args: str,
    model: type[P],
    compute: Callable[[], Awaitable[CacheEntry[P]]],
    *,
    ttl_s: float,
    lock_s: float,
) -> CacheEntry[P]:
    """The cached payload, or computed once however many callers miss together: the one that takes the lock
    computes and stores it; the others look again (5 ms, doubling to 25 ms) until it is there. A holder that
    dies leaves a lock that expires after `lock_s`, and the next caller to look takes it. An entry older than
    `ttl_s` (the TTL was shortened since it was written) is never served: it is dropped and recomputed."""
    key, lock, token = entry_key(query, args), lock_key(query, args), uuid.uuid4().hex
    deadline = time.monotonic() + 3 * lock_s
    delay = POLL_FIRST_S
    while True:
        kind, raw = await _run(redis, _GET_OR_LOCK, [key, lock], [token, int(lock_s * 1000)])
        if kind == _HIT:
            entry = decode(raw, model)
            if entry.expires_at_ms(ttl_s) > _now_ms():
                return entry
            await _run(redis, _DELETE_IF, [key], [raw])
            continue
        if kind == _LOCKED:
            return await _compute_and_store(redis, key, lock, token, compute, ttl_s)
        if time.monotonic() > deadline:
            raise CacheBusyError(f"{query} ({args}) was not computed within {3 * lock_s:g}s; try again")
        await asyncio.sleep(delay)
        delay = min(delay * 2, POLL_MAX_S)


async def _compute_and_store(
    redis: Redis, key: str, lock: str, token: str, compute: Callable[[], Awaitable[CacheEntry[P]]], ttl_s: float
) -> CacheEntry[P]:
    try:
        entry = await compute()
    except BaseException:
        await _run(redis, _DELETE_IF, [lock], [token])  # let the next caller try at once
        raise
    await _run(redis, _STORE, [key, lock], [encode(entry), _ms_left(entry, ttl_s), token])
    return entry
