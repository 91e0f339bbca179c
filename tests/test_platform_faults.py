"""Issue 12: faults around the workers. Dependency outages are waited out without spending tries; a try that lost
its lease is fenced off; a Redis restart under load loses no job. Outages use private servers (private_servers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import redis.exceptions
from redis.asyncio import Redis

from db.migrate import upgrade
from salesdash.config import Settings
from salesdash.connections import open_redis
from tests.conftest import enqueue_job, wait_for
from tests.private_servers import PrivatePostgres, PrivateRedis, free_port
from tests.test_platform import QUEUE, SETTINGS, finished, status_of
from worker import client
from worker import jobstore as js
from worker.records import JobPayload, JobRecord, Progress, TryRecord
from worker.retry import dependency_backoff_s, dependency_down

OUTAGE_S = float(os.environ.get("SALESDASH_TEST_OUTAGE_SECONDS", "60"))
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
FAST_FAULTS = {"SALESDASH_LEASE_SECONDS": "2", "SALESDASH_DEPENDENCY_BACKOFF_CAP_SECONDS": "2"}


async def _started(redis: Redis, n: int) -> bool:
    return bool(await redis.llen("test:started") >= n)  # type: ignore[misc]


# ---- which faults are the dependencies' -------------------------------------------------------------------------
async def test_dependency_faults_are_told_from_the_jobs_own() -> None:
    closed = free_port()  # nothing listens here
    with pytest.raises(OSError) as pg_refused:
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{closed}/postgres", timeout=2)
    assert dependency_down(pg_refused.value) == "postgresql"
    try:
        raise RuntimeError("report failed") from pg_refused.value
    except RuntimeError as wrapped:
        assert dependency_down(wrapped) == "postgresql"  # a job that wraps the fault still waits

    unreachable = Redis(port=closed, socket_connect_timeout=1)
    with pytest.raises(redis.exceptions.ConnectionError) as redis_refused:
        await unreachable.ping()
    await unreachable.aclose()
    assert dependency_down(redis_refused.value) == "redis"

    with pytest.raises(OSError) as third_party:  # a webhook or SMTP server that is down: the job's own fault
        await asyncio.open_connection("127.0.0.1", closed)
    assert dependency_down(third_party.value) is None
    assert dependency_down(redis.exceptions.AuthenticationError("invalid password")) is None
    assert dependency_down(asyncpg.exceptions.CannotConnectNowError("the database system is starting up")) == (
        "postgresql"
    )
    assert dependency_down(ValueError("bad input")) is None
    assert dependency_down(TimeoutError()) is None


def test_dependency_backoff_grows_and_is_capped() -> None:
    import random

    rng = random.Random(7)
    delays = [dependency_backoff_s(n, 8, rng) for n in range(1, 9)]
    assert 0.5 <= delays[0] <= 1 and 1 <= delays[1] <= 2 and 2 <= delays[2] <= 4
    assert all(4 <= d <= 8 for d in delays[4:])


# ---- fencing, at the wire format ---------------------------------------------------------------------------------
async def test_a_try_that_lost_its_lease_cannot_write(clean_redis: Redis) -> None:
    keys = js.QueueKeys("fencing")
    job_id = await enqueue_job(clean_redis, "noop", "fencing")
    [first], _ = await js.claim(clean_redis, keys, 1, "host-a:1:aaaaaa", lease_ms=1)
    await asyncio.sleep(0.01)
    assert await js.sweep(clean_redis, keys) == [job_id]  # host a went quiet past its lease
    [second], _ = await js.claim(clean_redis, keys, 1, "host-b:2:bbbbbb", lease_ms=30_000, first_lease=7)
    assert first.lease != second.lease and second.lease == "host-b:2:bbbbbb#7"

    assert not await js.set_progress(clean_redis, job_id, "fencing", first.lease, Progress(fraction=0.9))
    assert await js.set_progress(clean_redis, job_id, "fencing", second.lease, Progress(fraction=0.5))
    lease_before = await clean_redis.zscore(keys.running, job_id)
    assert await js.renew_leases(clean_redis, keys, {job_id: first.lease}, 60_000) == {job_id: "lost"}
    assert await clean_redis.zscore(keys.running, job_id) == lease_before  # the old try extended nothing
    assert await js.renew_leases(clean_redis, keys, {job_id: second.lease}) == {job_id: "held"}

    job = js.decode_payload(job_id, js.deserialize_json(first.raw or b""), "fencing")
    winner = _final(job, "host-b:2:bbbbbb", "b's result", second.lease)
    loser = _final(job, "host-a:1:aaaaaa", "a's late result", first.lease)
    assert await js.finish(clean_redis, keys, [winner], js.serialize_json) == []
    assert await js.finish(clean_redis, keys, [winner], js.serialize_json) == []  # a retried call is no conflict
    assert await js.finish(clean_redis, keys, [loser], js.serialize_json) == [loser]
    record = await js.read_record(clean_redis, job_id)
    assert record is not None and record.result == "b's result" and record.worker_id == "host-b:2:bbbbbb"
    entries = [js.decode_history_entry(e) for e in await clean_redis.lrange(js.HISTORY_KEY, 0, -1)]  # type: ignore[misc]
    history = [h for h in entries if isinstance(h, JobRecord)]  # the rest: tries alone (a's lost, then fenced, try)
    assert [(h.job_id, h.result) for h in history] == [(job_id, "b's result")]
    assert [(t.outcome, t.worker_id) for t in entries if isinstance(t, TryRecord)] == [
        ("fenced", "host-a:1:aaaaaa"),
        ("lost", "host-a:1:aaaaaa"),
    ]


def _final(job: JobPayload, worker_id: str, result: str, lease: str) -> js.Outcome:
    record = js.job_record(job, "complete", tries=1, started_ms=js.now_ms(), worker_id=worker_id, result=result)
    return js.Outcome(job, "final", record, keep_result_ms=60_000, lease=lease)


async def test_history_rows_are_never_replaced_by_an_earlier_try(db: asyncpg.Pool) -> None:
    from db.queries.history import get_job_run, upsert_job_runs
    from worker.history import record_to_row

    job = JobPayload(js.new_job_id(), "noop", [], {}, "fencing", 5, js.now_ms(), js.now_ms())
    second = js.job_record(job, "complete", tries=2, started_ms=js.now_ms(), worker_id="b", result="b")
    first = js.job_record(job, "complete", tries=1, started_ms=js.now_ms(), worker_id="a", result="a")
    await upsert_job_runs(db, [record_to_row(second)])
    await upsert_job_runs(db, [record_to_row(first)])
    row = await get_job_run(db, job.id)
    assert row is not None and row["worker_id"] == "b" and row["tries"] == 2


# ---- fencing, with real workers ----------------------------------------------------------------------------------
async def test_a_paused_worker_cannot_overwrite_the_try_that_replaced_it(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any
) -> None:
    paused = spawn_worker(SETTINGS, extra_env=FAST_FAULTS)
    job_id = await enqueue_job(clean_redis, "sleep", QUEUE, {"seconds": 3, "tag": "fenced"})
    await wait_for(lambda: _started(clean_redis, 1), timeout=20)
    paused.send_signal(signal.SIGSTOP)
    try:
        replacement = spawn_worker(SETTINGS, extra_env=FAST_FAULTS)
        status = await finished(clean_redis, db, job_id, timeout=30)
        assert status["status"] == "complete" and status["result"]["pid"] == replacement.pid
        assert status["tries"] == 2  # the paused try counts as lost
    finally:
        paused.send_signal(signal.SIGCONT)
    first_result = await clean_redis.get(js.result_key(job_id))

    async def fenced() -> bool:
        return "fenced" in paused.log_path.read_text()

    await wait_for(fenced, timeout=20)  # the resumed worker learnt it lost the job, and said so
    await asyncio.sleep(1.5)  # a late write would land within a heartbeat or two of waking
    assert await clean_redis.get(js.result_key(job_id)) == first_result
    row = await wait_for(lambda: db.fetchrow("SELECT * FROM job_runs WHERE job_id = $1", job_id), timeout=15)
    assert row["tries"] == 2 and f":{replacement.pid}:" in row["worker_id"]
    assert paused.poll() is None  # it carries on serving
    after = await enqueue_job(clean_redis, "record", QUEUE, {"tag": "after"})
    assert (await finished(clean_redis, db, after))["status"] == "complete"


# ---- outages -----------------------------------------------------------------------------------------------------
@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        upgrade(server.url())
        yield server
    finally:
        server.close()


async def test_jobs_wait_out_a_postgres_outage_without_spending_tries(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any, private_postgres: PrivatePostgres
) -> None:
    env = {**FAST_FAULTS, "DATABASE_URL": private_postgres.url(), "TEST_MAX_JOBS": "10"}
    worker = spawn_worker(SETTINGS, extra_env=env)
    ids = [await enqueue_job(clean_redis, "needs_db", QUEUE, {"tag": f"q{i}", "pause": 1}) for i in range(20)]
    await wait_for(lambda: _started(clean_redis, 10), timeout=30)
    await asyncio.to_thread(private_postgres.stop)  # while ten of them run, ten wait
    down_at = time.monotonic()

    seen_waiting: dict[str, dict[str, Any]] = {}

    async def all_seen_waiting() -> bool:
        for job_id in set(ids) - set(seen_waiting):
            status = await status_of(clean_redis, db, job_id)
            assert status["status"] != "failed", status
            if status["waiting_for"] == "postgresql":
                seen_waiting[job_id] = status
        return len(seen_waiting) == len(ids)

    late = spawn_worker(SETTINGS, extra_env=env)  # a worker (re)started during the outage starts all the same

    await wait_for(all_seen_waiting, timeout=40, interval=0.05)
    for waiting in seen_waiting.values():  # shown as waiting for the database, no try spent
        assert waiting["status"] == "deferred" and waiting["tries"] == 0
        assert waiting["error"].startswith("waiting for PostgreSQL")
    await asyncio.sleep(max(OUTAGE_S - (time.monotonic() - down_at), 0))
    assert all([(await status_of(clean_redis, db, i))["status"] != "failed" for i in ids])
    await asyncio.to_thread(private_postgres.start)

    for i, job_id in enumerate(ids):
        status = await finished(clean_redis, db, job_id, timeout=30)
        assert (status["status"], status["result"], status["tries"]) == ("complete", f"q{i}", 1)
    assert worker.poll() is None and "job waiting for a dependency" in worker.log_path.read_text()
    assert late.poll() is None and "postgresql unreachable at start" in late.log_path.read_text()
    assert any(w.pid == late.pid for w in await client.workers(clean_redis))
    history = await asyncpg.connect(private_postgres.url())
    try:
        rows = await wait_for(lambda: _complete_rows(history, ids), timeout=20)
        assert {r["tries"] for r in rows} == {1}
    finally:
        await history.close()


async def _complete_rows(conn: asyncpg.Connection, ids: list[str]) -> list[Any] | None:
    rows = await conn.fetch("SELECT * FROM job_runs WHERE job_id = any($1) AND status = 'complete'", ids)
    return rows if len(rows) == len(ids) else None


async def test_a_dependency_down_past_the_budget_spends_tries(
    clean_redis: Redis, db: asyncpg.Pool, spawn_worker: Any
) -> None:
    env = {**FAST_FAULTS, "SALESDASH_DEPENDENCY_WAIT_SECONDS": "1.5", "SALESDASH_DEPENDENCY_BACKOFF_CAP_SECONDS": "1"}
    spawn_worker(SETTINGS, extra_env=env)
    job_id = await enqueue_job(clean_redis, "needs_missing_db", QUEUE, {"port": free_port()})

    async def waiting() -> dict[str, Any] | None:
        status = await status_of(clean_redis, db, job_id)
        return status if status["waiting_for"] == "postgresql" else None

    seen = await wait_for(waiting, timeout=15, interval=0.05)
    assert seen["status"] == "deferred" and seen["tries"] == 0
    status = await finished(clean_redis, db, job_id, timeout=30)
    assert status["status"] == "failed" and status["tries"] == 2  # then its two tries, and no more
    assert "ConnectionRefusedError" in status["error"] or "Connect" in status["error"]


@contextlib.asynccontextmanager
async def _client_of(server: PrivateRedis) -> AsyncIterator[Redis]:
    connection = await open_redis(Settings(DATABASE_URL=os.environ["DATABASE_URL"], REDIS_URL=server.url()))
    try:
        yield connection
    finally:
        await connection.aclose(close_connection_pool=True)


async def test_a_redis_that_lost_its_scripts_gets_them_again() -> None:
    """Scripts live in the server's memory only (a restart, a failover, SCRIPT FLUSH): the next call loads its script
    again and goes on."""
    server = PrivateRedis()
    try:
        await asyncio.to_thread(server.start)
        async with _client_of(server) as redis:
            first = await enqueue_job(redis, "record", QUEUE, {"tag": "before"})
            await redis.script_flush()
            second = await enqueue_job(redis, "record", QUEUE, {"tag": "after"})
            for job_id in (first, second):
                status = await js.live_status(redis, job_id, [QUEUE])
                assert status is not None and status.status == "queued"
    finally:
        server.close()


async def test_no_job_is_lost_when_redis_restarts_under_load(db: asyncpg.Pool, spawn_worker: Any) -> None:
    server = PrivateRedis()
    try:
        await asyncio.to_thread(server.start)
        worker = spawn_worker(SETTINGS, extra_env={**FAST_FAULTS, "REDIS_URL": server.url()})
        async with _client_of(server) as redis:  # the worker is up and serving before the load starts
            warm_up = await enqueue_job(redis, "record", QUEUE, {"tag": "warm-up"})
            assert (await finished(redis, db, warm_up, timeout=30))["status"] == "complete"
        acked, unsure = await _enqueue_through_a_restart(server)
        assert len(acked) > 100
        async with _client_of(server) as redis:
            for job_id in acked:
                assert (await finished(redis, db, job_id, timeout=60))["status"] == "complete"
            for job_id in unsure:  # sent while Redis died: either never stored, or run like the others
                status = await js.live_status(redis, job_id, [QUEUE])
                assert status is None or status.status in ("complete", "queued", "in_progress")
        assert worker.poll() is None and "redis unreachable" in worker.log_path.read_text()
    finally:
        server.close()


async def _enqueue_through_a_restart(server: PrivateRedis) -> tuple[list[str], list[str]]:
    """Enqueue for ~6 s while Redis is killed at 2 s and back at 3.5 s. Returns the ids Redis acknowledged and those
    whose enqueue failed midway (stored or not: unknown)."""
    acked: list[str] = []
    unsure: list[str] = []
    started = time.monotonic()
    killed = restarted = False
    async with _client_of(server) as conn:
        while (elapsed := time.monotonic() - started) < 6:
            if elapsed > 2 and not killed:
                server.kill()
                killed = True
            if elapsed > 3.5 and not restarted:
                await asyncio.to_thread(server.start)
                restarted = True
            job_id = js.new_job_id()
            try:
                await enqueue_job(conn, "sleep", QUEUE, {"seconds": 0.05, "tag": "load"}, job_id=job_id)
                acked.append(job_id)
            except REDIS_DOWN:
                unsure.append(job_id)
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.01)
    return acked, unsure
