"""Browser-facing security (issue 10): dashboard sessions held server-side, GraphiQL and introspection behind a
token and switchable off, security headers on HTML answers, CORS only for configured origins."""

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
from api.sessions import COOKIE
from db.queries.tokens import create_token, hash_token, revoke_token
from salesdash.config import get_settings
from tests.test_api import gql
from worker.sessionstore import session_key

INTROSPECTION = "query { __schema { queryType { name } } }"
HTML = {"Accept": "text/html"}


def _app(db: asyncpg.Pool, redis: Redis, **settings: Any) -> FastAPI:
    from api.main import create_app

    app = create_app(get_settings().model_copy(update=settings))
    app.state.db, app.state.redis = db, redis
    app.state.tokens = TokenVerifier(cache_s=0.3)
    return app


@pytest.fixture
async def browser(db: asyncpg.Pool, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    """A client over HTTPS, which keeps the cookies it is given as a browser would."""
    transport = httpx.ASGITransport(app=_app(db, redis))
    async with httpx.AsyncClient(transport=transport, base_url="https://salesdash.test") as http:
        yield http


async def _client(app: FastAPI, base: str = "http://test") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base)


# ---- sessions ------------------------------------------------------------------------------------------------
async def test_sign_in_starts_a_server_side_session(
    browser: httpx.AsyncClient, clean_redis: Redis, tokens: dict[str, str]
) -> None:
    login = await browser.post("/dashboard/login", data={"token": tokens["read"]})
    assert login.status_code == 303 and login.headers["location"] == "/dashboard"
    cookie = login.headers["set-cookie"]
    session_id = login.cookies[COOKIE]
    assert tokens["read"] not in cookie and hash_token(tokens["read"]) not in cookie
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "secure", "max-age", "path"} <= attributes and "samesite=strict" in cookie.lower()
    assert f"Max-Age={get_settings().session_ttl_s}" in cookie
    # stored in Redis under a hash of the id, expiring with the cookie; it holds the token's hash, not the token
    assert await clean_redis.get(session_key(session_id)) == hash_token(tokens["read"]).encode()
    assert 0 < await clean_redis.ttl(session_key(session_id)) <= get_settings().session_ttl_s
    assert session_id.encode() not in b"".join(await clean_redis.keys("*"))
    page = await browser.get("/dashboard")
    assert page.status_code == 200 and "salesdash · operations" in page.text


async def test_no_secure_flag_over_plain_http(
    db: asyncpg.Pool, redis: Redis, clean_redis: Redis, tokens: dict[str, str]
) -> None:
    async with await _client(_app(db, redis)) as http:
        login = await http.post("/dashboard/login", data={"token": tokens["read"]})
    assert COOKIE in login.headers["set-cookie"] and "secure" not in login.headers["set-cookie"].lower()


async def test_a_refused_token_gets_no_session(browser: httpx.AsyncClient, clean_redis: Redis) -> None:
    for token in ("sd_wrong", ""):
        login = await browser.post("/dashboard/login", data={"token": token})
        assert login.status_code in (401, 422) and "set-cookie" not in login.headers
    assert await clean_redis.keys("salesdash:session:*") == []
    assert (await browser.get("/dashboard")).status_code == 401


async def test_sign_out_and_expiry_end_the_session(
    browser: httpx.AsyncClient, clean_redis: Redis, tokens: dict[str, str]
) -> None:
    await browser.post("/dashboard/login", data={"token": tokens["read"]})
    session_id = browser.cookies[COOKIE]
    out = await browser.post("/dashboard/logout")
    assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]
    assert await clean_redis.exists(session_key(session_id)) == 0
    browser.cookies.clear()
    browser.cookies.set(COOKIE, session_id)  # a copied cookie is worth nothing once its session is gone
    refused = await browser.get("/dashboard")
    assert refused.status_code == 401 and "sign in again" in refused.text
    # expiry is Redis's: a session whose key expired is the same as one signed out
    browser.cookies.clear()
    await browser.post("/dashboard/login", data={"token": tokens["read"]})
    await clean_redis.pexpire(session_key(browser.cookies[COOKIE]), 1)
    await asyncio.sleep(0.01)
    assert (await browser.get("/dashboard")).status_code == 401


