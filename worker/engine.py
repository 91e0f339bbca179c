"""Our arq worker: arq's `Worker` (settings, signals, cron arithmetic, health key) with a new job loop.

What it changes, and why (arq 0.28 behaviour in brackets):
- claims jobs with one Lua call per batch and sleeps in BLPOP on a wake list [polls every 0.5 s, ~6 round trips
  per job]; so an idle worker sends a few commands a second and still starts a job within a millisecond;
- priorities 0–9 inside a queue [FIFO only];
- a claimed job leaves the ready set and holds a 30 s lease that its worker renews; any worker re-queues
  jobs whose lease ran out [a crashed worker's jobs wait for the largest timeout + 10 s; running jobs stay in
  the queue and can starve idle workers];
- retries transient faults with capped exponential backoff and jitter, fails others at once with traceback
  [only `Retry` retries]; per-task result expiry for failures too [failures use the worker default];
- SIGTERM: stop claiming, wait up to `job_completion_wait`, then hand unfinished jobs back to the queue;
- durable history (batched via Redis into PostgreSQL), fleet-wide metrics, progress, abort without arq #485.

arq's CLI builds `arq.worker.Worker` from a Settings class, so importing this module points that name at
`SalesdashWorker`; `arq worker.analytics.Settings` then runs this loop. No `__init__` override: arq reads the
accepted settings from the constructor's signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from signal import Signals
from typing import Any

import arq.worker
import redis.exceptions
from arq.connections import create_pool
from arq.cron import CronJob
from arq.utils import to_unix_ms
from arq.worker import Function, Retry

from worker import jobstore as js
from worker.history import flush_history
from worker.metrics import MetricsBuffer
from worker.registry import TASKS, RetryPolicy
from worker.retry import backoff_seconds, is_transient

logger = logging.getLogger("salesdash.worker")

HEARTBEAT_S = 1.0
SWEEP_EVERY_S = 5.0
WORKERS_KEY = js.WORKERS_KEY
MAX_JOBS_ENV = "SALESDASH_MAX_JOBS_PER_PROCESS"
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ConnectionError)


@dataclass
class _Running:
    payload: dict[str, Any]
    started_ms: int
    task: asyncio.Task[Any] | None = None
    aborting: bool = False


@dataclass
class _Outcome:
    """What a finished try did; the flusher applies a batch of these in one Redis transaction."""

    payload: dict[str, Any]
    record: dict[str, Any] | None  # final record (complete/failed/aborted), None when the job goes back
    requeue_score: int | None = None  # hand back to ready (shutdown) with this score
    retry_score: int | None = None  # retry later: deferred score
    keep_result_ms: int = 0


@dataclass
class _State:
    worker_id: str
    keys: js.QueueKeys
    running: dict[str, _Running] = field(default_factory=dict)
    outcomes: list[_Outcome] = field(default_factory=list)
    flush_wanted: asyncio.Event = field(default_factory=asyncio.Event)
    slot_free: asyncio.Event = field(default_factory=asyncio.Event)
    metrics: MetricsBuffer = field(default_factory=MetricsBuffer)
    started_total: int = 0
    max_jobs_per_process: int = 0
    stopping: bool = False
    wake: asyncio.Future[Any] | None = None
    redis_failures: int = 0
    stop_timer: asyncio.TimerHandle | None = None
    background: list[asyncio.Task[Any]] = field(default_factory=list)


class SalesdashWorker(arq.worker.Worker):
    _state: _State

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def main(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(self.redis_settings, default_queue_name=self.queue_name)
        self._state = _State(
            worker_id=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
            keys=js.QueueKeys(self.queue_name),
            max_jobs_per_process=int(os.environ.get(MAX_JOBS_ENV) or 0),
        )
        self.ctx.update(redis=self.pool, worker_id=self._state.worker_id, queue=self.queue_label)
        logger.info("worker starting", extra={"worker_id": self._state.worker_id, "queue": self.queue_label,
                                              "functions": sorted(self.functions)})
        if self.on_startup:
            await self.on_startup(self.ctx)
        self._state.background = [
            asyncio.create_task(self._flush_outcomes_forever()),
            asyncio.create_task(self._heartbeat_forever()),
        ]
        await self._register()
        await self._job_loop()

    @property
    def queue_label(self) -> str:
        return self.queue_name.rsplit(":", 1)[-1]

    async def _job_loop(self) -> None:
        st = self._state
        while not st.stopping:
            budget = self._jobs_budget()
            if not self.allow_pick_jobs or budget == 0:
                break
            free = min(self.max_jobs - len(st.running), budget)
            if free <= 0:
                st.slot_free.clear()
                await st.slot_free.wait()
                continue
            try:
                claimed, next_due_ms = await self._claim(free)
            except REDIS_DOWN as exc:
                await self._wait_for_redis(exc)
                continue
            st.redis_failures = 0
            if claimed == free:
                continue
            if self.burst and not st.running and await self._queue_empty():
                break
            if claimed == 0:
                await self._wait_for_work(next_due_ms)
        await self._drain()

    async def _wait_for_redis(self, exc: BaseException) -> None:
        """Redis is unreachable: keep running jobs going, retry with capped backoff [arq's loop dies, #435]."""
        st = self._state
        st.redis_failures += 1
        delay = min(0.1 * 2 ** st.redis_failures, 5.0)
        logger.warning("redis unreachable, retrying", extra={"queue": self.queue_label, "error": str(exc),
                                                              "retry_in_s": delay})
        await asyncio.sleep(delay)

    def _jobs_budget(self) -> int:
        """Jobs this process may still start: unbounded (a large number) unless recycling or --burst caps it."""
        limit = self._state.max_jobs_per_process or (self.max_burst_jobs if self.burst else -1)
        return max(limit - self._state.started_total, 0) if limit > 0 else 1 << 30

    async def _queue_empty(self) -> bool:
        counts = await js.queue_counts(self.pool, self.queue_label)
        return counts["queued"] == 0 and counts["deferred"] == 0

    async def _wait_for_work(self, next_due_ms: int) -> None:
        timeout = 1.0
        if next_due_ms > 0:
            timeout = min(timeout, max((next_due_ms - js.now_ms()) / 1000, 0.01))
        if self.burst and not self._state.running:
            timeout = min(timeout, 0.2)
        st = self._state
        # one BLPOP at a time: if a freed slot woke us last time, the pending one is still good
        if st.wake is not None and st.wake.done() and not st.wake.cancelled():
            st.wake.exception()  # a BLPOP that failed (Redis gone) is retried below, not left unread
        if st.wake is None or st.wake.done():
            st.wake = asyncio.ensure_future(self.pool.blpop([st.keys.wake], timeout=timeout))  # type: ignore[arg-type]
        slot = asyncio.ensure_future(st.slot_free.wait()) if st.running else None
        waiters = [w for w in (st.wake, slot) if w is not None]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if slot is not None:
                slot.cancel()

    async def _drain(self) -> None:
        """Finish what is running (graceful shutdown waits here), then flush what is buffered."""
        st = self._state
        if st.running:
            await asyncio.gather(*(r.task for r in st.running.values() if r.task), return_exceptions=True)
        await self._flush_outcomes()

    def handle_sig(self, signum: Signals) -> None:
        """Immediate stop (no completion wait configured): hand every running job back at once."""
        logger.info("shutdown: handing back running jobs", extra={"signal": Signals(signum).name})
        self.allow_pick_jobs = False
        if not hasattr(self, "_state"):
            self.main_task and self.main_task.cancel()
            return
        self._state.stopping = True
        for running in self._state.running.values():
            if running.task:
                running.task.cancel()
        self._state.slot_free.set()
        self.on_stop and self.on_stop(Signals(signum))

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        """Graceful stop: take no new jobs, give running ones `job_completion_wait` seconds, hand back the rest."""
        if not hasattr(self, "_state") or self._state.stop_timer is not None:
            return self.handle_sig(signum)  # not started yet, or a second signal: stop now
        logger.info("shutdown: waiting for running jobs", extra={
            "signal": Signals(signum).name, "running": len(self._state.running),
            "wait_s": self._job_completion_wait})
        self.allow_pick_jobs = False
        self._state.slot_free.set()
        self._state.stop_timer = self.loop.call_later(self._job_completion_wait, self.handle_sig, signum)

    async def close(self) -> None:
        if self._pool is None:
            return
        st = getattr(self, "_state", None)
        if st is not None:
            if st.stop_timer is not None:
                st.stop_timer.cancel()
            if st.wake is not None:
                st.wake.cancel()
            for task in st.background:
                task.cancel()
            await asyncio.gather(*st.background, return_exceptions=True)
            await self._flush_outcomes()
            await self.pool.zrem(WORKERS_KEY, st.worker_id)
            await self.pool.delete(f"{WORKERS_KEY}:{st.worker_id}")
            await st.metrics.flush(self.pool)
            with contextlib.suppress(Exception):
                await flush_history(self.pool, self.ctx.get("db"), st.worker_id)
        await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.aclose(close_connection_pool=True)
        self._pool = None

    # ---- claiming and running --------------------------------------------------------------------------
    async def _claim(self, limit: int) -> tuple[int, int]:
        st = self._state
        k = st.keys
        now = js.now_ms()
        reply = await js.run_script(self.pool, js.CLAIM_LUA, [k.ready, k.deferred, k.running, k.owners, k.wake],
                                    [now, limit, now + js.LEASE_MS, st.worker_id, js.job_key("")])
        next_due = int(reply[0])
        for i in range(1, len(reply), 2):
            payload = json.loads(reply[i + 1])
            self._start(payload)
        return (len(reply) - 1) // 2, next_due

    def _start(self, payload: dict[str, Any]) -> None:
        st = self._state
        running = _Running(payload, js.now_ms())
        st.running[payload["id"]] = running
        st.started_total += 1
        running.task = asyncio.create_task(self._run(running))
        self.tasks[payload["id"]] = running.task

    async def _run(self, running: _Running) -> None:
        st = self._state
        job = running.payload
        try:
            outcome = await self._execute(running)
        except BaseException as exc:  # a bug in the loop itself must not kill the worker silently
            logger.exception("job loop error", extra={"job_id": job["id"]})
            outcome = self._final(job, running, "failed", None, exc)
        st.outcomes.append(outcome)
        st.flush_wanted.set()
        del st.running[job["id"]]
        self.tasks.pop(job["id"], None)
        st.slot_free.set()

    async def _execute(self, running: _Running) -> _Outcome:  # noqa: C901 - one place for every outcome
        st = self._state
        job = running.payload
        task_name, job_id = job["task"], job["id"]
        log = {"job_id": job_id, "task": task_name, "queue": self.queue_label}
        function = self.functions.get(task_name)
        try_no = job["tries"] + 1
        st.metrics.task_event(task_name, self.queue_label, "started")
        st.metrics.queue_wait(self.queue_label, max(running.started_ms - job["run_at_ms"], 0) / 1000)
        exc: Exception
        if function is None:
            exc = LookupError(f"task {task_name!r} is not registered on queue {self.queue_label!r}")
            logger.error("job failed", extra={**log, "error": str(exc)})
            return self._final(job, running, "failed", None, exc)
        if try_no > self._max_tries(function):
            exc = RuntimeError(f"max {self._max_tries(function)} tries exceeded")
            logger.error("job failed", extra={**log, "error": str(exc)})
            return self._final(job, running, "failed", None, exc)
        ctx = {**self.ctx, "job_id": job_id, "job_try": try_no, "task_name": task_name,
               "enqueue_time": js.ms_to_dt(job["enqueued_ms"])}
        logger.info("job started", extra={**log, "try": try_no, "priority": job["priority"]})
        timeout_s = function.timeout_s or self.job_timeout_s
        try:
            kwargs = self._bind_arguments(task_name, job["kwargs"])
            async with asyncio.timeout(timeout_s) as deadline:
                result = await function.coroutine(ctx, *(job["args"] or []), **kwargs)
        except asyncio.CancelledError:
            if running.aborting:
                logger.info("job aborted", extra=log)
                return self._final(job, running, "aborted", None, None)
            if not st.stopping:
                raise
            logger.info("job handed back on shutdown", extra=log)
            return _Outcome(job, None, requeue_score=js.ready_score(job["priority"], job["enqueued_ms"]))
        except TimeoutError as exc:
            if not deadline.expired():
                return self._failure_or_retry(job, running, function, exc, log)
            err = TimeoutError(f"{task_name} timed out after {timeout_s:g}s")
            logger.error("job timed out", extra={**log, "timeout_s": timeout_s})
            return self._final(job, running, "failed", None, err)
        except Exception as exc:
            return self._failure_or_retry(job, running, function, exc, log)
        logger.info("job complete", extra={**log, "ms": js.now_ms() - running.started_ms})
        return self._final(job, running, "complete", result, None)

    def _bind_arguments(self, task_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        spec = TASKS.get(task_name)
        if spec is None:
            return kwargs
        model = spec.args_model.model_validate(kwargs)
        return {name: getattr(model, name) for name in type(model).model_fields}

    def _max_tries(self, function: Function | CronJob) -> int:
        return function.max_tries or self.max_tries

    def _policy(self, task_name: str, function: Function | CronJob) -> RetryPolicy:
        """Settings.ctx["retry_policies"] (per worker) first, then the registry, then defaults."""
        override = self.ctx.get("retry_policies", {}).get(task_name)
        spec = TASKS.get(task_name)
        return override or (spec.retry if spec else RetryPolicy(max_tries=self._max_tries(function)))

    def _failure_or_retry(self, job: dict[str, Any], running: _Running, function: Function | CronJob,
                          exc: Exception, log: dict[str, Any]) -> _Outcome:
        try_no = job["tries"] + 1
        policy = self._policy(job["task"], function)
        max_tries = self._max_tries(function)
        retryable = isinstance(exc, Retry) or is_transient(exc)
        if retryable and try_no < max_tries:
            delay_s = (exc.defer_score / 1000 if isinstance(exc, Retry) and exc.defer_score
                       else backoff_seconds(policy, try_no))
            self._state.metrics.task_event(job["task"], self.queue_label, "retry")
            self.jobs_retried += 1
            logger.warning("job retrying", extra={**log, "try": try_no, "delay_s": round(delay_s, 3),
                                                   "error": f"{type(exc).__name__}: {exc}"})
            retried = {**job, "tries": try_no, "last_error": f"{type(exc).__name__}: {exc}",
                       "run_at_ms": js.now_ms() + int(delay_s * 1000)}
            record = self._record(job, running, "deferred", None, exc)
            return _Outcome(retried, record, retry_score=js.deferred_score(job["priority"], retried["run_at_ms"]))
        logger.error("job failed", extra={**log, "try": try_no, "error": f"{type(exc).__name__}: {exc}"},
                     exc_info=exc)
        return self._final(job, running, "failed", None, exc)

    def _record(self, job: dict[str, Any], running: _Running, status: str, result: Any,
                exc: BaseException | None) -> dict[str, Any]:
        return js.job_record(job, status, tries=job["tries"] + 1, started_ms=running.started_ms,
                             worker_id=self._state.worker_id, result=result, exc=exc,
                             error="aborted" if status == "aborted" else None)

    def _final(self, job: dict[str, Any], running: _Running, status: str, result: Any,
               exc: BaseException | None) -> _Outcome:
        record = self._record(job, running, status, result, exc)
        metric_status = {"complete": "success", "failed": "failure", "aborted": "aborted"}[status]
        self._state.metrics.task_event(job["task"], self.queue_label, metric_status)
        self._state.metrics.duration(job["task"], self.queue_label,
                                     (record["finished_ms"] - running.started_ms) / 1000)
        if status == "complete":
            self.jobs_complete += 1
        else:
            self.jobs_failed += 1
        spec, function = TASKS.get(job["task"]), self.functions.get(job["task"])
        if spec is not None:
            keep_s = spec.keep_result_s
        elif function is not None and function.keep_result_s is not None:
            keep_s = function.keep_result_s
        else:
            keep_s = self.keep_result_s
        return _Outcome(job, record, keep_result_ms=int(keep_s * 1000))

    # ---- writing outcomes back -------------------------------------------------------------------------
    async def _flush_outcomes_forever(self) -> None:
        st = self._state
        while True:
            await st.flush_wanted.wait()
            st.flush_wanted.clear()
            try:
                await self._flush_outcomes()
            except Exception:
                logger.exception("flushing job outcomes failed; retrying")
                st.flush_wanted.set()
                await asyncio.sleep(0.5)

    async def _flush_outcomes(self) -> None:
        """Apply finished tries in one transaction: results, retries, hand-backs, history rows."""
        st = self._state
        if not st.outcomes:
            return
        batch, st.outcomes = st.outcomes, []
        k = st.keys
        ids = [o.payload["id"] for o in batch]
        records = [json.dumps(o.record, default=str) for o in batch if o.record is not None]
        try:
            async with self.pool.pipeline(transaction=True) as pipe:
                pipe.zrem(k.running, *ids)
                pipe.hdel(k.owners, *ids)
                if records:
                    pipe.lpush(js.HISTORY_KEY, *records)
                finished: list[str] = []
                for o in batch:
                    finished += self._queue_outcome(pipe, k, o)
                if finished:
                    pipe.unlink(*finished)
                await pipe.execute()
        except BaseException:
            st.outcomes[:0] = batch  # nothing was applied (MULTI): keep them for the next attempt
            raise

    def _queue_outcome(self, pipe: Any, k: js.QueueKeys, o: _Outcome) -> list[str]:
        """Queue one job's own writes; returns the keys to drop now that it is finished."""
        job_id = o.payload["id"]
        if o.retry_score is not None:
            pipe.set(js.job_key(job_id), json.dumps(o.payload), px=js.JOB_TTL_MS, xx=True)
            pipe.zadd(k.deferred, {job_id: o.retry_score})
        elif o.requeue_score is not None:
            pipe.zadd(k.ready, {job_id: o.requeue_score})
            pipe.lpush(k.wake, "1")
        elif o.record is not None:
            pipe.set(js.result_key(job_id), json.dumps(o.record, default=str), px=max(o.keep_result_ms, 1000))
            if o.payload.get("notify"):
                pipe.rpush(js.done_key(job_id), "1")
                pipe.pexpire(js.done_key(job_id), 60_000)
            return [js.job_key(job_id), js.progress_key(job_id), js.abort_key(job_id)]
        return []

    # ---- periodic duties -------------------------------------------------------------------------------
    async def _heartbeat_forever(self) -> None:
        st = self._state
        last_sweep = 0.0
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._renew_leases_and_check_aborts()
                await self.run_cron(datetime.now(tz=self.timezone), HEARTBEAT_S)
                if self.loop.time() - last_sweep >= SWEEP_EVERY_S:
                    last_sweep = self.loop.time()
                    await self._sweep()
                    await self._register()
                    await self.record_health()
                await st.metrics.flush(self.pool)
                await flush_history(self.pool, self.ctx.get("db"), st.worker_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("heartbeat failed")

    async def _renew_leases_and_check_aborts(self) -> None:
        st = self._state
        ids = list(st.running)
        if not ids:
            return
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.zadd(st.keys.running, dict.fromkeys(ids, js.now_ms() + js.LEASE_MS), xx=True)
            pipe.mget([js.abort_key(i) for i in ids])
            _, aborts = await pipe.execute()
        for job_id, flag in zip(ids, aborts, strict=True):
            running = st.running.get(job_id)
            if flag and running and running.task and not running.aborting:
                running.aborting = True
                running.task.cancel()

    async def _sweep(self) -> None:
        k = self._state.keys
        moved = await js.run_script(self.pool, js.SWEEP_LUA, [k.ready, k.running, k.owners, k.wake],
                                    [js.now_ms(), js.job_key("")])
        if moved:
            logger.warning("re-queued jobs of a dead worker", extra={
                "queue": self.queue_label, "job_ids": [m.decode() for m in moved]})

    async def _register(self) -> None:
        st = self._state
        key = f"{WORKERS_KEY}:{st.worker_id}"
        info = {
            "worker_id": st.worker_id, "queue": self.queue_label, "host": socket.gethostname(),
            "pid": os.getpid(), "functions": json.dumps(sorted(self.functions)),
            "running": json.dumps(list(st.running)), "jobs_complete": self.jobs_complete,
            "jobs_failed": self.jobs_failed, "jobs_retried": self.jobs_retried, "seen_ms": js.now_ms(),
            "max_jobs": self.max_jobs,
        }
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.zadd(WORKERS_KEY, {st.worker_id: js.now_ms()})
            pipe.hset(key, mapping=info)
            pipe.pexpire(key, int(SWEEP_EVERY_S * 3000))
            await pipe.execute()

    async def run_cron(self, n: datetime, delay: float, num_windows: int = 2) -> None:
        """arq's schedule arithmetic, our enqueue: a unique key per tick makes each tick run once per fleet,
        even when a fast job has already finished before a slower replica reaches the same tick."""
        cutoff = n + timedelta(seconds=delay * num_windows)
        for cron_job in self.cron_jobs:
            if cron_job.next_run is None:
                cron_job.calculate_next(n)
                continue
            if cron_job.next_run < cutoff:
                run_at = cron_job.next_run
                defer_ms = max(to_unix_ms(run_at) - js.now_ms(), 0)
                await js.enqueue_raw(
                    self.pool, task_name=cron_job.name, queue=self.queue_label, kwargs={},
                    job_id=f"cron:{cron_job.name}:{to_unix_ms(run_at)}", defer_ms=defer_ms, dedupe_ms=3_600_000)
                cron_job.calculate_next(run_at)


def install() -> None:
    """Make `arq <module>.Settings` build a SalesdashWorker (see the module docstring)."""
    arq.worker.Worker = SalesdashWorker  # type: ignore[misc]


install()

__all__ = ["SalesdashWorker", "install"]
