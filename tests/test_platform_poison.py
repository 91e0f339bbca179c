"""Nothing is dropped silently and no payload can stop a worker: every unrunnable id found in Redis ends as a
failed job that says why, while the good jobs claimed with it run at once. A real worker process."""

from __future__ import annotations

import asyncio
import json
import pickle
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

from tests.conftest import enqueue_job, wait_for
from worker import client, jobstore
from worker.metrics import METRICS_KEY

QUEUE = "platform"  # tests/platform_worker.py
SETTINGS = "tests.platform_worker.Settings"


class _CreatesAFile:
    """Unpickling this would create `path`: proof that a pickled payload is never loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.path), "w")


def _ours(task: str, **changes: Any) -> dict[str, Any]:
    now = jobstore.now_ms()
    payload = {
        "f": task,
        "a": [],
        "k": {"tag": "x"},
        "t": 0,
        "et": now,
        "queue": QUEUE,
        "priority": 5,
        "due_ms": now,
        "retry_of": None,
        "notify": False,
        "last_error": None,
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not _DROP}


_DROP = object()


async def _plant(redis: Redis, job_id: str, raw: bytes | None) -> None:
    """Queue an id the way a foreign writer could: ready to claim, with whatever payload (or none)."""
    keys = jobstore.QueueKeys(QUEUE)
    async with redis.pipeline(transaction=True) as pipe:
        if raw is not None:
            pipe.set(jobstore.job_key(job_id), raw)
        pipe.zadd(keys.schedule, {job_id: jobstore.PROMOTED})
        pipe.zadd(keys.ready, {job_id: 4 * 10**13 + jobstore.now_ms()})
        await pipe.execute()


async def test_poison_payloads_fail_with_a_reason_and_the_good_jobs_run(
    clean_redis: Redis,
    db: asyncpg.Pool,
    spawn_worker: Any,
    app_client: httpx.AsyncClient,
    auth: dict[str, dict[str, str]],
    tmp_path: Path,
) -> None:
    marker = tmp_path / "unpickled"
    poison = {
        "missing": (None, "payload missing"),
        "garbage": (b"\x80\x04\xff not json at all", "not valid JSON"),
        "array": (b"[1, 2, 3]", "payload is a JSON array, not an object"),
        "pickle": (pickle.dumps(_CreatesAFile(marker)), "not valid JSON"),
        "no-task": (json.dumps(_ours("record", f=_DROP)).encode(), "payload field 'f' (the task name) is missing"),
        "no-priority": (
            json.dumps(_ours("record", priority=_DROP)).encode(),
            "payload field 'priority' (the priority) is missing",
        ),
        "bad-type": (json.dumps(_ours("record", k=["tag"])).encode(), "'k' (keyword arguments) must be a JSON object"),
        "unknown-task": (
            json.dumps(_ours("no_such_task")).encode(),
            "task 'no_such_task' is not registered on queue 'platform'",
        ),
    }
    good = []
    for i, (name, (raw, _)) in enumerate(poison.items()):
        good.append(await enqueue_job(clean_redis, "record", QUEUE, {"tag": f"good-{i}"}))
        await _plant(clean_redis, f"poison-{name}", raw)
    good.append(await enqueue_job(clean_redis, "record", QUEUE, {"tag": "good-last"}))

    worker = spawn_worker(SETTINGS)
    pages = asyncio.create_task(_pages_answer_200_meanwhile(app_client, auth))
    statuses = {job_id: await _finished(clean_redis, db, job_id) for job_id in good}
    assert all(s.status == "complete" for s in statuses.values())
    started = [s.started_at for s in statuses.values() if s.started_at]
    assert max(s.finished_at for s in statuses.values() if s.finished_at) - min(started) < _SECOND
    for name, (_, reason) in poison.items():
        failed = await _finished(clean_redis, db, f"poison-{name}")
        assert failed.status == "failed" and failed.error is not None and reason in failed.error, (name, failed)
    assert not marker.exists()  # the pickle was never loaded
    assert worker.poll() is None  # the worker process never exited
    after = await enqueue_job(clean_redis, "record", QUEUE, {"tag": "after"})
    assert (await _finished(clean_redis, db, after)).status == "complete"  # and it keeps serving
    assert await pages == 0

    listed = await app_client.get("/jobs?status=failed&limit=100", headers=auth["read"])
    assert listed.status_code == 200
    assert {f"poison-{n}" for n in poison} <= {j["task_id"] for j in listed.json()}
    await wait_for(lambda: _history_has(db, len(poison)), timeout=15)
    failures = await _failure_metric(clean_redis)
    assert failures["record"] >= 2 and failures["unknown"] >= 4 and failures["no_such_task"] == 1


_SECOND = timedelta(seconds=1)


async def _finished(redis: Redis, db: asyncpg.Pool, job_id: str) -> Any:
    async def done() -> Any:
        status = await client.job_status(redis, db, job_id)
        return status if status.status in ("complete", "failed", "aborted") else None

    return await wait_for(done, timeout=30)


async def _pages_answer_200_meanwhile(app_client: httpx.AsyncClient, auth: dict[str, dict[str, str]]) -> int:
    """Polls the status routes for about two seconds; returns how many answers were not 200."""
    bad = 0
    for _ in range(20):
        paths = (
            "/jobs",
            "/jobs?status=failed",
            "/dashboard",
            "/dashboard/api/jobs",
            "/dashboard/api/overview",
            "/queues",
        )
        for path in (*paths, "/jobs/poison-array", "/dashboard/api/jobs/poison-array"):
            if (await app_client.get(path, headers=auth["read"])).status_code != 200:
                bad += 1
        await asyncio.sleep(0.1)
    return bad


async def _history_has(db: asyncpg.Pool, n: int) -> bool:
    count = await db.fetchval("SELECT count(*) FROM job_runs WHERE job_id LIKE 'poison-%' AND status = 'failed'")
    return bool(count >= n)


async def _failure_metric(redis: Redis) -> dict[str, float]:
    async def flushed() -> dict[str, float] | None:
        raw = await redis.hgetall(METRICS_KEY)  # type: ignore[misc]
        counts = {
            json.loads(k)[1]: float(v)
            for k, v in raw.items()
            if json.loads(k)[0] == "total" and json.loads(k)[-1] == "failure"
        }
        return counts if counts.get("no_such_task") else None

    result: dict[str, float] = await wait_for(flushed, timeout=10)
    return {"record": result.get("record", 0), "unknown": result.get("unknown", 0), **result}
