"""Authorization in one place: the auth matrix over every route and GraphQL operation × {no token, expired,
revoked, read, trigger, admin} (job routes and mutations for an ordinary and an admin task), and the rules of
salesdash.auth that the job service applies for REST, GraphQL and the CLI alike."""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from db.queries.lifetime_values import latest_model
from db.queries.tokens import create_token, revoke_token
from salesdash import auth
from salesdash.auth import OPERATOR, ForbiddenError, Principal, Scope, scope_to_operate
from tests.conftest import ROOT
from tests.test_api import gql
from worker import client, registry

ORDINARY_TASK = "refresh_all_materialized_views"
ADMIN_TASK = "prune_job_history"
TOKENS = ("none", "expired", "revoked", "read", "trigger", "admin")
_COLUMNS = ("none", "read", "trigger", "admin")  # the expected-outcome tuples: a dead token fares as no token
KINDS = {"ordinary": ORDINARY_TASK, "admin": ADMIN_TASK}
TRIGGER_ONLY = Principal(frozenset({Scope.TRIGGER}))


@dataclass(frozen=True)
class Jobs:
    """One task's jobs in Redis before each call: a waiting one (to look at, abort, purge) and an aborted
    one (which may be retried)."""

    task: str
    queue: str
    queued: str
    aborted: str


async def make_jobs(redis: Redis, db: asyncpg.Pool, task: str) -> Jobs:
    queued = await client.enqueue_task(redis, OPERATOR, task)
    aborted = await client.enqueue_task(redis, OPERATOR, task)
    await client.abort_job(redis, db, OPERATOR, aborted.task_id)
    return Jobs(task, queued.queue, queued.task_id, aborted.task_id)


async def snapshot(redis: Redis) -> dict[bytes, bytes | None]:
    """Every key of the test db with its serialized value: equal snapshots mean nothing was written."""
    return {key: await redis.dump(key) for key in sorted(await redis.keys("*"))}


def expected_for(row: tuple[Any, Any, Any, Any], token: str) -> Any:
    return row[_COLUMNS.index("none" if token in ("expired", "revoked") else token)]


@pytest.fixture(scope="session")
async def dead_tokens(db: asyncpg.Pool) -> dict[str, dict[str, str]]:
    """An admin token that expired and one that was revoked: both must fare exactly as no token."""
    expired_id, expired = await create_token(db, "test-expired", "admin", timedelta(hours=1))
    await db.execute("UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = $1", expired_id)
    revoked_id, revoked = await create_token(db, "test-revoked", "admin")
    assert await revoke_token(db, revoked_id)
    return {"expired": {"Authorization": f"Bearer {expired}"}, "revoked": {"Authorization": f"Bearer {revoked}"}}


