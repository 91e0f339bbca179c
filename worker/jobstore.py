"""How jobs live in Redis, shared by the client side (API, CLI) and the worker engine.

Per queue `q` (Queue.redis_key is `salesdash:queue:<q>`, arq's `queue_name`):
- `<q>`            ZSET of ready job ids, score = (9 - priority)·10¹³ + enqueue ms: priority first, then FIFO.
- `<q>:deferred`   ZSET of not-yet-due ids, score = run-at ms·10 + (9 - priority); promoted when due.
- `<q>:running`    ZSET of claimed ids, score = lease expiry ms; workers extend leases of their jobs,
                   and any worker re-queues ids whose lease ran out (the owner died).
- `<q>:owners`     HASH id → worker id.
- `<q>:wake`       LIST an enqueue pushes to; idle workers BLPOP it instead of polling.
Per job: `salesdash:job:<id>` (JSON payload), `salesdash:result:<id>` (JSON record, kept per task),
`salesdash:progress:<id>`, `salesdash:abort:<id>`, `salesdash:done:<id>` (for a client waiting on it).

Ready jobs leave the ready set when claimed, so a page of running jobs never hides waiting ones from
idle workers, and claiming is one Lua call per batch.
"""

from __future__ import annotations

import json
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 0, 9, 5
PRIORITY_BAND = 10**13  # wider than any enqueue-ms span, so priority always dominates age
JOB_TTL_MS = 7 * 24 * 3600 * 1000
LEASE_MS = 30_000
PREFIX = "salesdash"
HISTORY_KEY = f"{PREFIX}:history:pending"
WORKERS_KEY = f"{PREFIX}:workers"

STATUSES = ("queued", "deferred", "in_progress", "complete", "failed", "aborted")


def now_ms() -> int:
    return int(time.time() * 1000)


def ms_to_dt(ms: int | float | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def result_key(job_id: str) -> str:
    return f"{PREFIX}:result:{job_id}"


def progress_key(job_id: str) -> str:
    return f"{PREFIX}:progress:{job_id}"


def abort_key(job_id: str) -> str:
    return f"{PREFIX}:abort:{job_id}"


def done_key(job_id: str) -> str:
    return f"{PREFIX}:done:{job_id}"


@dataclass(frozen=True)
class QueueKeys:
    ready: str

    @classmethod
    def of(cls, queue: str) -> QueueKeys:
        return cls(f"{PREFIX}:queue:{queue}")

    @property
    def deferred(self) -> str:
        return self.ready + ":deferred"

    @property
    def running(self) -> str:
        return self.ready + ":running"

    @property
    def owners(self) -> str:
        return self.ready + ":owners"

    @property
    def wake(self) -> str:
        return self.ready + ":wake"


def ready_score(priority: int, enqueued_ms: int) -> int:
    return (PRIORITY_MAX - priority) * PRIORITY_BAND + enqueued_ms


def deferred_score(priority: int, run_at_ms: int) -> int:
    return run_at_ms * 10 + (PRIORITY_MAX - priority)


# KEYS: job, ready, deferred, wake, dedupe (or "")
# ARGV: payload, ready score, deferred score ("" when ready now), job ttl ms, dedupe ttl ms, id
ENQUEUE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[5] ~= '' then
  if not redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[5]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[6])
else
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[6])
end
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, 63)
return 1
"""

# Promote due deferred jobs, pop up to `limit` ready jobs into `running` with a lease, and return
# {next deferred run-at ms or -1, id1, payload1, id2, payload2, ...}.
# KEYS: ready, deferred, running, owners, wake   ARGV: now ms, limit, lease expiry ms, worker id, job key prefix
CLAIM_LUA = """
local now = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now * 10 + 9, 'WITHSCORES', 'LIMIT', 0, 1000)
for i = 1, #due, 2 do
  local s = tonumber(due[i + 1])
  local rank = s % 10
  redis.call('ZADD', KEYS[1], string.format('%.0f', rank * 1e13 + (s - rank) / 10), due[i])
  redis.call('ZREM', KEYS[2], due[i])
end
local out = {-1}
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #nxt > 0 then out[1] = math.floor(tonumber(nxt[2]) / 10) end
local limit = tonumber(ARGV[2])
if limit > 0 and redis.call('ZCARD', KEYS[1]) <= limit then
  redis.call('DEL', KEYS[5])  -- this claim empties the ready set: leftover wake tokens would only be noise
