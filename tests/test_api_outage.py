"""Dependencies down (issue 10, point 3): PostgreSQL stopped, then Redis stopped, under a running API: every route
answers 503 with Retry-After and a body naming the server that is down (or, when it does not need that server,
what it answered before), never 500; /readyz fails; the API recovers by itself when the server is back.

The servers are private ones (tests/private_servers.py); the machine's are never stopped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from arq.connections import RedisSettings, create_pool
from fastapi import FastAPI

from api.main import create_app
from db.migrate import upgrade
from db.queries.tokens import create_token
from salesdash.auth import OPERATOR
from salesdash.config import get_settings
from salesdash.connections import open_db_pool
from tests.private_db import settings_for
from tests.private_servers import PrivatePostgres, PrivateRedis
from worker import client

PG, REDIS, AUTH = "postgres", "redis", "auth"  # AUTH: the token, checked in PostgreSQL once, then cached


@dataclass(frozen=True)
class Jobs:
    queued: str
    aborted: str


@dataclass(frozen=True)
class Call:
    method: str
    route: str  # the route's path template, to check every route is here
    needs: frozenset[str]
    path: Callable[[Jobs], str] = field(default=lambda j: "")
    json: dict[str, Any] | None = None
    data: dict[str, str] | None = None

    def url(self, jobs: Jobs) -> str:
        return self.path(jobs) or self.route


def _gql(query: str) -> dict[str, Any]:
    return {"query": query}


CALLS = [
    Call("POST", "/jobs", frozenset({AUTH, REDIS}), json={"task_name": "check_low_stock_products"}),
    Call("GET", "/jobs", frozenset({AUTH, REDIS, PG})),
    Call("GET", "/jobs/{task_id}", frozenset({AUTH, REDIS}), lambda j: f"/jobs/{j.queued}"),
    Call("DELETE", "/jobs/{task_id}", frozenset({AUTH, REDIS}), lambda j: f"/jobs/{j.aborted}"),
    Call("POST", "/jobs/{task_id}/retry", frozenset({AUTH, REDIS}), lambda j: f"/jobs/{j.aborted}/retry"),
    Call("POST", "/queues/{queue}/purge", frozenset({AUTH, REDIS}), lambda j: "/queues/maintenance/purge"),
    Call("GET", "/queues", frozenset({AUTH, REDIS})),
    Call("GET", "/tasks", frozenset({AUTH})),
    Call("GET", "/reports", frozenset({AUTH, PG})),
    Call("GET", "/reports/{report_id}", frozenset({AUTH, PG}), lambda j: "/reports/1"),
    Call("GET", "/exports/{task_id}", frozenset({AUTH, REDIS}), lambda j: f"/exports/{j.queued}"),
    Call("GET", "/customers/lifetime-value-model", frozenset({AUTH, PG})),
    Call("GET", "/dashboard", frozenset({AUTH})),  # the page itself; its data comes from /dashboard/api
    Call("POST", "/dashboard/login", frozenset({AUTH, REDIS}), data={"token": "TOKEN"}),  # a session in Redis
    Call("POST", "/dashboard/logout", frozenset()),  # without a session cookie: nothing to end
    Call("GET", "/dashboard/dashboard.js", frozenset()),
    Call("GET", "/dashboard/api/overview", frozenset({AUTH, REDIS, PG})),
    Call("GET", "/dashboard/api/jobs", frozenset({AUTH, REDIS, PG})),
    Call("GET", "/dashboard/api/jobs/{job_id}", frozenset({AUTH, REDIS}), lambda j: f"/dashboard/api/jobs/{j.queued}"),
    Call("GET", "/dashboard/api/tasks", frozenset({AUTH})),
    Call("GET", "/dashboard/api/sales", frozenset({AUTH, REDIS})),  # cached by the healthy round
    Call("POST", "/dashboard/api/jobs", frozenset({AUTH, REDIS}), json={"task_name": "check_low_stock_products"}),
    Call(
        "POST",
        "/dashboard/api/jobs/{job_id}/abort",
        frozenset({AUTH, REDIS}),
        lambda j: f"/dashboard/api/jobs/{j.aborted}/abort",
    ),
    Call(
        "POST",
        "/dashboard/api/jobs/{job_id}/retry",
        frozenset({AUTH, REDIS}),
        lambda j: f"/dashboard/api/jobs/{j.aborted}/retry",
    ),
    Call(
        "POST",
        "/dashboard/api/queues/{queue}/purge",
        frozenset({AUTH, REDIS}),
        lambda j: "/dashboard/api/queues/maintenance/purge",
    ),
    Call("GET", "/notifications", frozenset({AUTH, PG})),
    Call("GET", "/healthz", frozenset()),
    Call("GET", "/readyz", frozenset({PG, REDIS})),
    Call("GET", "/metrics", frozenset({REDIS})),
    Call("GET", "/graphql", frozenset({AUTH}), lambda j: "/graphql?query={backgroundTasks{name}}"),
    Call("POST", "/graphql", frozenset({AUTH}), json=_gql("{ backgroundTasks { name } }")),
    Call(
        "POST",
        "/graphql",
        frozenset({AUTH, REDIS}),
        lambda j: "/graphql?redis",
        json=_gql('mutation { triggerBackgroundTask(taskName: "check_low_stock_products") { success } }'),
    ),
    # memoized by the healthy round (api/graphql_memo.py): answered from the memo while Redis confirms it, whatever
    # PostgreSQL does; with Redis down, the 503 naming it
    Call(
        "POST",
        "/graphql",
        frozenset({AUTH, REDIS}),
        lambda j: "/graphql?memo",
        json=_gql('{ salesOverview(range: "today") { orders } }'),
    ),
]


def every_route(app: FastAPI) -> set[tuple[str, str]]:
    """The OpenAPI document's operations (it lists every route but GraphQL's, which has its own schema)."""
    documented = {(m.upper(), path) for path, operations in app.openapi()["paths"].items() for m in operations}
    return documented | {("GET", "/graphql"), ("POST", "/graphql")}


@pytest.fixture
async def servers() -> AsyncIterator[tuple[PrivatePostgres, PrivateRedis]]:
    pg, redis_server = PrivatePostgres(), PrivateRedis()
    try:
        pg.start()
        redis_server.start()
        await asyncio.to_thread(upgrade, pg.url())
        yield pg, redis_server
    finally:
        pg.close()
        redis_server.close()


async def test_every_route_answers_503_naming_the_server_that_is_down_and_recovers(
    servers: tuple[PrivatePostgres, PrivateRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With PostgreSQL down, a route that needs only Redis still answers (the token was verified before the outage
    and is cached); every route that needs the server that is down answers 503."""
    pg, redis_server = servers
    monkeypatch.setattr(get_settings(), "trigger_rate_per_minute", 0)  # the probes trigger often; no 429s here
    # the memo looks in Redis at every hit and waits for the look: no answer from the second before the outage
    monkeypatch.setattr("api.graphql_memo.REVALIDATE_S", 0.0)
    monkeypatch.setattr("api.graphql_memo.STALE_S", 0.0)
    app = create_app()
    assert every_route(app) == {(c.method, c.route) for c in CALLS}  # a new route needs a row here
    app.state.db = await open_db_pool(settings_for(pg.url()), max_size=4)
    app.state.redis = await create_pool(RedisSettings(port=redis_server.port))
    token = (await create_token(app.state.db, "outage", "admin"))[1]
    queued = await client.enqueue_task(app.state.redis, OPERATOR, "refresh_all_materialized_views")
    aborted = await client.enqueue_task(app.state.redis, OPERATOR, "refresh_all_materialized_views")
    await client.abort_job(app.state.redis, app.state.db, OPERATOR, aborted.task_id)
    jobs = Jobs(queued.task_id, aborted.task_id)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=20) as http:
            probe = Probe(http, token, jobs)
            healthy = await probe.statuses()
            assert all(status < 500 for status in healthy), healthy

            pg.stop()
            await probe.expect_down(PG, healthy)
            pg.start()
            await probe.expect_recovered(healthy)

            redis_server.kill()
            await probe.expect_down(REDIS, healthy)
            redis_server.start()
            await probe.expect_recovered(healthy)
    finally:
        await app.state.redis.aclose(close_connection_pool=True)
        await app.state.db.close()


