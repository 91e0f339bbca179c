"""The Redis wire format, in one module: every key, score, Lua script and record encoding of the platform.

arq's client is a first-class way in, so a job lives where arq looks for it:
- `arq:job:<id>`          the payload (arq's fields `f a k t et` plus ours), while the job is live;
- `arq:in-progress:<id>`  set while a worker runs it;
- `arq:result:<id>`       the record of its last try (arq's `JobResult` fields plus ours), kept per task;
- `salesdash:queue:<q>`   the queue's `Settings.queue_name`, arq's queue sorted set: every live job of the
                          queue. Score = when it is due (ms) while it waits for its time (deferred, backing
                          off, or just enqueued by arq's client); PROMOTED (-1) once a worker has taken it in.
and, ours alone, per queue (`<q>` = `salesdash:queue:<name>`):
- `<q>:ready`    ZSET of due ids, score = (9 - priority)·10¹³ + age ms: priority first, then FIFO;
- `<q>:running`  ZSET of claimed ids, score = lease expiry ms; the owner renews it, any worker re-queues
                 ids whose lease ran out (their worker died) and counts the lost try in `<q>:lost`;
- `<q>:owners`   HASH id → lease token `<worker id>#<n>`, one per claim (per try): the fencing token. Finishing,
                 renewing and progress writes go through only while the caller's token is still there;
- `<q>:lost`     HASH id → tries lost with a dead worker;
- `<q>:wake`     LIST an enqueue pushes to; idle workers BLPOP it instead of polling.
Per job also `salesdash:progress:<id>`, `salesdash:abort:<id>`, `salesdash:done:<id>` (a waiting client),
`salesdash:unique:<id>` (one enqueue per cron tick). Per API token: `salesdash:rate:trigger:<token id>` (its
trigger rate limit) and `salesdash:idempotency:<token id>:<sha256 of the key>` (HASH fp, replay). Fleet-wide:
the history list and its flush lock, the worker registry, the metrics hash, and
`salesdash:depth:<queue>:<minute ms>` (the queue's waiting jobs as a worker saw them in that minute, kept an hour:
the monitoring page's depth chart).

Claiming takes due jobs from `<q>` into `<q>:ready` and pops a batch into `<q>:running`, in one Lua call;
finishing a batch of tries is one more. A claimed job leaves `ready`, so running jobs never hide waiting ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix
from redis import exceptions as redis_exceptions
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from worker.records import (
    PRIORITY_DEFAULT,
    PRIORITY_MAX,
    PRIORITY_MIN,
    JobPayload,
    JobRecord,
    JobState,
    JobStatus,
    Progress,
    TryRecord,
    WorkerInfo,
    ms_to_dt,
)

PREFIX = "salesdash"
JOB_TTL_MS = 7 * 24 * 3600 * 1000
LEASE_MS = 30_000  # the default; workers take theirs from SALESDASH_LEASE_SECONDS
DONE_TTL_MS = 60_000
WAIT_SLICE_S = 1.0  # longest single BLPOP of a waiting client
PROMOTED = -1  # score in `<q>` of a job a worker has taken in (truthy and past, so arq reads it as queued)
HISTORY_KEY = f"{PREFIX}:history:pending"
HISTORY_LOCK_KEY = f"{PREFIX}:history:lock"
WORKERS_KEY = f"{PREFIX}:workers"
METRICS_KEY = f"{PREFIX}:metrics"
DEPTH_KEEP_MS = 65 * 60_000  # an hour of per-minute depth samples, and a little more

Serializer = Callable[[dict[str, Any]], bytes]
Deserializer = Callable[[bytes], Any]


def now_ms() -> int:
    return int(time.time() * 1000)


def new_job_id() -> str:
    """128 random bits as 32 hex digits, the form uuid4().hex had, without building a UUID object."""
    return os.urandom(16).hex()


# ---- keys ----------------------------------------------------------------------------------------------------
def job_key(job_id: str) -> str:
    return job_key_prefix + job_id


def in_progress_key(job_id: str) -> str:
    return in_progress_key_prefix + job_id


def result_key(job_id: str) -> str:
    return result_key_prefix + job_id


def progress_key(job_id: str) -> str:
    return f"{PREFIX}:progress:{job_id}"


def abort_key(job_id: str) -> str:
    return f"{PREFIX}:abort:{job_id}"


def done_key(job_id: str) -> str:
    return f"{PREFIX}:done:{job_id}"


def unique_key(job_id: str) -> str:
    return f"{PREFIX}:unique:{job_id}"


def trigger_rate_key(token_id: int) -> str:
    """The GCRA state (when the token's bucket is next empty, ms) of API triggers with one token."""
    return f"{PREFIX}:rate:trigger:{token_id}"


def idempotency_key(owner: str, key: str) -> str:
    """A client's Idempotency-Key, per token (`owner`); hashed, so any key has a short, safe Redis name."""
    return f"{PREFIX}:idempotency:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


def cron_job_id(task: str, tick_ms: int) -> str:
    """The id of a cron tick's job: the same on every worker, so each tick runs once fleet-wide; it also lets the
    monitoring page find a tick's run by primary key."""
    return f"cron:{task}:{tick_ms}"


def worker_key(worker_id: str) -> str:
    return f"{WORKERS_KEY}:{worker_id}"


def queue_name(queue: str) -> str:
    """arq's `queue_name` for one of our queues: what `Settings.queue_name` and `enqueue_job` use."""
    return f"{PREFIX}:queue:{queue}"


@dataclass(frozen=True)
class QueueKeys:
    queue: str

    @classmethod
    def of_queue_name(cls, name: str) -> QueueKeys:
        return cls(name.removeprefix(f"{PREFIX}:queue:"))

    @property
    def schedule(self) -> str:
        return queue_name(self.queue)

    @property
    def ready(self) -> str:
        return self.schedule + ":ready"

    @property
    def running(self) -> str:
        return self.schedule + ":running"

    @property
    def owners(self) -> str:
        return self.schedule + ":owners"

    @property
    def lost(self) -> str:
        return self.schedule + ":lost"

    @property
    def wake(self) -> str:
        return self.schedule + ":wake"


_PER_JOB_PREFIXES = [
    job_key_prefix,
    in_progress_key_prefix,
    result_key_prefix,
    progress_key(""),
    abort_key(""),
    done_key(""),
]


# ---- encodings -----------------------------------------------------------------------------------------------
class BadPayload(ValueError):
    """A payload or record in Redis that cannot be what it claims to be; the message names the problem."""


class JobFailed(Exception):
    """What arq's `Job.result()` raises for a job that failed or was aborted (see `deserialize_json`)."""


def serialize_json(value: dict[str, Any]) -> bytes:
    """The job serializer of every queue (`Settings.job_serializer`): JSON, never pickle, so nothing written to
    Redis can run code in a worker. Values JSON lacks (dates, decimals) are written as strings."""
    return json.dumps(value, default=str, separators=(",", ":")).encode()


def deserialize_json(raw: bytes) -> Any:
    """The job deserializer of every queue. A failed job's result comes back with its error as a `JobFailed`
    exception and an aborted one's as `CancelledError`, so arq's `Job.result()` raises them as arq does (and
    `Job.abort()` sees the abort)."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadPayload(f"not valid JSON ({exc})") from None
    if isinstance(value, dict) and value.get("s") is False and "ft" in value and isinstance(value.get("r"), str):
        failure = asyncio.CancelledError if value.get("status") == "aborted" else JobFailed
        value["r"] = failure(value["r"])
    return value


def encode_payload(job: JobPayload) -> dict[str, Any]:
    encoded = {
        "f": job.task,
        "a": job.args,
        "k": job.kwargs,
        "t": job.tries,
        "et": job.enqueued_ms,  # arq reads these
        "queue": job.queue,
        "priority": job.priority,
        "due_ms": job.due_ms,
        "retry_of": job.retry_of,
        "notify": job.notify,
        "last_error": job.last_error,
        **(
            {"waiting_for": job.waiting_for, "waiting_since_ms": job.waiting_since_ms, "waits": job.waits}
            if job.waiting_since_ms is not None
            else {}
        ),
    }
    if job.trace:  # only while tracing: payloads stay as they were otherwise (arq ignores fields it lacks)
        encoded["trace"] = job.trace
    return encoded


_OURS = ("queue", "priority", "due_ms")


def decode_payload(job_id: str, data: Any, queue: str) -> JobPayload:
    """A payload as found in Redis; raises BadPayload naming the problem. A payload with none of our fields was
    written by arq's `enqueue_job`: it runs on the queue it was sent to, at the default priority."""
    if not isinstance(data, dict):
        raise BadPayload(f"payload is a JSON {_json_kind(data)}, not an object")
    task = _field(data, "f", str, "the task name")
    args, kwargs = _field(data, "a", list, "positional arguments"), _field(data, "k", dict, "keyword arguments")
    enqueued_ms = _field(data, "et", int, "the enqueue time")
    tries = data.get("t")
    if tries is not None and (not isinstance(tries, int) or isinstance(tries, bool) or tries < 0):
        raise BadPayload(f"payload field 't' (tries) must be a non-negative integer or null, got {tries!r}")
    if not any(name in data for name in _OURS):
        return JobPayload(
            job_id,
            task,
            args,
            kwargs,
            queue,
            PRIORITY_DEFAULT,
            enqueued_ms,
            enqueued_ms,
            tries or 0,
        )
    payload_queue = _field(data, "queue", str, "the queue")
    if payload_queue != queue:
        raise BadPayload(f"payload is for queue {payload_queue!r} but was queued on {queue!r}")
    priority = _field(data, "priority", int, "the priority")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise BadPayload(f"payload field 'priority' must be {PRIORITY_MIN}–{PRIORITY_MAX}, got {priority}")
    return JobPayload(
        job_id,
        task,
        args,
        kwargs,
        queue,
        priority,
        enqueued_ms,
        _field(data, "due_ms", int, "the due time"),
        tries or 0,
        retry_of=_optional(data, "retry_of", str),
        notify=bool(_optional(data, "notify", bool)),
        last_error=_optional(data, "last_error", str),
        waiting_for=_optional(data, "waiting_for", str),
        waiting_since_ms=_optional(data, "waiting_since_ms", int),
        waits=_optional(data, "waits", int) or 0,
        trace=_trace_context(data),
    )


def _trace_context(data: dict[str, Any]) -> dict[str, str] | None:
    value = _optional(data, "trace", dict)
    if value is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadPayload("payload field 'trace' must be a JSON object of strings or null")
    return value or None


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def _field(data: dict[str, Any], name: str, kind: type, meaning: str) -> Any:
    if name not in data:
        raise BadPayload(f"payload field {name!r} ({meaning}) is missing")
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadPayload(
            f"payload field {name!r} ({meaning}) must be a JSON {_TYPE_NAMES[kind]}, got {_json_kind(value)}"
        )
    return value


def _optional(data: dict[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if value is not None and not isinstance(value, kind):
        raise BadPayload(f"payload field {name!r} must be a JSON {_TYPE_NAMES[kind]} or null")
    return value


_TYPE_NAMES: dict[type, str] = {str: "string", int: "integer", list: "array", dict: "object", bool: "boolean"}


def encode_record(record: JobRecord) -> dict[str, Any]:
    """arq's JobResult fields (`r` is the error text of a failed try, `st` never null), then ours."""
    return {
        "id": record.job_id,
        "f": record.task,
        "a": record.args,
        "k": record.kwargs,
        "t": record.tries,
        "et": record.enqueued_ms,
        "s": record.success,
        "r": record.result if record.success else record.error or record.status,
        "st": record.started_ms if record.started_ms is not None else record.finished_ms,
        "ft": record.finished_ms,
        "q": record.queue,
        "status": record.status,
        "started_ms": record.started_ms,
        "error": record.error,
        "traceback": record.traceback,
        "priority": record.priority,
        "worker_id": record.worker_id,
        "retry_of": record.retry_of,
    }


def decode_record(raw: bytes | str) -> JobRecord:
    try:
        data = json.loads(raw)
        status = data["status"]
        if status not in ("complete", "failed", "aborted", "deferred"):
            raise ValueError(f"unknown status {status!r}")
        return JobRecord(
            job_id=str(data["id"]),
            task=str(data["f"]),
            queue=str(data["q"]),
            status=status,
            args=list(data.get("a") or []),
            kwargs=dict(data.get("k") or {}),
            enqueued_ms=int(data["et"]),
            finished_ms=int(data["ft"]),
            tries=int(data["t"]),
            priority=int(data.get("priority", PRIORITY_DEFAULT)),
            started_ms=_int_or_none(data.get("started_ms")),
            result=data["r"] if data.get("s") else None,
            error=data.get("error"),
            traceback=data.get("traceback"),
            worker_id=data.get("worker_id"),
            retry_of=data.get("retry_of"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadPayload(f"stored job record is unreadable ({type(exc).__name__}: {exc})") from None


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def job_record(
    job: JobPayload,
    status: Any,
    *,
    tries: int,
    started_ms: int | None = None,
    worker_id: str | None = None,
    result: Any = None,
    exc: BaseException | None = None,
    error: str | None = None,
) -> JobRecord:
    """The record of a try of `job` that ends now."""
    return JobRecord(
        job_id=job.id,
        task=job.task,
        queue=job.queue,
        status=status,
        args=job.args,
        kwargs=job.kwargs,
        enqueued_ms=job.enqueued_ms,
        finished_ms=now_ms(),
        tries=tries,
        priority=job.priority,
        started_ms=started_ms,
        result=result,
        error=f"{type(exc).__name__}: {exc}" if exc else error,
        traceback="".join(traceback.format_exception(exc)) if exc else None,
        worker_id=worker_id,
        retry_of=job.retry_of,
    )


def history_entry(record: JobRecord) -> bytes:
    """A record on its way to `job_runs` (and, as a try, to `job_tries`): always JSON, whatever the queue's job
    serializer."""
    return serialize_json(encode_record(record))


def try_entry(record: TryRecord) -> bytes:
    """A try that leaves no job record (waiting, fenced) on its way to `job_tries`; the sweep writes the same
    shape for a lost try in Lua (`_SWEEP`)."""
    return serialize_json(
        {
            "kind": "try",
            "id": record.job_id,
            "t": record.try_no,
            "outcome": record.outcome,
            "started_ms": record.started_ms,
            "finished_ms": record.finished_ms,
            "worker_id": record.worker_id,
            "error": record.error,
        }
    )


def decode_history_entry(raw: bytes | str) -> JobRecord | TryRecord:
    """An entry of the history list: a try's record (`history_entry`) or a try alone (`try_entry`)."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("kind") != "try":
            return decode_record(raw)
        outcome, worker_id, error = data["outcome"], data.get("worker_id"), data.get("error")
        if outcome not in ("lost", "fenced", "waiting"):
            raise ValueError(f"unknown try outcome {outcome!r}")
        if not all(v is None or isinstance(v, str) for v in (worker_id, error)):
            raise TypeError("worker_id and error must be strings or null")
        return TryRecord(
            job_id=str(data["id"]),
            try_no=int(data["t"]),
            outcome=outcome,
            finished_ms=int(data["finished_ms"]),
            started_ms=_int_or_none(data.get("started_ms")),
            worker_id=worker_id,
            error=error,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BadPayload(f"stored try entry is unreadable ({type(exc).__name__}: {exc})") from None


# ---- Lua -----------------------------------------------------------------------------------------------------
# Every script starts with this prelude, so the score formula and the finish protocol exist once.
# ARGV[1..8]: the per-job key prefixes (job, in-progress, result, progress, abort, done), done-list ttl, job ttl.
_PRELUDE = (
    f"local ARQ_ABORTS = '{abort_jobs_ss}'"
    + """
local P_JOB, P_RUN, P_RES, P_PROG, P_ABORT, P_DONE = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local DONE_TTL, JOB_TTL = ARGV[7], ARGV[8]
local function ready_score(priority, age_ms)
  return string.format('%.0f', (9 - priority) * 1e13 + age_ms)
end
local function priority_of(raw)  -- a payload we cannot read runs at the default priority and fails there
  if not raw then return 5 end
  local ok, job = pcall(cjson.decode, raw)
  if ok and type(job) == 'table' then
    local p = tonumber(job['priority'])
    if p and p >= 0 and p <= 9 and p == math.floor(p) then return p end
  end
  return 5
end
-- rarely used keys (lost tries, arq's abort set) are touched per job only when they exist at all
local known = {}
local function exists(key)
  if known[key] == nil then known[key] = redis.call('EXISTS', key) == 1 end
  return known[key]
end
-- a finished job: its record becomes the result and goes to history, it leaves the queue, its live keys go
local function finish(schedule, lost, history, id, result, keep_ms, notify, entry)
  redis.call('SET', P_RES .. id, result, 'PX', keep_ms)
  redis.call('ZREM', schedule, id)
  if exists(lost) then redis.call('HDEL', lost, id) end
  redis.call('DEL', P_JOB .. id, P_RUN .. id, P_PROG .. id, P_ABORT .. id)
  if exists(ARQ_ABORTS) then redis.call('ZREM', ARQ_ABORTS, id) end
  redis.call('LPUSH', history, entry)
  if notify == '1' then
    redis.call('RPUSH', P_DONE .. id, '1')
    redis.call('PEXPIRE', P_DONE .. id, DONE_TTL)
  end
end
local function wake(list)
  redis.call('LPUSH', list, '1')
  redis.call('LTRIM', list, 0, 63)
end
"""
)

# KEYS: job, schedule, ready, wake, unique (or the job key again), result
# ARGV: prelude(8), payload, priority, age ms, due ms ('' when due now), unique ttl ('' for none), id
_ENQUEUE_JOB = """
local function enqueue_job()
  if redis.call('EXISTS', KEYS[1], KEYS[6]) > 0 then return 0 end
  if ARGV[13] ~= '' and not redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[13]) then return 0 end
  local ttl = JOB_TTL
  if ARGV[12] ~= '' then
    ttl = tonumber(JOB_TTL) + math.max(tonumber(ARGV[12]) - tonumber(ARGV[11]), 0)
    redis.call('ZADD', KEYS[2], ARGV[12], ARGV[14])
  else
    redis.call('ZADD', KEYS[2], -1, ARGV[14])
    redis.call('ZADD', KEYS[3], ready_score(tonumber(ARGV[10]), tonumber(ARGV[11])), ARGV[14])
  end
  redis.call('SET', KEYS[1], ARGV[9], 'PX', string.format('%.0f', ttl))
  wake(KEYS[4])
  return 1
end
"""
_ENQUEUE = _PRELUDE + _ENQUEUE_JOB + "return enqueue_job()\n"

# A trigger from the API, in one round trip: the idempotency key's earlier job, else the token's rate limit (GCRA:
# `tat` is when the bucket is next empty; a call is allowed while tat - now stays within burst · interval), else
# the enqueue, remembering the key. Refused calls change nothing.
# KEYS: as _ENQUEUE, then the rate key, the idempotency key (each the job key again when unused)
# ARGV: as _ENQUEUE, then interval ms ('' for no limit), burst, fingerprint, window ms ('' for no key), replay
# returns {1, ''} enqueued, {0, ''} id taken, {2, replay} the key's earlier job, {3, ''} the key with other
# arguments, {4, ms} rate limited for that long
_TRIGGER = (
    _PRELUDE
    + _ENQUEUE_JOB
    + """
if ARGV[18] ~= '' then
  local seen = redis.call('HMGET', KEYS[8], 'fp', 'replay')
  if seen[1] then
    if seen[1] == ARGV[17] then return {2, seen[2]} end
    return {3, ''}
  end
end
local tat, now
if ARGV[15] ~= '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local interval, burst = tonumber(ARGV[15]), tonumber(ARGV[16])
  tat = math.max(tonumber(redis.call('GET', KEYS[7]) or 0), now) + interval
  local wait = tat - burst * interval - now
  if wait > 0 then return {4, string.format('%.0f', math.ceil(wait))} end
end
if enqueue_job() == 0 then return {0, ''} end
if tat then
  redis.call('SET', KEYS[7], string.format('%.3f', tat), 'PX', string.format('%.0f', math.max(1, math.ceil(tat - now))))
end
if ARGV[18] ~= '' then
  redis.call('HSET', KEYS[8], 'fp', ARGV[17], 'replay', ARGV[19])
  redis.call('PEXPIRE', KEYS[8], ARGV[18])
end
return {1, ''}
"""
)

# Take due jobs in (deferred ones, retries, arq client's), then pop up to `limit` ready ones into `running`.
# KEYS: schedule, ready, running, owners, wake, lost
# ARGV: prelude(8), now ms, limit, lease expiry ms, worker id, first lease number
# returns {next due ms or -1, id, payload or nil, lost tries or nil, arq abort or nil, lease token, id, ...}
_CLAIM = (
    _PRELUDE
    + """
local now = tonumber(ARGV[9])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], 0, now, 'WITHSCORES', 'LIMIT', 0, 1000)
for i = 1, #due, 2 do
  local id = due[i]
  redis.call('ZADD', KEYS[2], ready_score(priority_of(redis.call('GET', P_JOB .. id)), tonumber(due[i + 1])), id)
  redis.call('ZADD', KEYS[1], -1, id)
end
local out = {-1}
local nxt = redis.call('ZRANGEBYSCORE', KEYS[1], 0, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #nxt > 0 then out[1] = nxt[2] end
local limit = tonumber(ARGV[10])
if limit > 0 then
  if redis.call('ZCARD', KEYS[2]) <= limit then
    redis.call('DEL', KEYS[5])  -- this claim empties the ready set: leftover wake tokens would only be noise
  end
  local popped = redis.call('ZPOPMIN', KEYS[2], limit)
  for i = 1, #popped, 2 do
    local id = popped[i]
    local token = ARGV[12] .. '#' .. string.format('%.0f', tonumber(ARGV[13]) + (i - 1) / 2)
    redis.call('ZADD', KEYS[3], ARGV[11], id)
    redis.call('HSET', KEYS[4], id, token)
    redis.call('SET', P_RUN .. id, ARGV[9], 'PX', JOB_TTL)  -- when the try began: a lost try's start (`_SWEEP`)
    out[#out + 1] = id
    out[#out + 1] = redis.call('GET', P_JOB .. id)
    out[#out + 1] = exists(KEYS[6]) and redis.call('HGET', KEYS[6], id)
    out[#out + 1] = exists(ARQ_ABORTS) and redis.call('ZSCORE', ARQ_ABORTS, id)  -- arq's `Job.abort()`, before it ran
    out[#out + 1] = token
  end
end
return out
"""
)

# Apply finished tries, each only while its lease token still owns the job (fencing: a try that lost its lease
# to another try must not overwrite what that one wrote). KEYS: schedule, running, owners, lost, history, ready, wake
# ARGV: prelude(8), then per job 7 values: kind, id, lease token, blob, number, notify, history entry
#   final:   blob = result,      number = keep ms
#   retry:   blob = new payload, number = due ms            (entry: the failed try's record, '' for none)
#   requeue: blob = age ms,      number = priority          (handed back on shutdown; no entry)
# Returns the ids whose outcome was refused because another try owns them. An outcome whose exact write is already
# there (a call retried after its reply was lost) is not refused.
_FINISH = (
    _PRELUDE
    + """
local woke, fenced = false, {}
for i = 9, #ARGV, 7 do
  local kind, id, token, blob = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local n, notify, entry = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  if redis.call('HGET', KEYS[3], id) ~= token then
    local kept = redis.call('GET', (kind == 'final' and P_RES or P_JOB) .. id)
    if kept ~= blob then fenced[#fenced + 1] = id end
  else
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    if kind == 'final' then
      finish(KEYS[1], KEYS[4], KEYS[5], id, blob, n, notify, entry)
    elseif kind == 'retry' then
      redis.call('SET', P_JOB .. id, blob, 'PX', JOB_TTL, 'XX')
      redis.call('DEL', P_RUN .. id)
      if exists(KEYS[4]) then redis.call('HDEL', KEYS[4], id) end
      redis.call('ZADD', KEYS[1], n, id)
      if entry ~= '' then redis.call('LPUSH', KEYS[5], entry) end
    else
      redis.call('DEL', P_RUN .. id)
      redis.call('ZADD', KEYS[6], ready_score(tonumber(n), tonumber(blob)), id)
      woke = true
    end
  end
end
if woke then wake(KEYS[7]) end
return fenced
"""
)

# Extend the leases of running jobs that the caller still owns. KEYS: running, owners
# ARGV: prelude(8), lease expiry ms, then per job: id, lease token
# Returns per job: 0 renewed, 1 renewed and an abort was asked for, 2 lost (re-queued or owned by another try).
_RENEW = (
    _PRELUDE
    + """
local out = {}
for i = 10, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[2], id) ~= ARGV[i + 1] then
    out[#out + 1] = 2
  else
    redis.call('ZADD', KEYS[1], 'XX', ARGV[9], id)
    local ours = redis.call('EXISTS', P_ABORT .. id) == 1
    local arqs = exists(ARQ_ABORTS) and redis.call('ZSCORE', ARQ_ABORTS, id)  -- arq's `Job.abort()`
    out[#out + 1] = (ours or arqs) and 1 or 0
  end
end
return out
"""
)

# Write a running job's progress while the caller still owns it. KEYS: owners, progress
# ARGV: prelude(8), id, lease token, progress JSON. Returns 1 when written, 0 when fenced.
_PROGRESS = (
    _PRELUDE
    + """
if redis.call('HGET', KEYS[1], ARGV[9]) ~= ARGV[10] then return 0 end
redis.call('SET', KEYS[2], ARGV[11], 'PX', JOB_TTL)
return 1
"""
)

# Abort a waiting job at once (its record written here), or flag a running one for its worker.
# KEYS: schedule, ready, running, lost, history
# ARGV: prelude(8), id, result, keep ms, notify, history entry, now ms, abort flag ttl ms
# Returns the status the job had, or nil when it is not live on this queue.
_ABORT = (
    _PRELUDE
    + """
local id, now = ARGV[9], tonumber(ARGV[14])
local was = nil
if redis.call('ZREM', KEYS[2], id) == 1 then
  was = 'queued'
else
  local s = redis.call('ZSCORE', KEYS[1], id)
  if s and tonumber(s) >= 0 then was = (tonumber(s) > now) and 'deferred' or 'queued' end
end
if was then
  finish(KEYS[1], KEYS[4], KEYS[5], id, ARGV[10], ARGV[11], ARGV[12], ARGV[13])
  return was
end
if redis.call('ZSCORE', KEYS[3], id) then
  redis.call('SET', P_ABORT .. id, '1', 'PX', ARGV[15])
  return 'in_progress'
end
return nil
"""
)

# Re-queue jobs whose lease ran out (their worker died); the lost try is counted in `lost` and goes to history as a
# try entry (`try_entry`'s shape): its worker from the lease token, its start from the in-progress key.
# KEYS: ready, running, owners, wake, lost, history   ARGV: prelude(8), now ms   returns the re-queued ids
_SWEEP = (
    _PRELUDE
    + """
local now = tonumber(ARGV[9])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[9], 'LIMIT', 0, 1000)
for _, id in ipairs(expired) do
  local token = redis.call('HGET', KEYS[3], id)
  local started = tonumber(redis.call('GET', P_RUN .. id))
  local raw = redis.call('GET', P_JOB .. id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('DEL', P_RUN .. id)
  local lost = redis.call('HINCRBY', KEYS[5], id, 1)
  redis.call('ZADD', KEYS[1], ready_score(priority_of(raw), now), id)
  local tries = 0  -- a payload of another serializer: the count of lost tries alone numbers this one
  if raw then
    local ok, job = pcall(cjson.decode, raw)
    if ok and type(job) == 'table' and tonumber(job['t']) then tries = tonumber(job['t']) end
  end
  local worker = nil
  if token then worker = string.match(token, '^(.*)#%d+$') end
  if started and started < 1e12 then started = nil end  -- a key written before starts were kept
  redis.call('LPUSH', KEYS[6], cjson.encode({kind = 'try', id = id, t = tries + lost, outcome = 'lost',
    started_ms = started, finished_ms = now, worker_id = worker,
    error = 'lost: its worker stopped renewing the lease (died or cut off); the job was re-queued'}))
end
if #expired > 0 then wake(KEYS[4]) end
return expired
"""
)

# Drop up to 1000 waiting jobs (ready, deferred, not yet taken in). KEYS: schedule, ready, lost
# ARGV: prelude(8). Returns how many went; call again until 0.
_PURGE = (
    _PRELUDE
    + """
local ids = redis.call('ZRANGE', KEYS[2], 0, 999)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], 0, '+inf', 'LIMIT', 0, 1000 - #ids)) do
  ids[#ids + 1] = id
end
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('DEL', P_JOB .. id, P_PROG .. id)
end
return #ids
"""
)

_SCRIPTS: dict[str, AsyncScript] = {}


def _script(redis: Redis, lua: str) -> AsyncScript:
    script = _SCRIPTS.get(lua)
    if script is None:
        script = _SCRIPTS[lua] = redis.register_script(lua)
    return script


def _argv(args: Iterable[object]) -> list[Any]:
    argv: list[Any] = [*_PER_JOB_PREFIXES, DONE_TTL_MS, JOB_TTL_MS]
    return argv + [a if isinstance(a, bytes) else str(a) for a in args]


async def _run(redis: Redis, lua: str, keys: Sequence[str], args: Iterable[object]) -> Any:
    """EVALSHA a script (loaded if the server does not have it) with the prelude's arguments. Not through redis-py's
    Script call, whose check for a pipeline (a runtime protocol isinstance) was a sixth of the call's CPU."""
    script = _script(redis, lua)
    argv = _argv(args)
    try:
        return await redis.evalsha(script.sha, len(keys), *keys, *argv)  # type: ignore[misc]
    except redis_exceptions.NoScriptError:
        script.sha = await redis.script_load(lua)
        return await redis.evalsha(script.sha, len(keys), *keys, *argv)  # type: ignore[misc]


async def _run_then_wait(
    redis: Redis, lua: str, keys: Sequence[str], args: Iterable[object], replica_wait_ms: int
) -> tuple[Any, int]:
    """`_run`, then `WAIT 1 replica_wait_ms` on the same connection (WAIT counts the replicas that have this
    connection's writes): the script's reply and how many replicas acknowledged it."""
    async with redis.pipeline(transaction=False) as pipe:
        await _script(redis, lua)(keys=list(keys), args=_argv(args), client=pipe)
        pipe.execute_command("WAIT", 1, replica_wait_ms)
        reply, acked = await pipe.execute(raise_on_error=False)
    if isinstance(acked, redis_exceptions.ResponseError) and "replica" in str(acked):
        # a Sentinel named a server that has just turned replica (a script that wrote nothing ran there): reconnect
        # through the Sentinels, as redis-py does when a write meets READONLY
        await redis.connection_pool.disconnect(inuse_connections=False)
        raise redis_exceptions.ConnectionError(f"the Redis server answering is now a replica ({acked})")
    for answer in (reply, acked):
        if isinstance(answer, Exception):
            raise answer
    return reply, int(acked)


class NotReplicatedError(RuntimeError):
    """A write the master took but no replica acknowledged in time: a failover now could lose it."""

    def __init__(self, job_id: str, replica_wait_ms: int) -> None:
        super().__init__(job_id, replica_wait_ms)
        self.job_id = job_id
        self.replica_wait_ms = replica_wait_ms

    def __str__(self) -> str:
        return (
            f"job {self.job_id} was stored on the Redis master, but no replica acknowledged it within "
            f"{self.replica_wait_ms} ms (SALESDASH_ENQUEUE_REPLICA_WAIT_MS): it is queued, yet a failover "
            f"now could lose it; check its status before enqueueing it again"
        )


# ---- operations ----------------------------------------------------------------------------------------------
async def enqueue(redis: Redis, job: JobPayload, *, unique_ms: int = 0, replica_wait_ms: int = 0) -> bool:
    """Store the payload and queue the id atomically. False when the id is taken (a live job or a kept result,
    as arq refuses it) or, with `unique_ms`, when that id was enqueued recently (each cron tick runs once).
    With `replica_wait_ms`, wait that long for one replica to acknowledge the write; NotReplicatedError if none
    did (the job stays queued: a master that survives runs it)."""
    keys = QueueKeys(job.queue)
    deferred = job.due_ms > job.enqueued_ms
    call_keys = [
        job_key(job.id),
        keys.schedule,
        keys.ready,
        keys.wake,
        unique_key(job.id) if unique_ms else job_key(job.id),
        result_key(job.id),
    ]
    call_args = [
        serialize_json(encode_payload(job)),
        job.priority,
        job.enqueued_ms,
        job.due_ms if deferred else "",
        unique_ms or "",
        job.id,
    ]
    if not replica_wait_ms:
        return bool(await _run(redis, _ENQUEUE, call_keys, call_args))
    stored, acked = await _run_then_wait(redis, _ENQUEUE, call_keys, call_args, replica_wait_ms)
    if stored and acked < 1:
        raise NotReplicatedError(job.id, replica_wait_ms)
    return bool(stored)


@dataclass(frozen=True, slots=True)
class TriggerGuard:
    """What a trigger from the API is checked against in the enqueue's round trip. `interval_ms` 0: no rate limit;
    `idempotency_key` None: no key (the fingerprint and window are then unused)."""

    rate_key: str | None = None
    interval_ms: float = 0
    burst: int = 1
    idempotency_key: str | None = None
    fingerprint: str = ""
    window_ms: int = 0
    replay: str = ""  # what a later call with the same key and arguments gets back (the caller's encoding)


@dataclass(frozen=True, slots=True)
class Triggered:
    """The outcome: `enqueued`, `taken` (the id exists), `replayed` (`replay` is the key's earlier answer),
    `conflict` (the key came with other arguments) or `limited` (try again in `retry_after_ms`)."""

    outcome: str
    replay: str = ""
    retry_after_ms: int = 0


_TRIGGER_OUTCOMES = {0: "taken", 1: "enqueued", 2: "replayed", 3: "conflict", 4: "limited"}


async def trigger(redis: Redis, job: JobPayload, guard: TriggerGuard, *, replica_wait_ms: int = 0) -> Triggered:
    """`enqueue` behind a rate limit and an idempotency key, atomically and in one round trip (two with
    `replica_wait_ms`, as `enqueue`: NotReplicatedError when no replica acknowledged a job it queued)."""
    keys = QueueKeys(job.queue)
    deferred = job.due_ms > job.enqueued_ms
    limited = guard.rate_key is not None and guard.interval_ms > 0
    call = (
        [
            job_key(job.id),
            keys.schedule,
            keys.ready,
            keys.wake,
            job_key(job.id),
            result_key(job.id),
            guard.rate_key if limited and guard.rate_key else job_key(job.id),
            guard.idempotency_key or job_key(job.id),
        ],
        [
            serialize_json(encode_payload(job)),
            job.priority,
            job.enqueued_ms,
            job.due_ms if deferred else "",
            "",
            job.id,
            repr(guard.interval_ms) if limited else "",
            guard.burst,
            guard.fingerprint,
            guard.window_ms if guard.idempotency_key else "",
            guard.replay,
        ],
    )
    if replica_wait_ms:
        (code, value), acked = await _run_then_wait(redis, _TRIGGER, *call, replica_wait_ms)
    else:
        (code, value), acked = await _run(redis, _TRIGGER, *call), 1
    outcome = _TRIGGER_OUTCOMES[int(code)]
    if outcome == "enqueued" and acked < 1:
        raise NotReplicatedError(job.id, replica_wait_ms)
    text = value.decode() if isinstance(value, bytes) else str(value)
    if outcome == "limited":
        return Triggered(outcome, retry_after_ms=int(text))
    return Triggered(outcome, replay=text)


@dataclass(frozen=True, slots=True)
class Claimed:
    job_id: str
    raw: bytes | None  # None: the payload is gone (expired, deleted)
    lost_tries: int  # tries lost with dead workers since the payload was last written
    abort_requested: bool  # by arq's `Job.abort()`, before a worker started it
    lease: str = ""  # this try's fencing token (see `<q>:owners`)


async def claim(
    redis: Redis, keys: QueueKeys, limit: int, worker_id: str, *, lease_ms: int = LEASE_MS, first_lease: int = 0
) -> tuple[list[Claimed], int]:
    """Up to `limit` jobs, leased to `worker_id` for `lease_ms`, and when the next deferred one is due (ms, or -1).
    Each claimed try gets its own lease token `<worker_id>#<n>`, n counting up from `first_lease`."""
    now = now_ms()
    reply = await _run(
        redis,
        _CLAIM,
        [keys.schedule, keys.ready, keys.running, keys.owners, keys.wake, keys.lost],
        [now, limit, now + lease_ms, worker_id, first_lease],
    )
    claimed = [
        Claimed(
            reply[i].decode(), reply[i + 1], int(reply[i + 2] or 0), reply[i + 3] is not None, reply[i + 4].decode()
        )
        for i in range(1, len(reply), 5)
    ]
    return claimed, int(float(reply[0]))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished try leaves to write: a final record, a retry later, a wait for a dependency (a retry that
    spends no try and leaves no history), a hand-back on shutdown; or nothing, when the try lost its lease."""

    job: JobPayload
    kind: str  # "final", "retry", "wait", "requeue" or "fenced"
    record: JobRecord | None = None  # final: the result; retry: the failed try (for history)
    keep_result_ms: int = 0
    retry_at_ms: int = 0
    lease: str = ""  # the try's fencing token: the write goes through only while it still owns the job


async def finish(redis: Redis, keys: QueueKeys, outcomes: Sequence[Outcome], serializer: Serializer) -> list[Outcome]:
    """Apply a batch of outcomes in one atomic call; returns those refused because their try lost its lease."""
    argv: list[object] = []
    for o in outcomes:
        job, record = o.job, o.record
        entry = b"" if record is None else _entry_of(o.kind, record)
        if o.kind == "final" and record is not None:
            result = entry if serializer is serialize_json else serializer(encode_record(record))
            argv += ["final", job.id, o.lease, result, max(o.keep_result_ms, 1000), "1" if job.notify else "0", entry]
        elif o.kind in ("retry", "wait"):
            argv += ["retry", job.id, o.lease, serializer(encode_payload(job)), o.retry_at_ms, "0", entry]
        else:
            argv += ["requeue", job.id, o.lease, job.due_ms, job.priority, "0", ""]
    fenced = await _run(
        redis, _FINISH, [keys.schedule, keys.running, keys.owners, keys.lost, HISTORY_KEY, keys.ready, keys.wake], argv
    )
    refused = {f.decode() for f in fenced}
    lost = [o for o in outcomes if o.job.id in refused]
    if entries := [try_entry(TryRecord.of_record(o.record, "fenced")) for o in lost if o.record is not None]:
        await redis.lpush(HISTORY_KEY, *entries)  # type: ignore[misc]  # rare: only a fenced try pays this call
    return lost


def _entry_of(kind: str, record: JobRecord) -> bytes:
    """The history entry of a finished try: its record, or for a wait (no try spent) a `waiting` try alone."""
    return try_entry(TryRecord.of_record(record, "waiting")) if kind == "wait" else history_entry(record)


async def sweep(redis: Redis, keys: QueueKeys) -> list[str]:
    """Re-queue the jobs of workers whose lease ran out; returns their ids."""
    moved = await _run(
        redis, _SWEEP, [keys.ready, keys.running, keys.owners, keys.wake, keys.lost, HISTORY_KEY], [now_ms()]
    )
    return [m.decode() for m in moved]


LeaseState = Literal["held", "abort", "lost"]
_LEASE_STATES: tuple[LeaseState, ...] = ("held", "abort", "lost")


async def renew_leases(
    redis: Redis, keys: QueueKeys, leases: Mapping[str, str], lease_ms: int = LEASE_MS
) -> dict[str, LeaseState]:
    """Extend the leases (job id → lease token) this worker still owns. Per job: "held", "abort" (held, and an abort
    was asked for, ours or arq's `Job.abort()`), or "lost" (re-queued, or another try owns it: stop this one)."""
    argv: list[object] = [now_ms() + lease_ms]
    for job_id, token in leases.items():
        argv += [job_id, token]
    codes = await _run(redis, _RENEW, [keys.running, keys.owners], argv)
    return {job_id: _LEASE_STATES[int(c)] for job_id, c in zip(leases, codes, strict=True)}


async def abort(redis: Redis, record: JobRecord, *, notify: bool, keep_result_ms: int) -> str | None:
    """Abort a live job: a waiting one at once (with `record` as its result), a running one at its worker's
    next heartbeat. Returns the status it had, None when it is not live (nothing is written then, so a later
    job with the same id can never inherit an abort)."""
    keys = QueueKeys(record.queue)
    was = await _run(
        redis,
        _ABORT,
        [keys.schedule, keys.ready, keys.running, keys.lost, HISTORY_KEY],
        [
            record.job_id,
            serialize_json(encode_record(record)),
            max(keep_result_ms, 1000),
            "1" if notify else "0",
            history_entry(record),
            now_ms(),
            JOB_TTL_MS,
        ],
    )
    return was.decode() if was else None


async def purge(redis: Redis, queue: str) -> int:
    """Drop every waiting job of a queue; running jobs are left to finish. Returns how many went."""
    keys, removed = QueueKeys(queue), 0
    while batch := int(await _run(redis, _PURGE, [keys.schedule, keys.ready, keys.lost], [])):
        removed += batch
    return removed


async def wait_done(redis: Redis, job_id: str, timeout_s: float) -> bool:
    """Block until a job enqueued with `notify` finished. In short BLPOPs with a look at the result between
    them, so a notification lost in a Redis failover or restart still ends the wait once the result is there;
    a broken connection is retried (a Sentinel pool reconnects to the new master) until the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (left := deadline - loop.time()) > 0:
        try:
            if await redis.blpop([done_key(job_id)], timeout=min(left, WAIT_SLICE_S)) is not None:  # type: ignore[arg-type,misc]
                return True
            if await redis.exists(result_key(job_id)):
                return True
        except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError):
            await asyncio.sleep(min(0.5, left))
    return False


async def set_progress(redis: Redis, job_id: str, queue: str, lease: str, progress: Progress) -> bool:
    """Write a running job's progress; False (nothing written) when the try holding `lease` no longer owns it."""
    keys = [QueueKeys(queue).owners, progress_key(job_id)]
    return bool(await _run(redis, _PROGRESS, keys, [job_id, lease, progress.model_dump_json()]))


# ---- reading live state --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LiveJob:
    """What Redis holds about an id: its payload (if readable), where it sits, and the reason if not readable."""

    job_id: str
    queue: str
    payload: JobPayload | None
    problem: str | None


async def live_status(redis: Redis, job_id: str, queues: Sequence[str]) -> JobStatus | None:
    """Status from Redis: the kept result when finished, else where the id sits; None when Redis has nothing
    (then PostgreSQL `job_runs` is the source). Unreadable payloads and records are reported, never raised."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(result_key(job_id))
        pipe.get(job_key(job_id))
        pipe.get(progress_key(job_id))
        pipe.exists(in_progress_key(job_id))
        for q in queues:
            pipe.zscore(queue_name(q), job_id)
            pipe.hget(QueueKeys(q).owners, job_id)
        result_raw, job_raw, progress_raw, running, *placed = await pipe.execute()
    if result_raw:
        try:
            return JobStatus.of_record(decode_record(result_raw))
        except BadPayload as exc:
            return JobStatus(task_id=job_id, task_name="unknown", queue="unknown", status="failed", error=str(exc))
    where = [(q, placed[2 * i], placed[2 * i + 1]) for i, q in enumerate(queues) if placed[2 * i] is not None]
    named = _named_queue(job_raw)
    if not where and named and named not in queues:  # a queue outside the given ones (tests, benches)
        return await live_status(redis, job_id, [named])
    if not job_raw and not where:
        return None
    queue, score, owner = where[0] if where else (named or "unknown", None, None)
    state: JobState = "in_progress" if running else "deferred" if score is not None and score > now_ms() else "queued"
    live = _read_payload(job_id, job_raw, queue)
    job = live.payload
    return JobStatus(
        task_id=job_id,
        task_name=job.task if job else "unknown",
        queue=queue,
        status=state,
        error=live.problem or (job.last_error if job else None),
        enqueued_at=ms_to_dt(job.enqueued_ms) if job else None,
        tries=(job.tries if job else 0) + (1 if running else 0),
        priority=job.priority if job else PRIORITY_DEFAULT,
        progress=Progress.model_validate_json(progress_raw) if progress_raw else None,
        worker_id=owner_worker(owner) if owner else None,
        waiting_for=job.waiting_for if job and not running else None,
    )


def owner_worker(lease: bytes | str) -> str:
    """The worker id in a lease token `<worker id>#<n>`."""
    text = lease.decode() if isinstance(lease, bytes) else lease
    return text.rpartition("#")[0] or text


def _read_payload(job_id: str, raw: bytes | None, queue: str) -> LiveJob:
    if raw is None:
        return LiveJob(job_id, queue, None, "payload missing (expired or deleted)")
    try:
        return LiveJob(job_id, queue, decode_payload(job_id, deserialize_json(raw), queue), None)
    except BadPayload as exc:
        return LiveJob(job_id, queue, None, f"payload refused: {exc}")


async def read_live_job(redis: Redis, job_id: str, queues: Sequence[str]) -> LiveJob | None:
    """The payload of a live job and its queue: the one its payload names, else whichever of `queues` holds the
    id (arq's client writes no queue into the payload). None when Redis has no live job with that id."""
    raw = await redis.get(job_key(job_id))
    candidates = [named] if (named := _named_queue(raw)) else list(queues)
    async with redis.pipeline(transaction=False) as pipe:
        for q in candidates:
            pipe.zscore(queue_name(q), job_id)
        scores = await pipe.execute()
    queue = next((q for q, s in zip(candidates, scores, strict=True) if s is not None), None)
    return None if queue is None else _read_payload(job_id, raw, queue)


def _named_queue(raw: bytes | None) -> str | None:
    try:
        data = deserialize_json(raw) if raw else None
    except BadPayload:
        return None
    named = data.get("queue") if isinstance(data, dict) else None
    return named if isinstance(named, str) else None


async def read_record(redis: Redis, job_id: str) -> JobRecord | None:
    raw = await redis.get(result_key(job_id))
    return decode_record(raw) if raw else None


async def queue_counts(redis: Redis, queue: str) -> dict[str, int]:
    keys, now = QueueKeys(queue), now_ms()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.ready)
        pipe.zcount(keys.schedule, 0, now)  # due, not yet taken in by a worker
        pipe.zcount(keys.schedule, f"({now}", "+inf")
        pipe.zcard(keys.running)
        ready, due, deferred, running = await pipe.execute()
    return {"queued": ready + due, "deferred": deferred, "in_progress": running}


_PRIORITY_BAND = 10**13  # the ready score's priority step: (9 - priority) · 10¹³ + the ms the job became due


async def oldest_waiting_ms(redis: Redis, queue: str) -> int | None:
    """When the longest-waiting job of a queue became due (ms since the epoch): the oldest of each priority's first
    ready job and of the due jobs no worker has taken in yet. None when nothing waits. Deferred jobs that are not
    due yet and running jobs do not count."""
    keys, now = QueueKeys(queue), now_ms()
    async with redis.pipeline(transaction=False) as pipe:
        for band in range(PRIORITY_MAX - PRIORITY_MIN + 1):
            low = band * _PRIORITY_BAND
            pipe.zrangebyscore(keys.ready, low, f"({low + _PRIORITY_BAND}", start=0, num=1, withscores=True)
        pipe.zrangebyscore(keys.schedule, 0, now, start=0, num=1, withscores=True)
        *bands, due = await pipe.execute()
    since = [int(score) % _PRIORITY_BAND for first in bands for _, score in first]
    since += [int(score) for _, score in due]
    return min(since) if since else None


async def live_ids(redis: Redis, queue: str, limit: int) -> list[str]:
    """Ids of running, then ready, then waiting jobs of a queue, at most `limit`."""
    keys = QueueKeys(queue)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrange(keys.running, 0, limit - 1)
        pipe.zrange(keys.ready, 0, limit - 1)
        pipe.zrangebyscore(keys.schedule, 0, "+inf", start=0, num=limit)
        groups = await pipe.execute()
    return [i.decode() for group in groups for i in group][:limit]


# ---- workers -------------------------------------------------------------------------------------------------
WORKER_TTL_MS = 15_000  # a worker re-registers every 5 s; gone after three misses


async def register_worker(redis: Redis, info: WorkerInfo) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(WORKERS_KEY, {info.worker_id: info.seen_ms})
        pipe.set(worker_key(info.worker_id), info.model_dump_json(), px=WORKER_TTL_MS)
        await pipe.execute()


async def unregister_worker(redis: Redis, worker_id: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrem(WORKERS_KEY, worker_id)
        pipe.delete(worker_key(worker_id))
        await pipe.execute()


async def live_workers(redis: Redis) -> list[WorkerInfo]:
    """Workers that registered within the liveness window."""
    ids = await redis.zrangebyscore(WORKERS_KEY, now_ms() - WORKER_TTL_MS, "+inf")
    if not ids:
        return []
    found = []
    for raw in await redis.mget([worker_key(i.decode()) for i in ids]):
        if raw:
            try:
                found.append(WorkerInfo.model_validate_json(raw))
            except ValueError:
                continue  # a foreign or half-written entry: it expires on its own
    return found


async def recent_workers(redis: Redis, since_ms: int) -> dict[str, int]:
    """Every worker id seen since `since_ms` (alive or gone without unregistering) and when it was last seen."""
    rows = await redis.zrangebyscore(WORKERS_KEY, since_ms, "+inf", withscores=True)
    return {worker_id.decode(): int(seen) for worker_id, seen in rows}


# ---- queue depth over time -----------------------------------------------------------------------------------
def depth_key(queue: str, minute_ms: int) -> str:
    return f"{PREFIX}:depth:{queue}:{minute_ms}"


async def record_depth(redis: Redis, queue: str) -> None:
    """Note the queue's waiting jobs for the current minute (any worker of the queue; the last write wins)."""
    counts = await queue_counts(redis, queue)
    minute = now_ms() // 60_000 * 60_000
    await redis.set(depth_key(queue, minute), counts["queued"], px=DEPTH_KEEP_MS)


async def depth_history(redis: Redis, queue: str, minutes: int) -> list[tuple[int, int | None]]:
    """(minute ms, waiting jobs) for the last `minutes` minutes, oldest first; None where no worker looked."""
    last = now_ms() // 60_000 * 60_000
    starts = [last - 60_000 * i for i in range(minutes - 1, -1, -1)]
    values = await redis.mget([depth_key(queue, m) for m in starts])
    return [(m, None if v is None else int(v)) for m, v in zip(starts, values, strict=True)]