@pytest.fixture
def every_token(auth: dict[str, dict[str, str]], dead_tokens: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    return {**auth, **dead_tokens}


def headers(auth_headers: dict[str, dict[str, str]], token: str) -> dict[str, str]:
    return {} if token == "none" else auth_headers[token]


async def assert_effect(
    redis: Redis,
    db: asyncpg.Pool,
    effect: str | None,
    jobs: Jobs,
    before: dict[bytes, bytes | None],
    new_id: str | None,
) -> None:
    """What an allowed call must have done; a refused (or read-only) call must have changed nothing."""
    if effect is None:
        assert await snapshot(redis) == before
    elif effect in ("enqueue", "retry"):
        assert new_id and new_id not in (jobs.queued, jobs.aborted)
        status = await client.job_status(redis, db, new_id)
        assert (status.task_name, status.status) == (jobs.task, "queued")
    elif effect == "abort":
        assert (await client.job_status(redis, db, jobs.queued)).status == "aborted"
    elif effect == "purge":
        assert (await client.queue_overview(redis))[jobs.queue]["queued"] == 0
    else:
        raise AssertionError(effect)


# ---- REST ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RestOp:
    name: str
    path: Callable[[Jobs], str]
    codes: dict[str, tuple[int, int, int, int]]  # task kind → status for no token, read, trigger, admin
    effect: str | None = None  # what an allowed call does (None: reads nothing changes)
    body: Callable[[Jobs], dict[str, Any]] | None = None

    @property
    def method(self) -> str:
        return self.name.split()[0]


READS = (401, 200, 200, 200)
REST_OPS = [
    RestOp(
        "POST /jobs",
        lambda j: "/jobs",
        {"ordinary": (401, 403, 202, 202), "admin": (401, 403, 403, 202)},
        "enqueue",
        body=lambda j: {"task_name": j.task},
    ),
    RestOp("GET /jobs", lambda j: "/jobs", {"ordinary": READS, "admin": READS}),
    RestOp("GET /jobs/{id}", lambda j: f"/jobs/{j.queued}", {"ordinary": READS, "admin": READS}),
    RestOp(
        "DELETE /jobs/{id}",
        lambda j: f"/jobs/{j.queued}",
        {"ordinary": (401, 403, 200, 200), "admin": (401, 403, 403, 200)},
        "abort",
    ),
    RestOp(
        "POST /jobs/{id}/retry",
        lambda j: f"/jobs/{j.aborted}/retry",
        {"ordinary": (401, 403, 202, 202), "admin": (401, 403, 403, 202)},
        "retry",
    ),
    RestOp(
        "POST /queues/{queue}/purge",
        lambda j: f"/queues/{j.queue}/purge",
        {"ordinary": (401, 403, 403, 200), "admin": (401, 403, 403, 200)},
        "purge",
    ),
    RestOp("GET /queues", lambda j: "/queues", {"ordinary": READS, "admin": READS}),
    RestOp("GET /tasks", lambda j: "/tasks", {"ordinary": READS, "admin": READS}),
]


@pytest.mark.parametrize("token", TOKENS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", REST_OPS, ids=lambda op: op.name)
async def test_rest_auth_matrix(
    op: RestOp,
    kind: str,
    token: str,
    app_client: httpx.AsyncClient,
    clean_redis: Redis,
    db: asyncpg.Pool,
    every_token: dict[str, dict[str, str]],
) -> None:
    jobs = await make_jobs(clean_redis, db, KINDS[kind])
    before = await snapshot(clean_redis)
    response = await app_client.request(
        op.method, op.path(jobs), headers=headers(every_token, token), json=op.body(jobs) if op.body else None
    )
    expected = expected_for(op.codes[kind], token)
    assert response.status_code == expected, response.text
    if expected in (401, 403):
        assert response.json()["code"] == {401: "UNAUTHENTICATED", 403: "FORBIDDEN"}[expected]
    allowed = expected in (200, 202)
    new_id = response.json().get("task_id") if allowed and op.effect in ("enqueue", "retry") else None
    await assert_effect(clean_redis, db, op.effect if allowed else None, jobs, before, new_id)
    if op.effect == "purge" and allowed:
        assert response.json() == {"queue": jobs.queue, "removed": 1}


# ---- GraphQL -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GqlOp:
    field: str
    query: str
    variables: Callable[[Jobs], dict[str, Any]]
    outcomes: dict[str, tuple[str, str, str, str]]  # task kind → for no token, read, trigger, admin
    effect: str | None = None


ANYONE = ("UNAUTHENTICATED", "ok", "ok", "ok")
GQL_OPS = [
    GqlOp(
        "triggerBackgroundTask",
        "mutation($t: String!) { triggerBackgroundTask(taskName: $t) { success taskId message } }",
        lambda j: {"t": j.task},
        {
            "ordinary": ("UNAUTHENTICATED", "FORBIDDEN", "ok", "ok"),
            "admin": ("UNAUTHENTICATED", "FORBIDDEN", "FORBIDDEN", "ok"),
        },
        "enqueue",
    ),
    GqlOp(
        "taskStatus",
        "query($id: String!) { taskStatus(taskId: $id) { taskId status } }",
        lambda j: {"id": j.queued},
        {"ordinary": ANYONE, "admin": ANYONE},
    ),
    GqlOp(
        "backgroundTasks",
        "query { backgroundTasks { name scope } }",
        lambda j: {},
        {"ordinary": ANYONE, "admin": ANYONE},
    ),
    GqlOp(
        "abortTask",
        "mutation($id: String!) { abortTask(taskId: $id) { success message previousStatus } }",
        lambda j: {"id": j.queued},
        {
            "ordinary": ("UNAUTHENTICATED", "FORBIDDEN", "ok", "ok"),
            "admin": ("UNAUTHENTICATED", "FORBIDDEN", "FORBIDDEN", "ok"),
        },
        "abort",
    ),
    GqlOp(
        "retryTask",
        "mutation($id: String!) { retryTask(taskId: $id) { success taskId message } }",
        lambda j: {"id": j.aborted},
        {
            "ordinary": ("UNAUTHENTICATED", "FORBIDDEN", "ok", "ok"),
            "admin": ("UNAUTHENTICATED", "FORBIDDEN", "FORBIDDEN", "ok"),
        },
        "retry",
    ),
    GqlOp(
        "purgeQueue",
        "mutation($q: String!) { purgeQueue(queue: $q) { success message removed } }",
        lambda j: {"q": j.queue},
        {
            "ordinary": ("UNAUTHENTICATED", "FORBIDDEN", "FORBIDDEN", "ok"),
            "admin": ("UNAUTHENTICATED", "FORBIDDEN", "FORBIDDEN", "ok"),
        },
        "purge",
    ),
]


@pytest.mark.parametrize("token", TOKENS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", GQL_OPS, ids=lambda op: op.field)
async def test_graphql_auth_matrix(
    op: GqlOp,
    kind: str,
    token: str,
    app_client: httpx.AsyncClient,
    clean_redis: Redis,
    db: asyncpg.Pool,
    every_token: dict[str, dict[str, str]],
) -> None:
    jobs = await make_jobs(clean_redis, db, KINDS[kind])
    before = await snapshot(clean_redis)
    body = await gql(app_client, op.query, headers(every_token, token), **op.variables(jobs))
    expected = expected_for(op.outcomes[kind], token)
    if expected != "ok":
        assert [e["extensions"]["code"] for e in body["errors"]] == [expected], body
        assert (body["data"] or {}).get(op.field) is None  # a nullable field is null, else data is
        await assert_effect(clean_redis, db, None, jobs, before, None)
        return
    assert "errors" not in body, body
    data = body["data"][op.field]
    assert data, body
    if op.effect is None:
        await assert_effect(clean_redis, db, None, jobs, before, None)
        return
    assert data["success"] is True, data
    await assert_effect(clean_redis, db, op.effect, jobs, before, data.get("taskId"))
    if op.effect == "purge":
        assert data["removed"] == 1


# ---- every other route and GraphQL operation: read routes, open routes, pages -----------------------------------
READ_ROUTES = [
    ("GET", "/reports", 200),
    ("GET", "/reports/999999999", 404),
    ("GET", "/exports/0123456789abcdef", 404),
    ("GET", "/customers/lifetime-value-model", None),  # 200 once a model was fitted, else 404: asked of the db
    ("GET", "/dashboard", 200),
]
OPEN_ROUTES = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/openapi.json")]


@pytest.mark.parametrize("token", TOKENS)
async def test_rest_read_and_open_routes_matrix(
    token: str, app_client: httpx.AsyncClient, clean_redis: Redis, db: asyncpg.Pool, every_token: dict[str, Any]
) -> None:
    model_code = 200 if await latest_model(db) is not None else 404
    for method, path, allowed in READ_ROUTES:
        response = await app_client.request(method, path, headers=headers(every_token, token))
        expected = expected_for((401, allowed or model_code, allowed or model_code, allowed or model_code), token)
        assert response.status_code == expected, (path, response.text[:300])
    for method, path in OPEN_ROUTES:
        assert (await app_client.request(method, path, headers=headers(every_token, token))).status_code == 200, path
    graphiql = await app_client.get("/graphql", headers={"Accept": "text/html", **headers(every_token, token)})
    assert graphiql.status_code == expected_for((401, 200, 200, 200), token)


GQL_READS = [
    ("salesOverview", 'query { salesOverview(range: "today") { generatedAt } }'),
    ("hourlyMetrics", "query { hourlyMetrics(hours: 2) { generatedAt } }"),
    ("topProducts", 'query { topProducts(range: "today", limit: 3) { generatedAt } }'),
    ("topCategories", 'query { topCategories(range: "today", limit: 3) { generatedAt } }'),
    ("categoryBreakdown", 'query { categoryBreakdown(range: "today") { generatedAt } }'),
    ("customerSegments", "query { customerSegments { generatedAt } }"),
    ("lowStockProducts", "query { lowStockProducts { generatedAt } }"),
    ("__schema", "query { __schema { queryType { name } } }"),
]


@pytest.mark.parametrize("token", TOKENS)
async def test_graphql_read_operations_matrix(
    token: str, app_client: httpx.AsyncClient, clean_redis: Redis, every_token: dict[str, Any]
) -> None:
    for field, query in GQL_READS:
        body = await gql(app_client, query, headers(every_token, token))
        if expected_for(("UNAUTHENTICATED", "ok", "ok", "ok"), token) == "ok":
            assert "errors" not in body and body["data"][field], (field, body)
        else:
            assert [e["extensions"]["code"] for e in body["errors"]] == ["UNAUTHENTICATED"], (field, body)
            assert (body["data"] or {}).get(field) is None


# ---- the order of checks: authenticate, scope, then existence and state --------------------------------------
@pytest.mark.parametrize(("token", "code"), [("none", 401), ("read", 403), ("trigger", 404), ("admin", 404)])
async def test_unknown_job_ids(
    token: str, code: int, app_client: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    for method, path in (("DELETE", "/jobs/0123456789abcdef"), ("POST", "/jobs/0123456789abcdef/retry")):
        response = await app_client.request(method, path, headers=headers(auth, token))
        assert response.status_code == code, (method, path, response.text)
    assert await clean_redis.keys("*") == []


async def test_state_conflicts_come_after_the_scope_check(
    app_client: httpx.AsyncClient, clean_redis: Redis, db: asyncpg.Pool, auth: dict[str, dict[str, str]]
) -> None:
    ordinary, admin = await make_jobs(clean_redis, db, ORDINARY_TASK), await make_jobs(clean_redis, db, ADMIN_TASK)
    # allowed, but the job is in the wrong state: 409
    for jobs, token in ((ordinary, "trigger"), (admin, "admin")):
        assert (await app_client.delete(f"/jobs/{jobs.aborted}", headers=auth[token])).status_code == 409
        assert (await app_client.post(f"/jobs/{jobs.queued}/retry", headers=auth[token])).status_code == 409
    # not allowed: 403 whatever the state, so a refused caller learns nothing about the job
    assert (await app_client.delete(f"/jobs/{admin.aborted}", headers=auth["trigger"])).status_code == 403
    assert (await app_client.post(f"/jobs/{admin.queued}/retry", headers=auth["trigger"])).status_code == 403


async def test_purge_of_an_unknown_queue(
    app_client: httpx.AsyncClient, clean_redis: Redis, auth: dict[str, dict[str, str]]
) -> None:
    assert (await app_client.post("/queues/nope/purge", headers=auth["trigger"])).status_code == 403
    missing = await app_client.post("/queues/nope/purge", headers=auth["admin"])
    assert missing.status_code == 404 and "unknown queue 'nope'" in missing.text
    body = await gql(app_client, 'mutation { purgeQueue(queue: "nope") { success message removed } }', auth["admin"])
    assert body["data"]["purgeQueue"]["success"] is False and body["data"]["purgeQueue"]["removed"] is None


async def test_a_job_whose_task_left_the_registry_needs_admin(
    clean_redis: Redis, db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = await client.enqueue_task(clean_redis, OPERATOR, ORDINARY_TASK)
    monkeypatch.delitem(registry.TASKS, ORDINARY_TASK)
    with pytest.raises(ForbiddenError):
        await client.abort_job(clean_redis, db, TRIGGER_ONLY, job.task_id)
    assert await client.abort_job(clean_redis, db, OPERATOR, job.task_id) == "queued"


# ---- the service, whichever transport calls it (the CLI passes OPERATOR) --------------------------------------
async def test_the_service_checks_scopes_itself(clean_redis: Redis, db: asyncpg.Pool) -> None:
    reader = Principal(frozenset({Scope.READ}))
    with pytest.raises(ForbiddenError):
        await client.enqueue_task(clean_redis, reader, ORDINARY_TASK)
    with pytest.raises(ForbiddenError):
        await client.enqueue_task(clean_redis, TRIGGER_ONLY, ADMIN_TASK)
    jobs = await make_jobs(clean_redis, db, ADMIN_TASK)
    before = await snapshot(clean_redis)
    for refused in (
        client.abort_job(clean_redis, db, TRIGGER_ONLY, jobs.queued),
        client.retry_job(clean_redis, db, TRIGGER_ONLY, jobs.aborted),
        client.purge_queue(clean_redis, TRIGGER_ONLY, jobs.queue),
    ):
        with pytest.raises(ForbiddenError):
            await refused
    assert await snapshot(clean_redis) == before
    assert await client.purge_queue(clean_redis, OPERATOR, jobs.queue) == 1


def test_the_matrix_tasks_have_the_scopes_it_assumes() -> None:
    assert registry.TASKS[ORDINARY_TASK].scope is Scope.TRIGGER
    assert registry.TASKS[ADMIN_TASK].scope is Scope.ADMIN  # deletes job history (destructive tasks need admin)


def test_scopes_are_ordered_and_unknown_ones_grant_nothing() -> None:
    assert [Scope(s) for s in ("read", "trigger", "admin")] == list(Scope)
    assert registry.Scope is Scope  # type: ignore[attr-defined]  # one definition, used by the registry too
    admin, trigger = Principal.of(["admin"]), Principal.of(["trigger", "root"])
    assert all(admin.allows(s) for s in Scope) and admin == OPERATOR
    assert trigger.scopes == {Scope.TRIGGER} and not trigger.allows(Scope.ADMIN) and trigger.allows(Scope.READ)
    assert not Principal.of([]).allows(Scope.READ)
    assert [scope_to_operate(s) for s in (Scope.READ, Scope.TRIGGER, Scope.ADMIN, None)] == [
        Scope.TRIGGER,
        Scope.TRIGGER,
        Scope.ADMIN,
        Scope.ADMIN,
    ]


def test_the_foundation_module_imports_nothing_from_the_project() -> None:
    project = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    tree = ast.parse(Path(auth.__file__).read_text())
    imported = {n.name for node in ast.walk(tree) if isinstance(node, ast.Import) for n in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name.split(".")[0] for name in imported} & project, imported
