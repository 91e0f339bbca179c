"""Issue 12 point 2: a Redis Sentinel failover under load. A master, a replica and three Sentinels on loopback
(tests/private_redis.py); the master is SIGKILLed while a stream of enqueues runs and a worker runs them. The
worker, the API and the CLI follow the new master with no restart; with SALESDASH_ENQUEUE_REPLICA_WAIT_MS on,
every enqueue that was acknowledged survives and runs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.exceptions
from redis.asyncio import Redis

from salesdash.config import Settings
from salesdash.connections import open_redis
from tests.conftest import ROOT, wait_for
from tests.private_redis import sentinel_cluster
from worker import client, jobstore
from worker.records import JobPayload

SETTINGS = "tests.platform_worker.Settings"
QUEUE = "platform"
REPLICA_WAIT_MS = 250


@dataclass
class EnqueueStream:
    """Enqueues jobs back to back, as a client would: an error is noted and the next one tried shortly after."""

    redis: Redis
    replica_wait_ms: int
    acked: dict[str, float] = field(default_factory=dict)  # job id -> when acknowledged (monotonic)
    unacked: dict[str, float] = field(default_factory=dict)  # stored, but NotReplicatedError reported
    errors: list[tuple[float, str]] = field(default_factory=list)
    stop: bool = False

    async def run(self) -> None:
        i = 0
        while not self.stop:
            i += 1
            now = jobstore.now_ms()
            # every tenth job sleeps a while, so some are in flight at the kill
            task, kwargs = ("sleep", {"seconds": 0.3, "tag": f"s{i}"}) if i % 10 == 0 else ("record", {"tag": f"r{i}"})
            job = JobPayload(jobstore.new_job_id(), task, [], kwargs, QUEUE, 5, now, now)
            try:
                assert await jobstore.enqueue(self.redis, job, replica_wait_ms=self.replica_wait_ms)
                self.acked[job.id] = time.monotonic()
            except jobstore.NotReplicatedError:
                self.unacked[job.id] = time.monotonic()  # stored on the master; the caller was told
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                self.errors.append((time.monotonic(), type(e).__name__))
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(0.01)


async def _final(redis: Redis, db: asyncpg.Pool, job_id: str) -> str | None:
    try:
        status = (await client.job_status(redis, db, job_id)).status
    except client.JobNotFoundError:
        return "lost"
    return status if status in ("complete", "failed", "aborted") else None


async def _all_final(redis: Redis, db: asyncpg.Pool, ids: list[str]) -> dict[str, str] | None:
    states: dict[str, str] = {}
    for job_id in ids:
        state = await _final(redis, db, job_id)
        if state is None:
            return None
        states[job_id] = state
    return states


async def test_a_failover_under_load_loses_no_acknowledged_enqueue(
    db: asyncpg.Pool, spawn_worker: Any, auth: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    with sentinel_cluster(tmp_path / "redis", down_after_ms=1000) as cluster:
        url = cluster.url()
        redis = await open_redis(Settings(DATABASE_URL=os.environ["DATABASE_URL"], REDIS_URL=url))
        worker = spawn_worker(SETTINGS, extra_env={"REDIS_URL": url})
        stream = EnqueueStream(redis, REPLICA_WAIT_MS)
        streaming = asyncio.create_task(stream.run())
        try:
            await wait_for(lambda: _some_complete(redis, db, stream, 30), timeout=30)
            old, killed_at = cluster.kill_master()
            promoted_at = await asyncio.to_thread(cluster.wait_failover, old.port)
            # the only replica is now the master: enqueues are stored but reported, until a replica is back
            await wait_for(lambda: _stored_after(stream, killed_at, 5), timeout=20)
            await asyncio.to_thread(old.start)  # as a restart policy would: Sentinel makes it a replica
            rejoined_at = time.monotonic()
            await wait_for(lambda: _stored_after(stream, rejoined_at, 20, acked_only=True), timeout=20)
        finally:
            stream.stop = True
            await streaming
        ids = [*stream.acked, *stream.unacked]
        states = await wait_for(lambda: _all_final(redis, db, ids), timeout=60, interval=0.5)
        assert [i for i in stream.acked if states[i] != "complete"] == []  # no acknowledged enqueue lost
        # unacknowledged ones could have been lost (the caller was told), but nothing failed here after them
        assert {states[i] for i in stream.unacked} <= {"complete"}

        first_after = min(t for t in [*stream.acked.values(), *stream.unacked.values()] if t > killed_at)
        failover_s, resumed_s = promoted_at - killed_at, first_after - killed_at
        # enqueues resume within the failover time plus a client's reconnect, with no restart of anything
        assert resumed_s < failover_s + 3, (failover_s, resumed_s, stream.errors[-5:])
        assert worker.poll() is None

        await _api_and_cli_follow(redis, db, auth, url, ids[-1])
        await redis.aclose(close_connection_pool=True)


async def _some_complete(redis: Redis, db: asyncpg.Pool, stream: EnqueueStream, at_least: int) -> bool:
    ids = list(stream.acked)[:at_least]
    return len(ids) == at_least and all([await _final(redis, db, i) == "complete" for i in ids])


async def _stored_after(stream: EnqueueStream, moment: float, count: int, *, acked_only: bool = False) -> bool:
    times = [*stream.acked.values(), *([] if acked_only else stream.unacked.values())]
    return sum(1 for t in times if t > moment) >= count


async def _api_and_cli_follow(
    redis: Redis, db: asyncpg.Pool, auth: dict[str, dict[str, str]], url: str, job: str
) -> None:
    """The API (its pool opened on the Sentinel URL) and the CLI (a fresh process) read the new master."""
    from api.main import create_app

    app = create_app()
    app.state.db, app.state.redis = db, redis
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        response = await http.get(f"/jobs/{job}", headers=auth["read"])
    assert response.status_code == 200 and response.json()["status"] == "complete"

    cli = subprocess.run(
        [str(Path(sys.executable).parent / "salesdash"), "result", job, "--json"],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["status"] == "complete"


async def test_enqueue_reports_when_no_replica_acknowledges(
    db: asyncpg.Pool, auth: dict[str, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A master with no replica: the job is stored, and the caller is told it is not safe from a failover."""
    from api.main import create_app
    from salesdash.config import get_settings
    from tests.private_redis import redis_server

    server = redis_server(tmp_path, "lonely").start()
    try:
        redis = await open_redis(Settings(DATABASE_URL=os.environ["DATABASE_URL"], REDIS_URL=server.url))
        now = jobstore.now_ms()
        job = JobPayload(jobstore.new_job_id(), "record", [], {"tag": "x"}, QUEUE, 5, now, now)
        with pytest.raises(jobstore.NotReplicatedError, match=f"job {job.id} was stored on the Redis master"):
            await jobstore.enqueue(redis, job, replica_wait_ms=50)
        assert await redis.exists(jobstore.job_key(job.id)) == 1  # queued all the same
        other = JobPayload(jobstore.new_job_id(), "record", [], {"tag": "y"}, QUEUE, 5, now, now)
        assert await jobstore.enqueue(redis, other)  # the setting off: no wait, no report

        monkeypatch.setattr(get_settings(), "enqueue_replica_wait_ms", 50)
        app = create_app()
        app.state.db, app.state.redis = db, redis
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            body = {"task_name": "refresh_all_materialized_views"}
            response = await http.post("/jobs", json=body, headers=auth["admin"])
        assert response.status_code == 503, response.text
        detail = response.json()["detail"]
        assert "no replica acknowledged it within 50 ms" in detail
        queued = re.search(r"job (\w+) was stored", detail)
        assert queued is not None and await redis.exists(jobstore.job_key(queued.group(1))) == 1

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            query = 'mutation { triggerBackgroundTask(taskName: "refresh_all_materialized_views") '
            query += "{ success taskId message } }"
            answer = (await http.post("/graphql", json={"query": query}, headers=auth["admin"])).json()
        triggered = answer["data"]["triggerBackgroundTask"]
        assert triggered["success"] is False and "no replica acknowledged it" in triggered["message"]
        assert await redis.exists(jobstore.job_key(triggered["taskId"])) == 1

        env = {**os.environ, "REDIS_URL": server.url, "SALESDASH_ENQUEUE_REPLICA_WAIT_MS": "50"}
        called = subprocess.run(
            [sys.executable, "-m", "cli", "call", "refresh_all_materialized_views"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert called.returncode == 3 and "no replica acknowledged it within 50 ms" in called.stderr, called.stderr
        await redis.aclose(close_connection_pool=True)
    finally:
        server.kill()


async def test_a_durable_enqueue_that_reaches_a_replica_is_a_connection_fault(tmp_path: Path) -> None:
    """Just after a failover a Sentinel can still name the demoted master. An enqueue whose script wrote nothing
    there (its id was taken) would meet `WAIT` refused on a replica: it must read as a fault to retry, not as
    an unexpected error (a 500)."""
    from tests.private_redis import redis_server

    master = redis_server(tmp_path, "master").start()
    replica = redis_server(tmp_path, "replica", replica_of=master.port).start()
    try:
        settings = Settings(DATABASE_URL=os.environ["DATABASE_URL"], REDIS_URL=master.url)
        on_master = await open_redis(settings)
        now = jobstore.now_ms()
        job = JobPayload(jobstore.new_job_id(), "record", [], {"tag": "x"}, QUEUE, 5, now, now)
        assert await jobstore.enqueue(on_master, job, replica_wait_ms=2000)  # acknowledged: the replica has it
        on_replica = await open_redis(settings.model_copy(update={"redis_url": replica.url}))
        with pytest.raises(redis.exceptions.ConnectionError, match="now a replica"):
            await jobstore.enqueue(on_replica, job, replica_wait_ms=100)
        for client_ in (on_master, on_replica):
            await client_.aclose(close_connection_pool=True)
    finally:
        replica.kill()
        master.kill()
