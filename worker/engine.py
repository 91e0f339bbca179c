"""Our arq worker: arq's `Worker` (settings, signals, cron arithmetic, health key) with a new job loop.

What it changes, and why (arq 0.28 behaviour in brackets):
- claims jobs with one Lua call per batch and sleeps in BLPOP on a wake list [polls every 0.5 s, ~6 round trips
  per job]; so an idle worker sends a few commands a second and still starts a job within a millisecond;
- priorities 0–9 inside a queue [FIFO only];
- a claimed job leaves the ready set and holds a lease (30 s, SALESDASH_LEASE_SECONDS) that its worker renews; any
  worker re-queues jobs whose lease ran out [a crashed worker's jobs wait for the largest timeout + 10 s];
- fencing: each try holds its own lease token; its result, retry, lease renewal and progress are written only
  while the token still owns the job, so a worker that was paused or cut off past its lease cannot overwrite the
  try that replaced it (it logs "fenced" and drops its outcome);
- a job that cannot reach PostgreSQL or Redis waits for it (capped backoff, SALESDASH_DEPENDENCY_WAIT_SECONDS)
  without spending a try; only its own faults spend tries;
- retries transient faults with capped exponential backoff and jitter, fails others at once with traceback
  [only `Retry` retries]; per-task result expiry for failures too;
- a payload it cannot run (gone, not JSON, not an object, a field missing or mistyped, an unknown task, bad
  arguments) ends as a failed job that says why [arq drops some silently and dies on others];
- SIGTERM: stop claiming, wait up to `job_completion_wait`, then hand unfinished jobs back to the queue;
- durable history (batched via Redis into PostgreSQL), fleet-wide metrics, progress, abort without arq #485.

Jobs enqueued with arq's own `enqueue_job` run too (see worker/jobstore.py for the shared layout).
`install_engine()` makes arq's CLI build this worker; `create_worker()` builds it directly and refuses
settings it would not honour.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from signal import Signals
from typing import Any

import arq.worker
import psutil
import redis.exceptions
from arq.connections import create_pool
from arq.cron import CronJob
from arq.utils import to_unix_ms
from arq.version import VERSION as ARQ_VERSION
from arq.worker import Function, Retry

from salesdash import tracing
from salesdash.config import get_settings
from worker import jobstore as js
from worker.history import flush_history
from worker.metrics import MetricsBuffer
from worker.records import PRIORITY_DEFAULT, JobPayload, WorkerInfo, ms_to_dt
from worker.registry import TASKS, RetryPolicy, TaskArgumentError
from worker.retry import (
    DEPENDENCY_NAMES,
    Dependency,
    backoff_seconds,
    dependency_backoff_s,
    dependency_down,
    is_transient,
)

logger = logging.getLogger("salesdash.worker")

ARQ_SERIES = "0.28."  # the arq whose Worker internals this subclass was written against
HEARTBEAT_S = 1.0
SWEEP_EVERY_S = 5.0
CRON_UNIQUE_MS = 3_600_000
MAX_JOBS_ENV = "SALESDASH_MAX_JOBS_PER_PROCESS"
# TimeoutError: a Redis call that outlived `reply_timeout_s` (a cut link answers nothing, it does not refuse)
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ConnectionError, TimeoutError)


@dataclass
class _Running:
    job: JobPayload
    started_ms: int
    ctx: dict[str, Any]
    lease: str  # this try's fencing token
    task: asyncio.Task[Any] | None = None
    aborting: bool = False
    fenced: bool = False  # the lease was lost: another try owns the job, this one's outcome is not written


@dataclass(frozen=True)
class _Faults:
    """How the worker rides out faults around it (salesdash/config.py)."""

    lease_ms: int
    dependency_wait_ms: int
    dependency_backoff_cap_s: float

    @classmethod
    def from_settings(cls) -> _Faults:
        config = get_settings()
        return cls(int(config.lease_s * 1000), int(config.dependency_wait_s * 1000), config.dependency_backoff_cap_s)

    @property
    def sweep_every_s(self) -> float:
        return min(SWEEP_EVERY_S, self.lease_ms / 3000)

    @property
    def reply_timeout_s(self) -> float:
        """A Redis reply later than this means a dead link: the engine gives up on its own calls (claim, finish,
        heartbeat) well inside a lease. Enforced with `asyncio.timeout` rather than redis-py's socket_timeout, whose
        `wait_for` on Python 3.11 can swallow a cancellation and hang shutdown."""
        return max(self.lease_ms / 3000, 2.0)


@dataclass
class _State:
    worker_id: str
    keys: js.QueueKeys
    faults: _Faults
    running: dict[str, _Running] = field(default_factory=dict)
    outcomes: list[tuple[js.Outcome, dict[str, Any] | None]] = field(default_factory=list)
    flush_wanted: asyncio.Event = field(default_factory=asyncio.Event)
    slot_free: asyncio.Event = field(default_factory=asyncio.Event)
    metrics: MetricsBuffer = field(default_factory=MetricsBuffer)
    started_total: int = 0
    max_jobs_per_process: int = 0
    stopping: bool = False
    wake: asyncio.Future[Any] | None = None
    redis_failures: int = 0
    redis_failed_at: float = float("-inf")  # loop time of the last Redis call that failed
    next_lease: int = 0
    stop_timer: asyncio.TimerHandle | None = None
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    started_ms: int = field(default_factory=lambda: js.now_ms())


class SalesdashWorker(arq.worker.Worker):
    _state: _State

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def main(self) -> None:
        faults = _Faults.from_settings()
        if self._pool is None:
            self._pool = await create_pool(self.redis_settings, default_queue_name=self.queue_name)
        self._state = _State(
            worker_id=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
            keys=js.QueueKeys.of_queue_name(self.queue_name),
            faults=faults,
            max_jobs_per_process=int(os.environ.get(MAX_JOBS_ENV) or 0),
        )
        self.ctx.update(redis=self.pool, worker_id=self._state.worker_id, queue=self.queue_label)
        logger.info(
            "worker starting",
            extra={"worker_id": self._state.worker_id, "queue": self.queue_label, "functions": sorted(self.functions)},
        )
        if self.on_startup:
            await self.on_startup(self.ctx)
        self._state.background = [
            asyncio.create_task(self._flush_outcomes_forever()),
            asyncio.create_task(self._heartbeat_forever()),
            asyncio.create_task(self._history_forever()),
        ]
        await self._register()
        await self._job_loop()

    @property
    def queue_label(self) -> str:
        return js.QueueKeys.of_queue_name(self.queue_name).queue

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
        st.redis_failed_at = self.loop.time()
        delay = min(0.1 * 2**st.redis_failures, 5.0)
        logger.warning(
            "redis unreachable, retrying", extra={"queue": self.queue_label, "error": str(exc), "retry_in_s": delay}
        )
        await asyncio.sleep(delay)

    def _jobs_budget(self) -> int:
        """Jobs this process may still start: unbounded (a large number) unless recycling or --burst caps it."""
        limit = self._state.max_jobs_per_process or (self.max_burst_jobs if self.burst else -1)
        return max(limit - self._state.started_total, 0) if limit > 0 else 1 << 30

    async def _queue_empty(self) -> bool:
        counts = await js.queue_counts(self.pool, self.queue_label)
        return counts["queued"] == 0 and counts["deferred"] == 0

    async def _wait_for_work(self, next_due_ms: int) -> None:
        # a job sent by arq's client pushes no wake token: the 1 s ceiling bounds how long it waits
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
            done, _ = await asyncio.wait(
                waiters, timeout=timeout + st.faults.reply_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if slot is not None:
                slot.cancel()
        if not done:  # the BLPOP never answered: a dead link; start over on a fresh connection
            st.wake.cancel()
            st.wake = None
            st.redis_failed_at = self.loop.time()

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
            if self.main_task:
                self.main_task.cancel()
            return
        self._state.stopping = True
        for running in self._state.running.values():
            if running.task:
                running.task.cancel()
        self._state.slot_free.set()
        if self.on_stop:
            self.on_stop(Signals(signum))

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        """Graceful stop: take no new jobs, give running ones `job_completion_wait` seconds, hand back the rest."""
        if not hasattr(self, "_state") or self._state.stop_timer is not None:
            return self.handle_sig(signum)  # not started yet, or a second signal: stop now
        logger.info(
            "shutdown: waiting for running jobs",
            extra={
                "signal": Signals(signum).name,
                "running": len(self._state.running),
                "wait_s": self._job_completion_wait,
            },
        )
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
            await js.unregister_worker(self.pool, st.worker_id)
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
        first_lease = st.next_lease
        st.next_lease += limit  # a token is never reused, even when a claim's reply is lost
        async with asyncio.timeout(st.faults.reply_timeout_s):
            claimed, next_due = await js.claim(
                self.pool, st.keys, limit, st.worker_id, lease_ms=st.faults.lease_ms, first_lease=first_lease
            )
        for c in claimed:
            self._admit(c)
        return len(claimed), next_due

    def _admit(self, claimed: js.Claimed) -> None:
        """Start a claimed job, or fail it at once when its payload cannot be run: never drop it, never crash."""
        data: Any = None
        try:
            if claimed.raw is None:
                raise js.BadPayload("payload missing: it expired before a worker took it, or was deleted")
            data = self._deserialize(claimed.raw)
            job = js.decode_payload(claimed.job_id, data, self.queue_label)
        except js.BadPayload as exc:
            self._refuse(claimed, data, str(exc))
            return
        job = replace(job, tries=job.tries + claimed.lost_tries) if claimed.lost_tries else job
        if claimed.abort_requested:
            self._abort_unstarted(job, claimed.lease)
            return
        self._start(job, claimed.lease)

    def _abort_unstarted(self, job: JobPayload, lease: str) -> None:
        logger.info(
            "job aborted before it started", extra={"job_id": job.id, "task": job.task, "queue": self.queue_label}
        )
        record = js.job_record(
            job, "aborted", tries=job.tries, worker_id=self._state.worker_id, error="aborted before it started"
        )
        self._state.metrics.task_event(job.task, self.queue_label, "aborted")
        self._queue_outcome(
            js.Outcome(job, "final", record, keep_result_ms=self._keep_result_ms(job.task)), None, lease
        )

    def _deserialize(self, raw: bytes) -> Any:
        if self.job_deserializer is None:
            return js.deserialize_json(raw)
        try:
            return self.job_deserializer(raw)
        except Exception as exc:
            raise js.BadPayload(f"payload could not be deserialized ({type(exc).__name__}: {exc})") from None

    def _refuse(self, claimed: js.Claimed, data: Any, reason: str) -> None:
        named = data.get("f") if isinstance(data, dict) else None
        task = named if isinstance(named, str) else "unknown"
        now = js.now_ms()
        job = JobPayload(claimed.job_id, task, [], {}, self.queue_label, PRIORITY_DEFAULT, now, now)
        logger.error("job refused", extra={"job_id": job.id, "task": task, "queue": self.queue_label, "error": reason})
        record = js.job_record(
            job, "failed", tries=claimed.lost_tries, worker_id=self._state.worker_id, error=f"refused: {reason}"
        )
        self._state.metrics.task_event(task, self.queue_label, "failure")
        self.jobs_failed += 1
        outcome = js.Outcome(job, "final", record, keep_result_ms=self._keep_result_ms(task))
        self._queue_outcome(outcome, None, claimed.lease)

    def _start(self, job: JobPayload, lease: str) -> None:
        st = self._state
        ctx = {
            **self.ctx,
            "lease": lease,
            "job_id": job.id,
            "job_try": job.tries + 1,
            "task_name": job.task,
            "enqueue_time": ms_to_dt(job.enqueued_ms),
            "score": job.due_ms,
        }
        running = _Running(job, js.now_ms(), ctx, lease)
        st.running[job.id] = running
        st.started_total += 1
        running.task = asyncio.create_task(self._run(running))
        self.tasks[job.id] = running.task

    async def _run(self, running: _Running) -> None:
        st = self._state
        job = running.job
        try:
            with tracing.job_span(job.task, job.id, self.queue_label, job.tries + 1, job.trace) as span:
                outcome = await self._execute(running)
                tracing.end_job_span(span, *_span_outcome(outcome))
        except BaseException as exc:  # a bug in the loop itself must not kill the worker silently
            logger.exception("job loop error", extra={"job_id": job.id})
            outcome = self._final(running, "failed", None, exc)
        if outcome.kind != "fenced":  # a try that lost its lease writes nothing: another try owns the job
            self._queue_outcome(outcome, running.ctx, running.lease)
        del st.running[job.id]
        self.tasks.pop(job.id, None)
        st.slot_free.set()

    def _queue_outcome(self, outcome: js.Outcome, ctx: dict[str, Any] | None, lease: str) -> None:
        self._state.outcomes.append((replace(outcome, lease=lease), ctx))
        self._state.flush_wanted.set()

    async def _execute(self, running: _Running) -> js.Outcome:
        job = running.job
        log = {"job_id": job.id, "task": job.task, "queue": self.queue_label}
        self._state.metrics.task_event(job.task, self.queue_label, "started")
        self._state.metrics.queue_wait(self.queue_label, max(running.started_ms - job.due_ms, 0) / 1000)
        function = self.functions.get(job.task)
        if function is None:
            return self._fail_now(
                running, LookupError(f"task {job.task!r} is not registered on queue {self.queue_label!r}"), log
            )
        if job.tries + 1 > self._max_tries(function):
            return self._fail_now(running, RuntimeError(f"max {self._max_tries(function)} tries exceeded"), log)
        try:
            args, kwargs = self._bind_arguments(job)
        except TaskArgumentError as exc:
            return self._fail_now(running, exc, log)
        logger.info("job started", extra={**log, "try": job.tries + 1, "priority": job.priority})
        return await self._call(running, function, args, kwargs, log)

    async def _call(
        self,
        running: _Running,
        function: Function | CronJob,
        args: list[Any],
        kwargs: dict[str, Any],
        log: dict[str, Any],
    ) -> js.Outcome:
        timeout_s = function.timeout_s or self.job_timeout_s
        try:
            async with asyncio.timeout(timeout_s) as deadline:
                if self.on_job_start:
                    await self.on_job_start(running.ctx)
                result = await function.coroutine(running.ctx, *args, **kwargs)
        except asyncio.CancelledError:
            if running.fenced:
                return js.Outcome(running.job, "fenced")
            if running.aborting:
                logger.info("job aborted", extra=log)
                return self._final(running, "aborted", None, None)
            if not self._state.stopping:
                raise
            logger.info("job handed back on shutdown", extra=log)
            return js.Outcome(running.job, "requeue")
        except TimeoutError as exc:
            if not deadline.expired():
                return self._failure_or_retry(running, function, exc, log)
            logger.error("job timed out", extra={**log, "timeout_s": timeout_s})
            return self._final(
                running, "failed", None, TimeoutError(f"{running.job.task} timed out after {timeout_s:g}s")
            )
        except Exception as exc:
            return self._failure_or_retry(running, function, exc, log)
        finally:
            await self._hook(self.on_job_end, running.ctx)
        logger.info("job complete", extra={**log, "ms": js.now_ms() - running.started_ms})
        return self._final(running, "complete", result, None)

    def _bind_arguments(self, job: JobPayload) -> tuple[list[Any], dict[str, Any]]:
        """Validate against the task's argument model, as the API does before enqueueing (arq's client does
        not), and hand the function typed values. Tasks outside the table get their arguments as stored."""
        spec = TASKS.get(job.task)
        if spec is None:
            return job.args, job.kwargs
        return [], spec.bind(job.args, job.kwargs)

    def _max_tries(self, function: Function | CronJob) -> int:
        return function.max_tries or self.max_tries

    def _policy(self, task_name: str, function: Function | CronJob) -> RetryPolicy:
        """ctx["retry_policies"] (per worker) first, then the task table, then the function's max tries."""
        override = self.ctx.get("retry_policies", {}).get(task_name)
        spec = TASKS.get(task_name)
        return override or (spec.retry if spec else RetryPolicy(max_tries=self._max_tries(function)))

    def _failure_or_retry(
        self, running: _Running, function: Function | CronJob, exc: Exception, log: dict[str, Any]
    ) -> js.Outcome:
        job = running.job
        dependency = dependency_down(exc)
        if dependency and (waiting := self._wait_for_dependency(running, dependency, exc, log)):
            return waiting
        # the budget is spent: it stays spent (waiting_since_ms kept) but the job no longer shows as waiting; after
        # a fault of the job's own, a later outage gets a fresh budget
        job = (
            replace(job, waiting_for=None)
            if dependency
            else replace(job, waiting_for=None, waiting_since_ms=None, waits=0)
        )
        try_no = job.tries + 1
        if (isinstance(exc, Retry) or is_transient(exc)) and try_no < self._max_tries(function):
            delay_s = (
                exc.defer_score / 1000
                if isinstance(exc, Retry) and exc.defer_score
                else backoff_seconds(self._policy(job.task, function), try_no)
            )
            self._state.metrics.task_event(job.task, self.queue_label, "retry")
            self.jobs_retried += 1
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("job retrying", extra={**log, "try": try_no, "delay_s": round(delay_s, 3), "error": error})
            due = js.now_ms() + int(delay_s * 1000)
            record = js.job_record(
                job, "deferred", tries=try_no, started_ms=running.started_ms, worker_id=self._state.worker_id, exc=exc
            )
            return js.Outcome(
                replace(job, tries=try_no, last_error=error, due_ms=due), "retry", record, retry_at_ms=due
            )
        logger.error("job failed", extra={**log, "try": try_no, "error": f"{type(exc).__name__}: {exc}"}, exc_info=exc)
        return self._final(running, "failed", None, exc)

    def _wait_for_dependency(
        self, running: _Running, dependency: Dependency, exc: Exception, log: dict[str, Any]
    ) -> js.Outcome | None:
        """Put the job back, due after a capped backoff, with its tries untouched, while the wait budget lasts."""
        job, faults, now = running.job, self._state.faults, js.now_ms()
        since = job.waiting_since_ms or now
        if now - since >= faults.dependency_wait_ms:
            logger.warning("job waited out its dependency budget; the fault now spends a try", extra=log)
            return None
        waits = job.waits + 1
        delay_s = dependency_backoff_s(waits, faults.dependency_backoff_cap_s)
        error = f"waiting for {DEPENDENCY_NAMES[dependency]}: {type(exc).__name__}: {exc}"
        logger.warning(
            "job waiting for a dependency",
            extra={**log, "dependency": dependency, "waits": waits, "retry_in_s": round(delay_s, 3), "error": error},
        )
        due = now + int(delay_s * 1000)
        waiting = replace(
            job, last_error=error, due_ms=due, waiting_for=dependency, waiting_since_ms=since, waits=waits
        )
        record = js.job_record(  # for history only: a try that waited (spent none)
            job, "deferred", tries=job.tries + 1, started_ms=running.started_ms, worker_id=self._state.worker_id
        )
        return js.Outcome(waiting, "wait", replace(record, error=error), retry_at_ms=due)

    def _fail_now(self, running: _Running, exc: Exception, log: dict[str, Any]) -> js.Outcome:
        logger.error("job failed", extra={**log, "error": f"{type(exc).__name__}: {exc}"})
        return self._final(running, "failed", None, exc)

    def _final(self, running: _Running, status: str, result: Any, exc: BaseException | None) -> js.Outcome:
        job = running.job
        record = js.job_record(
            job,
            status,
            tries=job.tries + 1,
            started_ms=running.started_ms,
            worker_id=self._state.worker_id,
            result=result,
            exc=exc,
            error="aborted" if status == "aborted" else None,
        )
        metric_status = {"complete": "success", "failed": "failure", "aborted": "aborted"}[status]
        self._state.metrics.task_event(job.task, self.queue_label, metric_status)
        self._state.metrics.duration(job.task, self.queue_label, (record.finished_ms - running.started_ms) / 1000)
        if status == "complete":
            self.jobs_complete += 1
        else:
            self.jobs_failed += 1
        return js.Outcome(job, "final", record, keep_result_ms=self._keep_result_ms(job.task))

    def _keep_result_ms(self, task: str) -> int:
        function = self.functions.get(task)
        keep_s = function.keep_result_s if function and function.keep_result_s is not None else self.keep_result_s
        return int(keep_s * 1000)

    # ---- writing outcomes back -------------------------------------------------------------------------
    async def _flush_outcomes_forever(self) -> None:
        st = self._state
        while True:
            await st.flush_wanted.wait()
            st.flush_wanted.clear()
            try:
                await self._flush_outcomes()
            except REDIS_DOWN as exc:
                self._state.redis_failed_at = self.loop.time()
                logger.warning("flushing job outcomes failed: redis unreachable; retrying", extra={"error": str(exc)})
                st.flush_wanted.set()
                await asyncio.sleep(0.5)
            except Exception:
                logger.exception("flushing job outcomes failed; retrying")
                st.flush_wanted.set()
                await asyncio.sleep(0.5)

    async def _flush_outcomes(self) -> None:
        """Apply finished tries in one atomic call, then run `after_job_end` for each."""
        st = self._state
        if not st.outcomes:
            return
        batch, st.outcomes = st.outcomes, []
        try:
            async with asyncio.timeout(st.faults.reply_timeout_s):
                refused = await js.finish(
                    self.pool, st.keys, [o for o, _ in batch], self.job_serializer or js.serialize_json
                )
        except BaseException:
            # all or nothing was applied (one script); unknown only when the reply was lost. Either way the batch is
            # sent again: a write already there is recognised by the script, not refused
            st.outcomes[:0] = batch
            raise
        for outcome in refused:
            logger.warning(
                "job outcome fenced: this try lost its lease and another try owns the job; its result is discarded",
                extra={
                    "job_id": outcome.job.id,
                    "queue": self.queue_label,
                    "kind": outcome.kind,
                    "lease": outcome.lease,
                },
            )
        fenced = {o.job.id for o in refused}
        for outcome, ctx in batch:
            if ctx is not None and outcome.kind not in ("requeue", "wait") and outcome.job.id not in fenced:
                await self._hook(self.after_job_end, ctx)

    async def _hook(self, hook: Any, ctx: dict[str, Any]) -> None:
        """`on_job_end`/`after_job_end`: a failing hook is logged; the job's outcome stands."""
        if hook is None:
            return
        try:
            await hook(ctx)
        except Exception:
            logger.exception("job hook failed", extra={"job_id": ctx.get("job_id"), "hook": hook.__name__})

    # ---- periodic duties -------------------------------------------------------------------------------
    async def _heartbeat_forever(self) -> None:
        st = self._state
        last_sweep = 0.0
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                async with asyncio.timeout(st.faults.reply_timeout_s):
                    await self._renew_leases_and_check_aborts()
                    await self.run_cron(datetime.now(tz=self.timezone), HEARTBEAT_S)
                    await self.record_health()
                    if self.loop.time() - last_sweep >= st.faults.sweep_every_s:
                        last_sweep = self.loop.time()
                        await self._sweep()
                        await self._register()
                    await st.metrics.flush(self.pool)
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN as exc:
                st.redis_failed_at = self.loop.time()
                logger.warning("heartbeat failed: redis unreachable", extra={"error": f"{type(exc).__name__}: {exc}"})
            except Exception:
                logger.exception("heartbeat failed")

    async def _history_forever(self) -> None:
        """Move records to job_runs, apart from the heartbeat: a slow or unreachable PostgreSQL must never hold up
        lease renewals. Backs off while it fails."""
        st, failures = self._state, 0
        while True:
            await asyncio.sleep(min(HEARTBEAT_S * 2**failures, 30.0))
            try:
                await flush_history(self.pool, self.ctx.get("db"), st.worker_id)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures = min(failures + 1, 5)
                logger.warning("history flush failed; retrying", extra={"error": f"{type(exc).__name__}: {exc}"})

    async def record_health(self) -> None:
        """arq's health key (`arq --check`), rewritten every `health_check_interval`; it lives one heartbeat and a
        second longer than that [arq: interval + 1 s, so a check between late writes can miss a live worker]."""
        now = time.time()
        if now - self._last_health_check < self.health_check_interval:
            return
        self._last_health_check = now
        info = (
            f"{datetime.now():%b-%d %H:%M:%S} j_complete={self.jobs_complete} j_failed={self.jobs_failed} "
            f"j_retried={self.jobs_retried} j_ongoing={len(self._state.running)}"
        )
        ttl_ms = int((self.health_check_interval + HEARTBEAT_S + 1) * 1000)
        await self.pool.psetex(self.health_check_key, ttl_ms, info.encode())

    async def _renew_leases_and_check_aborts(self) -> None:
        st = self._state
        leases = {job_id: r.lease for job_id, r in st.running.items()}
        if not leases:
            return
        for job_id, state in (await js.renew_leases(self.pool, st.keys, leases, st.faults.lease_ms)).items():
            running = st.running.get(job_id)
            if running is None or running.task is None or running.aborting or running.fenced:
                continue
            if state == "lost":
                logger.warning(
                    "job fenced: this try lost its lease and another try owns the job; stopping it here",
                    extra={"job_id": job_id, "queue": self.queue_label, "lease": running.lease},
                )
                running.fenced = True
                running.task.cancel()
            elif state == "abort":
                running.aborting = True
                running.task.cancel()

    async def _sweep(self) -> None:
        """Re-queue jobs whose lease ran out, unless Redis or this worker's link to it was down less than a lease
        ago: their owners have not had a heartbeat to renew them yet, and would lose them for nothing."""
        st = self._state
        lease_s = st.faults.lease_ms / 1000
        if self.loop.time() - st.redis_failed_at < lease_s:
            return
        uptime = (await self.pool.info("server")).get("uptime_in_seconds")
        if isinstance(uptime, int) and uptime < lease_s:
            return
        moved = await js.sweep(self.pool, st.keys)
        if moved:
            logger.warning("re-queued jobs of a dead worker", extra={"queue": self.queue_label, "job_ids": moved})

    async def _register(self) -> None:
        st = self._state
        await js.register_worker(
            self.pool,
            WorkerInfo(
                worker_id=st.worker_id,
                queue=self.queue_label,
                host=socket.gethostname(),
                pid=os.getpid(),
                functions=sorted(self.functions),
                running=list(st.running),
                jobs_complete=self.jobs_complete,
                jobs_failed=self.jobs_failed,
                jobs_retried=self.jobs_retried,
                max_jobs=self.max_jobs,
                seen_ms=js.now_ms(),
                started_ms=st.started_ms,
                rss_bytes=psutil.Process().memory_info().rss,
            ),
        )
        await js.record_depth(self.pool, self.queue_label)

    async def run_cron(self, n: datetime, delay: float, num_windows: int = 2) -> None:
        """arq's schedule arithmetic, our enqueue: a unique key per tick makes each tick run once per fleet,
        even when a fast job has already finished before a slower replica reaches the same tick."""
        cutoff = n + timedelta(seconds=delay * num_windows)
        for cron_job in self.cron_jobs:
            if cron_job.next_run is None:
                cron_job.calculate_next(n)
                continue
            if cron_job.next_run < cutoff:
                run_at = to_unix_ms(cron_job.next_run)
                now = js.now_ms()
                job = JobPayload(
                    js.cron_job_id(cron_job.name, run_at),
                    cron_job.name,
                    [],
                    {},
                    self.queue_label,
                    PRIORITY_DEFAULT,
                    now,
                    max(run_at, now),
                )
                await js.enqueue(self.pool, job, unique_ms=CRON_UNIQUE_MS)
                cron_job.calculate_next(cron_job.next_run)


