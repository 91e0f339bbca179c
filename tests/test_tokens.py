"""API tokens (issue 10): verified tokens cached per process, `last_used_at` written in batches off the request
path, revocation within the cache time, expiry at once, Redis-only routes while PostgreSQL is unreachable."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from api import auth as api_auth
from api.auth import TokenVerifier
from db.queries.tokens import (
    ActiveToken,
    active_token,
    create_token,
    hash_token,
    revoke_token,
    revoke_tokens_named,
)
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


async def test_one_lookup_per_token_within_the_cache_time(db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    _, token = await create_token(db, "cached", "trigger")
    looked_up: list[str] = []

    async def counted(conn: asyncpg.Pool, token_hash: str) -> ActiveToken | None:
        looked_up.append(token_hash)
        return await active_token(conn, token_hash)

    monkeypatch.setattr(api_auth, "active_token", counted)
    verifier = TokenVerifier(cache_s=60)
    principals = await asyncio.gather(*(verifier.authenticate(db, f"Bearer {token}") for _ in range(50)))
    principals.append(await verifier.authenticate(db, f"Bearer {token}"))
    assert {p.scopes for p in principals} == {frozenset({Scope.TRIGGER})}
    assert looked_up == [hash_token(token)]  # single flight: 51 requests, one query


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


# ---- the CLI and `salesdash up` ------------------------------------------------------------------------------
def test_cli_creates_expiring_tokens_and_lists_use_and_expiry() -> None:
    from tests.test_cli import salesdash

    created = salesdash("token", "create", "--name", "nightly", "--scope", "trigger", "--expires-in", "2h", "--json")
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)
    expires = datetime.fromisoformat(token["expires_at"])
    assert timedelta(hours=1, minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=2)
    listed = {t["id"]: t for t in json.loads(salesdash("token", "list", "--json").stdout)}
    mine = listed[token["id"]]
    assert mine["active"] is True and mine["last_used_at"] is None
    assert abs(datetime.fromisoformat(mine["expires_at"]) - expires) < timedelta(seconds=5)
    bad = salesdash("token", "create", "--name", "x", "--expires-in", "soon")
    assert bad.returncode == 2 and "duration 'soon'" in bad.stderr


async def test_up_revokes_the_tokens_of_earlier_runs_and_its_own(db: asyncpg.Pool) -> None:
    from cli.up import UP_TOKEN_PREFIX, _api_command, _revoke

    left_behind, _ = await create_token(db, f"{UP_TOKEN_PREFIX}2026-01-01 00:00:00", "admin")
    other, _ = await create_token(db, "salesdash upgrade bot", "admin")  # only `salesdash up ` names match
    assert await revoke_tokens_named(db, UP_TOKEN_PREFIX) >= 1
    current, _ = await create_token(db, f"{UP_TOKEN_PREFIX}2026-01-02 00:00:00", "admin")
    await _revoke(current)
    revoked = dict(
        await db.fetch(
            "SELECT id, revoked_at IS NOT NULL FROM api_tokens WHERE id = ANY($1)", [left_behind, other, current]
        )
    )
    assert revoked == {left_behind: True, other: False, current: True}
    assert "--workers" not in _api_command("127.0.0.1", 8000, 1)
    assert _api_command("127.0.0.1", 8000, 2)[-2:] == ["--workers", "2"]
