"""Triggers from the API (issue 10): idempotency keys per token, the per-token rate limit shared through Redis,
and one Redis round trip per enqueue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from api.auth import TokenVerifier
from db.queries.tokens import create_token
from salesdash.auth import OPERATOR
from salesdash.config import get_settings
from tests.test_api import gql
from worker import client, jobstore

TASK = "refresh_all_materialized_views"
OTHER = "refresh_realtime_materialized_views"
TRIGGER = """mutation($t: String!, $key: String, $p: Int! = 5) {
  triggerBackgroundTask(taskName: $t, idempotencyKey: $key, priority: $p) { success taskId message } }"""


def _app(db: asyncpg.Pool, redis: Redis) -> FastAPI:
    from api.main import create_app

    app = create_app()
    app.state.db, app.state.redis = db, redis
    app.state.tokens = TokenVerifier(cache_s=60)
    return app


@pytest.fixture
async def api(db: asyncpg.Pool, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_app(db, redis))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


@pytest.fixture
async def bearer(db: asyncpg.Pool) -> dict[str, str]:
    """A fresh trigger token per test: its own rate bucket and its own idempotency keys."""
    return {"Authorization": f"Bearer {(await create_token(db, 'guards', 'trigger'))[1]}"}


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> Any:
    def set_limits(**values: Any) -> None:
        for name, value in values.items():
            monkeypatch.setattr(get_settings(), name, value)

    return set_limits


async def _queued(redis: Redis) -> int:
    return sum([(await jobstore.queue_counts(redis, q))["queued"] for q in client.QUEUES])


# ---- idempotency ---------------------------------------------------------------------------------------------
async def test_the_same_key_returns_the_first_job(
    api: httpx.AsyncClient, clean_redis: Redis, bearer: dict[str, str]
) -> None:
    headers = {**bearer, "Idempotency-Key": "nightly-2026-12-01"}
    first = await api.post("/jobs", json={"task_name": TASK}, headers=headers)
    again = await api.post("/jobs", json={"task_name": TASK}, headers=headers)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert await _queued(clean_redis) == 1


async def test_the_same_key_with_other_arguments_is_a_conflict(
    api: httpx.AsyncClient, clean_redis: Redis, bearer: dict[str, str]
) -> None:
    headers = {**bearer, "Idempotency-Key": "k1"}
    assert (await api.post("/jobs", json={"task_name": TASK}, headers=headers)).status_code == 202
    for body in ({"task_name": OTHER}, {"task_name": TASK, "priority": 7}, {"task_name": TASK, "defer_seconds": 60}):
        conflict = await api.post("/jobs", json=body, headers=headers)
        assert conflict.status_code == 409 and "Idempotency-Key" in conflict.json()["detail"], body
    assert await _queued(clean_redis) == 1


async def test_keys_belong_to_their_token(
    api: httpx.AsyncClient, clean_redis: Redis, bearer: dict[str, str], auth: dict[str, dict[str, str]]
) -> None:
    mine = await api.post("/jobs", json={"task_name": TASK}, headers={**bearer, "Idempotency-Key": "shared"})
    theirs = await api.post("/jobs", json={"task_name": OTHER}, headers={**auth["admin"], "Idempotency-Key": "shared"})
    assert mine.status_code == theirs.status_code == 202 and mine.json()["task_id"] != theirs.json()["task_id"]


async def test_a_key_lasts_its_window(
    api: httpx.AsyncClient, clean_redis: Redis, bearer: dict[str, str], limits: Any
) -> None:
    limits(idempotency_window_s=1)
    headers = {**bearer, "Idempotency-Key": "short"}
    first = await api.post("/jobs", json={"task_name": TASK}, headers=headers)
    await asyncio.sleep(1.1)
    later = await api.post("/jobs", json={"task_name": TASK}, headers=headers)
    assert later.status_code == 202 and later.json()["task_id"] != first.json()["task_id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "line\nbreak"])
async def test_bad_keys_are_refused_before_enqueue(
    key: str, api: httpx.AsyncClient, clean_redis: Redis, bearer: dict[str, str]
) -> None:
    # httpx refuses to send a header with a newline or a non-ASCII character, so those go to the service directly
    if key.isascii() and key.isprintable():
        refused = await api.post("/jobs", json={"task_name": TASK}, headers={**bearer, "Idempotency-Key": key})
        assert refused.status_code == 422 and "idempotency-key" in refused.text.lower()  # named, in any shape
    with pytest.raises(ValueError, match="Idempotency-Key"):
        await client.enqueue_task(clean_redis, OPERATOR, TASK, idempotency_key=key)
    assert await clean_redis.keys("*") == []


async def test_graphql_idempotency_key(api: httpx.AsyncClient, clean_redis: Redis, bearer: dict[str, str]) -> None:
    first = (await gql(api, TRIGGER, bearer, t=TASK, key="g1"))["data"]["triggerBackgroundTask"]
    again = (await gql(api, TRIGGER, bearer, t=TASK, key="g1"))["data"]["triggerBackgroundTask"]
    assert first["success"] and again["taskId"] == first["taskId"]
    conflict = await gql(api, TRIGGER, bearer, t=TASK, key="g1", p=9)
    assert [e["extensions"]["code"] for e in conflict["errors"]] == ["IDEMPOTENCY_CONFLICT"]
    assert await _queued(clean_redis) == 1


# ---- rate limit ----------------------------------------------------------------------------------------------
async def test_a_burst_then_429_with_retry_after(
    api: httpx.AsyncClient, clean_redis: Redis, bearer: dict[str, str], limits: Any
) -> None:
    limits(trigger_rate_per_minute=6, trigger_burst=3)  # one every 10 s: no slow test run refills the bucket
    keyed = {**bearer, "Idempotency-Key": "first"}
    codes = [
        (await api.post("/jobs", json={"task_name": TASK}, headers=h)).status_code for h in (keyed, bearer, bearer)
    ]
    assert codes == [202, 202, 202]
    # a refused request (bad input) costs nothing from the bucket
    assert (await api.post("/jobs", json={"task_name": TASK, "priority": 99}, headers=bearer)).status_code == 422
    limited = await api.post("/jobs", json={"task_name": TASK}, headers=bearer)
    assert limited.status_code == 429 and limited.headers["Retry-After"] in ("9", "10"), limited.text
    assert "too many triggers" in limited.json()["detail"]
    gql_limited = await gql(api, TRIGGER, bearer, t=TASK)
    assert [e["extensions"]["code"] for e in gql_limited["errors"]] == ["RATE_LIMITED"]
    assert gql_limited["errors"][0]["extensions"]["retryAfter"] in (9, 10)
    # a replay enqueues nothing, so it is answered even now
    replay = await api.post("/jobs", json={"task_name": TASK}, headers=keyed)
    assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert await _queued(clean_redis) == 3


async def test_the_bucket_refills_at_the_rate(
    api: httpx.AsyncClient, clean_redis: Redis, bearer: dict[str, str], limits: Any
) -> None:
    limits(trigger_rate_per_minute=60, trigger_burst=1)
    assert (await api.post("/jobs", json={"task_name": TASK}, headers=bearer)).status_code == 202
    limited = await api.post("/jobs", json={"task_name": TASK}, headers=bearer)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    await asyncio.sleep(1.05)  # one trigger back per second at 60 a minute
    assert (await api.post("/jobs", json={"task_name": TASK}, headers=bearer)).status_code == 202


async def test_the_limit_is_shared_by_api_processes_and_per_token(
    db: asyncpg.Pool, redis: Redis, clean_redis: Redis, bearer: dict[str, str], limits: Any
) -> None:
    limits(trigger_rate_per_minute=6, trigger_burst=2)
    one, two = (httpx.ASGITransport(app=_app(db, redis)) for _ in range(2))  # two APIs, each its own token cache
    async with (
        httpx.AsyncClient(transport=one, base_url="http://a") as a,
        httpx.AsyncClient(transport=two, base_url="http://b") as b,
    ):
        codes = [(await http.post("/jobs", json={"task_name": TASK}, headers=bearer)).status_code for http in (a, b, a)]
        assert codes == [202, 202, 429]
        other = {"Authorization": f"Bearer {(await create_token(db, 'other', 'trigger'))[1]}"}
        assert (await b.post("/jobs", json={"task_name": TASK}, headers=other)).status_code == 202
        retry_after = int((await b.post("/jobs", json={"task_name": TASK}, headers=bearer)).headers["Retry-After"])
        assert 9 <= retry_after <= 10  # 6 a minute: one every 10 s


async def test_the_operator_is_not_rate_limited(clean_redis: Redis, limits: Any) -> None:
    limits(trigger_rate_per_minute=1, trigger_burst=1)
    for _ in range(5):
        await client.enqueue_task(clean_redis, OPERATOR, TASK)
    assert await _queued(clean_redis) == 5


async def test_rate_zero_turns_the_limit_off(
    api: httpx.AsyncClient, clean_redis: Redis, bearer: dict[str, str], limits: Any
) -> None:
    limits(trigger_rate_per_minute=0, trigger_burst=1)
    codes = {(await api.post("/jobs", json={"task_name": TASK}, headers=bearer)).status_code for _ in range(5)}
    assert codes == {202} and not await clean_redis.keys("salesdash:rate:*")


# ---- one round trip ------------------------------------------------------------------------------------------
async def test_a_trigger_is_one_redis_command_and_no_postgres(
    api: httpx.AsyncClient, clean_redis: Redis, bearer: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = {**bearer, "Idempotency-Key": "counted"}
    assert (await api.post("/jobs", json={"task_name": OTHER}, headers=bearer)).status_code == 202  # token cached
    await api.post("/jobs", json={"task_name": OTHER}, headers=headers)  # the script is loaded
    sent: list[str] = []
    real = clean_redis.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return await real(*args, **options)

    monkeypatch.setattr(clean_redis, "execute_command", counting)
    app_db = api._transport.app.state  # type: ignore[attr-defined]
    app_db.db = None  # any PostgreSQL use on the hot path would now fail
    assert (
        await api.post("/jobs", json={"task_name": TASK}, headers=headers | {"Idempotency-Key": "n"})
    ).status_code == 202
    assert (
        await api.post("/jobs", json={"task_name": TASK}, headers=headers | {"Idempotency-Key": "n"})
    ).status_code == 202
    assert sent == ["EVALSHA", "EVALSHA"]


async def test_a_rate_too_fast_to_measure_in_ms_still_works(
    api: httpx.AsyncClient, clean_redis: Redis, bearer: dict[str, str], limits: Any
) -> None:
    # an interval far below 1 ms: the key's expiry rounds up to 1 ms instead of an invalid 0 (which was a 500)
    limits(trigger_rate_per_minute=1e12, trigger_burst=1)
    codes = {(await api.post("/jobs", json={"task_name": TASK}, headers=bearer)).status_code for _ in range(5)}
    assert codes == {202}
