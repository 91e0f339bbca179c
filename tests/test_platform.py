"""Issue 3: the job platform, with real worker processes and real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from salesdash.auth import OPERATOR
from tests.conftest import enqueue_job, wait_for
from worker import client, jobstore

QUEUE = "platform"
SETTINGS = "tests.platform_worker.Settings"


async def enqueue(redis: Redis, task: str, priority: int = 5, **kwargs: Any) -> str:
    return await enqueue_job(redis, task, QUEUE, kwargs, priority=priority)


async def status_of(redis: Redis, db: asyncpg.Pool, job_id: str) -> dict[str, Any]:
    return (await client.job_status(redis, db, job_id)).model_dump()


async def finished(redis: Redis, db: asyncpg.Pool, job_id: str, timeout: float = 30) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        status = await status_of(redis, db, job_id)
        return status if status["status"] in ("complete", "failed", "aborted") else None

    result: dict[str, Any] = await wait_for(done, timeout)
    return result


async def test_priority_job_starts_before_a_waiting_backlog(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any
) -> None:
    for i in range(1000):
        await enqueue(clean_redis, "record", priority=3, tag=f"p3-{i}")
    urgent = await enqueue(clean_redis, "record", priority=9, tag="p9")
    spawn_worker(SETTINGS)
    await finished(clean_redis, db, urgent)
    await wait_for(lambda: _list_len(clean_redis, "test:order", 1001), timeout=60)
    order = [t.decode() for t in await clean_redis.lrange("test:order", 0, -1)]  # type: ignore[misc]
    assert order[0] == "p9"
    # FIFO within a priority, to the millisecond (jobs enqueued in the same ms tie; ten run concurrently)
    assert all(int(tag.split("-")[1]) < 300 for tag in order[1:11]), order[1:11]


async def _list_len(redis: Redis, key: str, at_least: int) -> bool:
    return bool(await redis.llen(key) >= at_least)  # type: ignore[misc]


async def test_retries_transient_faults_and_fails_permanent_ones_at_once(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any
) -> None:
    spawn_worker(SETTINGS)
    recovers = await enqueue(clean_redis, "flaky", key="test:flaky:a", failures=2)
    exhausts = await enqueue(clean_redis, "flaky", key="test:flaky:b", failures=10)
    permanent = await enqueue(clean_redis, "broken")

    ok = await finished(clean_redis, db, recovers)
    assert ok["status"] == "complete" and ok["result"] == 3 and ok["tries"] == 3

    bad = await finished(clean_redis, db, permanent)
    assert bad["status"] == "failed" and bad["tries"] == 1
    assert "ValueError: bad input for broken" in bad["traceback"]

    gave_up = await finished(clean_redis, db, exhausts)
    assert gave_up["status"] == "failed" and gave_up["tries"] == 4
    assert "ConnectionError: transient fault on attempt 4" in gave_up["traceback"]
    assert int(await clean_redis.get("test:flaky:b")) == 4  # no fifth try


async def test_backoff_grows_and_is_capped() -> None:
    import random

    from worker.registry import RetryPolicy
    from worker.retry import backoff_seconds, is_transient

    policy = RetryPolicy(max_tries=10, backoff_base_s=1, backoff_cap_s=8)
    rng = random.Random(1)
    delays = [backoff_seconds(policy, n, rng) for n in range(1, 8)]
    assert 0.5 <= delays[0] <= 1 and 1 <= delays[1] <= 2 and 2 <= delays[2] <= 4
    assert all(4 <= d <= 8 for d in delays[3:])  # capped
    deadlock = asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
    assert is_transient(deadlock) and is_transient(ConnectionResetError())
    assert not is_transient(ValueError("bad")) and not is_transient(KeyError("x"))


async def test_hung_job_times_out_and_the_worker_keeps_serving(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any
) -> None:
    spawn_worker(SETTINGS)
    hung = await enqueue(clean_redis, "hang")
    after = await enqueue(clean_redis, "record", tag="after-hang")
    status = await finished(clean_redis, db, hung, timeout=20)
    assert status["status"] == "failed" and "timed out after 1s" in status["error"]
    assert (await finished(clean_redis, db, after))["status"] == "complete"


async def test_results_expire_per_task_and_history_takes_over(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any
) -> None:
    spawn_worker(SETTINGS)
    job_id = await enqueue(clean_redis, "broken")  # registered with keep_result=3 s, failures included
    await finished(clean_redis, db, job_id)
    ttl_ms = await clean_redis.pttl(jobstore.result_key(job_id))
    assert 0 < ttl_ms <= 3000
    await wait_for(lambda: db.fetchval("SELECT status FROM job_runs WHERE job_id = $1", job_id), timeout=10)
    await wait_for(lambda: _gone(clean_redis, jobstore.result_key(job_id)), timeout=10)
    row = await db.fetchrow("SELECT * FROM job_runs WHERE job_id = $1", job_id)
    assert row["status"] == "failed" and row["task_name"] == "broken" and row["queue"] == QUEUE
    assert row["tries"] == 1 and "ValueError" in row["traceback"] and row["worker_id"]
    assert row["finished_at"] >= row["started_at"] >= row["enqueued_at"] and row["duration_ms"] >= 0
    status = await status_of(clean_redis, db, job_id)  # now served from PostgreSQL
    assert status["status"] == "failed" and status["error"].startswith("ValueError")


async def _gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


async def test_abort_queued_and_running_jobs_and_unknown_ids_harm_nothing(
    clean_redis: Redis,
    db: asyncpg.Pool,
    spawn_worker: Any,
    app_client: httpx.AsyncClient,
    auth: dict[str, dict[str, str]],
) -> None:
    queued = await enqueue(clean_redis, "record", tag="never")
    # the test tasks are not in the task table, so only admin may touch their jobs (tests/test_auth.py)
    gone = await app_client.delete(f"/jobs/{queued}", headers=auth["admin"])
    assert gone.status_code == 200 and gone.json()["previous_status"] == "queued"
    assert (await status_of(clean_redis, db, queued))["status"] == "aborted"

    spawn_worker(SETTINGS)
    running = await enqueue(clean_redis, "sleep", seconds=30, tag="abort-me")
    await wait_for(lambda: _is(clean_redis, db, running, "in_progress"))
    mutation = f'mutation {{ abortTask(taskId: "{running}") {{ success previousStatus }} }}'
    body = (await app_client.post("/graphql", json={"query": mutation}, headers=auth["admin"])).json()
    assert body["data"]["abortTask"] == {"success": True, "previousStatus": "in_progress"}
    started = time.monotonic()
    assert (await finished(clean_redis, db, running, timeout=10))["status"] == "aborted"
    assert time.monotonic() - started < 5

    unknown = jobstore.new_job_id()
    assert (await app_client.delete(f"/jobs/{unknown}", headers=auth["admin"])).status_code == 404
    await enqueue_job(clean_redis, "record", QUEUE, {"tag": "later"}, job_id=unknown)
    assert (await finished(clean_redis, db, unknown))["status"] == "complete"
    assert b"never" not in await clean_redis.lrange("test:order", 0, -1)  # type: ignore[misc]


async def _is(redis: Redis, db: asyncpg.Pool, job_id: str, status: str) -> bool:
    return (await status_of(redis, db, job_id))["status"] == status


async def test_job_of_a_killed_worker_runs_again_within_a_minute(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any
) -> None:
    doomed = spawn_worker(SETTINGS)
    job_id = await enqueue(clean_redis, "sleep", seconds=3, tag="crash")
    await wait_for(lambda: _list_len(clean_redis, "test:started", 1), timeout=20)
    doomed.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    doomed.wait()
    survivor = spawn_worker(SETTINGS)
    status = await finished(clean_redis, db, job_id, timeout=60)
    recovered_in = time.monotonic() - killed_at
    assert status["status"] == "complete" and recovered_in < 60
    assert status["result"]["pid"] == survivor.pid
    assert status["tries"] == 2  # the lost try counts


async def test_sigterm_finishes_short_jobs_and_hands_back_the_rest(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any
) -> None:
    worker = spawn_worker(SETTINGS, extra_env={"SALESDASH_SHUTDOWN_TIMEOUT": "3"})
    short = await enqueue(clean_redis, "sleep", seconds=1, tag="short")
    long = await enqueue(clean_redis, "sleep", seconds=60, tag="long")
    await wait_for(lambda: _list_len(clean_redis, "test:started", 2), timeout=20)
    worker.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert await asyncio.to_thread(worker.wait, 20) == 0
    assert time.monotonic() - stopped_at < 8
    assert (await status_of(clean_redis, db, short))["status"] == "complete"
    handed_back = await status_of(clean_redis, db, long)
    assert handed_back["status"] == "queued"
    assert (await jobstore.queue_counts(clean_redis, QUEUE))["in_progress"] == 0


async def test_replicas_run_each_cron_tick_once(clean_redis: Redis, spawn_worker: Any) -> None:
    for _ in range(3):
        spawn_worker("tests.platform_worker.CronSettings")

    async def all_up() -> bool:
        return len([w for w in await client.workers(clean_redis) if w.queue == "platformcron"]) == 3

    await wait_for(all_up, timeout=30)
    await asyncio.sleep(6)
    keys = await clean_redis.keys("test:tick:*")
    counts = [int(await clean_redis.get(k)) for k in keys]
    assert len(counts) >= 4  # one tick a second
    assert set(counts) == {1}, counts  # each tick ran once, whichever replica enqueued it first


async def test_idle_replicas_are_not_starved_by_running_jobs(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any
) -> None:
    for _ in range(3):
        spawn_worker(SETTINGS, extra_env={"TEST_MAX_JOBS": "2"})
    await wait_for(lambda: _workers_alive(clean_redis, 3), timeout=20)
    busy = [await enqueue(clean_redis, "sleep", seconds=15, tag=f"busy{i}") for i in range(2)]
    await wait_for(lambda: _list_len(clean_redis, "test:started", 2), timeout=10)
    quick = [await enqueue(clean_redis, "record", tag=f"quick{i}") for i in range(4)]
    started = time.monotonic()
    for job_id in quick:
        assert (await finished(clean_redis, db, job_id, timeout=10))["status"] == "complete"
    assert time.monotonic() - started < 5
    for job_id in busy:
        assert (await status_of(clean_redis, db, job_id))["status"] == "in_progress"


async def _workers_alive(redis: Redis, n: int) -> bool:
    return len([w for w in await client.workers(redis) if w.queue == QUEUE]) >= n


async def test_progress_is_shown_in_status(clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any) -> None:
    spawn_worker(SETTINGS)
    job_id = await enqueue(clean_redis, "halfway", release_key="test:release")

    async def halfway() -> dict[str, Any] | None:
        status = await status_of(clean_redis, db, job_id)
        return status if status["progress"] else None

    status = await wait_for(halfway, timeout=20)
    assert status["status"] == "in_progress"
    assert status["progress"] == {"fraction": 0.5, "message": "half way"}
    await clean_redis.set("test:release", 1)
    assert (await finished(clean_redis, db, job_id))["result"] == "done"


async def test_metrics_cover_jobs_run_by_workers(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any, app_client: httpx.AsyncClient
) -> None:
    spawn_worker(SETTINGS)
    ok = [await enqueue(clean_redis, "record", tag=str(i)) for i in range(3)]
    bad = await enqueue(clean_redis, "broken")
    retried = await enqueue(clean_redis, "flaky", key="test:flaky:m", failures=1)
    for job_id in [*ok, bad, retried]:
        await finished(clean_redis, db, job_id)
    await enqueue(clean_redis, "sleep", seconds=30)  # keeps the worker busy so depth counts what waits
    await enqueue(clean_redis, "sleep", seconds=30, priority=0)

    async def scraped() -> str | None:
        text = (await app_client.get("/metrics")).text
        complete = 'status="success",task_name="flaky"' in text and 'status="failure"' in text
        return text if complete else None

    text = await wait_for(scraped, timeout=10)
    assert 'salesdash_task_total{queue="platform",status="success",task_name="record"} 3.0' in text
    assert 'salesdash_task_total{queue="platform",status="failure",task_name="broken"} 1.0' in text
    assert 'salesdash_task_total{queue="platform",status="retry",task_name="flaky"} 1.0' in text
    assert 'salesdash_task_total{queue="platform",status="started",task_name="flaky"} 2.0' in text
    assert 'salesdash_task_duration_seconds_count{queue="platform",task_name="record"} 3.0' in text
    assert 'salesdash_task_queue_wait_seconds_bucket{le="+Inf",queue="platform"}' in text
    assert 'salesdash_queue_depth{queue="analytics"} 0.0' in text
    assert 'salesdash_workers{queue="analytics"} 0.0' in text


async def test_failed_jobs_are_listed_and_can_run_again(
    clean_redis: Redis,
    db: asyncpg.Pool,
    spawn_worker: Any,
    app_client: httpx.AsyncClient,
    auth: dict[str, dict[str, str]],
) -> None:
    failed_job = await client.enqueue_task(clean_redis, OPERATOR, "send_daily_summary")
    await db.execute("ALTER TABLE notifications RENAME TO notifications_away")
    try:
        from tests.conftest import arq_burst

        assert arq_burst("notifications").returncode == 0
    finally:
        await db.execute("ALTER TABLE notifications_away RENAME TO notifications")
    await wait_for(lambda: db.fetchval("SELECT 1 FROM job_runs WHERE job_id = $1", failed_job.task_id))
    listed = await app_client.get("/jobs?status=failed&limit=100", headers=auth["read"])
    assert failed_job.task_id in {j["task_id"] for j in listed.json()}
    assert all(j["status"] == "failed" for j in listed.json())

    again = await app_client.post(f"/jobs/{failed_job.task_id}/retry", headers=auth["trigger"])
    assert again.status_code == 202
    new_id = again.json()["task_id"]
    assert new_id != failed_job.task_id
    from tests.conftest import arq_burst

    assert arq_burst("notifications").returncode == 0
    assert (await status_of(clean_redis, db, new_id))["status"] == "complete"
    done = await app_client.post(f"/jobs/{new_id}/retry", headers=auth["trigger"])
    assert done.status_code == 409  # only failed or aborted jobs are retried


async def test_one_log_line_per_job_event_as_json(clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any) -> None:
    worker = spawn_worker(SETTINGS, extra_env={"SALESDASH_LOG_JSON": "1"})
    job_id = await enqueue(clean_redis, "record", tag="logged")
    await finished(clean_redis, db, job_id)
    worker.send_signal(signal.SIGTERM)
    await asyncio.to_thread(worker.wait, 20)
    events = []
    for line in worker.log_path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("job_id") == job_id:
                events.append(entry)
    assert [e["msg"] for e in events] == ["job started", "job complete"]
    assert all(e["task"] == "record" and e["queue"] == QUEUE for e in events)


@pytest.mark.parametrize("priority", [-1, 10])
async def test_priority_out_of_range_is_rejected(clean_redis: Redis, priority: int) -> None:
    with pytest.raises(ValueError, match="priority"):
        await client.enqueue_task(clean_redis, OPERATOR, "refresh_all_materialized_views", priority=priority)
    assert await jobstore.queue_counts(clean_redis, "analytics") == {"queued": 0, "deferred": 0, "in_progress": 0}


async def test_arq_check_reports_a_live_worker(clean_redis: Redis, spawn_worker: Any) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    def check() -> int:
        return subprocess.run(
            [sys.executable, "-m", "arq", "--check", "worker.analytics.Settings"],
            cwd=ROOT,
            env=os.environ.copy(),
            capture_output=True,
            timeout=30,
        ).returncode

    assert await asyncio.to_thread(check) == 1  # nobody has written the health key yet
    spawn_worker("worker.analytics.Settings")

    async def healthy() -> bool:
        return await asyncio.to_thread(check) == 0

    await wait_for(healthy, timeout=20, interval=0.5)


async def test_worker_survives_a_redis_restart(
    db: asyncpg.Pool, spawn_worker: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis dies under an idle worker and comes back on the same port: the worker carries on [arq #435]."""
    from salesdash import embedded
    from salesdash.config import Settings
    from salesdash.connections import open_redis

    monkeypatch.setattr(embedded, "_started", [])  # our own Redis only; never touch the suite's servers
    own = Settings(DATABASE_URL=os.environ["DATABASE_URL"], REDIS_URL=None, SALESDASH_DATA_DIR=str(tmp_path))
    saved_url = os.environ["REDIS_URL"]
    monkeypatch.setenv("REDIS_URL", saved_url)  # monkeypatch now restores this value, whatever resolve_urls sets
    try:
        _, redis_url = await asyncio.to_thread(embedded.resolve_urls, own)
    finally:
        monkeypatch.setenv("REDIS_URL", saved_url)
    try:
        worker = spawn_worker(SETTINGS, extra_env={"REDIS_URL": redis_url})
        private = await open_redis(Settings(DATABASE_URL=os.environ["DATABASE_URL"], REDIS_URL=redis_url))
        first = await enqueue(private, "record", tag="before")
        assert (await finished(private, db, first))["status"] == "complete"
        await private.aclose(close_connection_pool=True)

        server = next(s for s in embedded._started if s.name == "redis")
        server.proc.kill()
        server.proc.wait()
        embedded._started.remove(server)
        await asyncio.sleep(2)  # the worker meets a dead Redis
        _, again_url = await asyncio.to_thread(embedded.resolve_urls, own)
        monkeypatch.setenv("REDIS_URL", saved_url)
        assert again_url == redis_url  # same data dir, same port

        private = await open_redis(Settings(DATABASE_URL=os.environ["DATABASE_URL"], REDIS_URL=redis_url))
        second = await enqueue(private, "record", tag="after")
        assert (await finished(private, db, second, timeout=30))["status"] == "complete"
        await private.aclose(close_connection_pool=True)
        assert worker.poll() is None and "redis unreachable, retrying" in worker.log_path.read_text()
    finally:
        embedded.stop_started()
