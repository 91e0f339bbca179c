"""API tokens (issue 10): verified tokens cached per process, `last_used_at` written in batches off the request
path, revocation within the cache time, expiry at once, Redis-only routes while PostgreSQL is unreachable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from api.auth import TokenVerifier
from db.queries.tokens import create_token, hash_token, revoke_token
from salesdash.auth import Scope, UnauthenticatedError
from salesdash.periods import parse_duration

CACHE_S = 0.5


@pytest.fixture
async def app(db: asyncpg.Pool, redis: Redis) -> FastAPI:
    from api.main import create_app

    app = create_app()
    app.state.db, app.state.redis = db, redis
    app.state.tokens = TokenVerifier(cache_s=CACHE_S, stale_s=0)
    return app


@pytest.fixture
async def api(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


async def _last_used(db: asyncpg.Pool, token_id: int) -> object:
    return await db.fetchval("SELECT last_used_at FROM api_tokens WHERE id = $1", token_id)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_requests_do_not_write_last_used_until_the_batch_flush(
    api: httpx.AsyncClient, app: FastAPI, db: asyncpg.Pool, clean_redis: Redis
) -> None:
    token_id, token = await create_token(db, "batched", "read")
    for _ in range(5):
        assert (await api.get("/queues", headers=_bearer(token))).status_code == 200
    assert await _last_used(db, token_id) is None  # nothing written on the request path
    assert await app.state.tokens.flush_last_used(db) == 1  # one token, one row in one statement
    first = await _last_used(db, token_id)
    assert first is not None
    assert await app.state.tokens.flush_last_used(db) == 0  # no use since: no write
    assert (await api.get("/queues", headers=_bearer(token))).status_code == 200
    await app.state.tokens.flush_last_used(db)
    assert await _last_used(db, token_id) > first  # type: ignore[operator]


async def test_one_lookup_per_token_within_the_cache_time(db: asyncpg.Pool) -> None:
    _, token = await create_token(db, "cached", "trigger")
    verifier = TokenVerifier(cache_s=60)
    before = await db.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    principals = await asyncio.gather(*(verifier.authenticate(db, f"Bearer {token}") for _ in range(50)))
    assert {p.scopes for p in principals} == {frozenset({Scope.TRIGGER})}
    # single flight: 50 concurrent requests cost one query (plus this test's own two reads)
    await asyncio.sleep(0.6)  # pg_stat counters are published by each backend at most every 500 ms
    after = await db.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    assert after - before <= 4, after - before


async def test_revocation_takes_effect_within_the_cache_time(
    api: httpx.AsyncClient, db: asyncpg.Pool, clean_redis: Redis
) -> None:
    token_id, token = await create_token(db, "to revoke", "read")
    assert (await api.get("/tasks", headers=_bearer(token))).status_code == 200
    assert await revoke_token(db, token_id)
    assert (await api.get("/tasks", headers=_bearer(token))).status_code == 200  # still cached
    await asyncio.sleep(CACHE_S + 0.1)
    refused = await api.get("/tasks", headers=_bearer(token))
    assert refused.status_code == 401 and refused.json()["code"] == "UNAUTHENTICATED"


async def test_an_expired_token_is_refused_at_once_even_when_cached(db: asyncpg.Pool) -> None:
    _, token = await create_token(db, "short lived", "read", timedelta(seconds=1))
    verifier = TokenVerifier(cache_s=60)
    assert (await verifier.authenticate(db, f"Bearer {token}")).allows(Scope.READ)
    await asyncio.sleep(1.1)
    with pytest.raises(UnauthenticatedError, match="expired"):
        await verifier.authenticate(db, f"Bearer {token}")


async def test_unknown_tokens_are_cached_too_and_never_grow_without_bound(db: asyncpg.Pool) -> None:
    verifier = TokenVerifier(cache_s=60)
    for header in (None, "", "Basic abc", "Bearer ", "Bearer sd_nope"):
        with pytest.raises(UnauthenticatedError):
            await verifier.authenticate(db, header)
    assert list(verifier._cache) == [hash_token("sd_nope")]


async def _unreachable_pool() -> asyncpg.Pool:
    """A pool whose every connection attempt is refused: nothing listens on port 1."""
    pool = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/postgres", min_size=0, max_size=1)
    assert pool is not None
    return pool


async def test_redis_only_routes_work_while_postgres_is_unreachable(
    api: httpx.AsyncClient, app: FastAPI, db: asyncpg.Pool, clean_redis: Redis
) -> None:
    token_id, token = await create_token(db, "outage", "trigger")
    _, stranger = await create_token(db, "never seen", "trigger")
    assert (await api.get("/queues", headers=_bearer(token))).status_code == 200  # verified and cached
    app.state.tokens.stale_s = 30  # past its cache time the entry is kept while PostgreSQL cannot be asked
    app.state.db = await _unreachable_pool()
    try:
        await asyncio.sleep(CACHE_S + 0.1)
        assert (await api.get("/queues", headers=_bearer(token))).status_code == 200
        job = await api.post("/jobs", json={"task_name": "refresh_all_materialized_views"}, headers=_bearer(token))
        assert job.status_code == 202, job.text
        with pytest.raises(OSError):  # a token never verified cannot be (i10-errors turns this into a 503)
            await app.state.tokens.authenticate(app.state.db, f"Bearer {stranger}")
        with pytest.raises(OSError):  # uses stay pending while PostgreSQL is down ...
            await app.state.tokens.flush_last_used(app.state.db)
    finally:
        await app.state.db.close()
        app.state.db = db
    assert await app.state.tokens.flush_last_used(db) == 1  # ... and are written once it is back
    assert await _last_used(db, token_id) is not None


async def test_without_stale_grace_the_outage_ends_the_cached_trust(db: asyncpg.Pool) -> None:
    _, token = await create_token(db, "strict", "read")
    verifier = TokenVerifier(cache_s=0.2, stale_s=0)
    await verifier.authenticate(db, f"Bearer {token}")
    down = await _unreachable_pool()
    try:
        await verifier.authenticate(down, f"Bearer {token}")  # within the cache time: no query at all
        await asyncio.sleep(0.3)
        with pytest.raises(OSError):
            await verifier.authenticate(down, f"Bearer {token}")
    finally:
        await down.close()


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("2W", 1209600)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0", "-5m", "1.5h", "10y", "h"])
def test_bad_durations_are_named(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)