def _span_outcome(outcome: js.Outcome) -> tuple[str, str | None]:
    record = outcome.record
    return (record.status, record.error) if record is not None and outcome.kind != "wait" else (outcome.kind, None)


# ---- building and installing ---------------------------------------------------------------------------------
_HONOURED = {
    "functions",
    "queue_name",
    "cron_jobs",
    "redis_settings",
    "redis_pool",
    "burst",
    "on_startup",
    "on_shutdown",
    "on_job_start",
    "on_job_end",
    "after_job_end",
    "handle_signals",
    "job_completion_wait",
    "max_jobs",
    "job_timeout",
    "keep_result",
    "max_tries",
    "health_check_interval",
    "health_check_key",
    "ctx",
    "max_burst_jobs",
    "job_serializer",
    "job_deserializer",
    "timezone",
}
_WHY_NOT = {
    "poll_delay": "workers wait on a wake list instead of polling",
    "queue_read_limit": "jobs are claimed in batches of free slots",
    "keep_result_forever": "results are kept for the task's `keep_result`, then read from job_runs",
    "retry_jobs": "transient faults always retry, up to max_tries",
    "allow_abort_jobs": "abort always works, through DELETE /jobs/{id} or the abortTask mutation",
    "expires_extra_ms": "it is a client setting: pass `_expires` to enqueue_job",
    "log_results": "every job logs `job started` and `job complete`/`job failed`",
}


