"""What the monitoring page reads (worker/monitoring.py) and its JSON routes, without a browser: per-minute figures
from job_runs and the depth samples, workers alive and gone, the schedule's next runs, search and paging, tracebacks
by scope, every try of a job (run by real workers: a retried one, one lost with a SIGKILLed worker), and the routes'
refusals."""

from __future__ import annotations

import os
import signal
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

from db.queries.history import upsert_job_runs
from salesdash.auth import OPERATOR, Principal, Scope
from tests.conftest import enqueue_job, wait_for
from tests.private_servers import free_port
from worker import client, monitoring
from worker import jobstore as js
from worker.history import flush_history, record_to_row
from worker.records import JobRecord, WorkerInfo
from worker.registry import get_task


async def _finished(db: asyncpg.Pool, task: str, status: Any, finished: datetime, run_ms: int, **fields: Any) -> str:
    job_id = uuid.uuid4().hex
    end = int(finished.timestamp() * 1000)
    record = JobRecord(
        job_id, task, "maintenance", status, [], {}, end - run_ms - 10, end, 1, 5, end - run_ms, **fields
    )
    await upsert_job_runs(db, [record_to_row(record)])
    return job_id


async def test_queue_panels_count_each_minute_and_take_its_p95(db: asyncpg.Pool, clean_redis: Redis) -> None:
    now = datetime.now(UTC)
    minute = now.replace(second=0, microsecond=0) - timedelta(minutes=3)
    await db.execute("DELETE FROM job_runs WHERE finished_at >= $1", minute - timedelta(hours=1))
    for run_ms in range(10, 201, 10):  # 20 runs of 10..200 ms in one minute, two of them failed
        status = "failed" if run_ms in (50, 60) else "complete"
        await _finished(db, "prune_job_history", status, minute + timedelta(seconds=run_ms / 10), run_ms)
    await js.record_depth(clean_redis, "maintenance")
    await client.enqueue_task(clean_redis, OPERATOR, "prune_job_history")
    await js.record_depth(clean_redis, "maintenance")  # the minute's last sample wins

    [panel] = [p for p in await monitoring.queue_panels(clean_redis, db, now) if p.name == "maintenance"]
    assert len(panel.minutes) == monitoring.WINDOW_MINUTES
    assert panel.minutes[-1].minute == now.replace(second=0, microsecond=0)
    point = next(p for p in panel.minutes if p.minute == minute)
    assert (point.finished, point.failed) == (20, 2)
    assert point.p95_ms == sorted_p95([float(ms) for ms in range(10, 201, 10)])
    assert sum(p.finished for p in panel.minutes) == 20
    assert panel.minutes[-1].depth == 1 and panel.minutes[0].depth is None
    assert panel.queued == 1 and panel.oldest_wait_s is not None and 0 <= panel.oldest_wait_s < 60