async def test_revoking_the_token_ends_its_sessions(
    browser: httpx.AsyncClient, db: asyncpg.Pool, clean_redis: Redis
) -> None:
    token_id, token = await create_token(db, "browser", "read")
    await browser.post("/dashboard/login", data={"token": token})
    assert (await browser.get("/dashboard")).status_code == 200
    await revoke_token(db, token_id)
    await asyncio.sleep(0.35)  # the test app's token cache time
    assert (await browser.get("/dashboard")).status_code == 401


async def test_a_bearer_header_wins_over_the_cookie(
    browser: httpx.AsyncClient, clean_redis: Redis, tokens: dict[str, str]
) -> None:
    await browser.post("/dashboard/login", data={"token": tokens["read"]})
    assert (await browser.get("/dashboard", headers={"Authorization": "Bearer sd_wrong"})).status_code == 401


# ---- GraphiQL and introspection ------------------------------------------------------------------------------
async def test_graphiql_needs_a_token_or_a_session(
    browser: httpx.AsyncClient, clean_redis: Redis, tokens: dict[str, str], auth: dict[str, dict[str, str]]
) -> None:
    anonymous = await browser.get("/graphql", headers=HTML)
    assert anonymous.status_code == 401 and "sign in" in anonymous.text and "unpkg.com" not in anonymous.text
    assert "unpkg.com/graphiql" in (await browser.get("/graphql", headers=HTML | auth["read"])).text
    await browser.post("/dashboard/login", data={"token": tokens["read"]})
    assert "unpkg.com/graphiql" in (await browser.get("/graphql", headers=HTML)).text
    # GraphiQL's own requests carry the session cookie
    body = (await browser.post("/graphql", json={"query": "{ backgroundTasks { name } }"})).json()
    assert body["data"]["backgroundTasks"], body


async def test_introspection_needs_a_token(
    browser: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    anonymous = await gql(browser, INTROSPECTION)
    assert anonymous["data"] is None and [e["extensions"]["code"] for e in anonymous["errors"]] == ["UNAUTHENTICATED"]
    hidden = await gql(browser, 'query { ...F } fragment F on Query { __type(name: "Query") { name } }')
    assert [e["extensions"]["code"] for e in hidden["errors"]] == ["UNAUTHENTICATED"]
    assert (await gql(browser, INTROSPECTION, auth["read"]))["data"]["__schema"]["queryType"]["name"] == "Query"


async def test_graphiql_and_introspection_can_be_switched_off(
    db: asyncpg.Pool, redis: Redis, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    app = _app(db, redis, graphiql=False, graphql_introspection=False)
    async with await _client(app) as http:
        assert (await http.get("/graphql", headers=HTML | auth["admin"])).status_code == 404
        refused = await gql(http, INTROSPECTION, auth["admin"])
        assert "introspection" in refused["errors"][0]["message"].lower()
        assert (await gql(http, "{ backgroundTasks { name } }", auth["read"]))["data"]["backgroundTasks"]


# ---- headers -------------------------------------------------------------------------------------------------
async def test_every_html_answer_has_the_security_headers(
    browser: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    answers = [
        await browser.get("/dashboard"),
        await browser.get("/dashboard", headers=auth["read"]),
        await browser.get("/graphql", headers=HTML),
        await browser.get("/graphql", headers=HTML | auth["read"]),
        await browser.get("/docs"),
        await browser.get("/redoc"),
    ]
    for answer in answers:
        assert answer.headers["content-type"].startswith("text/html"), answer.request.url
        csp = answer.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["x-frame-options"] == "DENY"
    as_json = await browser.get("/tasks", headers=auth["read"])
    assert as_json.headers["x-content-type-options"] == "nosniff" and "content-security-policy" not in as_json.headers


async def test_cors_is_off_unless_origins_are_configured(
    db: asyncpg.Pool, redis: Redis, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
    async with await _client(_app(db, redis)) as http:
        answer = await http.options("/jobs", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
        got = await http.get("/tasks", headers=auth["read"] | {"Origin": "https://ui.example"})
        assert got.status_code == 200 and "access-control-allow-origin" not in got.headers
    async with await _client(_app(db, redis, cors_origins="https://ui.example, https://other.example")) as http:
        allowed = await http.options("/jobs", headers=preflight | {"Access-Control-Request-Headers": "idempotency-key"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://ui.example"
        stranger = await http.options("/jobs", headers=preflight | {"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in stranger.headers
