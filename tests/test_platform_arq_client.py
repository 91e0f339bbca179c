"""arq's own client both ways: jobs sent with `ArqRedis.enqueue_job` run on our workers, and arq's `Job` reads
the status and result of every job, whoever enqueued it. Real worker processes, real Redis and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from arq.connections import ArqRedis, create_pool
from arq.jobs import Job, JobStatus
from redis.asyncio import Redis

from salesdash.auth import OPERATOR
from salesdash.connections import LazyRedisSettings
from tests.conftest import wait_for
from worker import client
from worker.analytics import Settings as AnalyticsSettings
from worker.jobstore import JobFailed, queue_name
from worker.registry import Queue

ANALYTICS = Queue.ANALYTICS.queue_name
PLATFORM = queue_name("platform")  # tests/platform_worker.py
FINISHED = ("complete", "failed", "aborted")
ARQ_STATUS = {
    "queued": JobStatus.queued,
    "deferred": JobStatus.deferred,
    "in_progress": JobStatus.in_progress,
    "complete": JobStatus.complete,
    "failed": JobStatus.complete,
    "aborted": JobStatus.complete,
}


@pytest.fixture
async def arq_pool(clean_redis: Redis) -> AsyncIterator[ArqRedis]:
    """A pool made as the README shows: arq's create_pool with the queue's serializer functions."""
    pool = await create_pool(
        LazyRedisSettings(),
        job_serializer=AnalyticsSettings.job_serializer,
        job_deserializer=AnalyticsSettings.job_deserializer,
    )
    yield pool
    await pool.aclose(close_connection_pool=True)


async def api_status(app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]], job_id: str) -> dict[str, Any]:
    response = await app_client.get(f"/jobs/{job_id}", headers=auth["read"])
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def assert_arq_agrees(job: Job, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]) -> str:
    ours = (await api_status(app_client, auth, job.job_id))["status"]
    assert await job.status() == ARQ_STATUS[ours], ours
    return str(ours)


async def finished(
    app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]], job_id: str, timeout: float = 30
) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        status = await api_status(app_client, auth, job_id)
        return status if status["status"] in FINISHED else None

    result: dict[str, Any] = await wait_for(done, timeout)
    return result


async def test_a_job_by_name_runs_at_the_default_priority_and_arq_reads_it(
    arq_pool: ArqRedis, spawn_worker: Any, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    job = await arq_pool.enqueue_job("refresh_all_materialized_views", _queue_name=ANALYTICS)
    assert job is not None
    assert await assert_arq_agrees(job, app_client, auth) == "queued"  # no worker yet
    spawn_worker("worker.analytics.Settings")
    result = await job.result(timeout=60, poll_delay=0.05)
    assert {v["view"] for v in result["views"]} >= {"mv_hourly_sales_metrics"}
    status = await api_status(app_client, auth, job.job_id)
    assert status["status"] == "complete" and status["priority"] == 5 and status["result"] == result
    assert await assert_arq_agrees(job, app_client, auth) == "complete"
    info = await job.info()
    assert info is not None and info.function == "refresh_all_materialized_views"


async def test_deferred_and_named_jobs_behave_as_arq_documents(
    arq_pool: ArqRedis, spawn_worker: Any, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    spawn_worker("worker.analytics.Settings")
    deferred = await arq_pool.enqueue_job(
        "refresh_realtime_materialized_views", _queue_name=ANALYTICS, _defer_by=timedelta(seconds=3)
    )
    named = await arq_pool.enqueue_job(
        "refresh_daily_materialized_views",
        _queue_name=ANALYTICS,
        _job_id="nightly-views",
        _defer_by=timedelta(seconds=3),
    )
    assert deferred is not None and named is not None and named.job_id == "nightly-views"
    assert await assert_arq_agrees(deferred, app_client, auth) == "deferred"
    assert await assert_arq_agrees(named, app_client, auth) == "deferred"
    # a `_job_id` that is still live is refused, as arq refuses it
    assert (
        await arq_pool.enqueue_job("refresh_daily_materialized_views", _queue_name=ANALYTICS, _job_id="nightly-views")
        is None
    )
    for job in (deferred, named):
        await job.result(timeout=60, poll_delay=0.05)
        assert await assert_arq_agrees(job, app_client, auth) == "complete"
    timing = await api_status(app_client, auth, deferred.job_id)
    assert timing["started_at"] > timing["enqueued_at"]
    # while its result is kept, the id stays taken (arq checks the result key too)
    assert (
        await arq_pool.enqueue_job("refresh_daily_materialized_views", _queue_name=ANALYTICS, _job_id="nightly-views")
        is None
    )


async def test_an_expired_job_ends_failed_and_result_raises(
    arq_pool: ArqRedis, spawn_worker: Any, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    job = await arq_pool.enqueue_job(
        "refresh_all_materialized_views",
        _queue_name=ANALYTICS,
        _defer_by=timedelta(seconds=1.5),
        _expires=timedelta(milliseconds=300),
    )
    assert job is not None
    spawn_worker("worker.analytics.Settings")
    with pytest.raises(JobFailed, match="payload missing"):
        await job.result(timeout=30, poll_delay=0.05)
    status = await finished(app_client, auth, job.job_id)
    assert status["status"] == "failed" and "expired" in status["error"]
    assert await assert_arq_agrees(job, app_client, auth) == "failed"


async def test_a_failing_task_and_refused_arguments_raise_from_result(
    arq_pool: ArqRedis, spawn_worker: Any, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    spawn_worker("tests.platform_worker.Settings")
    spawn_worker("worker.analytics.Settings")
    running = await arq_pool.enqueue_job("sleep", 2, tag="arq", _queue_name=PLATFORM)
    broken = await arq_pool.enqueue_job("broken", _queue_name=PLATFORM)
    refused = await arq_pool.enqueue_job("refresh_all_materialized_views", "surplus", _queue_name=ANALYTICS)
    assert running is not None and broken is not None and refused is not None
    await wait_for(lambda: _is_running(app_client, auth, running.job_id))
    assert await assert_arq_agrees(running, app_client, auth) == "in_progress"
    assert await running.result(timeout=30, poll_delay=0.05) == {"slept": 2, "pid": pytest.approx(1, abs=1 << 30)}
    with pytest.raises(JobFailed, match="ValueError: bad input for broken"):
        await broken.result(timeout=30, poll_delay=0.05)
    with pytest.raises(JobFailed, match="takes at most 0 positional arguments, got 1"):
        await refused.result(timeout=30, poll_delay=0.05)
    for job in (broken, refused):
        assert (await finished(app_client, auth, job.job_id))["status"] == "failed"
        assert await assert_arq_agrees(job, app_client, auth) == "failed"


async def _is_running(app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]], job_id: str) -> bool:
    return (await api_status(app_client, auth, job_id))["status"] == "in_progress"


async def test_arq_reads_jobs_our_api_enqueued(
    arq_pool: ArqRedis,
    db: asyncpg.Pool,
    spawn_worker: Any,
    app_client: httpx.AsyncClient,
    auth: dict[str, dict[str, str]],
) -> None:
    ours = await client.enqueue_task(arq_pool, OPERATOR, "refresh_realtime_materialized_views", priority=7)
    later = await client.enqueue_task(arq_pool, OPERATOR, "refresh_realtime_materialized_views", defer_seconds=60)
    job = Job(ours.task_id, arq_pool, _queue_name=ANALYTICS, _deserializer=AnalyticsSettings.job_deserializer)
    waiting = Job(later.task_id, arq_pool, _queue_name=ANALYTICS, _deserializer=AnalyticsSettings.job_deserializer)
    assert await assert_arq_agrees(job, app_client, auth) == "queued"
    assert await assert_arq_agrees(waiting, app_client, auth) == "deferred"
    spawn_worker("worker.analytics.Settings")
    result = await job.result(timeout=60, poll_delay=0.05)
    assert (await api_status(app_client, auth, ours.task_id))["result"] == result
    assert await assert_arq_agrees(job, app_client, auth) == "complete"
    info = await job.result_info()
    assert info is not None and info.success and info.job_try == 1 and info.function == ours.task_name


async def test_arq_abort_stops_a_deferred_and_a_running_job(
    arq_pool: ArqRedis, spawn_worker: Any, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    spawn_worker("tests.platform_worker.Settings")
    later = await arq_pool.enqueue_job("record", "never", _queue_name=PLATFORM, _defer_by=timedelta(seconds=30))
    running = await arq_pool.enqueue_job("sleep", 30, tag="arq-abort", _queue_name=PLATFORM)
    assert later is not None and running is not None
    await wait_for(lambda: _is_running(app_client, auth, running.job_id))
    # arq makes a deferred job due at once to abort it: it must end aborted, never run
    assert await later.abort(timeout=10, poll_delay=0.05) is True
    assert await running.abort(timeout=10, poll_delay=0.05) is True
    for job in (later, running):
        status = await finished(app_client, auth, job.job_id)
        assert status["status"] == "aborted", status
    assert b"never" not in await arq_pool.lrange("test:order", 0, -1)  # type: ignore[misc]