def sorted_p95(values: list[float]) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between the ranks around 0.95·(n-1)."""
    values = sorted(values)
    rank = 0.95 * (len(values) - 1)
    low = int(rank)
    return values[low] + (values[min(low + 1, len(values) - 1)] - values[low]) * (rank - low)


async def test_workers_that_stop_reporting_are_listed_as_gone(clean_redis: Redis) -> None:
    now = js.now_ms()

    def info(worker_id: str, seen_ms: int) -> WorkerInfo:
        return WorkerInfo(
            worker_id=worker_id, queue="analytics", host="h", pid=1, functions=[], running=[], jobs_complete=0,
            jobs_failed=0, jobs_retried=0, max_jobs=4, seen_ms=seen_ms, started_ms=now - 60_000, rss_bytes=10 << 20,
        )  # fmt: skip

    await js.register_worker(clean_redis, info("alive", now))
    await js.register_worker(clean_redis, info("crashed", now - js.WORKER_TTL_MS - 1000))
    await clean_redis.zadd(js.WORKERS_KEY, {"long-gone": now - 2 * 3600 * 1000})
    rows = await monitoring.worker_rows(clean_redis)
    assert [(r.worker_id, r.alive) for r in rows] == [("alive", True), ("crashed", False)]
    assert rows[0].info is not None and rows[0].info.rss_bytes == 10 << 20 and rows[1].info is None


def test_next_run_follows_the_schedule_in_the_store_timezone() -> None:
    at = datetime(2026, 1, 5, 10, 0, 30, tzinfo=UTC)  # a Monday; the suite runs in UTC
    assert monitoring.next_run(get_task("check_low_stock_products"), at) == datetime(2026, 1, 6, 9, 0, tzinfo=UTC)
    assert monitoring.next_run(get_task("warm_dashboard_cache"), at) == datetime(2026, 1, 5, 10, 2, tzinfo=UTC)
    assert monitoring.next_run(get_task("clean_old_order_partitions"), at) == datetime(2026, 1, 11, 4, tzinfo=UTC)
    assert monitoring.next_run(get_task("refresh_all_materialized_views"), at) is None


async def test_schedule_rows_carry_the_outcome_of_the_last_recorded_tick(db: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    health, exports = get_task("check_system_health"), get_task("prune_exports")
    last, before = monitoring.recent_ticks(health, now)
    assert last <= now < last + timedelta(minutes=10) and last - before == timedelta(minutes=10)
    assert last.minute % 10 == 0 and last.second == 0
    [daily, daily_before] = monitoring.recent_ticks(exports, now)
    assert (daily.hour, daily.minute) == (1, 45) and daily - daily_before == timedelta(days=1)

    async def record(spec: Any, tick: datetime, status: Any, **fields: Any) -> str:
        job_id = monitoring.cron_job_id(spec, tick)
        end = int(tick.timestamp() * 1000) + 50
        row = JobRecord(job_id, spec.name, spec.queue.value, status, [], {}, end - 50, end, 1, 5, end - 40, **fields)
        await upsert_job_runs(db, [record_to_row(row)])
        return job_id

    await record(health, before, "complete")
    older = await record(exports, daily_before, "complete")
    newer = await record(exports, daily, "failed", error="disk full")
    rows = {r.task_name: r for r in await monitoring.schedule_rows(db, now)}
    # the last tick's job is not recorded yet (still running, or missed): the tick before it answers
    assert rows["check_system_health"].last_job_id == monitoring.cron_job_id(health, before)
    assert rows["check_system_health"].last_status == "complete"
    assert (rows["prune_exports"].last_job_id, rows["prune_exports"].last_status) == (newer, "failed")
    assert older != newer and rows["clean_old_order_partitions"].last_status is None  # never ran here
    assert "refresh_all_materialized_views" not in rows  # on demand only
    assert all(r.next_run and r.next_run > now for r in rows.values())


async def test_search_pages_through_history_newest_first(db: asyncpg.Pool, clean_redis: Redis) -> None:
    tag = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    ids = []
    for i in range(monitoring.PAGE_SIZE + 3):
        job_id = await _finished(db, "prune_old_records", "complete", now - timedelta(seconds=i), 5)
        ids.append(job_id)
    await db.execute("UPDATE job_runs SET kwargs = $2 WHERE job_id = ANY($1)", ids, {"batch": f"x_{tag}%"})
    first = await monitoring.search_jobs(clean_redis, db, monitoring.JobFilter(text=f"x_{tag}%"))
    second = await monitoring.search_jobs(clean_redis, db, monitoring.JobFilter(text=f"x_{tag}%", page=2))
    assert [r.status.task_id for r in first.jobs + second.jobs] == ids
    assert first.has_more and not second.has_more and len(second.jobs) == 3
    # LIKE's wildcards in the search text are literal
    assert (await monitoring.search_jobs(clean_redis, db, monitoring.JobFilter(text=f"x{tag}"))).jobs == []
    by_prefix = await monitoring.search_jobs(clean_redis, db, monitoring.JobFilter(text=ids[4][:10]))
    assert [r.status.task_id for r in by_prefix.jobs] == [ids[4]]
    # text looks back SEARCH_WINDOW unless `since` is given; a whole id is found however old
    old = await _finished(db, "prune_old_records", "complete", now - timedelta(days=40), 5)
    await db.execute("UPDATE job_runs SET kwargs = $2 WHERE job_id = $1", old, {"batch": f"old-{tag}"})
    assert (await monitoring.search_jobs(clean_redis, db, monitoring.JobFilter(text=f"old-{tag}"))).jobs == []
    longer = monitoring.JobFilter(text=f"old-{tag}", since=now - timedelta(days=41))
    assert [r.status.task_id for r in (await monitoring.search_jobs(clean_redis, db, longer)).jobs] == [old]
    whole_id = await monitoring.search_jobs(clean_redis, db, monitoring.JobFilter(text=old))
    assert [r.status.task_id for r in whole_id.jobs] == [old]
    other_status = await monitoring.search_jobs(clean_redis, db, monitoring.JobFilter(text=old, status="failed"))
    assert other_status.jobs == []  # the other filters still apply to it
    window = monitoring.JobFilter(text=tag, since=now - timedelta(seconds=5.5), until=now - timedelta(seconds=1.5))
    assert [r.status.task_id for r in (await monitoring.search_jobs(clean_redis, db, window)).jobs] == ids[2:6]
    # without an offset a time is the store's (the suite runs in UTC)
    naive = monitoring.JobFilter(text=tag, since=window.since.replace(tzinfo=None), until=window.until)  # type: ignore[union-attr]
    assert [r.status.task_id for r in (await monitoring.search_jobs(clean_redis, db, naive)).jobs] == ids[2:6]


async def test_search_leads_with_live_jobs_that_match(db: asyncpg.Pool, clean_redis: Redis) -> None:
    month = "2025-07"
    job = await client.enqueue_task(clean_redis, OPERATOR, "generate_monthly_report", kwargs={"month": month})
    other = await client.enqueue_task(clean_redis, OPERATOR, "check_low_stock_products")
    found = await monitoring.search_jobs(clean_redis, db, monitoring.JobFilter(text=month, status="queued"))
    assert [(r.status.task_id, r.kwargs) for r in found.jobs] == [(job.task_id, {"month": month})]
    by_task = await monitoring.search_jobs(clean_redis, db, monitoring.JobFilter(task="check_low_stock_products"))
    assert by_task.jobs[0].status.task_id == other.task_id
    page_two = await monitoring.search_jobs(clean_redis, db, monitoring.JobFilter(text=month, page=2))
    assert job.task_id not in {r.status.task_id for r in page_two.jobs}


async def test_tracebacks_and_actions_follow_the_scope(db: asyncpg.Pool, clean_redis: Redis) -> None:
    job_id = await _finished(
        db, "prune_job_history", "failed", datetime.now(UTC), 5, error="boom", traceback="Traceback: secret path"
    )
    seen = {}
    for scope in Scope:
        seen[scope] = await monitoring.job_detail(clean_redis, db, Principal(frozenset({scope})), job_id)
    assert seen[Scope.ADMIN].job.traceback == "Traceback: secret path" and not seen[Scope.ADMIN].traceback_hidden
    for scope in (Scope.READ, Scope.TRIGGER):
        assert seen[scope].job.traceback is None and seen[scope].traceback_hidden and seen[scope].job.error == "boom"
    # prune_job_history is an admin task: only admin may retry it
    assert [seen[s].can_retry for s in Scope] == [False, False, True]
    assert not any(seen[s].can_abort for s in Scope)  # finished


def test_task_forms_are_the_tasks_a_scope_may_run_with_their_schemas() -> None:
    assert monitoring.task_forms(Principal(frozenset({Scope.READ}))) == []
    trigger = {f.name: f for f in monitoring.task_forms(Principal(frozenset({Scope.TRIGGER})))}
    assert "prune_job_history" not in trigger and "refresh_all_materialized_views" in trigger
    export = trigger["export_analytics_data"].arguments
    assert export["required"] == ["start_date", "end_date"]
    assert export["properties"]["export_format"]["enum"] == ["json", "csv", "parquet"]
    admin = monitoring.task_forms(OPERATOR)
    assert {f.name for f in admin} >= {"prune_job_history", "clean_old_order_partitions"}


async def test_routes_refuse_bad_filters_unknown_jobs_and_strangers(
    app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]
) -> None:
    assert (await app_client.get("/dashboard/api/overview")).status_code == 401
    bad = await app_client.get("/dashboard/api/jobs?status=sleeping", headers=auth["read"])
    assert bad.status_code == 422 and "unknown status 'sleeping'" in bad.json()["detail"]
    since, until = "2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z"
    backwards = await app_client.get(f"/dashboard/api/jobs?since={since}&until={until}", headers=auth["read"])
    assert backwards.status_code == 422 and "until must be after since" in backwards.json()["detail"]
    naive = await app_client.get("/dashboard/api/jobs?since=2026-01-01T10:00&status=queued", headers=auth["read"])
    assert naive.status_code == 200
    missing = await app_client.get("/dashboard/api/jobs/no-such-job", headers=auth["read"])
    assert missing.status_code == 404 and "no-such-job" in missing.json()["detail"]
    refused = await app_client.post(
        "/dashboard/api/jobs", json={"task_name": "prune_job_history"}, headers=auth["trigger"]
    )
    assert refused.status_code == 403
    wrong = await app_client.post(
        "/dashboard/api/jobs", json={"task_name": "generate_monthly_report", "kwargs": {"month": "2999-01"}},
        headers=auth["trigger"],
    )  # fmt: skip
    assert wrong.status_code == 422 and "month" in wrong.json()["detail"] and "future" in wrong.json()["detail"]
    page = await app_client.get("/dashboard", headers=auth["read"])
    assert 'data-can-trigger="no"' in page.text and 'id="trigger"' not in page.text


# ---- every try, from real workers -------------------------------------------------------------------------------
PLATFORM = "tests.platform_worker.Settings"


async def _tries_when(
    app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]], job_id: str, count: int
) -> list[dict[str, Any]]:
    detail = (await app_client.get(f"/dashboard/api/jobs/{job_id}", headers=auth["read"])).json()
    tries: list[dict[str, Any]] = detail["tries"]
    return tries if detail["job"]["status"] == "complete" and len(tries) >= count else []


async def test_a_job_failing_once_shows_both_tries_with_outcome_and_timing(
    clean_redis: Redis, db: asyncpg.Pool, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]],
    spawn_worker: Any,
) -> None:  # fmt: skip
    key = f"test:flaky:{uuid.uuid4().hex}"
    job_id = await enqueue_job(clean_redis, "flaky", "platform", {"key": key, "failures": 1})
    worker = spawn_worker(PLATFORM, args=["--burst"])
    assert worker.wait(timeout=60) == 0  # burst: runs both tries, flushes history on the way out
    first, second = await wait_for(lambda: _tries_when(app_client, auth, job_id, 2), timeout=10)
    assert (first["try_no"], first["outcome"]) == (1, "retried")
    assert first["error"] == "ConnectionError: transient fault on attempt 1"
    assert (second["try_no"], second["outcome"], second["error"]) == (2, "complete", None)
    for t in (first, second):
        started, finished = datetime.fromisoformat(t["started_at"]), datetime.fromisoformat(t["finished_at"])
        assert started <= finished and t["duration_ms"] == (finished - started).total_seconds() * 1000
        assert t["worker_id"].split(":")[1] == str(worker.pid) and t["host"] == t["worker_id"].split(":")[0]
    assert second["started_at"] > first["finished_at"]  # the retry waited out its backoff


async def test_a_try_whose_worker_was_killed_shows_as_lost(
    clean_redis: Redis, db: asyncpg.Pool, app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]],
    spawn_worker: Any,
) -> None:  # fmt: skip
    fast = {"SALESDASH_LEASE_SECONDS": "2"}
    job_id = await enqueue_job(clean_redis, "sleep", "platform", {"seconds": 1.5, "tag": "killed"})
    doomed = spawn_worker(PLATFORM, extra_env=fast)
    await wait_for(lambda: clean_redis.llen("test:started"), timeout=30, interval=0.05)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=10)
    survivor = spawn_worker(PLATFORM, extra_env=fast)  # sweeps the expired lease, runs the job again

    async def flushed() -> list[dict[str, Any]]:
        await flush_history(clean_redis, db, "test")
        return await _tries_when(app_client, auth, job_id, 2)

    lost, done = await wait_for(flushed, timeout=40, interval=0.3)
    assert (lost["try_no"], lost["outcome"]) == (1, "lost") and lost["worker_id"].split(":")[1] == str(doomed.pid)
    assert "stopped renewing the lease" in lost["error"] and lost["started_at"] < lost["finished_at"]
    assert (done["try_no"], done["outcome"]) == (2, "complete") and done["worker_id"].split(":")[1] == str(survivor.pid)
    assert done["duration_ms"] >= 1500 and done["started_at"] >= lost["finished_at"]


async def test_a_live_jobs_detail_answers_without_postgresql_and_says_its_tries_are_unknown(
    clean_redis: Redis,
) -> None:
    job_id = await enqueue_job(clean_redis, "noop", "platform")
    nowhere = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", min_size=0)
    try:
        detail = await monitoring.job_detail(clean_redis, nowhere, OPERATOR, job_id)
    finally:
        await nowhere.close()
    assert detail.job.status == "queued" and detail.tries is None