class SettingsError(ValueError):
    """A Settings attribute the engine would silently ignore."""


def check_settings(settings: Any) -> None:
    """Refuse any non-default attribute of a Settings class (or dict) that the engine does not honour."""
    attrs: Mapping[str, Any] = settings if isinstance(settings, Mapping) else vars(settings)
    defaults = {n: p.default for n, p in inspect.signature(arq.worker.Worker).parameters.items()}
    name = getattr(settings, "__qualname__", "Settings")
    for attr, value in attrs.items():
        if attr.startswith("__") or attr in _HONOURED:
            continue
        if attr in defaults and _same(value, defaults[attr]):
            continue  # spelled out at arq's default: harmless
        why = _WHY_NOT.get(attr, "no such arq setting" if attr not in defaults else "the engine does not use it")
        raise SettingsError(f"{name}.{attr} = {value!r} is not honoured by the salesdash engine ({why}); remove it")


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default)
    except Exception:
        return False


def create_worker(settings: Any, **overrides: Any) -> SalesdashWorker:
    """Our worker for a Settings class, after `check_settings`: what `salesdash worker`, `salesdash up` and
    `python -m worker QUEUE` use, and what arq's CLI uses once `install_engine()` ran."""
    check_settings(settings)
    return SalesdashWorker(**{**arq.worker.get_kwargs(settings), **overrides})


def install_engine() -> None:
    """Make arq's CLI (`arq worker.analytics.Settings`) build workers with `create_worker`. Refuses to run on an
    arq other than the one whose Worker internals this engine extends."""
    if not ARQ_VERSION.startswith(ARQ_SERIES):
        raise SystemExit(
            f"salesdash's worker engine extends arq {ARQ_SERIES}x, but arq {ARQ_VERSION} is "
            f"installed; install the version pyproject.toml pins (arq==0.28.*)"
        )
    arq.worker.create_worker = create_worker  # type: ignore[assignment]  # run_worker looks it up at call time


__all__ = ["SalesdashWorker", "SettingsError", "check_settings", "create_worker", "install_engine"]
