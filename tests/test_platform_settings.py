"""The arq settings a user would set work for real; the ones the engine would ignore are refused by name; the
engine runs only on the arq it was written for. Real worker processes where processes matter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.connections import ArqRedis, create_pool
from arq.jobs import SerializationError
from redis.asyncio import Redis

from salesdash.connections import LazyRedisSettings
from tests import platform_worker
from tests.conftest import ROOT, wait_for
from worker import engine


def test_settings_the_engine_would_ignore_are_refused_by_name() -> None:
    with pytest.raises(engine.SettingsError, match=r"RefusedSettings.poll_delay = 0.1 .*does not poll|polling"):
        engine.check_settings(platform_worker.RefusedSettings)
    with pytest.raises(engine.SettingsError, match="max_job = 4 .*no such arq setting"):
        engine.check_settings({"max_job": 4})  # a typo arq itself would drop without a word
    engine.check_settings({"poll_delay": 0.5, "max_jobs": 4})  # arq's default, spelled out: harmless


def test_a_worker_with_refused_settings_stops_at_start_with_the_reason() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "arq", "tests.platform_worker.RefusedSettings"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "RefusedSettings.poll_delay = 0.1 is not honoured by the salesdash engine" in run.stderr


def test_the_engine_refuses_another_arq(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "ARQ_VERSION", "0.29.1")
    with pytest.raises(SystemExit, match="extends arq 0.28.x, but arq 0.29.1 is installed"):
        engine.install_engine()


@pytest.fixture
async def marked_pool(clean_redis: Redis) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(
        LazyRedisSettings(),
        job_serializer=platform_worker.marked_serializer,
        job_deserializer=platform_worker.marked_deserializer,
    )
    yield pool
    await pool.aclose(close_connection_pool=True)


async def test_hooks_serializers_timeouts_tries_expiry_and_health_come_from_the_settings(
    marked_pool: ArqRedis, spawn_worker: Any
) -> None:
    queue = platform_worker.HookSettings.queue_name
    spawn_worker("tests.platform_worker.HookSettings")
    greeting = await marked_pool.enqueue_job("greet", "ada", _queue_name=queue)
    hung = await marked_pool.enqueue_job("hang", _queue_name=queue)
    flaky = await marked_pool.enqueue_job("flaky", "test:hooks:flaky", 5, _queue_name=queue)
    assert greeting is not None and hung is not None and flaky is not None
    # the payload went through the user's serializer and the result comes back through it
    assert await greeting.result(timeout=30, poll_delay=0.05) == "hello ada"
    raw = await marked_pool.get(f"arq:result:{greeting.job_id}")
    assert raw.startswith(b"SD1")
    assert 0 < await marked_pool.pttl(f"arq:result:{greeting.job_id}") <= 2000  # keep_result = 2
    await wait_for(lambda: _hooks(marked_pool, greeting.job_id, 4))
    assert await _hooks(marked_pool, greeting.job_id, 4) == ["start", "run", "end", "after:1"]
    # this deserializer does not turn a failure into an exception, so arq raises SerializationError with it
    with pytest.raises(SerializationError, match="hang timed out after 1s"):  # job_timeout = 1
        await hung.result(timeout=30, poll_delay=0.05)
    with pytest.raises(SerializationError, match="ConnectionError"):
        await flaky.result(timeout=30, poll_delay=0.05)
    assert int(await marked_pool.get("test:hooks:flaky")) == 2  # max_tries = 2
    health = f"{queue}:health-check"
    await wait_for(lambda: marked_pool.exists(health))
    assert 0 < await marked_pool.pttl(health) <= 4000  # health_check_interval = 2, plus a heartbeat and a second


async def _hooks(redis: Redis, job_id: str, at_least: int) -> list[str] | None:
    events = [e.decode() for e in await redis.lrange(f"test:hooks:{job_id}", 0, -1)]  # type: ignore[misc]
    return events if len(events) >= at_least else None