end
if limit > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[1], limit)
  for i = 1, #popped, 2 do
    local id = popped[i]
    local payload = redis.call('GET', ARGV[5] .. id)
    if payload then
      redis.call('ZADD', KEYS[3], ARGV[3], id)
      redis.call('HSET', KEYS[4], id, ARGV[4])
      out[#out + 1] = id
      out[#out + 1] = payload
    end
  end
end
return out
"""

# Re-queue jobs whose lease expired (their worker died): back to the ready set at their priority.
# KEYS: ready, running, owners, wake   ARGV: now ms, job key prefix   returns the re-queued ids
SWEEP_LUA = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 1000)
local moved = {}
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  local payload = redis.call('GET', ARGV[2] .. id)
  if payload then
    local job = cjson.decode(payload)
    job['tries'] = job['tries'] + 1  -- the lost try counts toward max tries: a job that kills workers ends
    redis.call('SET', ARGV[2] .. id, cjson.encode(job), 'KEEPTTL')
    local score = (9 - job['priority']) * 1e13 + job['enqueued_ms']
    redis.call('ZADD', KEYS[1], string.format('%.0f', score), id)
    moved[#moved + 1] = id
  end
end
if #moved > 0 then redis.call('LPUSH', KEYS[4], '1') redis.call('LTRIM', KEYS[4], 0, 63) end
return moved
"""


_SCRIPTS: dict[str, AsyncScript] = {}


async def run_script(redis: Redis, lua: str, keys: Sequence[str], args: Sequence[object]) -> Any:
    """EVALSHA a Lua script (loaded on first use; re-loaded if the server lost it)."""
    script = _SCRIPTS.get(lua)
    if script is None:
        script = _SCRIPTS[lua] = redis.register_script(lua)
    return await script(keys=list(keys), args=[str(a) for a in args], client=redis)


@dataclass(frozen=True)
class EnqueuedJob:
    job_id: str
    queue: str
    priority: int
    run_at_ms: int


def new_job_id() -> str:
    return uuid.uuid4().hex


def validate_priority(priority: int) -> int:
    if not isinstance(priority, int) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}, got {priority!r}")
    return priority


async def enqueue_raw(
    redis: Redis,
    *,
    task_name: str,
    queue: str,
    kwargs: dict[str, Any],
    priority: int = PRIORITY_DEFAULT,
    defer_ms: int = 0,
    job_id: str | None = None,
    dedupe_ms: int = 0,
    tries: int = 0,
    retry_of: str | None = None,
    notify_done: bool = False,
) -> EnqueuedJob | None:
    """Store the payload and queue the id atomically; None when a job with that id already exists (or the
    dedupe key is taken: how each cron tick runs once across replicas)."""
    job_id = job_id or new_job_id()
    enqueued = now_ms()
    run_at = enqueued + max(defer_ms, 0)
    payload = {
        "id": job_id, "task": task_name, "queue": queue, "args": [], "kwargs": kwargs, "priority": priority,
        "enqueued_ms": enqueued, "run_at_ms": run_at, "tries": tries, "retry_of": retry_of,
        "notify": notify_done,
    }
    keys = QueueKeys.of(queue)
    dedupe = f"{PREFIX}:unique:{job_id}" if dedupe_ms else ""
    added = await run_script(
        redis, ENQUEUE_LUA, [job_key(job_id), keys.ready, keys.deferred, keys.wake, dedupe or job_key(job_id)],
        [json.dumps(payload), ready_score(priority, enqueued),
         deferred_score(priority, run_at) if defer_ms > 0 else "", JOB_TTL_MS + max(defer_ms, 0),
         dedupe_ms or "", job_id],
    )
    return EnqueuedJob(job_id, queue, priority, run_at) if added else None


def _status_from_result(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "task_id": record["job_id"], "task_name": record["task_name"], "queue": record["queue"],
        "status": record["status"], "result": record.get("result"), "error": record.get("error"),
        "traceback": record.get("traceback"), "enqueued_at": ms_to_dt(record.get("enqueued_ms")),
        "started_at": ms_to_dt(record.get("started_ms")), "finished_at": ms_to_dt(record.get("finished_ms")),
        "tries": record.get("tries", 0), "priority": record.get("priority", PRIORITY_DEFAULT),
        "progress": None, "worker_id": record.get("worker_id"),
    }


async def live_status(redis: Redis, job_id: str) -> dict[str, Any] | None:
    """Status from Redis: the stored result when finished, else where the id sits now; None if Redis has
    nothing (then job_runs in PostgreSQL is the source)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(result_key(job_id))
        pipe.get(job_key(job_id))
        pipe.get(progress_key(job_id))
        result_raw, job_raw, progress_raw = await pipe.execute()
    if result_raw:
        return _status_from_result(json.loads(result_raw))
    if not job_raw:
        return None
    job = json.loads(job_raw)
    keys = QueueKeys.of(job["queue"])
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zscore(keys.running, job_id)
        pipe.zscore(keys.deferred, job_id)
        pipe.hget(keys.owners, job_id)
        running, deferred, owner = await pipe.execute()
    status = "in_progress" if running is not None else "deferred" if deferred is not None else "queued"
    return {
        "task_id": job_id, "task_name": job["task"], "queue": job["queue"], "status": status,
        "result": None, "error": job.get("last_error"), "traceback": None,
        "enqueued_at": ms_to_dt(job["enqueued_ms"]), "started_at": ms_to_dt(job.get("started_ms")),
        "finished_at": None, "tries": job["tries"] + (1 if status == "in_progress" else 0),
        "priority": job["priority"], "progress": json.loads(progress_raw) if progress_raw else None,
        "worker_id": owner.decode() if owner else None,
    }


async def abort(redis: Redis, job_id: str, keep_result_ms: int = 24 * 3600 * 1000) -> str | None:
    """Abort a queued, deferred or running job. Returns the status it had, or None when Redis does not know
    it as live (finished or unknown ids are left alone, so a later job can never inherit an abort)."""
    raw = await redis.get(job_key(job_id))
    if raw is None:
        return None
    job = json.loads(raw)
    keys = QueueKeys.of(job["queue"])
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(keys.ready, job_id)
        pipe.zrem(keys.deferred, job_id)
        removed_ready, removed_deferred = await pipe.execute()
    if removed_ready or removed_deferred:
        record = job_record(job, "aborted", tries=job["tries"], error="aborted before it started")
        await store_final(redis, job, record, keep_result_ms)
        return "deferred" if removed_deferred else "queued"
    if await redis.zscore(keys.running, job_id) is not None:
        # the owning worker sees this key at its next heartbeat (or, if that worker died, the one that
        # re-runs the job does) and cancels it; finishing the job deletes the key, so no later job sees it
        await redis.set(abort_key(job_id), "1", px=JOB_TTL_MS)
        return "in_progress"
    return None


def job_record(job: dict[str, Any], status: str, *, tries: int, started_ms: int | None = None,
               worker_id: str | None = None, result: Any = None, exc: BaseException | None = None,
               error: str | None = None) -> dict[str, Any]:
    """The record of a finished try: stored as the job's result and written to job_runs."""
    return {
        "job_id": job["id"], "task_name": job["task"], "queue": job["queue"], "status": status,
        "result": result, "error": f"{type(exc).__name__}: {exc}" if exc else error,
        "traceback": "".join(traceback.format_exception(exc)) if exc else None,
        "args": job["args"] or [], "kwargs": job["kwargs"], "enqueued_ms": job["enqueued_ms"],
        "started_ms": started_ms, "finished_ms": now_ms(), "tries": tries, "priority": job["priority"],
        "worker_id": worker_id, "retry_of": job.get("retry_of"),
    }


async def store_final(redis: Redis, job: dict[str, Any], record: dict[str, Any], keep_result_ms: int) -> None:
    """Write a finished job's record and drop its live keys (used outside the worker: abort before start)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(result_key(job["id"]), json.dumps(record, default=str), px=max(keep_result_ms, 1000))
        pipe.delete(job_key(job["id"]), progress_key(job["id"]))
        pipe.lpush(HISTORY_KEY, json.dumps(record, default=str))
        if job.get("notify"):
            pipe.rpush(done_key(job["id"]), "1")
            pipe.pexpire(done_key(job["id"]), 60_000)
        await pipe.execute()


async def wait_done(redis: Redis, job_id: str, timeout_s: float) -> bool:
    """Block until the worker signals the job finished (needs notify_done=True at enqueue)."""
    return await redis.blpop([done_key(job_id)], timeout=timeout_s) is not None  # type: ignore[arg-type,misc]


async def queue_counts(redis: Redis, queue: str) -> dict[str, int]:
    keys = QueueKeys.of(queue)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.ready)
        pipe.zcard(keys.deferred)
        pipe.zcard(keys.running)
        ready, deferred, running = await pipe.execute()
    return {"queued": ready, "deferred": deferred, "in_progress": running}


async def live_jobs(redis: Redis, queue: str, limit: int) -> list[dict[str, Any]]:
    keys = QueueKeys.of(queue)
    ids: list[bytes] = []
    for key in (keys.running, keys.ready, keys.deferred):
        ids += await redis.zrange(key, 0, max(limit - 1, 0))
    statuses = [await live_status(redis, i.decode()) for i in ids[:limit]]
    return [s for s in statuses if s is not None]


async def purge(redis: Redis, queue: str) -> int:
    """Drop every waiting (ready and deferred) job of a queue; running jobs are left to finish."""
    keys = QueueKeys.of(queue)
    removed = 0
    for key in (keys.ready, keys.deferred):
        while ids := await redis.zrange(key, 0, 999):
            async with redis.pipeline(transaction=True) as pipe:
                pipe.zrem(key, *ids)
                pipe.delete(*(job_key(i.decode()) for i in ids))
                await pipe.execute()
            removed += len(ids)
    return removed