@dataclass
class Probe:
    http: httpx.AsyncClient
    token: str
    jobs: Jobs

    async def call(self, call: Call) -> httpx.Response:
        data = {k: v.replace("TOKEN", self.token) for k, v in (call.data or {}).items()} or None
        self.http.cookies.clear()  # each call stands alone (no dashboard session carried over)
        return await self.http.request(
            call.method,
            call.url(self.jobs),
            json=call.json,
            data=data,
            headers={"Authorization": f"Bearer {self.token}"},
            follow_redirects=False,
        )

    async def statuses(self) -> list[int]:
        return [(await self.call(call)).status_code for call in CALLS]

    async def expect_down(self, down: str, healthy: list[int]) -> None:
        for call, healthy_status in zip(CALLS, healthy, strict=True):
            response = await self.call(call)
            needed = down in call.needs
            if response.status_code == 503:
                assert needed, (call, response.text)
                assert response.headers["Retry-After"].isdigit(), call
                body = response.json()
                if call.route == "/readyz":
                    assert body[down] == "unreachable" and body["ready"] is False
                else:
                    assert body["code"] == "UNAVAILABLE" and body["dependency"] == down, (call, body)
                    assert {"postgres": "PostgreSQL", "redis": "Redis"}[down] in body["detail"]
            else:
                assert not needed and response.status_code == healthy_status, (down, call, response.text)

    async def expect_recovered(self, healthy: list[int], timeout: float = 15) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while (now := await self.statuses()) != healthy:
            answers = list(zip([c.url(self.jobs) for c in CALLS], now, strict=True))
            assert asyncio.get_running_loop().time() < deadline, answers
            await asyncio.sleep(0.2)
